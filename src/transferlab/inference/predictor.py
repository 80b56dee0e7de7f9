"""The Predictor: top-k classes and probabilities for image files or decoded batches, on any
engine. Decoding, batching, test-time augmentation and softmax live here once, whichever engine
(torch on a CPU or GPU, onnxruntime) runs the network."""

from __future__ import annotations

import functools
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import torch

from ..data.decode import DEFAULT_MAX_PIXELS
from ..data.loaders import decode_image
from ..data.transforms import Preprocessing, eval_transform
from ..options import check
from .batches import progress_bar, run_batches
from .bundle import BundleConfig
from .engines import Engine, engine_precision


@dataclass
class Prediction:
    file: str
    top_k: list[tuple[str, float]]
    error: str = ""

    def to_dict(self) -> dict:
        if self.error:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "top_k": [{"label": l, "probability": p} for l, p in self.top_k]}


class Predictor:
    """Top-k predictions with an engine that computes logits for `classes` from images prepared by
    `preprocessing`. `config` is the bundle's, when the predictor came from one (load_model)."""

    def __init__(self, engine: Engine, classes: Sequence[str], preprocessing: Preprocessing, *,
                 config: BundleConfig | None = None):
        self.engine = engine
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.config = config
        self._transform = None

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def decode(self, source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """One image file (or file object, such as the bytes of an upload) as a uint8 CHW input, as
        predict_proba decodes files; raises data.decode.UnreadableImage."""
        if self._transform is None:
            self._transform = eval_transform(self.preprocessing)
        return decode_image(source, self._transform, self.preprocessing.resize_size, max_pixels)

    def top_k(self, proba: np.ndarray | torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The `k` most probable classes of one image's probabilities, most probable first."""
        row = np.asarray(proba)
        order = np.argsort(-row, kind="stable")[:min(k, len(self.classes))]
        return [(self.classes[i], float(row[i])) for i in order]

    def predict_batch(self, images: torch.Tensor, precision: str = "auto",
                      tta: bool = False) -> torch.Tensor:
        """Probabilities (on the CPU) for one uint8 NCHW batch, resized and cropped.

        tta: also predict the horizontally flipped images and average the two probabilities, a
        two-view ensemble for twice the compute; only for classes that a mirror image keeps.
        """
        return self._probabilities(images, engine_precision(self.engine, precision), tta)

    def _probabilities(self, images: torch.Tensor, precision: str, tta: bool) -> torch.Tensor:
        proba = self.engine(images, precision).softmax(dim=1)
        if tta:
            proba = (proba + self.engine(images.flip(dims=(3,)), precision).softmax(dim=1)) / 2
        return proba

    def predict_proba(self, paths: Sequence[str | Path], **options: Any) -> tuple[np.ndarray, list[str]]:
        """(len(paths), classes) probabilities and a per-file error ("" when it was read; images over
        `max_pixels` are refused unread). Options: batch_size (32), workers, precision (auto, bf16,
        16 or 32: the torch engine's; an ONNX model runs as exported), tta, show_progress,
        max_pixels."""
        paths = list(paths)
        proba = np.zeros((len(paths), len(self.classes)), dtype=np.float32)
        errors = [""] * len(paths)
        for positions, batch_proba, batch_errors in self.iter_proba(paths, **options):
            proba[positions.start:positions.stop] = batch_proba
            errors[positions.start:positions.stop] = batch_errors
        return proba, errors

    def iter_proba(self, paths: Sequence[str | Path], *, batch_size: int = 32,
                   workers: int | None = None, precision: str = "auto", tta: bool = False,
                   show_progress: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                   ) -> Iterator[tuple[range, np.ndarray, list[str]]]:
        """predict_proba batch by batch, as each is done: (positions in `paths`, probabilities,
        errors)."""
        check({"batch_size": batch_size, "workers": workers, "precision": precision,
               "max_pixels": max_pixels})
        precision = engine_precision(self.engine, precision)
        paths = [Path(p) for p in paths]
        with progress_bar("predicting", len(paths), show_progress) as advance:
            for positions, batch_proba, batch_errors in run_batches(
                    functools.partial(self._probabilities, tta=tta), paths, self.preprocessing,
                    precision=precision, pin_memory=self.device.type == "cuda",
                    batch_size=batch_size, workers=workers, progress=advance, max_pixels=max_pixels):
                yield positions, batch_proba.numpy(), batch_errors

    def predict(self, paths: Sequence[str | Path], top_k: int = 1, **options: Any) -> list[Prediction]:
        return list(self.iter_predictions(paths, top_k, **options))

    def iter_predictions(self, paths: Sequence[str | Path], top_k: int = 1,
                         **options: Any) -> Iterator[Prediction]:
        """Top-k Predictions, yielded as their batches are done (a folder of 10,000 files shows
        its first results after one batch); options as predict_proba's."""
        check({"top_k": top_k})
        paths = [Path(p) for p in paths]
        for positions, proba, errors in self.iter_proba(paths, **options):
            for position, row, error in zip(positions, proba, errors):
                yield Prediction(str(paths[position]), self.top_k(row, top_k), error)


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (every file below, hidden ones skipped) and glob patterns, in a stable order."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists() or not glob.has_magic(item):
            paths.append(path)  # a missing file is reported by predict as unreadable
        else:
            paths += sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
    return paths
