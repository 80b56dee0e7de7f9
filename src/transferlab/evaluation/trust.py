"""Fitting what makes a bundle's answers trustworthy (inference/trust.py): a temperature on the
validation split's logits, and a novelty bank of the training images' features with its threshold
set on the validation images."""

from __future__ import annotations

import numpy as np

from ..data.folder import ImageFolderData
from ..inference.predictor import NetworkOutputs, Predictor
from ..inference.trust import MAX_BANK_IMAGES, Novelty, Trust, balanced_sample, fit_temperature

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
