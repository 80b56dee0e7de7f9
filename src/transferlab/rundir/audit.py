"""The data audit's files, in the folder `transferlab audit --out` names, or in a run's audit/:

    label_issues.csv  file, given_label, suggested_label, given_probability, suggested_probability,
                      score, rank: the suspects of confident learning, most suspicious first
    outliers.csv      file, label, score, rank: images far from the rest of their class
    conflicts.csv     group, file, label: duplicate groups whose copies carry different labels
    quality.csv       file, label, flags, detail: small, aspect, uniform or blurry images
    audit.json        counts, parameters and thresholds
    audit.html        the self-contained page

Every CSV is written the way predictions.csv is (names a spreadsheet would run as a formula get a
leading apostrophe) and atomically; any of them, edited, is a valid `train --exclude` list.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_bytes
from .predictions import from_spreadsheet, spreadsheet_safe

AUDIT_DIR = "audit"  # inside a run directory
LABEL_ISSUES_COLUMNS = ("file", "given_label", "suggested_label", "given_probability",
                        "suggested_probability", "score", "rank")
OUTLIER_COLUMNS = ("file", "label", "score", "rank")
CONFLICT_COLUMNS = ("group", "file", "label")
QUALITY_COLUMNS = ("file", "label", "flags", "detail")
AUDIT_FILES = ("label_issues.csv", "outliers.csv", "conflicts.csv", "quality.csv", "audit.json",
               "audit.html")


@dataclass(frozen=True)
class AuditFiles:
    """The paths of one audit's files."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    label_issues = property(lambda self: self.path / "label_issues.csv")
    outliers = property(lambda self: self.path / "outliers.csv")
    conflicts = property(lambda self: self.path / "conflicts.csv")
    quality = property(lambda self: self.path / "quality.csv")
    json = property(lambda self: self.path / "audit.json")
    html = property(lambda self: self.path / "audit.html")


def write_table(path: Path, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """A CSV with a header; text cells spreadsheet-safe, floats with 6 decimals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([f"{v:.6f}" if isinstance(v, float) else
                         spreadsheet_safe(v) if isinstance(v, str) else v for v in row])
    write_bytes(path, buffer.getvalue().encode("utf-8", "surrogateescape"))


def read_table(path: Path) -> list[dict[str, str]]:
    """A table written by write_table, names as they were (empty when the file is absent)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return [{key: from_spreadsheet(value) for key, value in row.items()}
                for row in csv.DictReader(handle)]
