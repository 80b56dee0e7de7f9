"""Benchmark what transferlab says about trust in data and answers; print one JSON object to stdout.

Run: python benchmarks/bench_trust.py [--data PATH] [--part labels|trust] [--rates 0.05,0.10]
                                      [--runs COMPARE_DIR] [--unknown PHOTOS]

labels   a copy of DATA (symlinks in a temporary folder; a DATA with split folders, train/CLASS/
         and val/CLASS/, is flattened into CLASS/ folders) with a share of its labels flipped at
         random (seeded; each flipped file is linked into another class's folder, so the shared set
         is never touched). `transferlab audit` runs on the copy; we report the precision and recall
         of the flipped files among the files label_issues.csv flags, and the same for cleanlab's
         `find_label_issues` on the *same* out-of-fold probabilities (the anchor), at 5% and 10%
         noise. Targets on face-mask at 5%: precision >= 0.8, recall >= 0.8, F1 at least
         cleanlab's; a second set checks that nothing is tuned to face-mask. Also: the audit's wall
         time on DATA itself with a warm embedding cache (target under 10 s on face-mask), and the
         files it flags in the unflipped set (the set's own label errors, or the audit's false
         alarms: look at them). One data set per run:

             python benchmarks/bench_trust.py --part labels
             python benchmarks/bench_trust.py --part labels --data ../shared/datasets/flowers-12

trust    on one run per strategy (`--runs`, a `transferlab compare` folder of the same data; else
         trained now): unknown-input detection for extract and finetune, with the run's test split
         as the known inputs and ../shared/datasets/unknown-sample plus synthetic noise and blank
         images as the unknown ones: AUROC and the false-positive rate at 95% true-positive rate
         of the novelty score and of the max-softmax baseline (targets: AUROC >= 0.95, FPR at
         least 10 points better), and what the bundle's own threshold (set on val) flags; ECE
         before and after calibration on val and test for all four strategies (target: after <=
         before); the bytes the novelty bank adds and predict's images/s with and without it.

cleanlab is AGPL-licensed: it is never a dependency of transferlab, and this script imports it only
when it is installed. Install it in a throwaway environment that also sees the project's packages:

    python -m venv /tmp/bench-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/bench-venv/lib/python3.11/site-packages/p.pth
    echo "$PWD/src" >> /tmp/bench-venv/lib/python3.11/site-packages/p.pth
    /tmp/bench-venv/bin/pip install cleanlab
    /tmp/bench-venv/bin/python benchmarks/bench_trust.py

Without it, the cleanlab numbers are null. Progress and logs go to stderr. The embeddings come from
the default cache (~/.cache/transferlab or $TRANSFERLAB_CACHE), keyed by content, so the copies
reuse the set's embeddings; the first run of all fills it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from transferlab.data.cache import default_cache_dir
from transferlab.data.folder import ImageFolderData
from transferlab.evaluation.labels import find_label_issues, out_of_fold_probabilities
from transferlab.rundir.audit import read_table
from transferlab.workflows.audit import Embedder, audit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "face-mask"
DEFAULT_UNKNOWN = REPO_ROOT.parent / "shared" / "datasets" / "unknown-sample"
SEED = 0
FOLDS = 5
SHOWN = 10  # unflipped files flagged, listed by name
SPLIT_NAMES = {"train", "val", "valid", "validation", "test"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_split_layout(source: Path) -> bool:
    """Whether `source` holds split folders (train/CLASS/, val/CLASS/, ...) rather than classes."""
    folders = [d for d in source.iterdir() if d.is_dir()]
    return bool(folders) and all(d.name in SPLIT_NAMES for d in folders)


def class_files(source: Path) -> list[tuple[str, Path]]:
    """(class, file) of every image of `source`, whose classes are its folders, or the folders of
    its split folders (then the splits are pooled)."""
    roots = sorted(d for d in source.iterdir() if d.is_dir()) if is_split_layout(source) else [source]
    return sorted((c.name, p) for root in roots for c in root.iterdir() if c.is_dir()
                  for p in c.iterdir() if p.is_file())


def noisy_copy(source: Path, destination: Path, rate: float, seed: int) -> set[str]:
    """Link every image of `source` into destination/CLASS/ (a split layout is flattened, each name
    prefixed by its split), `rate` of them (seeded) into another class's folder; returns the flipped
    files as the copy names them (relative paths)."""
    files = class_files(source)
    classes = sorted({label for label, _ in files})
    rng = random.Random(seed)
    flipped_keys = set(rng.sample(range(len(files)), round(rate * len(files))))
    flipped = set()
    for n, (label, path) in enumerate(files):
        name = path.name if path.parent.parent == source else f"{path.parent.parent.name}-{path.name}"
        target = label
        if n in flipped_keys:
            target = rng.choice([c for c in classes if c != label])
            name = f"flipped-{name}"
        link = destination / target / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
        if n in flipped_keys:
            flipped.add(link.relative_to(destination).as_posix())
    return flipped


def scores(flagged: set[str], truth: set[str]) -> dict:
    hits = len(flagged & truth)
    precision = hits / len(flagged) if flagged else None
    recall = hits / len(truth) if truth else None
    f1 = (2 * precision * recall / (precision + recall)) if precision and recall else 0.0
    return {"flagged": len(flagged), "correct": hits, "precision": _round(precision),
            "recall": _round(recall), "f1": _round(f1)}


def cleanlab_flags(data: ImageFolderData, embedder: Embedder) -> set[str] | None:
    """cleanlab's find_label_issues (its defaults) on the audit's out-of-fold probabilities,
    recomputed with the same folds and seed; None when cleanlab is not installed."""
    if importlib.util.find_spec("cleanlab") is None:
        return None
    from cleanlab.filter import find_label_issues as cleanlab_find

    indices = list(range(len(data.scan.images)))
    labels = np.array(data.scan.labels)
    component = {i: n for n, group in enumerate(data.duplicates.components) for i in group}
    proba, _ = out_of_fold_probabilities(embedder.embed(data, indices, False), labels,
                                         np.array([component[i] for i in indices]),
                                         len(data.classes), folds=FOLDS, seed=SEED)
    ours = {data.scan.relative(x.index) for x in find_label_issues(proba, labels).issues}
    mask = cleanlab_find(labels=labels, pred_probs=proba)
    flagged = {data.scan.relative(i) for i in np.flatnonzero(mask)}
    log(f"  cleanlab flags {len(flagged)}; ours on the same probabilities {len(ours)}")
    return flagged


def label_part(source: Path, rates: list[float], work: Path) -> dict:
    """Precision and recall of the flipped labels at each noise rate, ours and cleanlab's."""
    embedder = Embedder(cache_dir=str(default_cache_dir()))  # the audit's backbone and cache
    results = {}
    for rate in rates:
        copy = work / f"noisy-{rate:g}"
        flipped = noisy_copy(source, copy, rate, SEED)
        log(f"labels: {len(flipped)} of the copy's labels flipped ({rate:.0%})")
        data = ImageFolderData(copy, seed=SEED)
        started = time.perf_counter()
        result = audit(data, out=work / f"audit-{rate:g}", folds=FOLDS, seed=SEED,
                       show_progress=False)
        seconds = time.perf_counter() - started
        flagged = {row["file"] for row in read_table(result.dir / "label_issues.csv")}
        anchor = cleanlab_flags(data, embedder)
        results[f"{rate:g}"] = {
            "flipped": len(flipped), "audit_s": round(seconds, 2), "ours": scores(flagged, flipped),
            "cleanlab": None if anchor is None else scores(anchor, flipped),
            "ours_flagged_not_flipped": sorted(flagged - flipped)[:SHOWN]}
    return results


def warm_audit(source: Path, work: Path) -> dict:
    """The audit of the set itself (of a flattened copy when it has split folders), twice: the
    second run has every cache warm (embeddings, scan, pixels) and is the one timed; its flags are
    the set's own suspects."""
    if is_split_layout(source):
        noisy_copy(source, work / "flattened", 0.0, SEED)
        source = work / "flattened"
    audit(source, out=work / "warm-up", seed=SEED, show_progress=False)
    started = time.perf_counter()
    result = audit(source, out=work / "timed", seed=SEED, show_progress=False)
    seconds = time.perf_counter() - started
    issues = read_table(result.dir / "label_issues.csv")
    return {"audit_s": round(seconds, 2), "target_s": 10, "counts": result.summary["counts"],
            "label_issues": [{k: row[k] for k in ("file", "given_label", "suggested_label",
                                                  "given_probability")} for row in issues[:SHOWN]]}


# --- unknown inputs and calibration -------------------------------------------------------------

STRATEGIES = ("extract", "head", "finetune", "scratch")
SYNTHETIC_UNKNOWN = 40  # noise and blank images, half each


def synthetic_unknown(folder: Path, count: int = SYNTHETIC_UNKNOWN, seed: int = 0) -> list[Path]:
    """Random-noise and single-colour images: inputs no photo data set contains."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count // 2):
        noise = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        blank = np.full((224, 224, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        for name, pixels in (("noise", noise), ("blank", blank)):
            path = folder / f"{name}{i}.png"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


def detection(known: np.ndarray, unknown: np.ndarray) -> dict:
    """AUROC of telling unknown from known inputs by a score (higher: more likely unknown), and the
    share of unknown inputs let through when 95% of known ones are (FPR at 95% TPR)."""
    from sklearn.metrics import roc_auc_score

    truth = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    cut = np.quantile(known, 0.95)
    return {"auroc": round(float(roc_auc_score(truth, np.r_[known, unknown])), 4),
            "fpr_at_95_tpr": round(float((unknown <= cut).mean()), 4)}


def unknown_inputs(run_dir: Path, data_root: Path, unknown: list[Path]) -> dict:
    """The run's novelty score against the max-softmax baseline: its test split as the known
    inputs, `unknown` as the unknown ones; and what the bundle's own threshold (set on val) does."""
    from transferlab import load_model
    from transferlab.rundir.predictions import PredictionTable

    table = PredictionTable.read(run_dir / "predictions.csv")
    test = [data_root / table.files[i] for i in table.select("test")]
    model = load_model(run_dir / "model")
    known, _ = model.predict_scores(test)
    other, errors = model.predict_scores(unknown)
    read = np.array([not e for e in errors])
    msp = {"known": 1 - known.proba.max(1), "unknown": 1 - other.proba.max(1)[read]}
    return {"novelty": detection(known.novelty, other.novelty[read]),
            "max_softmax": detection(msp["known"], msp["unknown"]),
            "threshold": {"known_flagged": round(float(known.unknown.mean()), 4),
                          "unknown_flagged": round(float(other.unknown[read].mean()), 4)},
            "known": len(test), "unknown": int(read.sum())}


def calibration(metrics: dict) -> dict:
    return {split: {"ece_before": round(metrics[split]["ece_uncalibrated"], 4),
                    "ece_after": round(metrics[split]["ece"], 4)}
            for split in ("val", "test")} | {"temperature": round(metrics["trust"]["temperature"], 3)}


def cost(run_dir: Path, files: list[Path], rounds: int = 3) -> dict:
    """Bundle bytes the novelty bank adds, and predict's images/s with and without scoring novelty,
    alternated in one process (this machine is noisy: compare the ratio)."""
    from transferlab import load_model
    from transferlab.inference.trust import NOVELTY_FILE, Trust

    model = load_model(run_dir / "model")
    plain = load_model(run_dir / "model")
    plain.trust = Trust(model.trust.temperature)  # calibrated, no novelty
    plain.engine.module = plain.engine.module.net  # logits only, as a bundle without a bank runs
    speed = {"with_novelty": [], "without": []}
    for _ in range(rounds):
        for name, predictor in (("with_novelty", model), ("without", plain)):
            started = time.perf_counter()
            predictor.predict_proba(files, batch_size=32)
            speed[name].append(len(files) / (time.perf_counter() - started))
    best = {name: max(values) for name, values in speed.items()}
    weights = (run_dir / "model" / "model.safetensors").stat().st_size
    bank = (run_dir / "model" / NOVELTY_FILE).stat().st_size
    return {"bank_bytes": bank, "weights_bytes": weights,
            "images_per_s": {k: round(v, 1) for k, v in best.items()},
            "predict_time_added": round(best["without"] / best["with_novelty"] - 1, 4)}


def runs_of(compare_dir: Path | None, source: Path, work: Path) -> Path:
    """A `compare` folder holding one run per strategy on `source`: the one given, else trained
    now (about 8 minutes on face-mask on the 2-core test machine)."""
    if compare_dir is not None:
        return compare_dir
    from transferlab.workflows.compare import compare

    compare(source, strategies=list(STRATEGIES), out=work / "compare", show_progress=False)
    return work / "compare"


def trust_part(source: Path, compare_dir: Path, unknown_dir: Path, work: Path) -> dict:
    """Unknown-input detection (extract and finetune), calibration (all four strategies) and the
    cost of the novelty bank, on the runs in `compare_dir`."""
    from transferlab.inference.predictor import expand_inputs

    unknown = expand_inputs([str(unknown_dir)]) if unknown_dir.is_dir() else []
    unknown = [p for p in unknown if p.suffix.lower() != ".md"]
    synthetic = synthetic_unknown(work / "synthetic")
    runs = {name: next(compare_dir.glob(f"{name}-*")) for name in STRATEGIES
            if any(compare_dir.glob(f"{name}-*"))}
    report: dict = {"unknown_photos": str(unknown_dir), "calibration": {}, "unknown_inputs": {}}
    for name, run in runs.items():
        metrics = json.loads((run / "metrics.json").read_text())
        report["calibration"][name] = calibration(metrics)
        if name in ("extract", "finetune"):
            log(f"unknown inputs: {name}")
            report["unknown_inputs"][name] = {
                "photos_and_synthetic": unknown_inputs(run, source, unknown + synthetic),
                "photos_only": unknown_inputs(run, source, unknown),
                "synthetic_only": unknown_inputs(run, source, synthetic)}
    if "extract" in runs:
        files = [source / f for f in test_files(runs["extract"])][:256]
        report["cost"] = cost(runs["extract"], files)
    return report


def test_files(run: Path) -> list[str]:
    """The run's test images, relative to its data folder."""
    from transferlab.rundir.predictions import PredictionTable

    table = PredictionTable.read(run / "predictions.csv")
    return [table.files[i] for i in table.select("test")]


def _round(value):
    return None if value is None else round(value, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--part", choices=["labels", "trust"], action="append",
                        help="what to measure (repeatable; default: every part)")
    parser.add_argument("--rates", default="0.05,0.10", help="label-noise rates, comma-separated")
    parser.add_argument("--runs", type=Path, help="a `transferlab compare` folder of DATA with "
                        "extract, head, finetune and scratch runs (default: train them now)")
    parser.add_argument("--unknown", type=Path, default=DEFAULT_UNKNOWN,
                        help="photos unlike DATA's, as unknown inputs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if not args.data.is_dir():
        sys.exit(f"{args.data}: not found; give --data, a folder of class folders")
    parts = args.part or ["labels", "trust"]
    report: dict = {"data": str(args.data)}
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as folder:
        work = Path(folder)
        if "labels" in parts:
            report["warm_audit"] = warm_audit(args.data, work)
            report["labels"] = label_part(args.data, [float(r) for r in args.rates.split(",")], work)
        if "trust" in parts:
            report["trust"] = trust_part(args.data, runs_of(args.runs, args.data, work), args.unknown,
                                         work)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
