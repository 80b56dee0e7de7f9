"""Where transferlab caches work between runs, and the cache of per-file scan results.

A file's scan result (content hash, perceptual hash, format, size) is reused while the file's size
and modification time are unchanged, so a second run on the same folder does not decode every image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import sys
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Sequence

from ..data.decode import ImageInfo

log = logging.getLogger(__name__)
SCAN_CACHE_FORMAT = 2  # SQLite's user_version; 1 was a JSON file
LOCK_WAIT_S = 30  # how long a run waits for another that is writing the same scan cache
_ENTRY_FIELDS = [field.name for field in fields(ImageInfo) if field.name != "path"]  # path: the key


def default_cache_dir() -> Path:
    """$TRANSFERLAB_CACHE, else $XDG_CACHE_HOME/transferlab, else ~/.cache/transferlab."""
    if os.environ.get("TRANSFERLAB_CACHE"):
        return Path(os.environ["TRANSFERLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferlab"


def stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class ScanCache:
    """ImageInfo of the files under one root folder, keyed by path and validated by stat_key, in a
    SQLite file read one row at a time, so a rescan holds no copy of it: read whole, the JSON file
    it replaced took 450 MB at 204,094 files, and would take gigabytes at a million.

    `reused` counts the files found unchanged; when every file of a scan was reused and none
    vanished, save() has nothing new to write and skips rewriting the whole file (at 200,000
    images, serialising it took longer than the rest of a warm rescan)."""

    def __init__(self, cache_dir: Path, root: Path):
        key = hashlib.sha256(os.fsencode(Path(root).resolve())).hexdigest()[:24]
        self.path = Path(cache_dir) / "scans" / f"{key}.sqlite"
        self.loaded = 0
        self.reused = 0

    def lookup_all(self, paths: Sequence[Path], need_phash: bool,
                   max_pixels: int) -> list[ImageInfo | None]:
        """The cached ImageInfo of each of `paths` while its file is unchanged (and within
        `max_pixels`), else None. One pass over the file's rows, whatever their order: a query per
        path took 11 µs a file against 0.6."""
        found: list[ImageInfo | None] = [None] * len(paths)
        position = {os.fsencode(path): i for i, path in enumerate(paths)}
        for key, stat, entry in self._entries():
            i = position.get(key)
            if i is not None:
                found[i] = self._info(paths[i], stat, entry, need_phash, max_pixels)
        self.reused = sum(info is not None for info in found)
        return found

    def _entries(self) -> Iterator[tuple[bytes, str, str]]:
        """(path as bytes, stat_key, JSON entry) of every row; none from a missing file, and none (or no
        more) from one that is damaged or of another format, which save() replaces."""
        self.loaded = 0
        if not self.path.exists():
            return
        try:
            # read-write: a save killed halfway left a journal, whose rollback is a write
            with contextlib.closing(sqlite3.connect(self.path, timeout=LOCK_WAIT_S)) as database:
                if database.execute("PRAGMA user_version").fetchone()[0] != SCAN_CACHE_FORMAT:
                    return
                for row in database.execute("SELECT path, stat, entry FROM files"):
                    self.loaded += 1
                    yield row
        except sqlite3.Error as error:
            log.warning("ignoring unreadable scan cache %s (%s)", self.path, error)

    @staticmethod
    def _info(path: Path, stat: str, entry: str, need_phash: bool,
              max_pixels: int) -> ImageInfo | None:
        try:
            values = json.loads(entry)
            if not isinstance(values, dict) or (need_phash and values.get("phash") is None):
                return None
            if stat != stat_key(path):
                return None
            info = ImageInfo(**{**values, "path": path, **_shared(values)})
        except (OSError, TypeError, ValueError, RecursionError):  # vanished, or another shape
            return None
        typed = (isinstance(info.width, int) and isinstance(info.height, int)
                 and isinstance(info.sha256, str) and isinstance(info.format, str)
                 and (info.phash is None or isinstance(info.phash, int)))
        return info if typed and info.width * info.height <= max_pixels else None

    def save(self, infos: list[ImageInfo]) -> None:
        if self.reused == len(infos) == self.loaded:
            return  # every entry read back unchanged: the file on disk already says all of it
        for last_try in (False, True):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.closing(sqlite3.connect(self.path, timeout=LOCK_WAIT_S,
                                                        isolation_level=None)) as database:
                    self._replace(database, infos)
                self.path.with_suffix(".json").unlink(missing_ok=True)  # format 1's, replaced
                return
            except sqlite3.DatabaseError as error:
                if last_try or isinstance(error, sqlite3.OperationalError):  # locked, full disk
                    log.warning("could not write scan cache %s (%s)", self.path, error)
                    return
                self.path.unlink(missing_ok=True)  # damaged, or not SQLite: started again
            except (OSError, ValueError) as error:  # a read-only cache costs speed, never the run
                log.warning("could not write scan cache %s (%s)", self.path, error)
                return

    @staticmethod
    def _replace(database: sqlite3.Connection, infos: list[ImageInfo]) -> None:
        """Every row replaced by `infos`, in one transaction: another run reads the old rows or the
        new ones, never a mixture, and an interrupted save leaves the old ones."""
        database.execute("BEGIN IMMEDIATE")  # the table's schema changes inside it too
        try:
            database.execute("DROP TABLE IF EXISTS files")
            # paths as bytes: a file name need not be valid UTF-8, which TEXT must be
            database.execute("CREATE TABLE files (path BLOB PRIMARY KEY, stat TEXT, entry TEXT) "
                             "WITHOUT ROWID")
            database.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", _rows(infos))
            database.execute(f"PRAGMA user_version = {SCAN_CACHE_FORMAT}")
            database.execute("COMMIT")
        except BaseException:
            database.execute("ROLLBACK")
            raise


def _rows(infos: list[ImageInfo]) -> Iterator[tuple[bytes, str, str]]:
    for info in infos:
        try:
            stat = stat_key(info.path)
        except OSError:
            continue  # vanished since it was read: nothing worth remembering
        entry = {name: getattr(info, name) for name in _ENTRY_FIELDS}  # asdict: slow
        yield os.fsencode(info.path), stat, json.dumps(entry)


def _shared(entry: dict) -> dict:
    """An entry's format and mode as the one string of each value: json makes a new string for
    every occurrence, and the ImageInfo of each file is held for the whole run (204,094 files held
    21 MB of "JPEG" and "RGB")."""
    return {key: sys.intern(entry[key]) for key in ("format", "mode")
            if isinstance(entry.get(key), str)}
