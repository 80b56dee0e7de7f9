"""Batched inference over image files: decoded and resized in DataLoader workers, then run by an
engine (engines.py) on its device, batch by batch."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..data.decode import DEFAULT_MAX_PIXELS
from ..data.loaders import ImageDataset, make_loader
from ..data.transforms import Preprocessing


def run_batches(forward: Callable[[torch.Tensor, str], torch.Tensor], paths: Sequence[Path],
                pre: Preprocessing, *, precision: str, pin_memory: bool = False, batch_size: int = 32,
                workers: int | None = None, progress=None, max_pixels: int = DEFAULT_MAX_PIXELS,
                decode_ahead: bool = False) -> Iterator[tuple[range, torch.Tensor, list[str]]]:
    """Yield (positions in `paths`, float32 outputs, per-file error or "") batch by batch; an
    unreadable file gets zeros and its reason.

    `forward(uint8 NCHW batch, precision)` is an engine (engines.py) or a function of one;
    `precision` is already resolved for its device; `pin_memory` when that device is a CUDA GPU.
    `progress` is called with the number of files done after each batch. `decode_ahead`: decode
    in a thread beside `forward` when no worker process does (decoded_ahead; an engine's
    overlap_decoding says whether it gains)."""
    dataset = ImageDataset(paths, pre, on_error="report", max_pixels=max_pixels)
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=pin_memory)
    if decode_ahead and loader.num_workers == 0 and len(loader) > 1:
        loader = decoded_ahead(loader)
    start = 0
    for images, _, errors in loader:
        outputs = forward(images, precision)
        positions = range(start, start + len(images))
        start += len(images)
        yield positions, outputs, list(errors)
        if progress:
            progress(len(images))


_END = object()


def decoded_ahead(batches: Iterable, depth: int = 2) -> Iterator:
    """`batches`, taken from a thread up to `depth` ahead of the caller: decoding (PIL and torch's
    resampling, which release the GIL) then runs while an engine that releases it too computes.
    ONNX Runtime and OpenVINO gain from it on 2 cores (8% and 10%, measured on face-mask, where
    decoding is a fifth of the time); torch's kernels lost 2%, as their threads wait at barriers
    for one the decoding preempts, so TorchEngine says overlap_decoding = False."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            put(error)
            return
        put(_END)

    threading.Thread(target=fill, name="transferlab-decode", daemon=True).start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True):
    """Yield advance(n) for a Rich progress bar on stderr (stdout stays clean for JSON/CSV), or None.
    When stderr is not a terminal (CI, nohup, a log file), a bar would print nothing until the end:
    then advance(n) logs one plain line every tenth of the way instead."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        yield PlainProgress(label, total)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


class PlainProgress:
    """advance(n) that logs "LABEL: done/total (p%, s)" each time another tenth is done."""

    STEPS = 10

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.logged = label, total, 0, 0
        self.started = time.perf_counter()

    def __call__(self, count: int) -> None:
        self.done += count
        step = self.done * self.STEPS // max(1, self.total)
        if step > self.logged:
            self.logged = step
            logging.getLogger(__name__).info(
                "%s: %d/%d (%d%%, %.0f s)", self.label, self.done, self.total,
                100 * self.done // max(1, self.total), time.perf_counter() - self.started)
