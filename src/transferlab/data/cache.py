"""Where transferlab caches work between runs, and the cache of per-file scan results.

A file's scan result (content hash, perceptual hash, format, size) is reused while the file's size
and modification time are unchanged, so a second run on the same folder does not decode every image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from ..rundir.atomic import write_json
from ..data.decode import ImageInfo

log = logging.getLogger(__name__)
SCAN_CACHE_FORMAT = 1
_FIELDS = [field.name for field in fields(ImageInfo)]


def default_cache_dir() -> Path:
    """$TRANSFERLAB_CACHE, else $XDG_CACHE_HOME/transferlab, else ~/.cache/transferlab."""
    if os.environ.get("TRANSFERLAB_CACHE"):
        return Path(os.environ["TRANSFERLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferlab"


def stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class ScanCache:
    """ImageInfo of the files under one root folder, keyed by path and validated by stat_key.

    `reused` counts the lookups that found an unchanged file; when every file of a scan was reused and
    none vanished, save() has nothing new to write and skips rewriting the whole file (at 200,000
    images, serialising it took longer than the rest of a warm rescan)."""

    def __init__(self, cache_dir: Path, root: Path):
        key = hashlib.sha256(os.fsencode(Path(root).resolve())).hexdigest()[:24]
        self.path = Path(cache_dir) / "scans" / f"{key}.json"
        self.loaded = 0
        self.reused = 0

    def load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as error:
            log.warning("ignoring unreadable scan cache %s (%s)", self.path, error)
            return {}
        if not isinstance(data, dict) or data.get("format") != SCAN_CACHE_FORMAT:
            return {}  # another format, or not ours: rescanned and rewritten
        files = data.get("files")
        files = files if isinstance(files, dict) else {}
        self.loaded = len(files)
        return files

    def save(self, infos: list[ImageInfo]) -> None:
        if self.reused == len(infos) == self.loaded:
            return  # every entry read back unchanged: the file on disk already says all of it
        files = {}
        for info in infos:
            try:
                entry = {name: getattr(info, name) for name in _FIELDS}  # asdict deep-copies: slow
                entry.update(path=str(info.path), stat=stat_key(info.path))
                files[str(info.path)] = entry
            except OSError:
                continue  # vanished since it was read: nothing worth remembering
        try:  # compact: json's C encoder only serves unindented output, 10x faster at this size
            write_json(self.path, {"format": SCAN_CACHE_FORMAT, "files": files}, indent=None)
        except OSError as error:  # a read-only cache costs speed, never the run
            log.warning("could not write scan cache %s (%s)", self.path, error)

    def lookup(self, known: dict[str, dict], path: Path, need_phash: bool,
               max_pixels: int) -> ImageInfo | None:
        """The cached ImageInfo of `path` while the file is unchanged (and within `max_pixels`)."""
        entry = known.get(str(path))
        if not isinstance(entry, dict) or (need_phash and entry.get("phash") is None):
            return None
        try:
            if entry.get("stat") != stat_key(path):
                return None
            info = ImageInfo(**{**{k: v for k, v in entry.items() if k != "stat"}, "path": path,
                                **_shared(entry)})
        except (OSError, TypeError):  # vanished, or an entry of another shape: read the file again
            return None
        typed = (isinstance(info.width, int) and isinstance(info.height, int)
                 and isinstance(info.sha256, str) and isinstance(info.format, str)
                 and (info.phash is None or isinstance(info.phash, int)))
        if not typed or info.width * info.height > max_pixels:
            return None
        self.reused += 1
        return info


def _shared(entry: dict) -> dict:
    """An entry's format and mode as the one string of each value: json makes a new string for
    every occurrence, and the ImageInfo of each file is held for the whole run (204,094 files held
    21 MB of "JPEG" and "RGB")."""
    return {key: sys.intern(entry[key]) for key in ("format", "mode")
            if isinstance(entry.get(key), str)}
