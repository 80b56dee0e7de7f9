"""Acting on an audit: files left out of a data set (`--exclude`) and labels corrected (`--relabel`),
read from CSV files such as an edited label_issues.csv.

A CSV is checked in two steps, each before any work: its shape when it is read (a `file` column, a
`label` column for relabelling, no file given two different labels), and its content against the
scan (every file an image of DATA, every label one of its classes). Every error names the CSV, the
row as a spreadsheet numbers it (the header is row 1) and what to do.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import ConfigError
from ..rundir.predictions import from_spreadsheet
from .scan import Scan


@dataclass(frozen=True)
class Listed:
    """One file named by --exclude or --relabel, and where it was named (for error messages)."""

    file: str  # relative to DATA, as predictions.csv and label_issues.csv name it
    where: str  # such as "fixes.csv row 7"
    label: str | None = None  # the new label (--relabel only)
    row: int = 0  # the CSV row, as a spreadsheet numbers it (0: not from a CSV)


@dataclass(frozen=True)
class Edits:
    """What to leave out and what to relabel; `sources` names the CSV files they came from."""

    exclude: tuple[Listed, ...] = ()
    relabel: tuple[Listed, ...] = ()
    sources: tuple[tuple[str, str], ...] = ()  # (("exclude", "drop.csv"), ...)

    @classmethod
    def given(cls, exclude: str | os.PathLike | Iterable[str] | None = None,
              relabel: str | os.PathLike | Mapping[str, str] | None = None) -> "Edits":
        """Edits from CSV paths, or from the lists run.json recorded (a file list, a file -> label
        mapping), so that a resumed run leaves out and relabels exactly what it did first."""
        sources = []
        if isinstance(exclude, (str, os.PathLike)):
            sources.append(("exclude", str(exclude)))
            exclude = read_exclude(Path(exclude))
        else:
            exclude = tuple(Listed(f, f"exclude list item {n}") for n, f in enumerate(exclude or (), 1))
        if isinstance(relabel, (str, os.PathLike)):
            sources.append(("relabel", str(relabel)))
            relabel = read_relabel(Path(relabel))
        else:
            relabel = tuple(Listed(f, f"relabel entry {f!r}", label)
                            for f, label in (relabel or {}).items())
        return cls(tuple(exclude), tuple(relabel), tuple(sources))

    def to_options(self) -> dict:
        """The lists as ImageFolderData takes them back (run.json)."""
        return {"exclude": [item.file for item in self.exclude],
                "relabel": {item.file: item.label for item in self.relabel}}


def read_table(path: Path, where: str) -> tuple[list[str], Iterable[tuple[int, dict]]]:
    """(column names, (row number, row) of each row) of a UTF-8 CSV with a header row; `where`
    starts the error when it cannot be read (such as "--exclude drop.csv")."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(f"{where}: cannot read it ({reason}); give a UTF-8 CSV file "
                          "with a header row") from None
    reader = csv.DictReader(text.splitlines())
    columns = [name.strip() for name in reader.fieldnames or []]
    rows = ((number, {(k or "").strip(): (v or "").strip() for k, v in row.items() if k})
            for number, row in enumerate(reader, 2))
    return columns, rows


def _rows(path: Path, option: str, needed: tuple[str, ...]) -> Iterable[tuple[int, dict]]:
    """(row number, row) of a CSV that has the `needed` columns; one clear error otherwise."""
    columns, rows = read_table(path, f"--{option} {path}")
    for column in needed:
        if column not in columns:
            hint = (" (label_issues.csv calls it suggested_label: rename that column to label after "
                    "checking each row)" if column == "label" and "suggested_label" in columns else "")
            raise ConfigError(f"--{option} {path}: no column named {column} in its header row "
                              f"({', '.join(columns) or 'empty'}); add one{hint}")
    yield from rows


def read_exclude(path: Path) -> tuple[Listed, ...]:
    """The files of a CSV's `file` column (other columns are ignored)."""
    listed = []
    for number, row in _rows(path, "exclude", ("file",)):
        file = _file_of(row, path, number, "exclude")
        if file:
            listed.append(Listed(file, f"--exclude {path} row {number}", row=number))
    return tuple(listed)


def read_relabel(path: Path) -> tuple[Listed, ...]:
    """(file, label) of a CSV's `file` and `label` columns; a file listed twice must agree."""
    listed: dict[str, Listed] = {}
    for number, row in _rows(path, "relabel", ("file", "label")):
        file = _file_of(row, path, number, "relabel")
        if not file:
            continue
        label = from_spreadsheet(row["label"])
        where = f"--relabel {path} row {number}"
        if not label:
            raise ConfigError(f"{where}: no label for {file}; write its class in the label column "
                              "or remove the row")
        earlier = listed.get(file)
        if earlier is not None and earlier.label != label:
            raise ConfigError(f"{where}: {file} is listed again with another label ({earlier.label!r} "
                              f"in row {earlier.row}, {label!r} here); keep one of the rows")
        listed.setdefault(file, Listed(file, where, label, number))
    return tuple(listed.values())


def _file_of(row: dict, path: Path, number: int, option: str) -> str:
    """The row's file, relative to DATA with forward slashes; empty rows are skipped."""
    file = from_spreadsheet(row.get("file", ""))
    if not file and any(row.values()):
        raise ConfigError(f"--{option} {path} row {number}: the file column is empty; give the "
                          "image's path relative to DATA (such as cats/1.jpg) or remove the row")
    return file.replace("\\", "/")


def apply_edits(scan: Scan, edits: Edits) -> tuple[Scan, list[dict]]:
    """`scan` without the excluded files and with the new labels, and what was relabelled
    ({file, from, to}); a file that is not an image of the scan, or a label that is not one of its
    classes, is an error naming where it was listed."""
    if not edits.exclude and not edits.relabel:
        return scan, []
    index = {scan.relative(i): i for i in range(len(scan.images))}
    for item in (*edits.exclude, *edits.relabel):
        if item.file not in index:
            raise ConfigError(f"{item.where}: {item.file!r} is not an image of {scan.root} (no such "
                              "file, or it was skipped as unreadable); name files relative to DATA "
                              "as label_issues.csv does, or remove the row")
    for item in edits.relabel:
        if item.label not in scan.classes:
            raise ConfigError(f"{item.where}: label {item.label!r} is not a class of {scan.root}; "
                              f"use one of {', '.join(scan.classes)}, or remove the row")
    labels = list(scan.labels)
    relabelled = []
    for item in edits.relabel:
        i = index[item.file]
        relabelled.append({"file": item.file, "from": scan.classes[labels[i]], "to": item.label})
        labels[i] = scan.classes.index(item.label)
    excluded = {index[item.file] for item in edits.exclude}
    kept = [i for i in range(len(scan.images)) if i not in excluded]
    edited = replace(scan, images=[scan.images[i] for i in kept], labels=[labels[i] for i in kept],
                     presplit=None if scan.presplit is None else [scan.presplit[i] for i in kept])
    return edited, relabelled
