"""A labelled image folder, scanned, deduplicated and split: what every strategy trains on."""

from __future__ import annotations

import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import ConfigError, DataError
from ..options import check
from .cache import default_cache_dir
from .decode import DEFAULT_MAX_PIXELS
from .duplicates import Duplicates, find_duplicates
from .edits import Edits, apply_edits
from .hf import HFSpec, is_hf, scan_hf
from .labels_file import labels_source, scan_labels_file
from .scan import Scan, scan_folder
from .split import MIN_IMAGES_TO_SPLIT, SPLITS, split_groups, split_notes

log = logging.getLogger(__name__)


NOTES_SHOWN = 5  # split notes logged one by one; the rest in one line (all are in split.json)


def _log_notes(notes: list[str]) -> None:
    for note in notes[:NOTES_SHOWN]:
        log.warning("%s", note)
    if len(notes) > NOTES_SHOWN:
        log.warning("... and %d more classes like these (split.json lists them all under notes)",
                    len(notes) - NOTES_SHOWN)


def data_location(root: str | os.PathLike) -> str:
    """DATA as run.json records it: the absolute folder or file, or the hf: spec of a Hugging Face
    dataset (with an absolute path when it is a local one)."""
    return str(HFSpec.parse(str(root))) if is_hf(root) else str(Path(root).resolve())


class ImageFolderData:
    """A labelled image folder with a deterministic, duplicate-aware train/val/test split.

    Work happens on first use: `scan` reads every file once, `split` deals the images out.
    `cache_dir` ("default": ~/.cache/transferlab; None: no cache) remembers per-file scan results.
    `exclude` (a CSV with a `file` column, or a list of files relative to `root`) leaves files out;
    `relabel` (a CSV with `file` and `label` columns, or a file -> label mapping) overrides labels.
    `root` may be a labels file (a CSV with `file` and `label` columns), or a folder with `labels`
    (such a file; paths relative to the folder) or with a metadata.csv/jsonl: see data/labels_file.py;
    or `hf:PATH_OR_NAME[:config]`, a Hugging Face dataset whose `image_column` and `label_column`
    are read (data/hf.py).
    """

    def __init__(self, root: str | os.PathLike, val: float = 0.15, test: float = 0.15, seed: int = 0,
                 near_duplicates: bool = True, dedupe_split: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: str | os.PathLike | None = "default",
                 min_classes: int = 2, layout: str = "auto",
                 exclude: str | os.PathLike | Iterable[str] | None = None,
                 relabel: str | os.PathLike | Mapping[str, str] | None = None,
                 labels: str | os.PathLike | None = None, image_column: str | None = None,
                 label_column: str | None = None):
        check({"val": val, "test": test, "seed": seed, "max_pixels": max_pixels, "layout": layout,
               "image_column": image_column, "label_column": label_column,
               **{name: str(value) for name, value in (("exclude", exclude), ("relabel", relabel),
                                                       ("labels", labels))
                  if isinstance(value, (str, os.PathLike))}})
        if val + test >= 1.0:
            raise ConfigError(f"val={val} + test={test} leaves nothing to train on; keep the sum below 1")
        self.hf = HFSpec.parse(str(root)) if is_hf(root) else None
        if self.hf is None and (image_column or label_column):
            raise ConfigError("--image-column and --label-column are for a Hugging Face dataset "
                              "(DATA hf:PATH_OR_NAME); drop them")
        if self.hf is not None and labels is not None:
            raise ConfigError(f"--labels {labels}: a Hugging Face dataset has its labels in a column; "
                              "name it with --label-column")
        self.root = self.hf.root if self.hf else Path(root)
        self.image_column, self.label_column = image_column, label_column
        self.val, self.test, self.seed = val, test, seed
        self.near_duplicates = near_duplicates
        self.dedupe_split = dedupe_split
        self.max_pixels = max_pixels
        self.min_classes = min_classes
        self.layout = layout
        self.cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
        self.edits = Edits.given(exclude, relabel)  # a bad CSV is refused here, before any work
        self.labels_file = None if labels is None else Path(labels)
        self.source = None if self.hf else labels_source(self.root, self.labels_file, layout)

    @cached_property
    def _edited(self) -> tuple[Scan, list[dict]]:
        reading = dict(near_duplicates=self.near_duplicates, max_pixels=self.max_pixels,
                       cache_dir=self.cache_dir, min_classes=self.min_classes)
        if self.hf:
            del reading["cache_dir"]  # rows have no file to stat: read again each time
            scan = scan_hf(self.hf, self.image_column or "image", self.label_column or "label",
                           **reading)
        elif self.source:
            scan = scan_labels_file(self.source, **reading)
        else:
            scan = scan_folder(self.root, layout=self.layout, **reading)
        return apply_edits(scan, self.edits)

    @property
    def scan(self) -> Scan:
        """The folder's images and labels, after --exclude and --relabel."""
        return self._edited[0]

    @property
    def relabelled(self) -> list[dict]:
        """{file, from, to} of every label --relabel changed."""
        return self._edited[1]

    @cached_property
    def duplicates(self) -> Duplicates:
        return find_duplicates(self.scan.images)

    @cached_property
    def split(self) -> dict[str, list[int]]:
        scan = self.scan
        if scan.presplit is not None:
            given = {name: [i for i, s in enumerate(scan.presplit) if s == name] for name in SPLITS}
            return given if given["val"] or not self.val else self._val_from_train(given)
        split = split_groups(scan.labels, self._components(), self.val, self.test, self.seed)
        if not split["train"]:
            raise DataError(f"{self.root}: val={self.val} and test={self.test} leave no image to "
                            "train on; lower them")
        _log_notes(split_notes(scan.classes, scan.labels, split, {"val": self.val, "test": self.test}))
        if (self.val or self.test) and not split["val"] and not split["test"]:
            log.warning("nothing to evaluate: no class has the %d images a split needs, so every image "
                        "is in train and val/test scores will be missing", MIN_IMAGES_TO_SPLIT)
        return split

    def _components(self) -> list[list[int]]:
        """What a split keeps together: duplicate groups, or (dedupe_split off) each image alone."""
        return (self.duplicates.components if self.dedupe_split
                else [[i] for i in range(len(self.scan.images))])

    def _val_from_train(self, given: dict[str, list[int]]) -> dict[str, list[int]]:
        """A given split without val (a Hugging Face dataset with train and test only): val is
        dealt out of train as a split is made, duplicate groups kept together."""
        train = set(given["train"])
        components = [[i for i in c if i in train] for c in self._components()]
        dealt = split_groups(self.scan.labels, [c for c in components if c], self.val, 0.0, self.seed)
        log.info("%s: no validation split given; %d of its %d train images are used for val",
                 self.location, len(dealt["val"]), len(train))
        return {"train": dealt["train"], "val": dealt["val"], "test": given["test"]}

    @property
    def location(self) -> str:
        """DATA as run.json, split.json and metrics.json record it (data_location)."""
        return str(self.hf) if self.hf else str(self.root.resolve())

    def notes(self) -> list[str]:
        """split_notes of this split (empty for a folder that came pre-split)."""
        if self.scan.presplit is not None:
            return []
        return split_notes(self.scan.classes, self.scan.labels, self.split,
                           {"val": self.val, "test": self.test})

    def groups_across_splits(self) -> list[list[int]]:
        """Duplicate groups whose members sit in different splits: leakage, possible only when the
        folder came pre-split or the split was made with dedupe_split=False."""
        home = {i: name for name, indices in self.split.items() for i in indices}
        return [g for g in self.duplicates.near if len({home[i] for i in g}) > 1]

    def has_copy_in_training(self, split: str) -> list[bool]:
        """For each image of `split`, whether a duplicate of it is in train: the images whose test
        result a leaky split inflates."""
        in_train = set(self.split["train"])
        copied = {i for group in self.duplicates.near if in_train.intersection(group) for i in group}
        return [i in copied for i in self.split[split]]

    @property
    def classes(self) -> list[str]:
        return self.scan.classes

    def files(self, split: str) -> list[Path]:
        return [self.scan.images[i].path for i in self.split[split]]

    def relative_files(self, split: str) -> list[str]:
        """The files of `split` relative to the folder, as split.json and predictions.csv name them."""
        return [self.scan.relative(i) for i in self.split[split]]

    def labels(self, split: str) -> list[int]:
        return [self.scan.labels[i] for i in self.split[split]]

    def hashes(self, split: str) -> list[str]:
        return [self.scan.images[i].sha256 for i in self.split[split]]

    def summary(self) -> dict:
        """The `split` section of metrics.json."""
        summary = {name: len(self.split[name]) for name in SPLITS}
        summary.update(seed=self.seed, duplicate_groups=len(self.duplicates.exact),
                       near_duplicate_groups=len(self.duplicates.near),
                       groups_across_splits=len(self.groups_across_splits()),
                       dedupe_split=self.dedupe_split, unreadable=len(self.scan.unreadable),
                       presplit=self.scan.presplit is not None, excluded=len(self.edits.exclude),
                       relabelled=len(self.relabelled))
        return summary

    def options(self) -> dict:
        """The constructor's arguments (cache aside): ImageFolderData(**options) splits the same way."""
        columns = {"image_column": self.image_column, "label_column": self.label_column}
        return {"root": self.location, "val": self.val, "test": self.test, "seed": self.seed,
                "near_duplicates": self.near_duplicates, "dedupe_split": self.dedupe_split,
                "max_pixels": self.max_pixels, "min_classes": self.min_classes, "layout": self.layout,
                "labels": None if self.labels_file is None else str(self.labels_file.resolve()),
                **{k: v for k, v in columns.items() if v is not None}, **self.edits.to_options()}

    def split_record(self) -> dict:
        """What split.json holds: the exact file lists and the duplicate groups, relative to root."""
        scan = self.scan
        root = str(self.hf) if self.hf else str(scan.root.resolve())  # what the files are under
        record = {"root": root, "classes": scan.classes, "seed": self.seed,
                  "fractions": {"val": self.val, "test": self.test}, **self.summary()}
        for name in SPLITS:
            record[name] = [{"file": scan.relative(i), "label": scan.classes[scan.labels[i]],
                             "sha256": scan.images[i].sha256} for i in self.split[name]]
        record["duplicate_group_files"] = scan.relative_groups(self.duplicates.exact)
        record["near_duplicate_group_files"] = scan.relative_groups(self.duplicates.near)
        record["unreadable"] = [{"file": str(p), "reason": r} for p, r in scan.unreadable]
        record["notes"] = self.notes()
        record["excluded"] = [item.file for item in self.edits.exclude]
        record["relabelled"] = self.relabelled
        record["edit_sources"] = dict(self.edits.sources)
        return record
