"""Images as uint8 batches: one Dataset for every purpose, the DataLoader settings, and the
Lightning DataModule of the trained strategies.

Images stay uint8 until the network's device normalises them per batch (four times less to move
between worker processes, and to a GPU); training images are augmented, the others only resized
and cropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .decode import DEFAULT_MAX_PIXELS, UnreadableImage, limit_aspect, open_rgb
from .folder import ImageFolderData
from .transforms import Preprocessing, eval_transform, train_transform

NO_LABEL = -1
ON_ERROR = ("raise", "report")


class ImageDataset(Dataset):
    """(uint8 CHW tensor, label, error) per file.

    `on_error` is what an unreadable file does: "raise" stops with its name (training: silently
    training on fewer images would make runs incomparable), "report" gives zeros and the reason in
    `error` (prediction: one bad upload must not cost the others their answers). `labels` may be
    None (NO_LABEL for every file).
    """

    def __init__(self, paths: Sequence[Path], pre: Preprocessing, *, labels: Sequence[int] | None = None,
                 transform=None, draft_size: int | None = None, on_error: str = "report",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use {' or '.join(ON_ERROR)}")
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [NO_LABEL] * len(self.paths)
        self.pre, self.on_error, self.max_pixels = pre, on_error, max_pixels
        self.transform = transform or eval_transform(pre)
        # Evaluation can let JPEG skip detail below the resize size; augmentation crops and zooms,
        # so training passes a larger draft size.
        self.draft_size = draft_size or pre.resize_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = decode_image(self.paths[index], self.transform, self.draft_size, self.max_pixels)
        except UnreadableImage as error:
            if self.on_error == "raise":
                raise DataError(f"{self.paths[index]}: became unreadable during training ({error}); "
                                "fix or remove it and rerun with --resume") from None
            blank = torch.zeros(self.pre.input_size, dtype=torch.uint8)
            return blank, self.labels[index], str(error) or "unreadable"
        return image, self.labels[index], ""


def decode_image(source: str | Path | BinaryIO, transform, draft_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A file (or the bytes of an upload) as the network's uint8 CHW input: decoded by
    decode.open_rgb, its aspect ratio bounded (decode.limit_aspect), then `transform` (resize and
    crop, or augmentation). Every image a network sees comes through here. Raises UnreadableImage."""
    image = open_rgb(source, draft_size=draft_size, max_pixels=max_pixels)
    return transform(limit_aspect(image))


def default_workers() -> int:
    """DataLoader workers only where cores are to spare.

    Workers share the cores with torch's intra-op threads, whose parallel kernels wait for the slowest
    thread. On 2 cores one decoding worker cut embedding from about 150 to 110 images/s, while
    decoding in the main process costs about 1 ms per photo; on bigger machines workers win.
    """
    cores = os.cpu_count() or 1
    return 0 if cores <= 4 else min(8, cores // 4)


def make_loader(dataset: Dataset, *, batch_size: int, workers: int | None = None, shuffle: bool = False,
                pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    """The DataLoader every batch of images comes through. `workers` None: default_workers(), but none
    for a data set of a batch or two, where starting a worker process costs more than decoding.
    `pin_memory` for a CUDA device, whose copies from pinned memory can overlap the computation."""
    if workers is None:
        workers = default_workers() if len(dataset) > 2 * batch_size else 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      persistent_workers=persistent and workers > 0,
                      prefetch_factor=4 if workers and not persistent else None, pin_memory=pin_memory)


class ImageFolderDataModule(L.LightningDataModule):
    """The train and val splits of an ImageFolderData for Lightning."""

    def __init__(self, data: ImageFolderData, pre: Preprocessing, augment: str = "standard",
                 batch_size: int = 32, workers: int | None = None, pin_memory: bool = False):
        super().__init__()
        self.data, self.pre, self.augment = data, pre, augment
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        self.pin_memory = pin_memory

    def _loader(self, split: str, training: bool) -> DataLoader:
        dataset = ImageDataset(
            self.data.files(split), self.pre, labels=self.data.labels(split), on_error="raise",
            transform=train_transform(self.pre, self.augment) if training else None,
            draft_size=2 * self.pre.resize_size if training else None, max_pixels=self.data.max_pixels)
        return make_loader(dataset, batch_size=self.batch_size, workers=self.workers, shuffle=training,
                           pin_memory=self.pin_memory, persistent=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", training=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", training=False)
