"""The Predictor: top-k classes, probabilities and novelty for image files or decoded batches, on
any engine. Decoding, batching, test-time augmentation, the temperature, softmax and novelty live
here once, whichever engine (torch on a CPU or GPU, onnxruntime) runs the network."""

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
from .engines import Engine, engine_precision, torch_threads
from .rows import RowFile
from .trust import Trust

UNKNOWN = "unknown"  # the answer instead of a class, with reject_unknown, for a novel input


@dataclass
class Prediction:
    file: str
    top_k: list[tuple[str, float]]
    error: str = ""
    novelty: float | None = None  # None: the bundle has no novelty bank (made before there was one)
    unknown: bool | None = None  # novelty over the bundle's threshold
    rejected: bool = False  # answered UNKNOWN instead of a class (reject_unknown)

    @property
    def label(self) -> str:
        return UNKNOWN if self.rejected else self.top_k[0][0]

    def to_dict(self) -> dict:
        if self.error:
            return {"file": self.file, "error": self.error}
        answer = {"file": self.file, "label": self.label,
                  "top_k": [{"label": label, "probability": p} for label, p in self.top_k]}
        if self.novelty is not None:
            answer.update(novelty=self.novelty, unknown=self.unknown)
        return answer


@dataclass
class Scores:
    """What a bundle answers for a batch of images: calibrated probabilities (images, classes) and,
    when it has a novelty bank, each image's novelty and whether it is over the threshold."""

    proba: np.ndarray
    novelty: np.ndarray | None = None
    unknown: np.ndarray | None = None

    def row(self, i: int) -> "Scores":
        """Image `i` alone, as a batch of one."""
        pick = slice(i, i + 1)
        return Scores(self.proba[pick], None if self.novelty is None else self.novelty[pick],
                      None if self.unknown is None else self.unknown[pick])


@dataclass
class NetworkOutputs:
    """A network's raw outputs for some images, before the temperature: what calibration and the
    novelty bank are fitted on."""

    logits: np.ndarray  # (images, classes)
    # (images, features): the penultimate layer; a RowFile when they are too many to hold
    features: np.ndarray | RowFile | None = None

    def softmax(self) -> np.ndarray:
        """The probabilities without calibration (temperature 1)."""
        return torch.as_tensor(self.logits, dtype=torch.float32).softmax(dim=1).numpy()

    def select(self, rows: np.ndarray) -> "NetworkOutputs":
        """The outputs of some images (features in memory only)."""
        return NetworkOutputs(self.logits[rows], None if self.features is None else self.features[rows])


class Predictor:
    """Top-k predictions with an engine that computes logits for `classes` from images prepared by
    `preprocessing`. `config` is the bundle's, when the predictor came from one (load_model);
    `trust` its temperature and novelty bank (inference/trust.py)."""

    def __init__(self, engine: Engine, classes: Sequence[str], preprocessing: Preprocessing, *,
                 config: BundleConfig | None = None, trust: Trust | None = None):
        self.engine = engine
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.config = config
        self.trust = trust or Trust()
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

    def outputs(self, images: torch.Tensor, precision: str = "32"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's raw (logits, penultimate features or None) for a uint8 NCHW batch, before
        the temperature; `precision` resolved for the engine (engine_precision)."""
        outputs = self.engine(images, precision)
        return (outputs[0], outputs[1]) if isinstance(outputs, tuple) else (outputs, None)

    def score_batch(self, images: torch.Tensor, precision: str = "auto", tta: bool = False) -> Scores:
        """Scores for one uint8 NCHW batch, resized and cropped.

        tta: also predict the horizontally flipped images and average the two, a two-view ensemble
        for twice the compute; only for classes that a mirror image keeps.
        """
        return self._scores(images, engine_precision(self.engine, precision), tta)

    def predict_batch(self, images: torch.Tensor, precision: str = "auto",
                      tta: bool = False) -> torch.Tensor:
        """Probabilities (on the CPU) for one uint8 NCHW batch (see score_batch)."""
        return torch.from_numpy(self.score_batch(images, precision, tta).proba)

    def _scores(self, images: torch.Tensor, precision: str, tta: bool) -> Scores:
        views = [images, images.flip(dims=(3,))] if tta else [images]
        proba, novelty = [], []
        # Beside a graph engine, torch's small sums run in one thread: a second one keeps spinning
        # after each on the cores the graph's threads need. OpenVINO's Lite0 ran at 258 against
        # 345 images/s at batch 4 and 300 against 322 at 32 (2 cores, with a novelty bank).
        beside_graph = getattr(self.engine, "overlap_decoding", False)
        for view in views:
            logits, features = self.outputs(view, precision)
            with torch_threads(1 if beside_graph else None):
                proba.append(self.trust.probabilities(logits))
                if self.trust.novelty is not None and features is not None:
                    novelty.append(self.trust.novelty.score(features))
        scores = Scores((sum(proba) / len(proba)).numpy())
        if novelty:
            scores.novelty = (sum(novelty) / len(novelty)).numpy()
            scores.unknown = scores.novelty > self.trust.novelty.threshold
        return scores

    def predict_proba(self, paths: Sequence[str | Path], **options: Any) -> tuple[np.ndarray, list[str]]:
        """(len(paths), classes) probabilities and a per-file error ("" when it was read; images over
        `max_pixels` are refused unread). Options: batch_size (32), workers, precision (auto, bf16,
        16 or 32: the torch engine's; an ONNX model runs as exported), tta, show_progress,
        max_pixels."""
        scores, errors = self.predict_scores(paths, **options)
        return scores.proba, errors

    def predict_scores(self, paths: Sequence[str | Path], **options: Any) -> tuple[Scores, list[str]]:
        """Scores of every file, and a per-file error; options as predict_proba's."""
        parts, errors = [], []
        for _, scores, batch_errors in self.iter_scores(paths, **options):
            parts.append(scores)
            errors += batch_errors
        if not parts:
            return Scores(np.zeros((0, len(self.classes)), dtype=np.float32)), errors
        novelty = None if parts[0].novelty is None else np.concatenate([p.novelty for p in parts])
        return Scores(np.concatenate([p.proba for p in parts]), novelty,
                      None if novelty is None else np.concatenate([p.unknown for p in parts])), errors

    def iter_scores(self, paths: Sequence[str | Path], *, batch_size: int = 32,
                    workers: int | None = None, precision: str = "auto", tta: bool = False,
                    show_progress: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                    ) -> Iterator[tuple[range, Scores, list[str]]]:
        """predict_scores batch by batch, as each is done: (positions in `paths`, scores, errors)."""
        forward = functools.partial(self._scores, tta=tta)
        yield from self._iter(forward, paths, batch_size=batch_size, workers=workers,
                              precision=precision, show_progress=show_progress,
                              max_pixels=max_pixels)

    def iter_outputs(self, paths: Sequence[str | Path], **options: Any
                     ) -> Iterator[tuple[range, tuple[torch.Tensor, torch.Tensor | None], list[str]]]:
        """The raw outputs (see `outputs`) batch by batch: what calibration and the novelty bank
        are fitted on. Options as predict_proba's, without tta."""
        yield from self._iter(self.outputs, paths, **options)

    def predict_outputs(self, paths: Sequence[str | Path], **options: Any
                        ) -> tuple[NetworkOutputs, list[str]]:
        """The raw outputs of every file (zeros for an unreadable one) and a per-file error."""
        logits, features, errors = [], [], []
        for _, (batch_logits, batch_features), batch_errors in self.iter_outputs(paths, **options):
            logits.append(batch_logits.numpy())
            if batch_features is not None:
                features.append(batch_features.flatten(start_dim=1).numpy())
            errors += batch_errors
        if not logits:
            return NetworkOutputs(np.zeros((0, len(self.classes)), dtype=np.float32)), errors
        return NetworkOutputs(np.concatenate(logits),
                              np.concatenate(features) if features else None), errors

    def _iter(self, forward, paths: Sequence[str | Path], *, batch_size: int = 32,
              workers: int | None = None, precision: str = "auto", show_progress: bool = False,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator:
        check({"batch_size": batch_size, "workers": workers, "precision": precision,
               "max_pixels": max_pixels})
        precision = engine_precision(self.engine, precision)
        paths = [Path(p) if isinstance(p, str) else p for p in paths]  # or StoredImage
        with progress_bar("predicting", len(paths), show_progress) as advance:
            yield from run_batches(forward, paths, self.preprocessing, precision=precision,
                                   pin_memory=self.device.type == "cuda", batch_size=batch_size,
                                   workers=workers, progress=advance, max_pixels=max_pixels,
                                   # an engine a caller made or wrapped may not say
                                   decode_ahead=getattr(self.engine, "overlap_decoding", False))

    def predict(self, paths: Sequence[str | Path], top_k: int = 1, **options: Any) -> list[Prediction]:
        return list(self.iter_predictions(paths, top_k, **options))

    def iter_predictions(self, paths: Sequence[str | Path], top_k: int = 1,
                         reject_unknown: bool = False, **options: Any) -> Iterator[Prediction]:
        """Top-k Predictions, yielded as their batches are done (a folder of 10,000 files shows
        its first results after one batch); options as predict_proba's. reject_unknown: an input
        over the novelty threshold is answered UNKNOWN (its top-k still listed)."""
        check({"top_k": top_k})
        paths = [Path(p) if isinstance(p, str) else p for p in paths]  # or StoredImage
        for positions, scores, errors in self.iter_scores(paths, **options):
            for row, position in enumerate(positions):
                yield self.prediction(str(paths[position]), scores, row, top_k, reject_unknown,
                                      errors[row])

    def prediction(self, file: str, scores: Scores, row: int, top_k: int,
                   reject_unknown: bool = False, error: str = "") -> Prediction:
        """The Prediction of row `row` of a batch's scores."""
        if error:
            return Prediction(file, [], error)
        if scores.novelty is None:
            return Prediction(file, self.top_k(scores.proba[row], top_k))
        unknown = bool(scores.unknown[row])
        return Prediction(file, self.top_k(scores.proba[row], top_k), novelty=float(scores.novelty[row]),
                          unknown=unknown, rejected=unknown and reject_unknown)


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
