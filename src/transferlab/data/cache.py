"""Where transferlab caches work between runs, and the cache of per-file scan results.

A file's scan result (content hash, perceptual hash, format, size) is reused while the file's size
and modification time are unchanged, so a second run on the same folder does not decode every image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from ..rundir.atomic import write_json
from ..data.decode import ImageInfo

log = logging.getLogger(__name__)
SCAN_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """$TRANSFERLAB_CACHE, else $XDG_CACHE_HOME/transferlab, else ~/.cache/transferlab."""
    if os.environ.get("TRANSFERLAB_CACHE"):
        return Path(os.environ["TRANSFERLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferlab"


def stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class ScanCache:
    """ImageInfo of the files under one root folder, keyed by path and validated by stat_key."""

    def __init__(self, cache_dir: Path, root: Path):
        key = hashlib.sha256(os.fsencode(Path(root).resolve())).hexdigest()[:24]
        self.path = Path(cache_dir) / "scans" / f"{key}.json"

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
        return files if isinstance(files, dict) else {}

    def save(self, infos: list[ImageInfo]) -> None:
        files = {}
        for info in infos:
            try:
                entry = asdict(info)
                entry.update(path=str(info.path), stat=stat_key(info.path))
                files[str(info.path)] = entry
            except OSError:
                continue  # vanished since it was read: nothing worth remembering
        try:
            write_json(self.path, {"format": SCAN_CACHE_FORMAT, "files": files})
        except OSError as error:  # a read-only cache costs speed, never the run
            log.warning("could not write scan cache %s (%s)", self.path, error)

    @staticmethod
    def lookup(known: dict[str, dict], path: Path, need_phash: bool) -> ImageInfo | None:
        entry = known.get(str(path))
        if not isinstance(entry, dict) or (need_phash and entry.get("phash") is None):
            return None
        try:
            if entry.get("stat") != stat_key(path):
                return None
            info = ImageInfo(**{**{k: v for k, v in entry.items() if k != "stat"}, "path": path})
        except (OSError, TypeError):  # vanished, or an entry of another shape: read the file again
            return None
        typed = (isinstance(info.width, int) and isinstance(info.height, int)
                 and isinstance(info.sha256, str) and isinstance(info.format, str)
                 and (info.phash is None or isinstance(info.phash, int)))
        return info if typed else None
