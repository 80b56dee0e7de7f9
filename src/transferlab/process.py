"""What a library call may have to change in the process for a while, and puts back when it ends.

Some libraries take their settings from environment variables, which child processes inherit:
Lightning passes its seed to DataLoader workers and DDP processes that way, and Uvicorn's worker
processes get their app's settings that way. A call that sets them restores them when it returns,
so nothing it did leaks into the rest of the user's program.
"""

from __future__ import annotations

import contextlib
import os
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
