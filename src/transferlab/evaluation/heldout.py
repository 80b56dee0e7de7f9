"""A trained model measured on the held-out splits of its data: val and test probabilities (from the
Predictor that will serve it, unless the strategy already has them), the metrics of metrics.json,
how much a leaky split flatters the test score, and how far bf16 predictions are from fp32."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..data.folder import ImageFolderData
from ..inference.predictor import Predictor
from .metrics import classification_metrics, probability_agreement

log = logging.getLogger(__name__)

HELD_OUT = ("val", "test")
# Images predicted twice to check a reduced precision, or an export, against fp32: enough to catch
# a broken graph or kernel, few enough to cost seconds.
PARITY_IMAGES = 64
MIN_PARITY_AGREEMENT = 0.98


@dataclass
class HeldOutResult:
    probabilities: dict[str, np.ndarray]  # per split: (images, classes)
    metrics: dict[str, dict]  # per split: classification_metrics (+ "leakage" in test)
    parity: dict  # bf16 vs fp32 on validation images; empty in fp32


def evaluate_held_out(predictor: Predictor, data: ImageFolderData, *, batch_size: int = 32,
                      workers: int | None = None, precision: str = "auto",
                      probabilities: dict[str, np.ndarray] | None = None,
                      show_progress: bool = False) -> HeldOutResult:
    """Predict val and test with `predictor` (unless `probabilities` are given) and measure them."""
    probabilities = probabilities or {
        name: predictor.predict_proba(data.files(name), batch_size=batch_size, workers=workers,
                                      precision=precision, show_progress=show_progress)[0]
        for name in HELD_OUT}
    metrics = {name: classification_metrics(np.array(data.labels(name)), probabilities[name],
                                            data.classes) for name in HELD_OUT}
    if data.groups_across_splits():
        metrics["test"]["leakage"] = leakage(data, probabilities["test"])
    parity = precision_parity(predictor, data, probabilities["val"], batch_size, precision)
    return HeldOutResult(probabilities, metrics, parity)


def leakage(data: ImageFolderData, proba: np.ndarray) -> dict:
    """Test accuracy separately on the images with a copy in training and on the rest: how much a
    leaky split flatters the model."""
    copied = np.array(data.has_copy_in_training("test"), dtype=bool)
    correct = proba.argmax(1) == np.array(data.labels("test"))

    def accuracy(mask: np.ndarray) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    return {"images_with_copy_in_train": int(copied.sum()), "accuracy_on_those": accuracy(copied),
            "accuracy_on_the_rest": accuracy(~copied)}


def precision_parity(predictor: Predictor, data: ImageFolderData, fast: np.ndarray, batch_size: int,
                     precision: str) -> dict:
    """Predict a few validation images in fp32 and compare them with the reduced-precision ones
    (`fast`, in the same order); nothing to compare in fp32."""
    if precision not in ("bf16", "16"):
        return {}
    count = min(PARITY_IMAGES, len(data.split["val"]))
    if not count:
        return {}
    exact, _ = predictor.predict_proba(data.files("val")[:count], batch_size=batch_size,
                                       precision="32")
    agreement = probability_agreement(exact, fast[:count])
    if agreement["top1_agreement"] < MIN_PARITY_AGREEMENT:
        log.warning("%s and fp32 predictions agree on only %.1f%% of %d validation images; consider "
                    "--precision 32", precision, 100 * agreement["top1_agreement"], count)
    return {"parity_images": count, **{f"parity_{key}": value for key, value in agreement.items()}}
