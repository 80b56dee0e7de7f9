"""What a bundle knows beyond its weights, to say how far to trust an answer: a temperature that
makes its probabilities mean what they say, and its training data's features, to score how unlike
them an input is (novelty).

Novelty is the cosine distance from an input's penultimate features to its k-th nearest training
image (Sun et al., ICML 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors"). It
needs no assumption about the shape of each class, which class-conditional Gaussians (Lee et al.,
2018) do; benchmarks/bench_trust.py measures both. The threshold is set on the validation split:
THRESHOLD_QUANTILE of its images score under it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .rows import Rows, row_chunks

NOVELTY_FILE = "novelty.safetensors"
NEIGHBOURS = 10  # k; measured on face-mask against 1, 5, 20 and 50 (benchmarks/bench_trust.py)
THRESHOLD_QUANTILE = 0.95  # 95% of in-distribution validation images are not flagged
# The training images kept to compare against: at most this many, and at most this many bytes in
# float16, sampled evenly from every class. On face-mask (extract, Lite0) banks of 256, 1,024 and
# 4,096 images all gave AUROC 0.9997-0.9999 against unknown photos; 1,024 Lite0 features (1,280
# wide) take 2.6 MB, a fifth of the weights.
MAX_BANK_IMAGES = 1024
MAX_BANK_BYTES = 4 * 2**20
# Features wider than this (a flattened feature map: simple-cnn's head sees 65,536) are averaged in
# consecutive groups down to at most this width before they are compared.
MAX_FEATURE_WIDTH = 2048
# Images scored at once: their features' float32 unit copy and their similarities to a full bank
# take 4096 x (1,280 + 1,024) x 4 bytes = 38 MB for Lite0; a whole 30,614-image test split at once
# took 2 x 157 MB plus 125 MB more.
SCORE_ROWS = 4096


@dataclass(frozen=True)
class Novelty:
    """Unit-length features of training images, and the score over which an input is `unknown`."""

    bank: torch.Tensor  # (images, features), float32 in memory, float16 on disk
    threshold: float
    k: int = NEIGHBOURS

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, seed: int = 0) -> "Novelty":
        """A bank of the training features (a class-balanced sample of them when there are more
        than the bank holds); the threshold is set later, on validation images (with_threshold)."""
        features = torch.as_tensor(np.asarray(features, dtype=np.float32))
        limit = max(1, min(MAX_BANK_IMAGES, MAX_BANK_BYTES // (2 * unit(features[:1]).shape[1])))
        keep = balanced_sample(np.asarray(labels), limit, seed)
        return cls(unit(features[keep]).half().float(), threshold=float("inf"),
                   k=min(NEIGHBOURS, len(keep)))

    def with_threshold(self, validation_features: Rows) -> "Novelty":
        scores = self.score(validation_features).numpy()
        return Novelty(self.bank, float(np.quantile(scores, THRESHOLD_QUANTILE)), self.k)

    def score(self, features: Rows) -> torch.Tensor:
        """(images,) novelty: 1 - cosine similarity to the k-th nearest bank image, in [0, 2].
        SCORE_ROWS images at a time, so that scoring a large split (a tensor, an array or a
        RowFile) holds no copy of it."""
        parts = [self._score(torch.as_tensor(chunk)) for chunk in row_chunks(features, SCORE_ROWS)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.zeros(0)

    def _score(self, features: torch.Tensor) -> torch.Tensor:
        similarity = unit(features) @ self.bank.T
        return 1 - similarity.topk(self.k, dim=1).values[:, -1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank.half().contiguous()}

    def to_dict(self) -> dict:
        return {"method": "knn", "k": self.k, "threshold": self.threshold,
                "bank_images": len(self.bank)}

    @classmethod
    def from_parts(cls, record: dict, tensors: dict[str, torch.Tensor]) -> "Novelty":
        bank = tensors["bank"].float()
        k, threshold = record["k"], record["threshold"]
        if bank.ndim != 2 or not isinstance(k, int) or not 1 <= k <= len(bank):
            raise ValueError(f"k={k!r} for a bank of {tuple(bank.shape)}")
        if not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            raise ValueError(f"threshold={threshold!r}: expected a number")
        return cls(bank, float(threshold), k)


@dataclass(frozen=True)
class Trust:
    """How a bundle's raw outputs become what it answers: probabilities = softmax(logits /
    temperature); novelty from the penultimate features when the bundle has a bank."""

    temperature: float = 1.0
    novelty: Novelty | None = None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.float() / self.temperature).softmax(dim=1)

    def to_dict(self) -> dict:
        record: dict = {"temperature": self.temperature}
        if self.novelty is not None:
            record["novelty"] = {**self.novelty.to_dict(), "file": NOVELTY_FILE}
        return record

    @classmethod
    def check_record(cls, record: dict) -> None:
        """A ValueError naming the field of config.json's "trust" that is wrong."""
        temperature = record.get("temperature", 1.0)
        if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                or not 0 < temperature < float("inf")):
            raise ValueError(f"trust.temperature={temperature!r}: expected a positive number")
        novelty = record.get("novelty")
        if novelty is not None and (not isinstance(novelty, dict)
                                    or not {"k", "threshold", "sha256"} <= novelty.keys()):
            raise ValueError("trust.novelty: expected k, threshold and sha256")


def unit(features: torch.Tensor) -> torch.Tensor:
    """(images, width) unit-length features, a wide feature map first averaged in consecutive
    groups to at most MAX_FEATURE_WIDTH."""
    flat = features.float().flatten(start_dim=1)
    group = math.ceil(flat.shape[1] / MAX_FEATURE_WIDTH)
    if group > 1:
        flat = torch.nn.functional.pad(flat, (0, group * math.ceil(flat.shape[1] / group)
                                              - flat.shape[1]))
        flat = flat.reshape(len(flat), -1, group).mean(dim=2)
    return torch.nn.functional.normalize(flat, dim=1)


def balanced_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most `limit` items, as evenly spread over the classes as they allow."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[np.ndarray] = []
    remaining, left = limit, len(pools)
    for pool in sorted(pools, key=len):  # small classes first: what they leave goes to the rest
        take = min(len(pool), remaining // left)
        chosen.append(pool[:take])
        remaining, left = remaining - take, left - 1
    return np.sort(np.concatenate(chosen))


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

    def loss(log_t: float) -> float:
        return log_loss_at(logits, labels, float(np.exp(log_t)))

    result = minimize_scalar(loss, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x)) if loss(result.x) <= loss(0.0) else 1.0


def calibrated_log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """The log loss at the temperature fitted on these images: the val loss a saved model will have
    (a bundle applies the temperature fitted on val). Training selects its epoch by it, so that
    label smoothing, which makes a network under-confident by design, is not mistaken for a worse
    model."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    return log_loss_at(logits, labels, fit_temperature(logits, labels))


def log_loss_at(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean -log softmax(logits / temperature)[label], computed stably."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    log_proba = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
    return float(-log_proba[np.arange(len(labels)), np.asarray(labels)].mean())
