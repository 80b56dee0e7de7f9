"""--engine: the torch network compiled once into an ONNX Runtime or OpenVINO graph, cached, checked
against torch fp32 before use, and torch whenever that fails (inference/graphs.py)."""

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from transferlab.cli import app
from transferlab.data.folder import ImageFolderData
from transferlab.data.transforms import Preprocessing
from transferlab.devices import cpu_has_native_bf16
from transferlab.errors import ConfigError, ExportError
from transferlab.inference import graphs
from transferlab.inference.backends import load_model
from transferlab.inference.embeddings import embed_files
from transferlab.inference.engines import TorchEngine, torch_threads
from transferlab.inference.predictor import Predictor
from transferlab.inference.trust import Trust
from transferlab.inference.graphs import (AUTO_BUILD_IMAGES, GraphEngine, GraphSpec, choose_engine,
                                          compile_engine)

from conftest import TINY_BACKBONE

PRE = Preprocessing(input_size=(3, 32, 32))
CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


def tiny_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()).eval()


def spec(seed: int = 0) -> GraphSpec:
    return GraphSpec(tiny_backbone(seed), PRE, (graphs.FEATURES,))


def pixels(count: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (count, *PRE.input_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


@pytest.fixture
def builds(monkeypatch):
    """The TorchScript exporter in place of the torch.export one, which takes a minute even for these
    tiny modules (test_export tests that one); returns the list of graphs built, which grows by one
    per export."""
    built = []

    def export(module, input_size, path, outputs, opset=graphs.DEFAULT_OPSET):
        built.append(path)
        torch.onnx.export(module.eval(), (torch.zeros(2, *input_size),), str(path), dynamo=False,
                          opset_version=17, input_names=[graphs.INPUT], output_names=list(outputs),
                          dynamic_axes={graphs.INPUT: {0: "batch"}})

    monkeypatch.setattr(graphs, "export_onnx_graph", export)
    return built


def _fake_installed(monkeypatch, engines, providers=("CPUExecutionProvider",)):
    real = graphs.available

    def available(name, device):
        return name == "torch" or (name in engines and real(name, device))

    monkeypatch.setattr(graphs, "available", available)
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(providers))


def test_auto_follows_the_table_per_device(monkeypatch):
    _fake_installed(monkeypatch, {"onnx", "openvino"})
    cached = lambda name: True  # noqa: E731
    assert choose_engine("auto", CPU, cached=cached) == "openvino"
    assert choose_engine("auto", CPU) == "torch"  # nothing cached, too few images to build for
    assert choose_engine("auto", CPU, images=AUTO_BUILD_IMAGES) == "openvino"
    assert choose_engine("auto", CPU, cached=lambda name: name == "onnx") == "onnx"
    assert choose_engine("auto", CUDA, cached=cached) == "torch"  # onnxruntime without CUDA
    assert choose_engine("auto", MPS, cached=cached) == "torch"
    assert choose_engine("torch", CPU) == "torch"
    _fake_installed(monkeypatch, {"onnx"}, ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert choose_engine("auto", CPU, cached=cached) == "onnx"  # no openvino
    assert choose_engine("auto", CUDA, cached=cached) == "onnx"  # onnxruntime-gpu
    with pytest.raises(ConfigError, match="engine='openvino': needs openvino"):
        choose_engine("openvino", CPU)


def test_autos_first_cpu_engine_is_installed_with_transferlab_on_x86_64():
    """auto can only pick the fastest engine if it is there: openvino comes with a plain
    `pip install transferlab` on x86-64 (where it was measured), and only with the extra elsewhere."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    core = [Requirement(line) for line in requires("transferlab") if "extra ==" not in line]
    engines = [req for req in core if req.name == graphs.AUTO_ORDER["cpu"][0]]
    assert len(engines) == 1
    marker = engines[0].marker
    assert marker.evaluate({"platform_machine": "x86_64", "sys_platform": "linux"})
    assert marker.evaluate({"platform_machine": "AMD64", "sys_platform": "win32"})
    assert not marker.evaluate({"platform_machine": "aarch64", "sys_platform": "linux"})


def test_openvino_on_a_gpu_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="runs on the CPU, not cuda; use --engine auto or torch"):
        choose_engine("openvino", CUDA)


def test_graph_is_built_once_and_reused(builds, tmp_path):
    model = spec()
    first = compile_engine(model, "onnx", cache_dir=tmp_path, precision="32")
    second = compile_engine(model, "onnx", cache_dir=tmp_path, precision="32")
    assert isinstance(first, GraphEngine) and isinstance(second, GraphEngine)
    assert len(builds) == 1
    expected = TorchEngine(model.module, PRE)(pixels(), "32")
    torch.testing.assert_close(second(pixels()), expected, rtol=1e-4, atol=1e-5)
    assert second.report()["parity"]["passed"] and second.report()["name"] == "onnx"
    # a cached graph is used by auto too, whatever the number of images
    assert compile_engine(model, "auto", cache_dir=tmp_path, precision="32").name in (
        "onnx", "openvino")


def test_key_names_the_weights_engine_and_precision():
    assert spec(0).key("onnx", "fp32") == spec(0).key("onnx", "fp32")
    assert spec(0).key("onnx", "fp32") != spec(1).key("onnx", "fp32")
    assert spec(0).key("openvino", "bf16") != spec(0).key("openvino", "f32")
    assert spec(0).key("onnx", "fp32") != GraphSpec(spec(0).module, Preprocessing(), (
        graphs.FEATURES,)).key("onnx", "fp32")


def test_damaged_graph_is_rebuilt(builds, tmp_path, caplog):
    model = spec()
    compile_engine(model, "onnx", cache_dir=tmp_path)
    graph = graphs.GraphCache(tmp_path, model, CPU).file("onnx", "fp32")
    graph.write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING):
        engine = compile_engine(model, "onnx", cache_dir=tmp_path)
    assert len(builds) == 2 and isinstance(engine, GraphEngine)
    assert "rebuilding the damaged onnx graph" in caplog.text
    assert engine(pixels()).shape == (4, 8)


def test_a_graph_that_cannot_be_built_leaves_torch_running(monkeypatch, tmp_path, caplog):
    def broken(*args, **kwargs):
        raise ExportError("torch.onnx.export failed (no)")

    monkeypatch.setattr(graphs, "export_onnx_graph", broken)
    with caplog.at_level(logging.WARNING):
        engine = compile_engine(spec(), "onnx", cache_dir=tmp_path)
    assert isinstance(engine, TorchEngine)
    assert "engine onnx (fp32) not used" in caplog.text and "torch runs instead" in caplog.text
    assert not list((tmp_path / "engines").iterdir())  # nothing half-built left behind


def test_a_graph_that_strays_from_torch_is_set_aside(caplog):
    module = tiny_backbone()
    reference = TorchEngine(module, PRE)
    wrong = GraphEngine(lambda images: torch.randn(len(images), 8), reference, "onnx", "fp32",
                        classifier=False)
    with caplog.at_level(logging.WARNING):
        outputs = wrong(pixels(), "32")
    torch.testing.assert_close(outputs, reference(pixels(), "32"))
    assert wrong.report()["name"] == "torch" and not wrong.report()["parity"]["passed"]
    assert "differs from torch fp32" in caplog.text


def test_fp32_asked_of_a_bf16_graph_is_answered_by_torch():
    reference = TorchEngine(tiny_backbone(), PRE)
    graph = GraphEngine(lambda images: reference(images, "32") + 1e-3, reference, "openvino",
                        "bf16", classifier=False)
    torch.testing.assert_close(graph(pixels(), "32"), reference(pixels(), "32"))
    torch.testing.assert_close(graph(pixels(), "bf16"), reference(pixels(), "32") + 1e-3)


def test_openvino_graph_comes_from_the_cached_onnx_one(builds, tmp_path):
    pytest.importorskip("openvino")
    model = spec()
    engine = compile_engine(model, "openvino", cache_dir=tmp_path, precision="auto")
    assert engine.precision == ("bf16" if cpu_has_native_bf16() else "f32")
    assert compile_engine(model, "onnx", cache_dir=tmp_path).name == "onnx"
    assert len(builds) == 1  # the ONNX graph, converted once for OpenVINO and reused by onnx
    torch.testing.assert_close(engine(pixels(), "bf16"),
                               TorchEngine(model.module, PRE)(pixels(), "32"), rtol=0.05, atol=0.02)


def test_embedding_cache_is_kept_per_engine(builds, image_folder, tmp_path):
    images = ImageFolderData(image_folder).scan.images[:6]
    paths, hashes = [im.path for im in images], [im.sha256 for im in images]
    module = tiny_backbone()
    by_torch, stats = embed_files(module, paths, hashes, PRE, cache_dir=tmp_path, engine="torch",
                                  precision="32", show_progress=False)
    assert stats.engine["name"] == "torch" and stats.embedded == 6
    by_onnx, stats = embed_files(module, paths, hashes, PRE, cache_dir=tmp_path, engine="onnx",
                                 precision="32", show_progress=False)
    assert stats.embedded == 6 and stats.cached == 0  # not torch's entries
    assert stats.engine["name"] == "onnx" and stats.engine["parity"]["mean_cosine"] > 0.999
    assert len(list((tmp_path / "embeddings").iterdir())) == 2
    np.testing.assert_allclose(by_onnx, by_torch, rtol=1e-4, atol=1e-5)
    _, stats = embed_files(module, paths, hashes, PRE, cache_dir=tmp_path, engine="onnx",
                           precision="32", show_progress=False)
    assert stats.cached == 6 and len(builds) == 1


def test_auto_embedding_builds_a_graph_only_for_many_images_torch_has_not_cached(
        builds, image_folder, tmp_path, monkeypatch):
    from transferlab.inference import embeddings

    _fake_installed(monkeypatch, {"onnx"})
    for chooser in (embeddings, graphs):
        monkeypatch.setattr(chooser, "AUTO_BUILD_IMAGES", 5)
    images = ImageFolderData(image_folder).scan.images[:6]
    paths, hashes = [im.path for im in images], [im.sha256 for im in images]
    module = tiny_backbone()
    embed = lambda n: embed_files(module, paths[:n], hashes[:n], PRE, cache_dir=tmp_path,  # noqa: E731
                                  engine="auto", precision="32", show_progress=False)[1]
    stats = embed(4)  # under the threshold: torch, nothing built
    assert stats.engine["name"] == "torch" and stats.embedded == 4 and builds == []
    stats = embed(6)  # 2 left for torch: still not worth a graph, and the 4 are reused
    assert stats.engine["name"] == "torch" and stats.cached == 4 and builds == []
    other = tmp_path / "other"
    stats = embed_files(module, paths, hashes, PRE, cache_dir=other, engine="auto",
                        precision="32", show_progress=False)[1]
    assert stats.engine["name"] == "onnx" and stats.embedded == 6 and len(builds) == 1
    stats = embed_files(module, paths[:2], hashes[:2], PRE, cache_dir=other, engine="auto",
                        precision="32", show_progress=False)[1]
    assert stats.engine["name"] == "onnx" and stats.cached == 2  # a built graph is always used


def test_extract_records_the_engine_in_metrics(builds, image_folder, tmp_path):
    from transferlab import train

    run = train(image_folder, backbone=TINY_BACKBONE, weights="none", engine="onnx",
                out=tmp_path / "run", cache_dir=str(tmp_path / "cache"), show_progress=False,
                audit=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    engine = metrics["engine"]
    assert engine == run.metrics["engine"]
    assert engine["name"] == "onnx" and engine["precision"] == "fp32"
    assert engine["parity"]["passed"] and metrics["timing"]["embed_images_per_s"] > 0
    assert engine["classifier_parity"]["top1_agreement"] == 1.0


def test_evaluate_records_the_engine_and_its_check_in_metrics(builds, tiny_run, image_folder,
                                                             tmp_path, monkeypatch):
    from transferlab import evaluate

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))  # this test's graphs only
    graph = evaluate(tiny_run.model_dir, image_folder, out=tmp_path / "onnx", engine="onnx",
                     report=False, show_progress=False)
    engine = json.loads((tmp_path / "onnx" / "metrics.json").read_text())["engine"]
    assert engine == graph.metrics["engine"]
    assert engine["name"] == "onnx" and engine["parity"]["top1_agreement"] == 1.0
    assert engine["parity"]["images"] > 0 and engine["parity"]["max_abs_prob_diff"] < 1e-3
    plain = evaluate(tiny_run.model_dir, image_folder, out=tmp_path / "torch", engine="torch",
                     report=False, show_progress=False)
    assert plain.metrics["engine"] == {"name": "torch"}


def test_predict_with_engine_torch_and_onnx_agree(builds, tiny_run, image_folder, tmp_path,
                                                  monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path))  # this test's graphs stay its own
    files = [str(p) for p in sorted((image_folder / "circles").iterdir())[:3]]
    answers = {}
    for engine in ("torch", "onnx"):
        result = CliRunner().invoke(app, ["predict", str(tiny_run.model_dir), *files, "--engine",
                                          engine, "--precision", "32", "--format", "json"])
        assert result.exit_code == 0, result.output
        answers[engine] = json.loads(result.stdout)["predictions"]
    for torch_answer, onnx_answer in zip(answers["torch"], answers["onnx"]):
        assert torch_answer["label"] == onnx_answer["label"]
        assert abs(torch_answer["top_k"][0]["probability"]
                   - onnx_answer["top_k"][0]["probability"]) < 1e-3
    # the graph is cached now: auto runs it
    assert load_model(tiny_run.model_dir, engine="auto").engine.name in ("onnx", "openvino")


def test_engine_with_an_export_backend_is_one_line(tiny_run, image_folder):
    good = str(image_folder / "circles" / "circles_000.jpg")
    result = CliRunner().invoke(app, ["predict", str(tiny_run.model_dir), good, "--backend", "onnx",
                                      "--engine", "openvino"])
    assert isinstance(result.exception, ConfigError)  # main() prints it as one line, exit 2
    message = str(result.exception)
    assert "engine='openvino'" in message and "drop --engine" in message and "\n" not in message


def test_decoding_ahead_in_a_thread_gives_the_same_batches_and_errors(image_folder):
    import threading

    from transferlab.inference.batches import decoded_ahead, run_batches

    paths = sorted(image_folder.rglob("*.png"))[:7]
    run = lambda ahead: list(run_batches(lambda batch, _: batch.float().mean((1, 2, 3)), paths,  # noqa: E731
                                         PRE, precision="32", batch_size=2, workers=0,
                                         decode_ahead=ahead))
    plain, ahead = run(False), run(True)
    assert [p for p, _, _ in ahead] == [p for p, _, _ in plain] and len(plain) == 4
    for (_, a, _), (_, b, _) in zip(ahead, plain):
        assert torch.equal(a, b)

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(decoded_ahead(failing()))
    taken = decoded_ahead(iter(range(1000)), depth=1)
    assert next(taken) == 0
    taken.close()  # a caller that stops early stops the thread
    for thread in threading.enumerate():
        if thread.name == "transferlab-decode":
            thread.join(timeout=5)
            assert not thread.is_alive()


def test_engines_say_whether_decoding_beside_them_gains(builds, tmp_path):
    engine = compile_engine(spec(), "onnx", cache_dir=tmp_path)
    assert engine.overlap_decoding and not TorchEngine(tiny_backbone(), PRE).overlap_decoding
    engine.fallback = "strayed"
    assert not engine.overlap_decoding


class ThreadedGraph:
    """An engine with threads of its own beside torch's, as OpenVINO's and ONNX Runtime's are."""

    device = CPU
    overlap_decoding = True

    def __call__(self, images, precision="32"):
        return torch.zeros(len(images), 2), torch.ones(len(images), 8)


def test_torch_threads_is_scoped_to_the_block():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_beside_a_graph_engine_the_scores_run_in_one_torch_thread(monkeypatch):
    """A second torch thread spins after each small sum, on the cores the graph's threads need."""
    threads, probabilities = [], Trust.probabilities
    monkeypatch.setattr(Trust, "probabilities", lambda trust, logits: threads.append(
        torch.get_num_threads()) or probabilities(trust, logits))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = ThreadedGraph()
        scores = Predictor(engine, ["a", "b"], PRE).score_batch(pixels())
        engine.overlap_decoding = False  # torch's own network: its threads are the engine's
        Predictor(engine, ["a", "b"], PRE).score_batch(pixels())
        assert threads == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(scores.proba, 0.5)


def test_torch_on_the_cpu_runs_a_batch_in_pieces_with_the_same_outputs():
    """Pieces of CPU_PIECE images (faster: their activations stay in the caches), joined in order,
    for one output and for (logits, features)."""
    from transferlab.inference.engines import CPU_PIECE

    seen = []

    class Recording(nn.Module):
        def forward(self, batch):
            seen.append(len(batch))
            flat = batch.mean(dim=(2, 3))
            return flat * 2, flat

    pre = Preprocessing(input_size=(3, 8, 8))
    engine = TorchEngine(Recording(), pre)
    images = torch.randint(0, 256, (2 * CPU_PIECE + 3, 3, 8, 8), dtype=torch.uint8)
    logits, features = engine(images)
    assert seen == [CPU_PIECE, CPU_PIECE, 3]
    alone = [engine(image[None]) for image in images]
    assert torch.equal(logits, torch.cat([pair[0] for pair in alone]))
    assert torch.equal(features, torch.cat([pair[1] for pair in alone]))
