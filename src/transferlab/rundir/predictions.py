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

    @classmethod
    def concat(cls, classes: list[str], parts: dict[str, tuple[list[str], np.ndarray, np.ndarray]]):
        """One table from {split: (files, labels, proba)}."""
        splits = [name for name, (files, _, _) in parts.items() for _ in files]
        files = [f for files, _, _ in parts.values() for f in files]
        labels = np.concatenate([np.asarray(y, dtype=np.int64) for _, y, _ in parts.values()])
        proba = np.concatenate([p for _, _, p in parts.values()]).reshape(-1, len(classes))
        return cls(classes, splits, files, labels, proba)

    def write(self, path: str | Path) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(_FIXED + [spreadsheet_safe(f"p:{name}") for name in self.classes])
        safe = [spreadsheet_safe(name) for name in self.classes]
        for split, file, label, row in zip(self.splits, self.files, self.labels, self.proba):
            best = int(row.argmax())
            writer.writerow([split, spreadsheet_safe(file), safe[label], safe[best], f"{row[best]:.6f}",
                             *(f"{p:.6f}" for p in row)])
        write_bytes(Path(path), buffer.getvalue().encode("utf-8", "surrogateescape"))

    @classmethod
    def read(cls, path: str | Path) -> "PredictionTable":
        with Path(path).open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            classes = [from_spreadsheet(name).removeprefix("p:") for name in header[len(_FIXED):]]
            rows = list(reader)
        index = {name: i for i, name in enumerate(classes)}
        return cls(classes, [r[0] for r in rows], [from_spreadsheet(r[1]) for r in rows],
                   np.array([index[from_spreadsheet(r[2])] for r in rows], dtype=np.int64),
                   np.array([[float(p) for p in r[len(_FIXED):]] for r in rows],
                            dtype=np.float64).reshape(-1, len(classes)))

    def select(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def confidently_wrong(self, split: str, limit: int = 12) -> list[int]:
        """Rows of `split` predicted wrongly, most confident first."""
        rows = self.select(split)
        predicted = self.proba[rows].argmax(1) if len(rows) else np.array([], dtype=np.int64)
        wrong = rows[predicted != self.labels[rows]]
        confidence = self.proba[wrong].max(1) if len(wrong) else np.array([])
        return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:limit]]
