"""Scan a labelled image folder: its class folders, every readable image, and what was skipped."""

from __future__ import annotations

import logging
import os
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .cache import ScanCache
from .decode import DEFAULT_MAX_PIXELS, ImageInfo, UnreadableImage, read_info

log = logging.getLogger(__name__)

_SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx"}
# Files to read before the scan starts worker processes. Measured on 2 cores with small images
# (bench_scale.py): threads read 1,590 files/s, processes 2,380 once started, and starting them costs
# about 0.4 s, which 2,000 files repay.
PROCESS_MIN_FILES = 2_000


@dataclass
class Scan:
    """Every readable image of a folder with its class, plus what was skipped and why."""

    root: Path
    classes: list[str]
    images: list[ImageInfo]
    labels: list[int]
    presplit: list[str] | None  # split name per image when the folder has train/ val/ test/
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # a StoredImage for a row
    ignored: list[Path] = field(default_factory=list)
    source: Path | None = None  # the labels file (CSV, metadata.jsonl), when not class folders

    def relative(self, index: int) -> str:
        """The image's path relative to root (with ../ when a labels file names one outside it), or
        a dataset row's SPLIT/INDEX (data/hf.py)."""
        path = self.images[index].path
        return relative_to(path, self.root) if isinstance(path, Path) else path.name

    def relative_groups(self, groups: list[list[int]]) -> list[list[str]]:
        return [[self.relative(i) for i in group] for group in groups]


def relative_to(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def scan_folder(root: str | os.PathLike, near_duplicates: bool = True,
                max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
                cache_dir: str | os.PathLike | None = None, min_classes: int = 2,
                layout: str = "auto") -> Scan:
    """Find the class folders under `root` (flat, or under train/ val/ test/: see _layout) and read
    every file; with `cache_dir`, files unchanged since the last scan are not read again. Training
    needs two classes; evaluating a model on one class's folder needs one (`min_classes`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a folder with one sub-folder per class")
    layout = _layout(root, layout)
    candidates, folders, ignored = _candidates(root, layout)
    cache = ScanCache(Path(cache_dir), root) if cache_dir else None
    readable, unreadable = read_images(candidates, [path for path, _, _ in candidates], cache,
                                       near_duplicates, max_pixels, workers)
    classes = _classes(root, readable, folders, unreadable, min_classes)
    scan = Scan(root, classes, [], [], [] if layout[0][0] else None, unreadable, ignored)
    for (path, class_name, split_name), result in readable:
        scan.images.append(result)
        scan.labels.append(classes.index(class_name))
        if scan.presplit is not None:
            scan.presplit.append(split_name)
    if cache:
        cache.save(scan.images)
    return scan


def _layout(root: Path, layout: str = "auto") -> list[tuple[str | None, Path]]:
    """(split name, folder) of a train/ val/ test/ layout, or [(None, root)] for class folders.

    `auto` takes the split layout when train/ and val/ (or validation/) both hold sub-folders (their
    classes), and class folders otherwise: a data set with a class called "train" is not a split.
    Other folders beside train/ and val/ make it ambiguous, and `layout` must say which it is."""
    folders = _subfolders(root)
    splits = {_SPLIT_FOLDERS[d.name.lower()]: d for d in folders if d.name.lower() in _SPLIT_FOLDERS}
    others = [d.name for d in folders if d.name.lower() not in _SPLIT_FOLDERS]
    looks_split = "train" in splits and "val" in splits and all(
        _subfolders(splits[name]) for name in ("train", "val"))
    if layout == "flat" or (layout == "auto" and not looks_split):
        log.info("layout: class folders under %s", root)
        return [(None, root)]
    if "train" not in splits or "val" not in splits:
        raise DataError(f"{root}: --layout split needs train/ and val/ (or validation/) folders, each "
                        "with one sub-folder per class")
    if others and layout == "auto":
        raise DataError(f"{root}: has train/ and val/ folders and also {', '.join(others[:5])}; use "
                        "--layout split to use train/ val/ test/ (and ignore the others), or --layout "
                        "flat to make every folder a class")
    if others:
        log.warning("layout: train/ val/ test/ folders; ignoring %s", ", ".join(others))
    else:
        log.info("layout: train/ val/ test/ folders under %s", root)
    return [(name, folder) for name, folder in sorted(splits.items())]


def _candidates(root: Path, layout: list[tuple[str | None, Path]]):
    """Every file of every class folder as (path, class, split), the class folders by class name,
    and the files ignored (hidden, system, loose)."""
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
    return candidates, folders, ignored


def read_images(items: list, paths: list[Path], cache: ScanCache | None, near_duplicates: bool,
                max_pixels: int, workers: int | None) -> tuple[list[tuple], list[tuple[Path, str]]]:
    """Read `paths` (one per item of `items`): (item, ImageInfo) of each readable one, and (path,
    reason) of each that is not, which is logged."""
    results = _read_all(paths, cache, near_duplicates, max_pixels, workers)
    unreadable = [(path, str(result)) for path, result in zip(paths, results)
                  if isinstance(result, UnreadableImage)]
    for path, reason in unreadable:
        log.warning("skipped %s: %s", path, reason)
    readable = [(item, result) for item, result in zip(items, results)
                if not isinstance(result, UnreadableImage)]
    return readable, unreadable


def _read_all(paths: list, cache: ScanCache | None, near_duplicates: bool, max_pixels: int,
              workers: int | None) -> list[ImageInfo | UnreadableImage]:
    """read_info of every file, or its cached result while the file is unchanged.

    Cached results are looked up in this process (a stat each; a pool would cost more than that).
    The files to read go to worker processes when there are at least PROCESS_MIN_FILES of them, so
    that the Python parts of reading each file (which hold the GIL) do not cap the scan at one core
    on machines with many; fewer files are read in threads, which start at once. Both give the
    same results; benchmarks/bench_scale.py (read_modes) compares their speeds."""
    results: list = (cache.lookup_all(paths, near_duplicates, max_pixels) if cache
                     else [None] * len(paths))
    todo = [i for i, result in enumerate(results) if result is None]
    read = partial(_read_one, with_phash=near_duplicates, max_pixels=max_pixels)
    for i, result in zip(todo, _map(read, [paths[i] for i in todo], workers)):
        results[i] = result
    return results


def _read_one(path, with_phash: bool, max_pixels: int) -> ImageInfo | UnreadableImage:
    try:
        return read_info(path, with_phash=with_phash, max_pixels=max_pixels)
    except UnreadableImage as error:
        return error


def _map(read, paths: list, workers: int | None) -> Iterator:
    """read(path) of every path, in order: in `workers` processes (all cores by default) when the
    paths are files and there are enough of them, else in threads."""
    workers = workers or os.cpu_count() or 1
    files = all(isinstance(path, (str, os.PathLike)) for path in paths)  # rows of a dataset stay here
    if workers > 1 and files and len(paths) >= PROCESS_MIN_FILES:
        # spawn: a fresh interpreter, not a fork of one that may hold torch's threads and locks
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:  # chunks: a round trip per file would cost about what reading a small file does
                yield from pool.map(read, paths, chunksize=max(1, min(256, len(paths) // (8 * workers))))
            except BaseException:  # interrupted: stop now, not once every queued file is read
                pool.shutdown(cancel_futures=True)
                raise
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(read, paths)


def _classes(root: Path, readable: list, folders: dict[str, list[Path]],
             unreadable: list[tuple[Path, str]], min_classes: int) -> list[str]:
    """The class names: folders with at least one readable image (an empty one is named, not
    trained on); an error when there are too few."""
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
    return classes


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


