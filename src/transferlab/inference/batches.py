"""Batched inference over image files: decoded and resized in DataLoader workers, then run by an
engine (engines.py) on its device, batch by batch."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..data.decode import DEFAULT_MAX_PIXELS
from ..data.loaders import ImageDataset, make_loader
from ..data.transforms import Preprocessing


def run_batches(forward: Callable[[torch.Tensor, str], torch.Tensor], paths: Sequence[Path],
                pre: Preprocessing, *, precision: str, pin_memory: bool = False, batch_size: int = 32,
                workers: int | None = None, progress=None, max_pixels: int = DEFAULT_MAX_PIXELS,
                ) -> Iterator[tuple[range, torch.Tensor, list[str]]]:
    """Yield (positions in `paths`, float32 outputs, per-file error or "") batch by batch; an
    unreadable file gets zeros and its reason.

    `forward(uint8 NCHW batch, precision)` is an engine (engines.py) or a function of one;
    `precision` is already resolved for its device; `pin_memory` when that device is a CUDA GPU.
    `progress` is called with the number of files done after each batch."""
    dataset = ImageDataset(paths, pre, on_error="report", max_pixels=max_pixels)
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=pin_memory)
    start = 0
    for images, _, errors in loader:
        outputs = forward(images, precision)
        positions = range(start, start + len(images))
        start += len(images)
        yield positions, outputs, list(errors)
        if progress:
            progress(len(images))


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True):
    """Yield advance(n) for a Rich progress bar on stderr (stdout stays clean for JSON/CSV), or None."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
