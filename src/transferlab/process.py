"""What a library call may have to change in the process for a while, and puts back when it ends.

Some libraries take their settings from environment variables, which child processes inherit:
Lightning passes its seed to DataLoader workers and DDP processes that way, and Uvicorn's worker
processes get their app's settings that way. A call that sets them restores them when it returns,
so nothing it did leaks into the rest of the user's program. Likewise for how malloc hands memory
back to the kernel while networks run (reused_memory), as far as glibc lets it be put back.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import threading
from typing import Iterator, Mapping


@contextlib.contextmanager
def scoped_environment(values: Mapping[str, str] | None = None) -> Iterator[None]:
    """Set `values` (if any) for the duration of the block; afterwards every variable set, changed
    or removed inside it is as it was before."""
    saved = dict(os.environ)
    os.environ.update(values or {})
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


# glibc's mallopt parameters and the values its malloc settles at on its own (see reused_memory)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_SETTLED_MMAP_THRESHOLD = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_DEFAULT_MMAP_MAX = 65536
_KEEP_EVERYTHING = 2**31 - 1
_reuse_lock = threading.Lock()
_reuse_depth = 0


@contextlib.contextmanager
def reused_memory() -> Iterator[bool]:
    """While the block runs, glibc's malloc keeps the memory a tensor frees for the next one instead
    of handing it back to the kernel; yields whether it could (glibc only: elsewhere, no change).

    By default glibc gives every block over 32 MB its own mmap and unmaps it when freed, so each
    batch's large activations (EfficientNet-Lite0 at batch 32: up to 154 MB each) come back as fresh
    pages that the kernel faults in and zeroes, page by page: 1.4-1.8 million page faults in 8
    fine-tuning steps on the 2-core test machine, a sixth of the step's time; torch's inference at
    batch 32 took 1,170 an image. Inside the block those blocks come from the heap, which is not
    trimmed: 0.1-0.3 million faults in those steps, none in inference, and the same peak RSS. The
    workflows (train, evaluate, audit, predict) run inside it; a long-running service does not, as
    its heap would hold its busiest moment's memory for good.

    Afterwards the heap is trimmed and malloc left as glibc's own dynamic threshold leaves it once
    the program has freed a block of 32 MB or more (mallopt cannot give that adjustment back, only
    its settled values). Nested blocks keep it until the outermost one ends."""
    global _reuse_depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _reuse_lock:
        _reuse_depth += 1
        if _reuse_depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_EVERYTHING)
    try:
        yield True
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, 2 * _SETTLED_MMAP_THRESHOLD)
                libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (Linux, not musl), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
