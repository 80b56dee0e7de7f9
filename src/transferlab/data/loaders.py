"""The Lightning DataModule of the trained strategies: a split ImageFolderData as uint8 batches.

Images stay uint8 until the model normalises them per batch (four times less to move between worker
processes); training images are augmented, validation images are only resized and cropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.folder import ImageFolderData
from ..errors import DataError
from ..data.decode import UnreadableImage, open_rgb
from ..inference.batches import default_workers
from ..data.transforms import Preprocessing, eval_transform, train_transform


class LabelledImages(Dataset):
    """(uint8 CHW tensor, label) per file. A file that became unreadable since the scan stops the run
    with its name: silently training on fewer images would make runs incomparable."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform, draft_size: int,
                 max_pixels: int):
        self.paths, self.labels = list(paths), list(labels)
        self.transform, self.draft_size, self.max_pixels = transform, draft_size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image = open_rgb(self.paths[index], draft_size=self.draft_size, max_pixels=self.max_pixels)
        except UnreadableImage as error:
            raise DataError(f"{self.paths[index]}: became unreadable during training ({error}); "
                            "fix or remove it and rerun with --resume") from None
        return self.transform(image), self.labels[index]


class ImageFolderDataModule(L.LightningDataModule):
    def __init__(self, data: ImageFolderData, pre: Preprocessing, augment: str = "standard",
                 batch_size: int = 32, workers: int | None = None):
        super().__init__()
        self.data, self.pre, self.augment = data, pre, augment
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers

    def _dataset(self, split: str, transform) -> LabelledImages:
        # Augmentation crops and zooms, so training decodes at full size; evaluation can use JPEG draft.
        draft = self.pre.resize_size if transform is None else 2 * self.pre.resize_size
        return LabelledImages(self.data.files(split), self.data.labels(split),
                              transform or eval_transform(self.pre), draft, self.data.max_pixels)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.workers, persistent_workers=self.workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train", train_transform(self.pre, self.augment)), True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", None), False)
