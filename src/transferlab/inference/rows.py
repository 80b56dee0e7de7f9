"""Rows of numbers too many to hold: a RowFile keeps float32 rows in an anonymous temporary file
and gives them back in chunks. Extract's streamed fit reads its training embeddings from one, pass
after pass, and the validation and test features that novelty is scored on wait in one until
evaluation: at a million images of EfficientNet-Lite0 those are 300,000 x 1,280 floats, 1.5 GB.

Plain reads, not a memory map: a map's pages would count as the process's memory once touched."""

from __future__ import annotations

import tempfile
from typing import Iterable, Iterator

import numpy as np
import torch

CHUNK_ROWS = 8192  # 40 MB of Lite0 embeddings: large matrix products, small memory


class RowFile:
    """float32 rows of one width, written once in chunks and read back in chunks any number of
    times; only one chunk is in memory at a time."""

    def __init__(self, chunks: Iterable[np.ndarray]):
        self.file = tempfile.TemporaryFile()  # removed when closed, also when the process dies
        self.rows, self.width = 0, None
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=np.float32).reshape(len(chunk), -1)
            self.width = chunk.shape[1]
            chunk.tofile(self.file)
            self.rows += len(chunk)

    def __len__(self) -> int:
        return self.rows

    def chunks(self, rows: int = CHUNK_ROWS, reuse: bool = False) -> Iterator[np.ndarray]:
        """The rows, `rows` at a time. reuse: each chunk read into the same buffer, overwriting
        the one before (for a caller done with a chunk before it asks for the next): a third
        faster than a new array per chunk, whose fresh pages the kernel must clear first."""
        self.file.seek(0)
        buffer = np.empty((min(rows, self.rows), self.width or 0), dtype=np.float32) if reuse else None
        for start in range(0, self.rows, rows):
            count = min(rows, self.rows - start)
            chunk = buffer[:count] if reuse else np.empty((count, self.width), dtype=np.float32)
            if self.file.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise OSError(f"{self.file.name}: the row file ended early")
            yield chunk

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "RowFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Rows = np.ndarray | torch.Tensor | RowFile  # a whole split's features, in memory or not


def row_chunks(rows: Rows, count: int) -> Iterator[np.ndarray | torch.Tensor]:
    """`rows` at most `count` at a time; an array or tensor of `count` rows or fewer (also none)
    as itself, in one piece."""
    if isinstance(rows, RowFile):
        yield from rows.chunks(count, reuse=True)
        return
    for start in range(0, max(len(rows), 1), count):
        yield rows[start:start + count]
