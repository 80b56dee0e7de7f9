"""Compare this checkout with another one (such as the last commit before a change) on the same
machine in the same run; print one JSON object to stdout.

Run: python benchmarks/bench_ab.py --baseline /path/to/other/checkout [--per-class 300] [--rounds 3]
     (make the other checkout with `git worktree add /tmp/base COMMIT`)

Each round runs `transferlab train DATA --strategy extract --no-cache` once with each source tree, in
alternating order and in fresh processes with PYTHONPATH pointing at that tree's src/, so a noisy
machine slows both alike. Each run embeds every image afresh; the JSON gives both trees' embedding
throughput (images/s, from metrics.json), test accuracy, wall time, and the ratio of the medians
(this checkout / baseline). DATA is a subset of the shared face-mask set, `--per-class` images of
each class linked into a temporary folder. Only the command line is used, which both trees share.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "face-mask"


def log(message: str) -> None:
    print(f"[bench-ab] {message}", file=sys.stderr, flush=True)


def subset(data: Path, per_class: int, folder: Path) -> Path:
    """The first `per_class` files of each class of `data`, linked into `folder`."""
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        target = folder / class_dir.name
        target.mkdir(parents=True)
        for path in sorted(p for p in class_dir.iterdir() if p.is_file())[:per_class]:
            (target / path.name).symlink_to(path.resolve())
    return folder


def run_extract(source: Path, data: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source / "src")}
    command = [sys.executable, "-c", "from transferlab.cli import main; main()", "train", str(data),
               "--strategy", "extract", "--no-cache", "--quiet", "--out", str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{source}: train failed:\n{result.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"embed_images_per_s": metrics["timing"]["embed_images_per_s"],
            "test_accuracy": metrics["test"]["accuracy"], "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout's root")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    trees = {"current": REPO_ROOT, "baseline": args.baseline.resolve()}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        data = subset(args.data, args.per_class, Path(tmp) / "data")
        images = sum(1 for path in data.rglob("*") if path.is_file())
        for round_index in range(args.rounds):
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            for name in order:
                log(f"round {round_index + 1}: {name}")
                results[name].append(run_extract(trees[name], data, Path(tmp) / f"{name}-{round_index}"))
    medians = {name: statistics.median(r["embed_images_per_s"] for r in runs)
               for name, runs in results.items()}
    print(json.dumps({
        "what": "end-to-end extract embedding throughput, no cache (images/s)",
        "images": images, "rounds": args.rounds, "runs": results, "median": medians,
        "ratio_current_over_baseline": round(medians["current"] / medians["baseline"], 3),
        "baseline": str(trees["baseline"]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_at_start": load},
    }, indent=2))


if __name__ == "__main__":
    main()
