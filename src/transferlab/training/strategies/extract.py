"""The `extract` recipe: a frozen backbone embeds every image once (cached), a scikit-learn classifier
is fitted on the embeddings and transplanted into a torch head, so the saved model is one network."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ...models.backbones import count_parameters, create_backbone
from ...inference.bundle import ClassifierNet
from ...data.folder import SPLITS, ImageFolderData
from ...inference.embeddings import embed_files
from ...errors import DataError
from ...models.heads import head_from_sklearn
from ...evaluation.metrics import classification_metrics
from ...inference.batches import resolve_precision
from ...data.transforms import Preprocessing

CLASSIFIERS = ("logistic", "mlp")


def fit_extract(data: ImageFolderData, config, show_progress: bool) -> dict:
    """Everything the run needs: the network, its head spec and preprocessing, val/test results and
    the timing of embedding and fitting."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(config.seed)
    precision = resolve_precision(config.precision)
    backbone = create_backbone(config.backbone, config.weights).eval()
    pre = Preprocessing.from_model(backbone)
    order = [i for name in SPLITS for i in data.split[name]]
    images = [data.scan.images[i] for i in order]
    embeddings, stats = embed_files(
        backbone, [im.path for im in images], [im.sha256 for im in images], pre,
        cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        batch_size=config.batch_size, workers=config.workers, precision=precision,
        show_progress=show_progress)
    features, labels, start = {}, {}, 0
    for name in SPLITS:
        count = len(data.split[name])
        features[name] = embeddings[start:start + count]
        labels[name] = np.array(data.labels(name), dtype=np.int64)
        start += count
    if len(set(labels["train"].tolist())) < 2:
        raise DataError(f"{data.root}: the training split holds only one class; add images")

    fit_started = time.perf_counter()
    if config.classifier == "mlp":
        classifier = MLPClassifier(hidden_layer_sizes=(250, 100), random_state=config.seed, max_iter=300)
    else:
        classifier = LogisticRegression(max_iter=3000)
    estimator = make_pipeline(StandardScaler(), classifier).fit(features["train"], labels["train"])
    fit_s = time.perf_counter() - fit_started
    spec, head = head_from_sklearn(estimator, num_classes=len(data.classes))

    def head_proba(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head(torch.as_tensor(x, dtype=torch.float32)).softmax(1).numpy()

    transplant_error = float(np.abs(head_proba(features["train"]) -
                                    estimator.predict_proba(features["train"])).max())
    if transplant_error > 1e-4:
        raise RuntimeError(f"torch head differs from the fitted classifier by {transplant_error:.2e}")
    return {
        "net": ClassifierNet(backbone, head.eval()), "head": spec, "preprocessing": pre,
        "probabilities": {name: head_proba(features[name]) for name in ("val", "test")},
        "trainable": count_parameters(head),
        "timing": {"embed_s": round(stats.seconds, 3), "embed_images_per_s":
                   round(stats.images_per_s, 1) if stats.images_per_s else None,
                   "embedded": stats.embedded, "cached": stats.cached, "train_s": round(fit_s, 3)},
        "extra": {"classifier": config.classifier, "train": _training_fit(estimator, features["train"],
                                                                           labels["train"]),
                  "precision": {
            "embedding": precision, "transplant_max_abs_diff": transplant_error}},
    }


def _training_fit(estimator, features: np.ndarray, labels: np.ndarray) -> dict:
    """How well the classifier fits its own training embeddings: with val loss, the overfitting gap."""
    from sklearn.metrics import log_loss

    proba = estimator.predict_proba(features)
    return {"loss": float(log_loss(labels, proba, labels=estimator.classes_)),
            "accuracy": float((estimator.classes_[proba.argmax(1)] == labels).mean()),
            "measured_on": "training embeddings"}


def evaluate_probabilities(data: ImageFolderData, probabilities: dict) -> dict:
    return {name: classification_metrics(np.array(data.labels(name)), probabilities[name], data.classes)
            for name in probabilities}
