"""The files of a run directory (design §4) and how to read them back: report and compare build on
what a run wrote, never on a model in memory."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..runs.predictions import FILE as PREDICTIONS_FILE, PredictionTable

METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.csv"
REPORT_FILE = "report.html"
MODEL_DIR = "model"
COMPARISON_FILE = "comparison.json"  # marks a compare folder
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


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
        folder = Path(folder)
        metrics = _json(folder / METRICS_FILE)
        if metrics is None:
            raise ConfigError(f"{folder}: no {METRICS_FILE}; give the directory of a finished "
                              "`transferlab train`, `evaluate` or `compare`")
        predictions = folder / PREDICTIONS_FILE
        return cls(folder, metrics, _json(folder / RUN_FILE) or {}, _json(folder / SPLIT_FILE),
                   read_history(folder / HISTORY_FILE),
                   PredictionTable.read(predictions) if predictions.is_file() else None)

    @property
    def model_dir(self) -> Path | None:
        model = self.dir / MODEL_DIR
        return model if model.is_dir() else None


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ConfigError(f"{path}: malformed JSON ({error})") from None


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
