"""Recipes benchmark (issue 17); prints JSON, one line per finished run, then a summary.

On each data set, every recipe trains on ONE split (the same ImageFolderData object, seed 0):
`extract`; `finetune` with the defaults before issue 17 (random Dense(256) head, SGD 1e-3, one
head-only warm-up epoch, 3 epochs) and with today's (linear probe first, AdamW, cosine with warm-up,
label smoothing, up to 10 epochs with early stopping); `head`; and `auto` at each budget. For each:
val and test accuracy, wall time, training images/s. The summary checks the targets: new finetune
>= extract + 1 point (val) and no worse than before; auto within 0.5 points of the best single
recipe that fit its budget, and never over budget by more than one epoch.

    python benchmarks/bench_recipes.py [--data ../shared/datasets/flowers-12 ...]
        [--recipes extract,finetune-old,finetune,head,auto] [--budgets 2m,5m,15m] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
DATA = [SHARED / "face-mask", SHARED / "flowers-12"]

# The finetune defaults before issue 17, spelled out as options.
FINETUNE_OLD = {"head_init": "random", "head_dim": 256, "dropout": 0.5, "optimizer": "sgd",
                "lr": 1e-3, "weight_decay": 0.0, "epochs": 3, "warmup_epochs": 1,
                "schedule": "constant", "label_smoothing": 0.0, "backbone_lr_scale": 0.1,
                "augment": "light"}
RECIPES = {"extract": ("extract", {}), "finetune-old": ("finetune", FINETUNE_OLD),
           "finetune": ("finetune", {}), "head": ("head", {})}


def run_one(data, name: str, strategy: str, options: dict, out: Path) -> dict:
    from transferlab import train

    started = time.perf_counter()
    run = train(data, strategy=strategy, out=out / name, overwrite=True, show_progress=False,
                audit=False, **options)
    wall = time.perf_counter() - started
    metrics = run.metrics
    row = {"recipe": name, "val_accuracy": metrics["val"].get("accuracy"),
           "val_loss": metrics["val"].get("loss"),
           "test_accuracy": (metrics.get("test") or {}).get("accuracy"), "wall_s": round(wall, 1),
           "train_images_per_s": metrics["timing"].get("train_images_per_s"),
           "epochs_run": metrics.get("epochs_run"), "best_epoch": metrics.get("best_epoch"),
           "backbone": metrics["backbone"]}
    if "auto" in metrics:
        auto = metrics["auto"]
        row["auto"] = {k: auto[k] for k in ("budget_s", "seconds", "chosen", "epoch_estimate_s")}
        row["auto"]["tried"] = auto["tried"]
    if "probe" in metrics:
        row["probe_val_accuracy"] = metrics["probe"]["val_acc"]
        row["kept"] = metrics.get("kept", "fine-tuned")
    return row


def summarise(rows: list[dict]) -> dict:
    by = {row["recipe"]: row for row in rows}
    summary = {}
    if "extract" in by and "finetune" in by:
        summary["finetune_minus_extract_val_points"] = round(
            100 * (by["finetune"]["val_accuracy"] - by["extract"]["val_accuracy"]), 2)
    if "finetune-old" in by and "finetune" in by:
        summary["finetune_new_minus_old_val_points"] = round(
            100 * (by["finetune"]["val_accuracy"] - by["finetune-old"]["val_accuracy"]), 2)
    singles = [row for row in rows if not row["recipe"].startswith("auto")]
    for row in rows:
        if not row["recipe"].startswith("auto"):
            continue
        budget = row["auto"]["budget_s"]
        fitting = [r for r in singles if r["wall_s"] <= budget]
        best = max(fitting, key=lambda r: r["val_accuracy"], default=None)
        epoch = row["auto"]["epoch_estimate_s"]
        summary[row["recipe"]] = {
            "best_single_that_fits": best and best["recipe"],
            "val_points_behind_it": best and round(100 * (best["val_accuracy"] - row["val_accuracy"]), 2),
            "over_budget_s": round(max(0.0, row["auto"]["seconds"] - budget), 1),
            "within_one_epoch": row["auto"]["seconds"] <= budget + epoch}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="*", type=Path, default=DATA)
    parser.add_argument("--recipes", default="extract,finetune-old,finetune,head,auto")
    parser.add_argument("--budgets", default="2m,5m,15m")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    from transferlab import ImageFolderData

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-recipes-"))
    results = {}
    for root in args.data:
        if not root.is_dir():
            print(json.dumps({"data": str(root), "skipped": "absent"}), flush=True)
            continue
        data = ImageFolderData(root, seed=0)
        rows = []
        for recipe in args.recipes.split(","):
            runs = ([(f"auto-{b}", "auto", {"time_budget": b}) for b in args.budgets.split(",")]
                    if recipe == "auto" else [(recipe, *RECIPES[recipe])])
            for name, strategy, options in runs:
                row = run_one(data, name, strategy, options, out / root.name)
                rows.append(row)
                print(json.dumps({"data": root.name, **row}), flush=True)
        results[root.name] = {"rows": rows, "summary": summarise(rows)}
    print(json.dumps({"machine": _machine(), "results": results}, indent=1))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


def _machine() -> dict:
    import os
    import platform

    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu_count": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "torch": torch.__version__, "python": sys.version.split()[0],
            "processor": platform.processor()}


if __name__ == "__main__":
    main()
