"""Labels from a file instead of class folders: a CSV given as DATA or with `--labels`, or Hugging
Face's imagefolder `metadata.csv` / `metadata.jsonl` in the data folder.

The file has a `file` (or `file_name`) column, a `label` column (or, in a metadata file, the one other
column), and optionally a `split` column (train/val/test): when it is filled in for every row, that
split is used and none is made. Which file is used (`labels_source`):
1. `--labels FILE` with a folder as DATA: paths are relative to DATA (or absolute);
2. DATA itself a .csv or .jsonl file: paths are relative to its folder;
3. DATA a folder holding metadata.csv or metadata.jsonl (with `--layout auto`, the default): paths
   are relative to DATA, and the class folders, if any, are not used;
4. otherwise the class folders (data/scan.py).

The files are read as class folders are (scan.read_images and the scan cache) into the same `Scan`,
sorted by (split, class, path) as a folder scan sorts them, so the same images give the same split.
A row naming a missing file, with an empty label, or giving a file a second label is one warning
naming the labels file and the row as a spreadsheet numbers it (the header is row 1; in a .jsonl
file, the line), and is left out; the rest is used. A file with no file or label column is an error.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError, DataError
from ..rundir.predictions import from_spreadsheet
from .cache import ScanCache
from .decode import DEFAULT_MAX_PIXELS
from .edits import read_table
from .scan import _SPLIT_FOLDERS, Scan, read_images, relative_to

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.csv", "metadata.jsonl")
FILE_COLUMNS = ("file", "file_name")
ROWS_SHOWN = 10  # bad rows logged one by one; the rest in one line


@dataclass(frozen=True)
class Source:
    """A labels file and the folder its relative paths start from (the scan's root)."""

    file: Path
    root: Path


@dataclass(frozen=True)
class _Entry:
    path: Path
    label: str
    split: str | None
    row: int


def labels_source(data: Path, labels: Path | None = None, layout: str = "auto") -> Source | None:
    """Where the labels come from (see the module's docstring), or None for class folders."""
    data = Path(data)
    if labels is not None:
        labels = Path(labels)
        if not data.is_dir():
            raise ConfigError(f"--labels {labels}: DATA {data} is not a folder; give the folder its "
                              "paths are relative to, or give the labels file itself as DATA")
        if not labels.is_file():
            raise ConfigError(f"--labels {labels}: no such file; give a CSV with file and label columns")
        return Source(labels, data)
    if data.is_file():
        if data.suffix.lower() not in (".csv", ".jsonl"):
            raise DataError(f"{data}: not a folder, a .csv or a .jsonl file; give a folder with one "
                            "sub-folder per class, or a CSV with file and label columns")
        return Source(data, data.parent)
    if data.is_dir() and layout == "auto":
        found = [data / name for name in METADATA_FILES if (data / name).is_file()]
        if len(found) > 1:
            raise DataError(f"{data}: holds both metadata.csv and metadata.jsonl; keep one of them")
        if found:
            log.info("labels from %s (class folders, if any, are not used)", found[0])
            return Source(found[0], data)
    return None


def scan_labels_file(source: Source, near_duplicates: bool = True,
                     max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
                     cache_dir: str | os.PathLike | None = None, min_classes: int = 2) -> Scan:
    """A Scan of the files a labels file names, read exactly as scan_folder reads class folders."""
    entries, missing = read_labels(source)
    entries.sort(key=lambda e: (e.split or "", e.label, relative_to(e.path, source.root)))
    cache = ScanCache(Path(cache_dir), source.root) if cache_dir else None
    readable, unreadable = read_images(entries, [e.path for e in entries], cache, near_duplicates,
                                       max_pixels, workers)
    classes = sorted({e.label for e, _ in readable})
    for name in sorted({e.label for e in entries} - set(classes)):
        log.warning("%s: no file labelled %s could be read; that class is ignored", source.file, name)
    if len(classes) < min_classes:
        raise DataError(f"{source.file}: {len(classes)} class(es) with readable images {classes}"
                        f" ({len(missing) + len(unreadable)} files missing or unreadable); at least "
                        f"{min_classes} classes are needed"
                        + (f" (relative paths are read from {source.root})" if missing else ""))
    presplit = [e.split for e, _ in readable] if entries and entries[0].split else None
    scan = Scan(source.root, classes, [r for _, r in readable],
                [classes.index(e.label) for e, _ in readable], presplit, missing + unreadable,
                [], source.file)
    if cache:
        cache.save(scan.images)
    return scan


def read_labels(source: Source) -> tuple[list[_Entry], list[tuple[Path, str]]]:
    """The usable rows of a labels file, and the files it names that do not exist (with the row)."""
    columns, rows = _table(source.file)
    file_column, label_column, split_column = _columns(source.file, columns)
    entries: dict[str, _Entry] = {}
    missing: list[tuple[Path, str]] = []
    problems: list[str] = []
    conflicts: set[str] = set()
    for number, row in rows:
        file, label = row.get(file_column, ""), row.get(label_column, "")
        if not any(row.values()):
            continue
        where = f"{source.file} row {number}"
        if not file:
            problems.append(f"{where}: the {file_column} column is empty; row left out")
            continue
        path = Path(file.replace("\\", "/"))
        path = path if path.is_absolute() else source.root / path
        if not label:
            problems.append(f"{where}: no label for {file}; left out (write its class in the "
                            f"{label_column} column)")
            continue
        if not path.is_file():
            reason = f"no such file ({where})"
            problems.append(f"{where}: {file}: no such file under {source.root}; left out")
            missing.append((path, reason))
            continue
        key = os.path.normpath(os.path.abspath(path))
        earlier = entries.get(key)
        if earlier is not None and earlier.label != label:
            problems.append(f"{where}: {file} is labelled {label!r} here and {earlier.label!r} in row "
                            f"{earlier.row}; both rows left out (keep one of them)")
            conflicts.add(key)
        entries.setdefault(key, _Entry(path, label, _split(row, split_column, where), number))
    _log_problems(problems)
    kept = [entry for key, entry in entries.items() if key not in conflicts]
    _check_splits(source.file, kept)
    return kept, missing


def _table(path: Path) -> tuple[list[str], Iterable[tuple[int, dict]]]:
    """Column names and (row number, {column: text}) of a CSV or a JSON-lines file."""
    if path.suffix.lower() != ".jsonl":
        columns, rows = read_table(path, str(path))
        return columns, ((n, {k: from_spreadsheet(v) for k, v in row.items()}) for n, row in rows)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it ({error}); give a UTF-8 JSON-lines file") from None
    rows, columns, bad = [], {}, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as error:
            bad.append(f"{path} line {number}: not a JSON object ({error}); line left out")
            continue
        columns.update(dict.fromkeys(record))
        rows.append((number, {k: "" if v is None else str(v).strip() for k, v in record.items()}))
    _log_problems(bad)
    return list(columns), rows


def _columns(path: Path, columns: list[str]) -> tuple[str, str, str | None]:
    """The file, label and split columns; one clear error when the file or label column is missing."""
    shown = ", ".join(columns) or "empty"
    file_column = next((c for c in FILE_COLUMNS if c in columns), None)
    if file_column is None:
        raise ConfigError(f"{path}: no column named file (or file_name) in its header ({shown}); add "
                          "one with each image's path, relative to the labels file's folder")
    others = [c for c in columns if c not in (*FILE_COLUMNS, "split")]
    label_column = "label" if "label" in columns else (others[0] if len(others) == 1 else None)
    if label_column is None:
        raise ConfigError(f"{path}: no column named label in its header ({shown}); name the column "
                          "that holds each image's class label")
    return file_column, label_column, "split" if "split" in columns else None


def _split(row: dict, column: str | None, where: str) -> str | None:
    value = row.get(column, "").lower() if column else ""
    if value and value not in _SPLIT_FOLDERS:
        raise DataError(f"{where}: split {value!r} is not one of train, val, test; correct it, or "
                        "empty the split column to let transferlab split")
    return _SPLIT_FOLDERS.get(value)


def _check_splits(path: Path, entries: list[_Entry]) -> None:
    """A split column is used only when it names every row's split, with train and val among them."""
    given = [e for e in entries if e.split]
    if not given:
        return
    if len(given) < len(entries):
        row = next(e.row for e in entries if not e.split)
        raise DataError(f"{path}: the split column is empty in row {row} and "
                        f"{len(entries) - len(given) - 1} more rows but filled in in others; give every "
                        "row its split (train, val or test), or empty the column to let transferlab split")
    names = {e.split for e in given}
    if not {"train", "val"} <= names:
        raise DataError(f"{path}: the split column names no {'train' if 'train' not in names else 'val'}"
                        " images; a given split needs train and val rows")


def _log_problems(problems: list[str]) -> None:
    for problem in problems[:ROWS_SHOWN]:
        log.warning("%s", problem)
    if len(problems) > ROWS_SHOWN:
        log.warning("... and %d more rows like these left out", len(problems) - ROWS_SHOWN)
