"""A trained model measured on the held-out splits of its data: its trust fitted (temperature and
novelty bank), val and test probabilities through it (from the Predictor that will serve it, unless
the strategy already has the raw outputs), the metrics of metrics.json, how much a leaky split
flatters the test score, and how far bf16 predictions are from fp32."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..data.folder import ImageFolderData
from ..inference.predictor import NetworkOutputs, Predictor
from ..inference.trust import Trust
from .metrics import (classification_metrics, expected_calibration_error, log_loss,
                      probability_agreement)
from .trust import fit_trust, training_outputs

log = logging.getLogger(__name__)

HELD_OUT = ("val", "test")
# Images predicted twice to check a reduced precision, or an export, against fp32: enough to catch
# a broken graph or kernel, few enough to cost seconds.
PARITY_IMAGES = 64
MIN_PARITY_AGREEMENT = 0.98


@dataclass
class HeldOutResult:
    probabilities: dict[str, np.ndarray]  # per split: (images, classes), calibrated
    metrics: dict[str, dict]  # per split: classification_metrics (+ "leakage" in test)
    parity: dict  # bf16 vs fp32 on validation images; empty in fp32
    trust: Trust  # the temperature and novelty bank fitted on this run's data
    novelty: dict[str, np.ndarray | None]  # per split: each image's novelty, None without a bank
    unknown: dict[str, np.ndarray | None]  # per split: novelty over the threshold


def evaluate_held_out(predictor: Predictor, data: ImageFolderData, *, batch_size: int = 32,
                      workers: int | None = None, precision: str = "auto",
                      outputs: dict[str, NetworkOutputs] | None = None,
                      show_progress: bool = False) -> HeldOutResult:
    """Fit the trust of the model behind `predictor` (a temperature on val, a novelty bank of
    training features thresholded on val), then measure val and test with it. The raw outputs come
    from the predictor unless the strategy has them (`outputs`, by split; train optional)."""
    options = {"batch_size": batch_size, "workers": workers, "precision": precision}
    outputs = dict(outputs or {name: predictor.predict_outputs(data.files(name), **options,
                                                               show_progress=show_progress)[0]
                               for name in HELD_OUT})
    labels = {name: np.array(data.labels(name), dtype=np.int64) for name in HELD_OUT}
    if "train" in outputs:
        train, train_labels = outputs["train"], np.array(data.labels("train"), dtype=np.int64)
    else:
        train, train_labels = training_outputs(predictor, data, **options)
    trust = fit_trust(train, train_labels, outputs["val"], labels["val"], seed=data.seed)
    measured = {name: measure(outputs[name], labels[name], data.classes, trust)
                for name in HELD_OUT}
    metrics = {name: measured[name].metrics for name in HELD_OUT}
    probabilities = {name: measured[name].proba for name in HELD_OUT}
    if data.groups_across_splits():
        metrics["test"]["leakage"] = leakage(data, probabilities["test"])
    calibrated = Predictor(predictor.engine, predictor.classes, predictor.preprocessing,
                           config=predictor.config, trust=trust)
    parity = precision_parity(calibrated, data, probabilities["val"], batch_size, precision)
    return HeldOutResult(probabilities, metrics, parity, trust,
                         {name: measured[name].novelty for name in HELD_OUT},
                         {name: measured[name].unknown for name in HELD_OUT})


@dataclass
class Measured:
    proba: np.ndarray
    metrics: dict
    novelty: np.ndarray | None = None
    unknown: np.ndarray | None = None


def measure(outputs: NetworkOutputs, labels: np.ndarray, classes: list[str], trust: Trust,
            seed: int = 0) -> Measured:
    """The metrics of raw outputs answered through `trust`: classification_metrics of the calibrated
    probabilities, the ECE before calibration beside it, and the share flagged unknown."""
    proba = trust.probabilities(torch.from_numpy(outputs.logits)).numpy()
    metrics = classification_metrics(labels, proba, classes, seed)
    measured = Measured(proba, metrics)
    if len(labels):
        before = outputs.softmax()
        metrics.update(ece_uncalibrated=expected_calibration_error(labels, before),
                       loss_uncalibrated=log_loss(labels, before), temperature=trust.temperature)
    if trust.novelty is not None and outputs.features is not None:
        measured.novelty = trust.novelty.score(outputs.features).numpy()
        measured.unknown = measured.novelty > trust.novelty.threshold
        if len(labels):
            metrics["unknown_rate"] = float(measured.unknown.mean())
    return measured


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
