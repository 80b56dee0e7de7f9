"""Classification metrics in the shape of metrics.json (design §4), computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, log_loss,
                             precision_recall_fscore_support)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """accuracy, loss, macro F1, per-class precision/recall/F1/support and the confusion matrix
    (rows: true class, columns: predicted class, in `classes` order)."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return {"accuracy": None, "loss": None, "size": 0}
    labels = list(range(len(classes)))
    predicted = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, predicted)),
        "loss": float(log_loss(y_true, np.clip(proba, 1e-7, 1.0), labels=labels)),
        "macro_f1": float(f1_score(y_true, predicted, labels=labels, average="macro", zero_division=0)),
        "size": int(len(y_true)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, predicted, labels=labels).tolist(),
    }
