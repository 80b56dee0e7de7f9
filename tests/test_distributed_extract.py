"""extract with --devices 2: the embedding spread over two CPU processes (Lightning's predict loop under
DDP, gloo) gives the embeddings, classifier and metrics of one process. The 2-process run starts real
processes (the CLI in a subprocess, which Lightning's "ddp" launcher runs again as rank 1): about
half a minute on an idle 2-core machine, per engine."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from transferlab import ImageFolderData, train
from transferlab.errors import ConfigError
from transferlab.training.strategies import configure

from conftest import TINY_BACKBONE

COMMON = {"backbone": TINY_BACKBONE, "weights": "none", "batch_size": 8, "precision": "32",
          "audit": False}


def shards(cache_dir) -> list[dict[str, np.ndarray]]:
    return [load_file(str(path)) for path in sorted((cache_dir / "embeddings").glob("*/shard-*"))]


# auto: torch (a graph pays only from graphs.AUTO_BUILD_IMAGES images); onnx: the ranks run the graph
# the main process built and checked before it started the other
@pytest.mark.parametrize("engine", ["auto", "onnx"])
def test_two_processes_embed_and_fit_like_one(engine, image_folder, tmp_path):
    one = train(image_folder, out=tmp_path / "one", cache_dir=str(tmp_path / "cache-one"),
                show_progress=False, engine=engine, **COMMON)
    command = [sys.executable, "-m", "transferlab.cli", "train", str(image_folder), "--backbone",
               TINY_BACKBONE, "--weights", "none", "--batch-size", "8", "--precision", "32",
               "--no-audit", "--devices", "2", "--distributed", "ddp", "--accelerator", "cpu",
               "--engine", engine, "--cache-dir", str(tmp_path / "cache-two"),
               "--out", str(tmp_path / "two")]
    two = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory:") == 1  # rank 1 ends without a result of its own

    # each process stored its share (a shard or more each): every image once, no padding duplicates
    written = shards(tmp_path / "cache-two")
    hashes = {image.sha256 for image in ImageFolderData(image_folder, cache_dir=None).scan.images}
    assert len(written) >= 2 and sum(map(len, written)) == len(hashes)
    single = {k: v for shard in shards(tmp_path / "cache-one") for k, v in shard.items()}
    spread = {k: v for shard in written for k, v in shard.items()}
    assert set(spread) == set(single) == hashes
    gap = max(float(np.abs(single[h] - spread[h]).max()) for h in hashes)
    print(f"max |embedding difference| between 1 and 2 processes: {gap:.2e}")
    assert gap < 1e-4  # one thread per rank against two: only the order of float sums differs

    first, second = one.metrics, json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert second["engine"]["name"] == first["engine"]["name"] == (
        "torch" if engine == "auto" else engine)
    if engine == "onnx":  # checked once, before the spread, and recorded
        assert second["engine"]["parity"]["passed"] and second["engine"]["classifier_parity"]
        # the main process built it before it started rank 1, which loaded it
        assert two.stderr.count("building the onnx (fp32) graph") == 1
    for split in ("val", "test"):
        assert first[split]["accuracy"] == second[split]["accuracy"]
        assert first[split]["loss"] == pytest.approx(second[split]["loss"], abs=1e-3)
    assert second["timing"]["embedded"] == len(hashes) and second["timing"]["cached"] == 0
    assert second["distribution"] == {"accelerator": "cpu", "devices": 2, "num_nodes": 1,
                                      "strategy": "ddp"}
    heads = [load_file(str(run / "model" / "model.safetensors")) for run in (tmp_path / "one",
                                                                             tmp_path / "two")]
    head_keys = [k for k in heads[0] if k.startswith("head.")]
    assert head_keys
    for key in head_keys:  # the scaler is folded into the weights: large values, relative error
        scale = float(np.abs(heads[0][key]).max())
        assert float(np.abs(heads[0][key] - heads[1][key]).max()) <= 1e-4 * scale, key
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.parametrize("options, message", [
    ({"devices": 2, "cache_dir": None}, "devices=2, num_nodes=1 with the cache off"),
    ({"num_nodes": 2, "cache_dir": None}, "devices=1, num_nodes=2 with the cache off"),
    ({"devices": 2, "cache_dir": "c", "distributed": "fsdp"}, "distributed='fsdp': extract's frozen"),
])
def test_distributed_extract_refuses_what_cannot_work(options, message):
    with pytest.raises(ConfigError, match=message):
        configure("extract", {"backbone": TINY_BACKBONE, "weights": "none", **options})


def test_extract_takes_the_distribution_options():
    _, config = configure("extract", {"backbone": TINY_BACKBONE, "weights": "none", "devices": 2,
                                      "num_nodes": 1, "distributed": "ddp_spawn",
                                      "cache_dir": "c", "accelerator": "cpu"})
    assert (config.devices, config.num_nodes, config.distributed) == (2, 1, "ddp_spawn")


def test_a_rank_whose_graph_strays_stores_nothing_in_the_graphs_cache(tmp_path, caplog):
    """A rank's engine answering as something other than what the cache holds (its own graph fell
    back to torch on its first batch) stores nothing there, warns once and runs no more batches;
    the main process embeds what is missing."""
    import torch
    from torch import nn

    from transferlab.data.transforms import Preprocessing
    from transferlab.inference.embeddings import EmbeddingCache, ShardWriter
    from transferlab.inference.engines import TorchEngine
    from transferlab.training.distributed_embedding import CacheFiller

    pre = Preprocessing(input_size=(3, 32, 32))
    module = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    calls = []

    class Counted(TorchEngine):
        def __call__(self, images, precision="32"):
            calls.append(len(images))
            return super().__call__(images, precision)

    engine = Counted(module, pre, torch.device("cpu"))
    cache = EmbeddingCache.for_model(tmp_path, module, pre, torch.device("cpu"), "onnx-fp32")
    paths, hashes = [tmp_path / f"{i}.png" for i in range(4)], [f"{i:064x}" for i in range(4)]
    filler = CacheFiller(lambda device: engine, "32", cache, "onnx-fp32", paths, hashes, False)
    filler.engine, filler.writer = engine, ShardWriter(cache, keep=False)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with caplog.at_level("WARNING"):
        for first in (0, 2):
            assert filler.predict_step((torch.tensor([first, first + 1]), images, ["", ""]), 0) == 0
    filler.writer.close()
    assert calls == [2] and cache.index() == {}
    assert caplog.text.count("graph differs from torch, so it stores nothing") == 1


def test_each_rank_runs_the_checked_engine_or_the_same_one_made_for_its_device(monkeypatch):
    """A rank on the device the main process checked its engine on (the CPU) runs that engine; a
    rank on another device (cuda:1, say) gets the same engine, by name, made for its device."""
    import torch

    from transferlab.inference.graphs import GraphEngine
    from transferlab.training import distributed_embedding

    made = []
    monkeypatch.setattr(distributed_embedding, "compile_engine",
                        lambda spec, engine, **options: made.append((engine, options["device"])))
    graph = GraphEngine.__new__(GraphEngine)
    graph.name, graph.fallback, graph.device = "onnx", None, torch.device("cpu")
    rank_engine = distributed_embedding._rank_engine
    assert rank_engine(graph, "spec", "32", "cache", torch.device("cpu")) is graph and not made
    rank_engine(graph, "spec", "32", "cache", torch.device("cuda", 1))
    graph.fallback = "differs from torch fp32"
    rank_engine(graph, "spec", "32", "cache", torch.device("cuda", 2))
    assert made == [("onnx", torch.device("cuda", 1)), ("torch", torch.device("cuda", 2))]
