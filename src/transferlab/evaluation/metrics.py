"""Classification metrics in the shape of metrics.json (README): scikit-learn for the scores,
torchmetrics for calibration, scipy for the bootstrap interval."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)
from sklearn.metrics import log_loss as sklearn_log_loss

CALIBRATION_BINS = 15  # the usual choice for expected calibration error (Guo et al., 2017)
BOOTSTRAP_RESAMPLES = 2000
# scipy draws the resamples this many bytes at a time (index and value per image per resample): all
# 2,000 at once held 934 MB for a 30,614-image test split (the peak of a 204,094-image extract
# run), and would hold 4.9 GB for 150,000. Batching draws the same resamples, so the interval is
# the same.
BOOTSTRAP_BYTES = 32 * 2**20


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str],
                           seed: int = 0) -> dict:
    """accuracy (with a 95% bootstrap interval), loss, macro F1, per-class precision/recall/F1/support,
    the confusion matrix (rows: true class, columns: predicted class, in `classes` order), ROC-AUC
    and expected calibration error."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return {"accuracy": None, "loss": None, "size": 0}
    labels = list(range(len(classes)))
    predicted = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, predicted)),
        "accuracy_ci95": accuracy_interval(y_true == predicted, seed),
        "loss": log_loss(y_true, proba),
        "macro_f1": float(f1_score(y_true, predicted, labels=labels, average="macro", zero_division=0)),
        "roc_auc": roc_auc(y_true, proba),
        "ece": expected_calibration_error(y_true, proba),
        "size": int(len(y_true)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, predicted, labels=labels).tolist(),
    }


def log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes, probabilities clipped at 1e-7."""
    return float(sklearn_log_loss(y_true, np.clip(proba, 1e-7, 1.0),
                                  labels=list(range(proba.shape[1]))))


def accuracy_interval(correct: np.ndarray, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the accuracy (percentile, not BCa, because BCa is
    undefined when every prediction is right, which happens on easy test sets)."""
    from scipy.stats import bootstrap

    correct = np.asarray(correct, dtype=np.float64)
    if correct.min() == correct.max():
        return [float(correct[0]), float(correct[0])]
    batch = max(1, min(BOOTSTRAP_RESAMPLES, BOOTSTRAP_BYTES // (16 * len(correct))))
    result = bootstrap((correct,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95,
                       method="percentile", rng=seed, batch=batch)
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def roc_auc(y_true: np.ndarray, proba: np.ndarray) -> float | None:
    """Two classes: ROC-AUC of the second class's probability. More: macro one-vs-rest AUC. None
    when a class is missing from y_true, where AUC is undefined."""
    num_classes = proba.shape[1]
    if len(np.unique(y_true)) < num_classes:
        return None
    if num_classes == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    return float(roc_auc_score(y_true, proba, multi_class="ovr", labels=list(range(num_classes))))


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Top-label ECE: |accuracy - confidence| averaged over equal-width confidence bins."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(
        torch.as_tensor(proba, dtype=torch.float32), torch.as_tensor(y_true, dtype=torch.long),
        num_classes=proba.shape[1], n_bins=CALIBRATION_BINS, norm="l1"))


def probability_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How closely two sets of predictions of the same images agree (an export against torch, bf16
    against fp32): top-1 agreement and the largest and mean absolute probability difference."""
    difference = np.abs(reference - candidate)
    return {"top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
            "max_abs_prob_diff": float(difference.max()),
            "mean_abs_prob_diff": float(difference.mean())}
