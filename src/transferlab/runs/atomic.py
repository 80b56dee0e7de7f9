"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A write goes to a temporary beside its target and is renamed onto it when complete. A process killed
before the rename leaves the temporary behind; temporaries are therefore named so that nothing mistakes
them for data (hidden, ending in .tmp) and remove_temporaries can find them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError

# mkstemp creates files readable by their owner only; finished files get the usual mode instead
# (0o666 less the umask, as open() would give), read once here because reading it means setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK  # mkdtemp makes owner-only folders too


def temporary_beside(path: str | os.PathLike) -> dict:
    """tempfile's prefix, suffix and dir for a temporary file or folder standing in for `path`:
    `.NAME.XXXXXXXX.tmp` in the same folder (so the final rename stays on one file system)."""
    path = Path(path)
    return {"prefix": f".{path.name}.", "suffix": ".tmp", "dir": path.parent}


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporaries that killed writes left directly in `folder`. Only when no write into
    `folder` can be under way: a temporary in use would vanish before its rename."""
    for path in Path(folder).glob(".*.tmp"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(**temporary_beside(path))
    os.close(fd)
    os.chmod(tmp, FILE_MODE)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def check_writable(folder: str | os.PathLike) -> None:
    """Fail before any work if `folder` cannot be written (or created): one clear error instead of a
    traceback once the work is done. Leaves no trace: a missing folder is not created here."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        # creating something is the only honest test: modes say nothing to root or on read-only mounts
        os.rmdir(tempfile.mkdtemp(**temporary_beside(existing / "write-test")))
    except OSError as error:
        raise ConfigError(f"{folder}: cannot write the output folder ({error.strerror}); choose "
                          "another --out") from None
