"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A write goes to a temporary beside its target and is renamed onto it when complete. A process killed
before the rename leaves the temporary behind; temporaries are therefore named so that nothing mistakes
them for data (hidden, ending in .tmp) and remove_temporaries can find them.

Temporaries are created with the modes open() and mkdir() would give the final file or folder (the
process's umask applies, as the kernel applies it), unlike tempfile's owner-only ones, so nothing
here needs to read the umask, which in Python means setting it for the whole process.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError

TEMPORARY_SUFFIX = ".tmp"
MAX_NAME_BYTES = 255  # a file name's limit on Linux, macOS and Windows file systems


def _temporary_name(path: Path) -> Path:
    """`.NAME.XXXXXXXX.tmp` in the same folder (so the final rename stays on one file system), NAME
    shortened so that the temporary is a legal name wherever the target is (255 bytes)."""
    name = os.fsencode(path.name)[:MAX_NAME_BYTES - 15].decode("utf-8", "ignore")
    return path.with_name(f".{name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


def _create_beside(path: Path, make) -> Path:
    """Create a fresh temporary for `path` with `make(temporary)`, retrying on a name clash."""
    for _ in range(100):
        temporary = _temporary_name(path)
        try:
            make(temporary)
            return temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file beside {path.name}")


def temporary_folder_beside(path: str | os.PathLike) -> Path:
    """A new empty folder standing in for `path` until it is renamed onto it."""
    return _create_beside(Path(path), lambda folder: os.mkdir(folder, 0o777))


def replace_folder(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the complete folder `new` onto `path` (same file system), removing any folder there only
    once `new` has taken its place; a reader meanwhile sees the old folder or, for an instant, none."""
    new, path = Path(new), Path(path)
    if not path.exists():
        new.rename(path)
        return
    retired = path.with_name(f".{path.name}.old{TEMPORARY_SUFFIX}")  # a temporary too, if killed here
    shutil.rmtree(retired, ignore_errors=True)
    path.rename(retired)
    new.rename(path)
    shutil.rmtree(retired, ignore_errors=True)


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporaries that killed writes left directly in `folder`. Only when no write into
    `folder` can be under way: a temporary in use would vanish before its rename."""
    for path in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    tmp_path = _create_beside(path, lambda temporary: os.close(os.open(temporary, flags, 0o666)))
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
    """UTF-8; a file name that is not valid UTF-8 (Python holds its bytes as surrogates) is written
    as the bytes it has on disk."""
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """Readable UTF-8 JSON, or, when a string holds such a file name, JSON with non-ASCII characters
    escaped (\\udcxx), which reads back to the same name. `indent` None: compact, for large files."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = (json.dumps(obj, indent=indent) + "\n").encode("ascii")
    write_bytes(path, data)


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
        os.rmdir(temporary_folder_beside(existing / "write-test"))
    except OSError as error:
        raise ConfigError(f"{folder}: cannot write the output folder ({error.strerror}); choose "
                          "another --out") from None
