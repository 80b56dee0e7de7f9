"""The run directory: every file name, the one run.json writer, the default run name, and reading
a finished run back. Report and compare build on what a run wrote, never on a model in memory.

A run (train), an evaluation (evaluate) and a comparison (compare) are folders laid out like this:

    model/            the bundle (inference/bundle.py)
    metrics.json      results, in the shape documented in README
    predictions.csv   every val/test (or evaluated) image with its label and probabilities
    history.csv       one row per epoch (trained strategies)
    split.json        the exact file lists of train / val / test, with the seed
    run.json          the resolved configuration, the command and the versions that produced it
    report.html       the self-contained report
    checkpoints/      last.ckpt and best.ckpt (trained strategies)
    logs/             TensorBoard event files
    comparison.json   (a comparison) the rows of the table; marks the folder as a comparison
    audit/            the data audit of the training split (rundir/audit.py; `transferlab audit`
                      writes the same files at the top of its folder)
    auto-plan.json    (strategy auto) the backbone, budget and fine-tuning epochs it chose, which
                      a resumed run keeps
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError
from .atomic import write_json
from .audit import AUDIT_DIR, AUDIT_FILES
from .predictions import FILE as PREDICTIONS_FILE, PredictionTable

METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.csv"
REPORT_FILE = "report.html"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best"  # ModelCheckpoint's file name, which adds .ckpt
LOGS_DIR = "logs"
AUTO_PLAN_FILE = "auto-plan.json"
COMPARISON_FILE = "comparison.json"
COMPARISON_TABLES = ("comparison.csv", "comparison.md")
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_loss_calibrated",
                   "lr", "seconds")
RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    metrics = property(lambda self: self.path / METRICS_FILE)
    run = property(lambda self: self.path / RUN_FILE)
    split = property(lambda self: self.path / SPLIT_FILE)
    history = property(lambda self: self.path / HISTORY_FILE)
    report = property(lambda self: self.path / REPORT_FILE)
    predictions = property(lambda self: self.path / PREDICTIONS_FILE)
    model = property(lambda self: self.path / MODEL_DIR)
    checkpoints = property(lambda self: self.path / CHECKPOINTS_DIR)
    last_checkpoint = property(lambda self: self.path / CHECKPOINTS_DIR / LAST_CHECKPOINT)
    comparison = property(lambda self: self.path / COMPARISON_FILE)
    audit = property(lambda self: self.path / AUDIT_DIR)
    auto_plan = property(lambda self: self.path / AUTO_PLAN_FILE)


# What a run, an evaluation or a comparison writes: an --out holding any of them holds results.
RUN_ENTRIES = (METRICS_FILE, RUN_FILE, SPLIT_FILE, HISTORY_FILE, REPORT_FILE, PREDICTIONS_FILE,
               MODEL_DIR, CHECKPOINTS_DIR, LOGS_DIR, COMPARISON_FILE, *COMPARISON_TABLES, AUDIT_DIR,
               *AUDIT_FILES, AUTO_PLAN_FILE)


def results_in(folder: str | Path) -> list[str]:
    """The run files and folders `folder` already holds."""
    folder = Path(folder)
    return [name for name in RUN_ENTRIES if (folder / name).exists()]


def claim_output(folder: str | Path, overwrite: bool = False) -> None:
    """Before any work: refuse an output folder that holds the results of an earlier run,
    evaluation or comparison (a new run would reuse its checkpoint, an evaluation replace its
    metrics), unless `overwrite`, which removes them. Other files in the folder are left alone."""
    found = results_in(folder)
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{folder}: already holds results ({', '.join(found[:4])}); continue that "
                          f"run with `transferlab train --resume {folder}`, choose another --out, "
                          "or add --overwrite to replace them")
    for name in found:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def is_within(path: str | Path, root: str | Path) -> bool:
    """Whether `path`, links resolved, is `root` or lies below it."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except (ValueError, OSError):
        return False
    return True


def file_inside(root: str | Path, name: str) -> Path | None:
    """root/name when `name` is a relative path that stays inside `root`, else None: a page shows
    pictures of the data set only, never another file a crafted CSV names."""
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not is_within(Path(root) / path, root):
        return None
    return Path(root) / path


def check_outside(out: Path, root: Path) -> None:
    """An output folder inside the data folder would be scanned as a class by the next run."""
    if not is_within(out, root):
        return
    raise ConfigError(f"--out {out} is inside the data folder {root}, whose next scan would take it "
                      "for a class; choose an --out outside it")


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder while writing it: a second transferlab process
    writing the same folder (two trainings, or an evaluation into a run) is refused instead of
    mixing its files with the first one's. The lock is on the folder itself (flock), so it adds no
    file and ends with the process, however it ends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the check of results_in still applies
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{folder}: another transferlab process is writing this folder; wait "
                              "for it to finish, or choose another --out") from None
        yield
    finally:
        os.close(descriptor)


def default_run_dir(kind: str, name: str | None = None) -> Path:
    """runs/KIND-NAME-YYYYmmdd-HHMMSS: the folder a command writes when --out is not given."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parts = [kind, re.sub(r"[^\w.+-]+", "_", name)] if name else [kind]
    return RUNS_ROOT / "-".join([*parts, stamp])


def provenance() -> dict:
    """What produced a record: the command, transferlab's version and the machine."""
    from .. import __version__

    return {"command": sys.argv, "transferlab_version": __version__, "environment": environment()}


def write_run_record(folder: str | Path, **record) -> None:
    """The one writer of run.json: `record` (configuration, data, ...) plus its provenance."""
    write_json(RunDir(folder).run, {**record, **provenance()})


def read_json(path: Path) -> dict | None:
    """A JSON file as a dict; None when absent; one clear error when malformed."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"{path}: malformed JSON ({str(error)[:200]})") from None


def read_history(path: str | Path) -> list[dict]:
    """history.csv as a list of rows with numbers (None where a value was not logged)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [{key: (int(value) if key == "epoch" else float(value) if value else None)
                 for key, value in row.items()} for row in csv.DictReader(handle)]


@dataclass
class RunFiles:
    """What a run (or an evaluation) directory holds; absent files are None or empty."""

    dir: Path
    metrics: dict
    run: dict
    split: dict | None
    history: list[dict]
    predictions: PredictionTable | None

    @classmethod
    def read(cls, folder: str | Path) -> "RunFiles":
        paths = RunDir(folder)
        metrics = read_json(paths.metrics)
        if metrics is None:
            raise ConfigError(f"{paths.path}: no {METRICS_FILE}; give the directory of a finished "
                              "`transferlab train`, `evaluate` or `compare`")
        return cls(paths.path, metrics, read_json(paths.run) or {}, read_json(paths.split),
                   read_history(paths.history),
                   PredictionTable.read(paths.predictions) if paths.predictions.is_file() else None)

    @property
    def model_dir(self) -> Path | None:
        model = RunDir(self.dir).model
        return model if model.is_dir() else None


def environment() -> dict:
    """Versions and machine facts recorded in run.json, so a report says what produced it."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("transferlab", "torch", "timm", "lightning", "scikit-learn", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "packages": versions}
