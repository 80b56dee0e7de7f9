"""Scan a labelled image folder, find duplicate images, and split it without leaking duplicates."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..data.cache import ScanCache, default_cache_dir
from ..errors import ConfigError, DataError
from ..data.decode import DEFAULT_MAX_PIXELS, ImageInfo, UnreadableImage, read_info

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx"}
# Perceptual hashes (64 bits) this close are the same photo re-encoded, resized or lightly edited.
NEAR_DUPLICATE_BITS = 4
MIN_IMAGES_TO_SPLIT = 3  # a class needs one image each for train, val and test


@dataclass
class Scan:
    """Every readable image of a folder with its class, plus what was skipped and why."""

    root: Path
    classes: list[str]
    images: list[ImageInfo]
    labels: list[int]
    presplit: list[str] | None  # split name per image when the folder has train/ val/ test/
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)

    def relative(self, index: int) -> str:
        return self.images[index].path.relative_to(self.root).as_posix()

    def relative_groups(self, groups: list[list[int]]) -> list[list[str]]:
        return [[self.relative(i) for i in group] for group in groups]


@dataclass
class Duplicates:
    """Groups of image indices: byte-identical files, and perceptually near-identical ones
    (the near groups include the byte-identical ones)."""

    exact: list[list[int]]
    near: list[list[int]]
    components: list[list[int]]  # every image in exactly one component: what a split keeps together


def scan_folder(root: str | os.PathLike, near_duplicates: bool = True,
                max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
                cache_dir: str | os.PathLike | None = None, min_classes: int = 2) -> Scan:
    """Find the class folders under `root` (flat, or under train/ val/ test/) and read every file;
    with `cache_dir`, files unchanged since the last scan are not read again. Training needs two
    classes; evaluating a model on one class's folder needs one (`min_classes`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a folder with one sub-folder per class")
    split_dirs = {_SPLIT_FOLDERS[d.name.lower()]: d for d in _subfolders(root)
                  if d.name.lower() in _SPLIT_FOLDERS}
    if "train" in split_dirs:
        if "val" not in split_dirs:
            raise DataError(f"{root}: has train/ but no val/ (or validation/) folder")
        layout = [(name, folder) for name, folder in sorted(split_dirs.items())]
    else:
        layout = [(None, root)]

    candidates: list[tuple[Path, str, str | None]] = []
    ignored: list[Path] = []
    folders: dict[str, list[Path]] = {}
    for split_name, folder in layout:
        for class_dir in _subfolders(folder):
            files = _files_under(class_dir, ignored)
            folders.setdefault(class_dir.name, []).append(class_dir)
            candidates += [(path, class_dir.name, split_name) for path in files]
        ignored.extend(p for p in folder.iterdir() if p.is_file())
    if not folders:
        loose = [p for p in ignored if not _is_hidden(p)]
        raise DataError(f"{root}: no class folders" + (
            f", only {len(loose)} loose files; put each class's images in a sub-folder per class, "
            "such as cats/ and dogs/" if loose else "; give a folder with one sub-folder per class"))

    cache = ScanCache(Path(cache_dir), root) if cache_dir else None
    known = cache.load() if cache else {}

    def read(item):
        cached = ScanCache.lookup(known, item[0], need_phash=near_duplicates)
        if cached and cached.width * cached.height <= max_pixels:
            return cached
        try:
            return read_info(item[0], with_phash=near_duplicates, max_pixels=max_pixels)
        except UnreadableImage as error:
            return error

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(pool.map(read, candidates))

    unreadable = [(path, str(result)) for (path, _, _), result in zip(candidates, results)
                  if isinstance(result, UnreadableImage)]
    for path, reason in unreadable:
        log.warning("skipped %s: %s", path, reason)
    readable = [(item, result) for item, result in zip(candidates, results)
                if not isinstance(result, UnreadableImage)]
    # A class is a folder with at least one readable image; an empty one is named, not trained on.
    classes = sorted({class_name for (_, class_name, _), _ in readable})
    for name in sorted(set(folders) - set(classes)):
        log.warning("class folder %s holds no readable images; ignored",
                    " and ".join(str(f) for f in folders[name]))
    if not readable:
        raise DataError(f"{root}: no readable images in {len(folders)} class folder(s)"
                        + (f" ({len(unreadable)} files could not be read, such as {unreadable[0][0].name}: "
                           f"{unreadable[0][1]})" if unreadable else " (they hold no files)"))
    if len(classes) < min_classes:
        empty = sorted(set(folders) - set(classes))
        raise DataError(f"{root}: found {len(classes)} class folder(s) with images {classes}"
                        + (f" (none readable in {empty})" if empty else "")
                        + f"; at least {min_classes} classes are needed, one sub-folder each")

    scan = Scan(root, classes, [], [], [] if layout[0][0] else None, unreadable, ignored)
    for (path, class_name, split_name), result in readable:
        scan.images.append(result)
        scan.labels.append(classes.index(class_name))
        if scan.presplit is not None:
            scan.presplit.append(split_name)
    if cache:
        cache.save(scan.images)
    return scan


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p))


def _files_under(folder: Path, ignored: list[Path]) -> list[Path]:
    """Every file below `folder`, following linked folders but never into one already visited, so a
    link back up the tree (a loop) is skipped instead of walked forever."""
    files = []
    visited = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if _is_hidden(Path(name)) or real in visited:
                continue
            visited.add(real)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(dirpath) / name
            (ignored if _is_hidden(path) else files).append(path)
    return files


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in _SYSTEM_FILES


def find_duplicates(images: list[ImageInfo], max_bits: int = NEAR_DUPLICATE_BITS) -> Duplicates:
    """Connected components of "same bytes" and "perceptual hashes within `max_bits`"."""
    n = len(images)
    rows, cols = [], []
    first_with_hash: dict[str, int] = {}
    for i, image in enumerate(images):
        j = first_with_hash.setdefault(image.sha256, i)
        if j != i:
            rows.append(j)
            cols.append(i)
    exact = [group for group in _components(n, rows, cols) if len(group) > 1]

    if all(image.phash is not None for image in images):
        hashes = np.array([image.phash for image in images], dtype=np.uint64)
        for start in range(0, n, 1024):  # chunks keep the distance matrix small
            block = np.bitwise_count(hashes[start:start + 1024, None] ^ hashes[None, :])
            i, j = np.nonzero(block <= max_bits)
            keep = i + start < j
            rows.extend((i[keep] + start).tolist())
            cols.extend(j[keep].tolist())
    components = _components(n, rows, cols)
    near = [group for group in components if len(group) > 1]
    return Duplicates(exact=exact, near=near, components=components)


def _components(n: int, rows: list[int], cols: list[int]) -> list[list[int]]:
    """Connected components (singletons included) of the graph with edges rows[k]-cols[k]."""
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, membership = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for index, component in enumerate(membership):
        groups.setdefault(component, []).append(index)
    return list(groups.values())


def split_groups(labels: list[int], components: list[list[int]], val: float, test: float,
                 seed: int) -> dict[str, list[int]]:
    """Stratified, seeded split that never separates the members of a component.

    Each component counts for the class most of its images have; per class, components are shuffled
    and dealt to test, then val, while they fit in that split's share of the class, the rest to
    train. A group larger than what is left of a share goes to train rather than overfilling it (a
    class made of one big group of near-duplicates would otherwise land wholly in test). Every class
    of three or more images gets at least one in val and in test (when their fractions are above
    zero); smaller classes stay whole in train.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[list[int]]] = {}
    for component in sorted(components, key=min):
        label = Counter(labels[i] for i in component).most_common(1)[0][0]
        by_class.setdefault(label, []).append(component)
    split: dict[str, list[int]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        groups = by_class[label]
        rng.shuffle(groups)
        total = sum(len(g) for g in groups)
        wanted = {"test": _share(test, total), "val": _share(val, total)}
        taken = {"test": 0, "val": 0}
        for group in groups:
            target = next((name for name in ("test", "val") if taken[name] + len(group) <= wanted[name]),
                          "train")
            if target != "train":
                taken[target] += len(group)
            split[target].extend(group)
    return {name: sorted(indices) for name, indices in split.items()}


def _share(fraction: float, total: int) -> int:
    """Images of a class of `total` that a split with `fraction` gets."""
    if fraction == 0 or total < MIN_IMAGES_TO_SPLIT:
        return 0
    return max(1, round(fraction * total))


def split_notes(classes: list[str], labels: list[int], split: dict[str, list[int]],
                fractions: dict[str, float]) -> list[str]:
    """What the split did that a user would not expect: classes absent from val or test, and why."""
    notes = []
    for label, name in enumerate(classes):
        count = sum(1 for value in labels if value == label)
        missing = [part for part in ("val", "test") if fractions[part] > 0
                   and not any(labels[i] == label for i in split[part])]
        if not missing:
            continue
        if count < MIN_IMAGES_TO_SPLIT:
            why = f"has only {count} image{'s' if count > 1 else ''}: all in train"
        else:
            why = (f"has {count} images in duplicate groups too large for its val/test share: "
                   "kept in train")
        notes.append(f"class {name!r} {why}, none in {' or '.join(missing)}, so its "
                     f"{' and '.join(missing)} scores are missing")
    return notes


class ImageFolderData:
    """A labelled image folder with a deterministic, duplicate-aware train/val/test split.

    Work happens on first use: `scan` reads every file once, `split` deals the images out.
    `cache_dir` ("default": ~/.cache/transferlab; None: no cache) remembers per-file scan results.
    """

    def __init__(self, root: str | os.PathLike, val: float = 0.15, test: float = 0.15, seed: int = 0,
                 near_duplicates: bool = True, dedupe_split: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: str | os.PathLike | None = "default",
                 min_classes: int = 2):
        for name, value in (("val", val), ("test", test)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}={value!r}: must be a fraction in [0, 1), such as 0.15")
        if val + test >= 1.0:
            raise ConfigError(f"val={val} + test={test} leaves nothing to train on; keep the sum below 1")
        self.root = Path(root)
        self.val, self.test, self.seed = val, test, seed
        self.near_duplicates = near_duplicates
        self.dedupe_split = dedupe_split
        self.max_pixels = max_pixels
        self.min_classes = min_classes
        self.cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir

    @cached_property
    def scan(self) -> Scan:
        return scan_folder(self.root, near_duplicates=self.near_duplicates, max_pixels=self.max_pixels,
                           cache_dir=self.cache_dir, min_classes=self.min_classes)

    @cached_property
    def duplicates(self) -> Duplicates:
        return find_duplicates(self.scan.images)

    @cached_property
    def split(self) -> dict[str, list[int]]:
        scan = self.scan
        if scan.presplit is not None:
            return {name: [i for i, s in enumerate(scan.presplit) if s == name] for name in SPLITS}
        components = (self.duplicates.components if self.dedupe_split
                      else [[i] for i in range(len(scan.images))])
        split = split_groups(scan.labels, components, self.val, self.test, self.seed)
        for note in split_notes(scan.classes, scan.labels, split, {"val": self.val, "test": self.test}):
            log.warning("%s", note)
        return split

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
                       presplit=self.scan.presplit is not None)
        return summary

    def options(self) -> dict:
        """The constructor's arguments (cache aside): ImageFolderData(**options) splits the same way."""
        return {"root": str(self.root.resolve()), "val": self.val, "test": self.test, "seed": self.seed,
                "near_duplicates": self.near_duplicates, "dedupe_split": self.dedupe_split,
                "max_pixels": self.max_pixels, "min_classes": self.min_classes}

    def split_record(self) -> dict:
        """What split.json holds: the exact file lists and the duplicate groups, relative to root."""
        scan = self.scan
        record = {"root": str(scan.root.resolve()), "classes": scan.classes, "seed": self.seed,
                  "fractions": {"val": self.val, "test": self.test}, **self.summary()}
        for name in SPLITS:
            record[name] = [{"file": scan.relative(i), "label": scan.classes[scan.labels[i]]}
                            for i in self.split[name]]
        record["duplicate_group_files"] = scan.relative_groups(self.duplicates.exact)
        record["near_duplicate_group_files"] = scan.relative_groups(self.duplicates.near)
        record["unreadable"] = [{"file": str(p), "reason": r} for p, r in scan.unreadable]
        record["notes"] = self.notes()
        return record
