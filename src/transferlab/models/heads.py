"""Classifier heads, and transplanting fitted scikit-learn classifiers into them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..options import POOLS


@dataclass(frozen=True)
class HeadSpec:
    """Enough to rebuild a head before loading its weights: optional pooling of a feature map ("avg" or
    "flatten"; "" when the backbone already gives vectors), then Linear layers with ReLU (and dropout)
    between them."""

    in_features: int
    num_classes: int
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    pool: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HeadSpec":
        """From a bundle's config.json; a ValueError names any bad field (a bundle may come from
        anywhere)."""
        def count(value, name: str) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive whole number")
            return value

        dropout, pool = data.get("dropout", 0.0), data.get("pool", "")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r}: expected a number in [0, 1)")
        if pool not in ("", *POOLS):
            raise ValueError(f"pool={pool!r}: use {', '.join(POOLS)} or nothing")
        return cls(count(data["in_features"], "in_features"), count(data["num_classes"], "num_classes"),
                   tuple(count(width, "hidden") for width in data.get("hidden", ())), float(dropout), pool)


def pooling(pool: str) -> list[nn.Module]:
    """The layers that turn a feature map into a vector: "avg" (global average), "flatten", or none
    ("") for a backbone that already gives vectors."""
    if pool == "avg":
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return [nn.Flatten()] if pool == "flatten" else []


def build_head(spec: HeadSpec) -> nn.Sequential:
    layers: list[nn.Module] = pooling(spec.pool)
    width = spec.in_features
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    layers.append(nn.Linear(width, spec.num_classes))
    return nn.Sequential(*layers)


def head_from_sklearn(estimator, num_classes: int, pool: str = "") -> tuple[HeadSpec, nn.Sequential]:
    """The torch head that computes the same probabilities as a fitted sklearn classifier, after
    `pool` (see `pooling`) when it was fitted on pooled feature maps.

    `estimator` is a Pipeline(StandardScaler, LogisticRegression | MLPClassifier). The scaler is folded
    into the first layer; a binary model's single logit z becomes the two logits (0, z), whose softmax
    is (1 - sigmoid(z), sigmoid(z)), exactly sklearn's predict_proba.
    """
    scaler, classifier = estimator[0], estimator[-1]
    if hasattr(classifier, "coefs_"):
        weights = [w.T for w in classifier.coefs_]
        biases = list(classifier.intercepts_)
    else:
        weights, biases = [classifier.coef_], [classifier.intercept_]
    scale = 1.0 / scaler.scale_
    biases[0] = biases[0] - weights[0] @ (scaler.mean_ * scale)
    weights[0] = weights[0] * scale
    if num_classes == 2:  # sklearn keeps one logit for two classes
        weights[-1] = np.vstack([np.zeros_like(weights[-1]), weights[-1]])
        biases[-1] = np.concatenate([[0.0], biases[-1]])
    spec = HeadSpec(in_features=weights[0].shape[1], num_classes=num_classes,
                    hidden=tuple(w.shape[0] for w in weights[:-1]), pool=pool)
    head = build_head(spec)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, weight, bias in zip(linears, weights, biases):
            layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return spec, head
