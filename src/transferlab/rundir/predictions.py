"""predictions.csv: every evaluated image with its true label and predicted probabilities, so the
report (and the user) can look at the mistakes without running the model again."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_bytes

FILE = "predictions.csv"
_FIXED = ["split", "file", "label", "predicted", "confidence"]
_NOVELTY = ["novelty", "unknown"]  # after the fixed columns, for a model with a novelty bank
# A spreadsheet runs a cell that starts with one of these as a formula (OWASP's CSV injection): such
# file and class names are written with a leading apostrophe, which spreadsheets hide, and read
# back without it. A name that itself starts with an apostrophe gets one more, so every name
# round-trips.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_safe(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def from_spreadsheet(text: str) -> str:
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_STARTS) else text


@dataclass
class PredictionTable:
    classes: list[str]
    splits: list[str]  # the split each image belongs to: val, test, or the evaluated folder's name
    files: list[str]  # relative to the data folder
    labels: np.ndarray  # true class indices
    proba: np.ndarray  # (images, classes)
    novelty: np.ndarray | None = None  # (images,), when the model has a novelty bank
    unknown: np.ndarray | None = None  # (images,) bool: novelty over the model's threshold

    @classmethod
    def concat(cls, classes: list[str], parts: dict[str, tuple]):
        """One table from {split: (files, labels, proba)} or {split: (files, labels, proba,
        novelty, unknown)} (novelty and unknown may be None)."""
        parts = {name: (*part, None, None)[:5] for name, part in parts.items()}
        splits = [name for name, part in parts.items() for _ in part[0]]
        files = [f for part in parts.values() for f in part[0]]
        labels = np.concatenate([np.asarray(part[1], dtype=np.int64) for part in parts.values()])
        proba = np.concatenate([part[2] for part in parts.values()]).reshape(-1, len(classes))
        table = cls(classes, splits, files, labels, proba)
        if all(part[3] is not None for part in parts.values()):
            table.novelty = np.concatenate([part[3] for part in parts.values()])
            table.unknown = np.concatenate([part[4] for part in parts.values()]).astype(bool)
        return table

    def write(self, path: str | Path) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        fixed = _FIXED + (_NOVELTY if self.novelty is not None else [])
        writer.writerow(fixed + [spreadsheet_safe(f"p:{name}") for name in self.classes])
        safe = [spreadsheet_safe(name) for name in self.classes]
        for i, (split, file, label, row) in enumerate(zip(self.splits, self.files, self.labels,
                                                          self.proba)):
            best = int(row.argmax())
            novelty = ([f"{self.novelty[i]:.6f}", str(bool(self.unknown[i])).lower()]
                       if self.novelty is not None else [])
            writer.writerow([split, spreadsheet_safe(file), safe[label], safe[best], f"{row[best]:.6f}",
                             *novelty, *(f"{p:.6f}" for p in row)])
        write_bytes(Path(path), buffer.getvalue().encode("utf-8", "surrogateescape"))

    @classmethod
    def read(cls, path: str | Path) -> "PredictionTable":
        with Path(path).open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            width = len(_FIXED) + (len(_NOVELTY) if header[len(_FIXED):][:2] == _NOVELTY else 0)
            classes = [from_spreadsheet(name).removeprefix("p:") for name in header[width:]]
            rows = list(reader)
        index = {name: i for i, name in enumerate(classes)}
        table = cls(classes, [r[0] for r in rows], [from_spreadsheet(r[1]) for r in rows],
                    np.array([index[from_spreadsheet(r[2])] for r in rows], dtype=np.int64),
                    np.array([[float(p) for p in r[width:]] for r in rows],
                             dtype=np.float64).reshape(-1, len(classes)))
        if width > len(_FIXED):
            table.novelty = np.array([float(r[len(_FIXED)]) for r in rows])
            table.unknown = np.array([r[len(_FIXED) + 1] == "true" for r in rows], dtype=bool)
        return table

    def select(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def confidently_wrong(self, split: str, limit: int = 12) -> list[int]:
        """Rows of `split` predicted wrongly, most confident first."""
        rows = self.select(split)
        predicted = self.proba[rows].argmax(1) if len(rows) else np.array([], dtype=np.int64)
        wrong = rows[predicted != self.labels[rows]]
        confidence = self.proba[wrong].max(1) if len(wrong) else np.array([])
        return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:limit]]
