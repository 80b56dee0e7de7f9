"""Benchmark `train --strategy extract` embedding in 1 process against 2 (DDP on CPU, gloo); print one
JSON object to stdout.

Run: flock /work/bench.lock python benchmarks/bench_ddp.py [--data PATH] [--images 1000] [--rounds 2]

A class-balanced subset of the data set (the first --images files by name, copied into a temporary
folder) is trained on with the CLI, each run in a fresh subprocess with an empty embedding cache
(the scan cache is filled beforehand, untimed, so only the embedding is cold), alternating 1 process
and 2 processes (`--devices 2 --distributed ddp`) for --rounds rounds. Per run: wall time of the
whole command, the embedding's seconds and images/s from metrics.json (for 2 processes: from the
launch of the second process to the last vector cached), val/test accuracy. Across runs: the
max |difference| between the embeddings of 1 and 2 processes (from their caches), and whether the
accuracies are the same. Lightning gives each of the 2 ranks cores // 2 torch threads.

Two processes on 2 cores are not expected to beat one process that already uses both: the point
is that the results are the same, and what the extra process costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from transferlab.data.folder import ImageFolderData

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "face-mask"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def subset(data: Path, images: int, into: Path) -> Path:
    """The first images/classes files (by name) of each class of `data`, copied under `into`."""
    classes = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        (into / folder.name).mkdir(parents=True)
        for path in files[:images // len(classes)]:
            shutil.copy2(path, into / folder.name / path.name)
    return into


def run(data: Path, workdir: Path, processes: int) -> dict:
    """One cold-cache extract with the CLI in `processes` processes; its numbers and cache folder."""
    cache = workdir / "cache"
    ImageFolderData(data, cache_dir=cache).split  # the scan cache, untimed
    command = [sys.executable, "-m", "transferlab.cli", "train", str(data), "--no-audit",
               "--cache-dir", str(cache), "--out", str(workdir / "run"), "--quiet"]
    if processes > 1:
        command += ["--devices", str(processes), "--distributed", "ddp", "--accelerator", "cpu"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((workdir / "run" / "metrics.json").read_text())
    timing = metrics["timing"]
    return {"processes": processes, "wall_s": round(wall, 2), "embed_s": timing["embed_s"],
            "embed_images_per_s": timing["embed_images_per_s"], "embedded": timing["embedded"],
            "val_accuracy": metrics["val"]["accuracy"], "test_accuracy": metrics["test"]["accuracy"],
            "engine": metrics["engine"]["name"], "cache": str(cache)}


def embeddings(cache: str) -> dict[str, np.ndarray]:
    return {k: v for shard in sorted(Path(cache).glob("embeddings/*/shard-*.safetensors"))
            for k, v in load_file(str(shard)).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: data set not found; pass --data")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        data = subset(args.data, args.images, Path(tmp) / "data")
        runs = []
        for round_ in range(args.rounds):
            for processes in (1, 2):
                runs.append(run(data, Path(tmp) / f"{round_}-{processes}", processes))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "cache"}),
                      file=sys.stderr)
        # against the first 1-process run: other 1-process runs show the run-to-run noise
        first = embeddings(runs[0]["cache"])
        gaps: dict[int, list[float]] = {1: [], 2: []}
        for result in runs[1:]:
            other = embeddings(result["cache"])
            if set(other) != set(first):
                raise SystemExit(f"the {result['processes']}-process run cached other images")
            gaps[result["processes"]].append(max(float(np.abs(first[h] - other[h]).max())
                                                 for h in first))
        for result in runs:
            del result["cache"]

    def mean(processes: int, key: str) -> float:
        return round(float(np.mean([r[key] for r in runs if r["processes"] == processes])), 2)

    print(json.dumps({
        "data": str(args.data), "files": args.images, "distinct_images": len(first), "runs": runs,
        "mean": {f"{n}_process{'es' if n > 1 else ''}": {k: mean(n, k) for k in
                                                           ("wall_s", "embed_s", "embed_images_per_s")}
                 for n in (1, 2)},
        "two_over_one_embed_images_per_s": round(mean(2, "embed_images_per_s")
                                                 / mean(1, "embed_images_per_s"), 3),
        "max_abs_embedding_diff_vs_first_1_process_run": {
            "other_1_process_runs": max(gaps[1], default=None),
            "2_process_runs": max(gaps[2], default=None)},
        "same_accuracy": len({(r["val_accuracy"], r["test_accuracy"]) for r in runs}) == 1,
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "load_average_at_start": [round(x, 2) for x in load],
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
    }, indent=2))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
