"""Deployment benchmark; prints JSON.

Section `latency`: the default backbone's whole network (EfficientNet-Lite0 + head, real ImageNet
weights) on preprocessed images: single-image (batch 1) latency p50/p99 and batch-32 throughput for
torch eager fp32 (plain module, NCHW, no autocast), our torch path (channels_last + bf16 autocast
where the CPU has it), ONNX Runtime fp32 and int8, and, when their extras are installed, OpenVINO
fp32 and int8 (NNCF, calibrated on the run's validation images) and LiteRT (TFLite) fp32. Engines
are timed in alternating rounds so that a noisy VM slows them
all alike. Target: ONNX Runtime fp32 p50 <= 0.7 x torch eager.

Section `service` (bench_service.py): `transferlab serve` as a real Uvicorn process on loopback
under one-image requests from 8 concurrent clients (images/s, p50/p99, errors, CPU shares) for the
torch and ONNX backends, each as a ratio to its engine's batch-32 images/s in the same run.

    python benchmarks/bench_deploy.py [--model runs/NAME/model] [--out /tmp/bench-deploy]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FACE_MASK = ROOT.parent / "shared" / "datasets" / "face-mask"
PER_CLASS = 100  # photos per class for the bundle trained when --model is not given


def make_bundle(out: Path) -> Path:
    """An extract run on a face-mask subset: a real Lite0 bundle inside a run directory."""
    from transferlab import ImageFolderData, train

    subset = out / "face-mask-subset"
    if not subset.exists():
        for class_dir in sorted(FACE_MASK.iterdir()):
            (subset / class_dir.name).mkdir(parents=True)
            for path in sorted(class_dir.iterdir())[:PER_CLASS]:
                (subset / class_dir.name / path.name).symlink_to(path)
    run = train(ImageFolderData(subset, cache_dir=None), out=out / "run", cache_dir=None,
                show_progress=False)
    return run.model_dir


# The optional formats: the import that tells whether their extra is installed.
OPTIONAL_FORMATS = {"openvino": "openvino", "tflite": "litert_torch"}


def optional_formats() -> list[str]:
    import importlib.util

    return [name for name, module in OPTIONAL_FORMATS.items() if importlib.util.find_spec(module)]


def exported(model_dir: Path) -> dict:
    """Every export format, fp32 and int8 where it has one, written into the bundle: file, size,
    parity, seconds."""
    from transferlab.deploy.export import run_val_images
    from transferlab.deploy.formats import EXPORT_FORMATS

    images, labels = run_val_images(model_dir) or (None, None)
    results = {}
    exports = [("onnx", None), ("onnx", "int8")] + [
        (name, quantize) for name in optional_formats()
        for quantize in ((None, "int8") if name == "openvino" else (None,))]
    for export_format, quantize in exports:
        started = time.perf_counter()
        result = EXPORT_FORMATS[export_format](model_dir, quantize=quantize, images=images,
                                               labels=labels)
        files = [result.path]
        if result.path.suffix == ".xml":  # OpenVINO IR keeps its weights beside, in a .bin
            files.append(result.path.with_suffix(".bin"))
        results[f"{export_format}_{quantize or 'fp32'}"] = {
            "file": result.path.name, "seconds": round(time.perf_counter() - started, 1),
            "megabytes": round(sum(f.stat().st_size for f in files if f.is_file()) / 1e6, 2),
            "parity": result.parity}
    return results


def sample_batch(model_dir: Path, size: int) -> torch.Tensor:
    """`size` real validation photos as the uint8 batch every engine takes, decoded, resized and
    cropped as the Predictor does."""
    from transferlab.data.loaders import ImageDataset
    from transferlab.deploy.export import run_val_images
    from transferlab.inference.bundle import read_config

    pre = read_config(model_dir).preprocessing
    paths = run_val_images(model_dir)[0]
    files = ImageDataset([paths[i % len(paths)] for i in range(size)], pre)
    return torch.stack([files[i][0] for i in range(size)])


def engines(model_dir: Path, only: str | None) -> dict:
    """name -> call(batch); with `only`, just that engine is built (the others are None)."""
    from transferlab.data.transforms import normalize
    from transferlab.devices import resolve_precision
    from transferlab.inference.bundle import (INT8_FILE, ONNX_FILE, OPENVINO_FILE, OPENVINO_INT8_FILE,
                                              TFLITE_FILE, load_network, read_config)
    from transferlab.inference.engines import (OnnxEngine, OpenVinoEngine, OpenVinoInt8Engine,
                                               TfliteEngine, TorchEngine)

    precision = resolve_precision("auto", "cpu")
    pre = read_config(model_dir).preprocessing

    def torch_eager():
        net, _ = load_network(model_dir)

        def call(batch):
            with torch.inference_mode():
                return net(normalize(batch, pre, channels_last=False))
        return call

    def torch_ours():
        fast = TorchEngine(load_network(model_dir)[0], pre, "cpu")
        return lambda batch: fast(batch, precision)

    builders = {"torch_eager_fp32": torch_eager,
                f"torch_ours_channels_last_{precision}": torch_ours,
                "onnxruntime_fp32": lambda: OnnxEngine(model_dir / ONNX_FILE, pre),
                "onnxruntime_int8": lambda: OnnxEngine(model_dir / INT8_FILE, pre)}
    optional = {
        "openvino": {"openvino_fp32": lambda: OpenVinoEngine(model_dir / OPENVINO_FILE, pre),
                     "openvino_int8": lambda: OpenVinoInt8Engine(model_dir / OPENVINO_INT8_FILE, pre)},
        "tflite": {"litert_fp32": lambda: TfliteEngine(model_dir / TFLITE_FILE, pre)}}
    for name in optional_formats():
        builders.update(optional[name])
    return {name: build() if name == only else None for name, build in builders.items()}


def time_calls(call, batch, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - started)
    return times


def measure_engine(model_dir: Path, name: str, iterations: int) -> dict:
    """One engine's timings, in a process of its own: onnxruntime's and torch's thread pools spin
    while idle, so an engine timed beside another one's pool measures the contention (seen: torch
    eager p99 of 2 s beside onnxruntime sessions on 2 cores)."""
    single, batch = sample_batch(model_dir, 1), sample_batch(model_dir, 32)
    call = engines(model_dir, only=name)[name]
    time_calls(call, single, 10)  # warm-up: allocation, graph optimisation, autocast caches
    time_calls(call, batch, 2)
    return {"single": time_calls(call, single, iterations), "batch32": time_calls(call, batch, 3)}


def latency(model_dir: Path, iterations: int, rounds: int) -> dict:
    """Every engine in alternating rounds of fresh processes, so a noisy VM slows them all alike."""
    import subprocess

    names = list(engines(model_dir, only=None))
    single_times = {name: [] for name in names}
    batch_times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            output = subprocess.run(
                [sys.executable, __file__, "--measure", name, "--model", str(model_dir),
                 "--iterations", str(iterations // rounds)],
                check=True, capture_output=True, text=True).stdout
            timings = json.loads(output)
            single_times[name] += timings["single"]
            batch_times[name] += timings["batch32"]
    report = {}
    for name in names:
        ms = np.array(single_times[name]) * 1000
        report[name] = {"batch1_p50_ms": round(float(np.percentile(ms, 50)), 2),
                        "batch1_p99_ms": round(float(np.percentile(ms, 99)), 2),
                        "batch1_mean_ms": round(float(ms.mean()), 2),
                        "batch32_images_per_s": round(32 / statistics.median(batch_times[name]), 1)}
    eager = report["torch_eager_fp32"]["batch1_p50_ms"]
    report["onnx_fp32_p50_over_torch_eager_p50"] = round(report["onnxruntime_fp32"]["batch1_p50_ms"] / eager, 3)
    report["target"] = "onnxruntime fp32 batch-1 p50 <= 0.7 x torch eager fp32"
    report["met"] = report["onnx_fp32_p50_over_torch_eager_p50"] <= 0.7
    report["iterations"], report["rounds"] = iterations, rounds
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a bundle inside a run directory (its val images "
                        "are used); default: train extract on a face-mask subset")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-deploy"))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: latency,service")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: time one engine, print JSON
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_engine(args.model, args.measure, args.iterations)))
        return
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)

    if args.model:  # exports are written into the bundle, so work on a copy beside its run
        source = args.model.resolve()
        run_copy = args.out / "run"
        shutil.rmtree(run_copy, ignore_errors=True)
        run_copy.mkdir(parents=True)
        shutil.copy(source.parent / "split.json", run_copy / "split.json")
        model_dir = Path(shutil.copytree(source, run_copy / "model"))
    else:
        if not FACE_MASK.is_dir():
            sys.exit(f"{FACE_MASK} is absent: give --model")
        model_dir = make_bundle(args.out)

    result = {"machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__},
              "model": str(model_dir), "exports": exported(model_dir)}
    import nncf
    import onnxruntime
    import openvino

    result["machine"].update(onnxruntime=onnxruntime.__version__, openvino=openvino.__version__,
                             nncf=nncf.__version__)
    if "latency" not in skip:
        result["latency"] = latency(model_dir, args.iterations, args.rounds)
    if "service" not in skip:
        from bench_service import service  # noqa: E402 - beside this file

        result["service"] = service(model_dir)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
