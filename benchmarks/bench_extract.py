"""Benchmark the `extract` strategy on the real face-mask data set; print one JSON object to stdout.

Run: python benchmarks/bench_extract.py [--data PATH] [--quick]

Everything is measured in one run (progress and logs go to stderr):

accuracy     `train(data, strategy="extract")` with defaults (seed 0) and a fresh, empty embedding
             cache: val/test accuracy, split sizes, duplicate groups, the cold run's wall time and its
             end-to-end embedding throughput (decode -> resize -> backbone, DataLoader start-up
             included). Target: test accuracy >= 0.99.
warm_cache   the same `train` again with the same cache: nothing may be re-embedded, and the wall
             time should be under 0.1x the cold run's.
throughput   images/s of
             - the backbone alone on random channels_last batches of the pipeline's batch size, timed
               for 5 s in each of 3 rounds that alternate with the pipeline (bf16 autocast where the CPU
               has native bf16, as the runner does);
             - `embed_files` without a cache on a third of the images per round (end to end);
             - a naive fp32 loop: PIL decode, torchvision Resize/CenterCrop/ToTensor/Normalize,
               batches of 32, plain NCHW model under no_grad (first 1,024 images).
             Targets: end to end >= 0.8x backbone alone, and >= 3x the naive loop.
machine      CPU model, core count, torch/timm versions, precision used, and the load average at
             the start (other processes on the 2 cores skew every number).

--quick uses only the first 512 images for the throughput parts (a smoke test); the accuracy and
warm-cache parts always use the whole data set. Temporary directories are removed at the end.

--part engines measures the engines of `--engine` instead (inference/graphs.py), in one run:
build        each engine's graph of the backbone, built into --graph-cache (kept between runs, so
             build it once: `--part build`), with its build seconds and its parity against torch
             fp32 on random images.
backbone     each engine's backbone-only images/s on random uint8 batches of 1, 8 and 32 (normalised
             inside the engine as in the pipeline), ROUNDS alternating rounds of 2 s each.
end_to_end   `embed_files` on the whole data set with a fresh embedding cache (graphs cached) for
             each engine: decode -> resize -> engine; decode alone (no network) for comparison; and
             the naive fp32 loop on the first 1,024 images; then `train --strategy extract` with
             --engine auto and a fresh embedding cache: its accuracy and metrics.json's "engine".
alternating  auto's end to end again, ROUNDS times, each between two batch-32 timings of the
             fastest engine's backbone alone: each round's ratio against their mean.
Ratios: auto's end to end ÷ the fastest engine's batch-32 backbone-only (target >= 0.8; the median
alternating round), ÷ torch's end to end (target >= 1.4) and ÷ the naive loop. Every engine runs
under process.reused_memory, as train, evaluate and predict run them; the naive loop outside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from transferlab.models.backbones import create_backbone
from transferlab.data.folder import ImageFolderData
from transferlab.inference.embeddings import embed_files
from transferlab.inference.engines import TorchEngine
from transferlab.process import reused_memory
from transferlab.devices import autocast, resolve_precision
from transferlab.training.config import TrainConfig
from transferlab.workflows.train import train
from transferlab.data.transforms import Preprocessing

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "face-mask"
TARGET_TEST_ACCURACY = 0.99
TARGET_WARM_RATIO = 0.1
TARGET_OVER_BACKBONE = 0.8
TARGET_OVER_NAIVE = 3.0
NAIVE_IMAGES = 1024
QUICK_IMAGES = 512
ROUNDS = 3


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed_train(data: Path, out: Path, cache_dir: Path):
    started = time.perf_counter()
    run = train(data, strategy="extract", out=out, cache_dir=str(cache_dir), show_progress=False)
    return run, time.perf_counter() - started


def bench_accuracy(data: Path, tmp: Path) -> tuple[dict, dict]:
    """Cold run, then warm run on the same cache: (accuracy section, warm_cache section)."""
    cache_dir = tmp / "cache"
    log("cold train (empty cache)")
    cold, cold_s = timed_train(data, tmp / "run-cold", cache_dir)
    log(f"cold train: {cold_s:.1f}s")
    log("warm train (same cache)")
    warm, warm_s = timed_train(data, tmp / "run-warm", cache_dir)
    log(f"warm train: {warm_s:.1f}s")
    m, split = cold.metrics, cold.metrics["split"]
    accuracy = {
        "val_accuracy": m["val"]["accuracy"], "test_accuracy": m["test"]["accuracy"],
        "split": {k: split[k] for k in ("train", "val", "test")},
        "duplicate_groups": split["duplicate_groups"],
        "near_duplicate_groups": split["near_duplicate_groups"],
        "target_test_accuracy": TARGET_TEST_ACCURACY,
        "target_met": m["test"]["accuracy"] >= TARGET_TEST_ACCURACY,
        "embed_images_per_s": m["timing"]["embed_images_per_s"],
        "timing": m["timing"], "wall_s": round(cold_s, 2),
    }
    ratio = warm_s / cold_s
    warm_cache = {
        "wall_s": round(warm_s, 2), "embedded": warm.metrics["timing"]["embedded"],
        "cached": warm.metrics["timing"]["cached"], "ratio_to_cold": round(ratio, 4),
        "target_ratio": TARGET_WARM_RATIO,
        "target_met": ratio < TARGET_WARM_RATIO and warm.metrics["timing"]["embedded"] == 0,
    }
    return accuracy, warm_cache


def backbone_only(model: torch.nn.Module, precision: str, seconds: float = 10.0) -> float:
    """images/s of the backbone alone on random channels_last batches of the pipeline's batch size."""
    batch_size = TrainConfig().batch_size
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast("cpu", precision):
        model(x)  # warm-up
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(x)
            images += batch_size
    return images / (time.perf_counter() - started)


def naive(paths: list[Path], pre: Preprocessing, batch_size: int = 32) -> float:
    """images/s of a plain PIL + torchvision + fp32 NCHW loop, decoding included."""
    from PIL import Image
    from torchvision import transforms

    model = create_backbone().eval()  # fresh: never converted to channels_last
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                    transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = [transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]]
            model(torch.stack(batch))
    return len(paths) / (time.perf_counter() - started)


def bench_throughput(data: Path, precision: str, cold_embed_per_s: float | None, quick: bool) -> dict:
    images = ImageFolderData(data, near_duplicates=False).scan.images
    if quick:
        images = images[:QUICK_IMAGES]
    paths, hashes = [im.path for im in images], [im.sha256 for im in images]
    backbone = create_backbone().eval()
    pre = Preprocessing.from_model(backbone)

    # These shared cores drift by 10-25% within a minute, so the backbone alone and the pipeline are
    # timed in alternating rounds (the pipeline on a third of the images each), not once each.
    backbone_rates, embedded, embed_seconds = [], 0, 0.0
    for part in range(ROUNDS):
        backbone_rates.append(backbone_only(backbone, precision, seconds=5.0))
        chunk = slice(part * len(paths) // ROUNDS, (part + 1) * len(paths) // ROUNDS)
        _, stats = embed_files(backbone, paths[chunk], hashes[chunk], pre, cache_dir=None,
                               show_progress=False)
        embedded += stats.embedded
        embed_seconds += stats.seconds
        log(f"round {part + 1}: backbone {backbone_rates[-1]:.1f}, pipeline "
            f"{stats.images_per_s:.1f} images/s")
    backbone_per_s = sum(backbone_rates) / ROUNDS
    direct_per_s = embedded / embed_seconds
    naive_paths = paths[:NAIVE_IMAGES]
    log(f"naive fp32 loop on {len(naive_paths)} images")
    naive_per_s = naive(naive_paths, pre)
    log(f"naive: {naive_per_s:.1f} images/s")

    over_backbone, over_naive = direct_per_s / backbone_per_s, direct_per_s / naive_per_s
    return {
        "images": len(paths), "naive_images": len(naive_paths),
        "batch_size": TrainConfig().batch_size,
        "backbone_only_images_per_s": round(backbone_per_s, 1),
        "backbone_only_rounds": [round(rate, 1) for rate in backbone_rates],
        "end_to_end_images_per_s": cold_embed_per_s,
        "end_to_end_direct_images_per_s": round(direct_per_s, 1),
        "naive_images_per_s": round(naive_per_s, 1),
        "end_to_end_over_backbone": round(over_backbone, 3),
        "end_to_end_over_backbone_target": TARGET_OVER_BACKBONE,
        "end_to_end_over_backbone_target_met": over_backbone >= TARGET_OVER_BACKBONE,
        "end_to_end_over_naive": round(over_naive, 3),
        "end_to_end_over_naive_target": TARGET_OVER_NAIVE,
        "end_to_end_over_naive_target_met": over_naive >= TARGET_OVER_NAIVE,
    }


def machine(precision: str, load: list[float]) -> dict:
    import timm

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "timm": timm.__version__,
            "precision": precision, "load_average_at_start": load}


ENGINE_BATCHES = (1, 8, 32)
ENGINE_SECONDS = 2.0
TARGET_OVER_TORCH = 1.4


def build_engines(backbone: torch.nn.Module, pre: Preprocessing, graph_cache: Path) -> dict:
    """Each installed engine of the backbone, built into (or loaded from) `graph_cache`, with its
    build-or-load seconds and parity against torch fp32 on random images."""
    from transferlab.inference.graphs import (ENGINES, FEATURES, GraphEngine, GraphSpec, available,
                                              compile_engine)

    engines, report = {}, {}
    for name in ENGINES:
        if name in ("auto", "torch") or not available(name, torch.device("cpu")):
            continue
        log(f"building/loading {name}")
        started = time.perf_counter()
        engine = compile_engine(GraphSpec(backbone, pre, (FEATURES,)), name, cache_dir=graph_cache)
        seconds = time.perf_counter() - started
        if isinstance(engine, GraphEngine):
            engine.check(random_pixels(32, pre))
            report[name] = {**engine.report(), "build_or_load_s": round(seconds, 1)}
        engines[name] = engine
    return {"engines": engines, "report": report}


def random_pixels(batch_size: int, pre: Preprocessing) -> torch.Tensor:
    return torch.randint(0, 256, (batch_size, *pre.input_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(batch_size))


def engine_rate(engine, pixels: torch.Tensor, precision: str, seconds: float) -> float:
    """images/s of `engine` on `pixels` over `seconds`, after one warm-up call."""
    engine(pixels, precision)
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        engine(pixels, precision)
        images += len(pixels)
    return images / (time.perf_counter() - started)


def engine_rates(engines: dict, pre: Preprocessing, precision: str) -> dict:
    """images/s of each engine at each batch size, ROUNDS rounds alternating between engines."""
    rates = {name: {batch: [] for batch in ENGINE_BATCHES} for name in engines}
    for part in range(ROUNDS):
        for batch in ENGINE_BATCHES:
            pixels = random_pixels(batch, pre)
            for name, engine in engines.items():
                rates[name][batch].append(engine_rate(engine, pixels, precision, ENGINE_SECONDS))
        log(f"round {part + 1}: " + ", ".join(f"{name} b32 {rates[name][32][-1]:.1f}"
                                              for name in engines))
    return {name: {f"batch_{batch}": {"images_per_s": round(sum(r) / len(r), 1),
                                      "rounds": [round(x, 1) for x in r]}
                   for batch, r in by_batch.items()} for name, by_batch in rates.items()}


def fresh_cache_with_graphs(tmp: Path, graph_cache: Path, name: str) -> Path:
    """An empty embedding cache that shares the built graphs."""
    cache = tmp / f"cache-{name}"
    cache.mkdir()
    (cache / "engines").symlink_to((graph_cache / "engines").resolve(), target_is_directory=True)
    return cache


def auto_against_backbone(backbone: torch.nn.Module, paths: list[Path], hashes: list[str],
                          pre: Preprocessing, fastest, precision: str, tmp: Path,
                          graph_cache: Path) -> dict:
    """`auto`'s end to end on the whole set (a fresh embedding cache each time) between two
    batch-32 backbone-only timings of the fastest engine, ROUNDS times: this machine's speed drifts
    by a tenth or more within minutes, so each round's ratio is taken against the mean of the
    timings around it, and the median round is the result."""
    pixels, rounds = random_pixels(32, pre), []
    for part in range(ROUNDS):
        before = engine_rate(fastest, pixels, precision, 2 * ENGINE_SECONDS)
        cache = fresh_cache_with_graphs(tmp, graph_cache, f"auto-{part}")
        _, stats = embed_files(backbone, paths, hashes, pre, cache_dir=cache, engine="auto",
                               show_progress=False)
        after = engine_rate(fastest, pixels, precision, 2 * ENGINE_SECONDS)
        rounds.append({"backbone_before": round(before, 1), "auto": round(stats.images_per_s, 1),
                       "backbone_after": round(after, 1),
                       "ratio": round(2 * stats.images_per_s / (before + after), 3)})
        log(f"alternating round {part + 1}: {rounds[-1]}")
    return {"rounds": rounds, "median_ratio": sorted(r["ratio"] for r in rounds)[ROUNDS // 2]}


def decode_only(paths: list[Path], pre: Preprocessing) -> float:
    from transferlab.inference.batches import run_batches

    started = time.perf_counter()
    for _ in run_batches(lambda batch, _: batch, paths, pre, precision="32"):
        pass
    return len(paths) / (time.perf_counter() - started)


def bench_engines(data: Path, graph_cache: Path, precision: str, quick: bool) -> dict:
    backbone = create_backbone().eval()
    pre = Preprocessing.from_model(backbone)
    built = build_engines(backbone, pre, graph_cache)
    engines = {"torch": TorchEngine(backbone, pre), **built["engines"]}
    with reused_memory():  # as the workflows run them
        backbone_only = engine_rates(engines, pre, precision)
    images = ImageFolderData(data, near_duplicates=False).scan.images
    if quick:
        images = images[:QUICK_IMAGES]
    paths, hashes = [im.path for im in images], [im.sha256 for im in images]
    end_to_end = {}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp, reused_memory() as reusing:
        for name in ("torch", *built["engines"], "auto"):
            cache = fresh_cache_with_graphs(Path(tmp), graph_cache, name)
            started = time.perf_counter()
            _, stats = embed_files(backbone, paths, hashes, pre, cache_dir=cache, engine=name,
                                   show_progress=False)
            wall = time.perf_counter() - started
            end_to_end[name] = {"images_per_s": round(stats.images_per_s, 1),
                                "wall_images_per_s": round(len(paths) / wall, 1),
                                "engine": stats.engine["name"], "precision": stats.engine["precision"]}
            log(f"end to end {name}: {end_to_end[name]}")
        fastest = max(backbone_only, key=lambda name: backbone_only[name]["batch_32"]["images_per_s"])
        alternating = auto_against_backbone(backbone, paths, hashes, pre, engines[fastest],
                                            precision, Path(tmp), graph_cache)
        decode_per_s = decode_only(paths, pre)
        log(f"decode only: {decode_per_s:.1f} images/s")
        cache = fresh_cache_with_graphs(Path(tmp), graph_cache, "train")
        started = time.perf_counter()
        run = train(data, strategy="extract", out=Path(tmp) / "run", cache_dir=str(cache),
                    show_progress=False, audit=False)
        train_s = time.perf_counter() - started
        log(f"train --strategy extract (auto): {train_s:.1f}s, engine {run.metrics.get('engine')}")
    naive_per_s = naive(paths[:NAIVE_IMAGES], pre)  # as a first script runs: outside reused_memory
    log(f"naive: {naive_per_s:.1f} images/s")
    auto = end_to_end["auto"]["images_per_s"]
    return {
        "images": len(paths), "reused_memory": reusing, "graphs": built["report"],
        "backbone_only": backbone_only,
        "end_to_end": end_to_end, "decode_only_images_per_s": round(decode_per_s, 1),
        "naive_images_per_s": round(naive_per_s, 1), "fastest_backbone_only": fastest,
        "auto_over_fastest_backbone_only": alternating["median_ratio"],
        "auto_over_fastest_backbone_only_target": TARGET_OVER_BACKBONE,
        "auto_over_fastest_backbone_only_rounds": alternating["rounds"],
        "auto_over_torch_end_to_end": round(auto / end_to_end["torch"]["images_per_s"], 3),
        "auto_over_torch_end_to_end_target": TARGET_OVER_TORCH,
        "auto_over_naive": round(auto / naive_per_s, 3),
        "train_extract_auto": {"wall_s": round(train_s, 1),
                               "val_accuracy": run.metrics["val"]["accuracy"],
                               "test_accuracy": run.metrics["test"]["accuracy"],
                               "timing": run.metrics["timing"], "engine": run.metrics.get("engine")},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled image folder")
    parser.add_argument("--quick", action="store_true",
                        help=f"only the first {QUICK_IMAGES} images for the throughput parts")
    parser.add_argument("--part", choices=("all", "engines", "build"), default="all",
                        help="all: the sections above; engines: the engines compared; build: only "
                             "build the graphs into --graph-cache (untimed)")
    parser.add_argument("--graph-cache", type=Path, default=Path(tempfile.gettempdir())
                        / "transferlab-bench-graphs", help="where the engines' graphs are kept")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    precision = resolve_precision("auto", "cpu")
    load = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    if args.part == "build":
        backbone = create_backbone().eval()
        report = build_engines(backbone, Preprocessing.from_model(backbone), args.graph_cache)
        print(json.dumps(report["report"], indent=2))
        return
    if args.part == "engines":
        result = {"data": str(args.data.resolve()), "quick": args.quick,
                  "engines": bench_engines(args.data, args.graph_cache, precision, args.quick),
                  "machine": machine(precision, load),
                  "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                  "total_s": round(time.perf_counter() - started, 1)}
        print(json.dumps(result, indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        accuracy, warm_cache = bench_accuracy(args.data, Path(tmp))
    throughput = bench_throughput(args.data, precision, accuracy["embed_images_per_s"], args.quick)
    result = {"data": str(args.data.resolve()), "quick": args.quick, "accuracy": accuracy,
              "warm_cache": warm_cache, "throughput": throughput, "machine": machine(precision, load),
              "total_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
