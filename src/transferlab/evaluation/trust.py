"""Fitting what makes a bundle's answers trustworthy (inference/trust.py): a temperature on the
validation split's logits, and a novelty bank of the training images' features with its threshold
set on the validation images."""

from __future__ import annotations

import numpy as np

from ..data.folder import ImageFolderData
from ..inference.predictor import NetworkOutputs, Predictor
from ..inference.trust import MAX_BANK_IMAGES, Novelty, Trust, balanced_sample

# The temperature is searched over [1/50, 50]: wider than any network needs (Guo et al., 2017,
# report 1.1-3.6 on ImageNet models), narrow enough that a degenerate split cannot give 0 or inf.
LOG_TEMPERATURE_BOUNDS = (-np.log(50), np.log(50))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the log loss of softmax(logits / T) on these images (Guo et al.,
    ICML 2017, "On Calibration of Modern Neural Networks"); 1 when there is nothing to fit on."""
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(labels) < 2 or len(np.unique(labels)) < 2 or not np.isfinite(logits).all():
        return 1.0
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        scaled = logits / np.exp(log_t)
        scaled -= scaled.max(axis=1, keepdims=True)
        log_proba = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        return float(-log_proba[rows, labels].mean())

    result = minimize_scalar(loss, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x)) if loss(result.x) <= loss(0.0) else 1.0


def fit_trust(train: NetworkOutputs, train_labels: np.ndarray, val: NetworkOutputs,
              val_labels: np.ndarray, seed: int = 0) -> Trust:
    """The temperature from the validation logits; the novelty bank from the training features,
    thresholded on the validation features (no bank when the network gives no features)."""
    temperature = fit_temperature(val.logits, val_labels)
    if train.features is None or val.features is None or not len(train.features):
        return Trust(temperature)
    novelty = Novelty.fit(train.features, train_labels, seed)
    if len(val.features):
        novelty = novelty.with_threshold(val.features)
    else:  # no validation images: the training images' own scores, a looser threshold
        novelty = novelty.with_threshold(train.features)
    return Trust(temperature, novelty)


def training_outputs(predictor: Predictor, data: ImageFolderData, **options) -> tuple[
        NetworkOutputs, np.ndarray]:
    """The raw outputs of the training images the novelty bank can hold (a class-balanced sample
    of at most MAX_BANK_IMAGES), and their labels."""
    labels = np.array(data.labels("train"), dtype=np.int64)
    rows = balanced_sample(labels, MAX_BANK_IMAGES, seed=data.seed)
    files = data.files("train")
    outputs, errors = predictor.predict_outputs([files[i] for i in rows], **options)
    readable = np.array([not error for error in errors], dtype=bool)
    return outputs.select(np.flatnonzero(readable)), labels[rows][readable]
