"""`extract`: a frozen backbone embeds every image once (cached), a scikit-learn classifier is fitted
on the embeddings and transplanted into a torch head, so the saved model is one network.

With `cut_layer`, the embedding is an intermediate stage's feature map, pooled (`head_pool`: avg or
flatten); the head of the saved network pools the same way, so the bundle predicts from that stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...data.folder import ImageFolderData
from ...data.split import SPLITS
from ...data.transforms import Preprocessing
from ...errors import DataError
from ...inference.embeddings import EmbeddingStats, embed_files
from ...inference.graphs import probability_parity
from ...inference.predictor import NetworkOutputs
from ...models.backbones import count_parameters
from ...models.heads import HeadSpec, head_from_sklearn, pooling
from ...models.network import ClassifierNet, build_network, head_outputs
from ..config import TrainConfig
from .base import FitContext, Strategy, Timings, TrainedModel, backbone_for

MLP_HIDDEN = (250, 100)  # scikit-learn's MLPClassifier as Keras-era tutorials sized it
TRANSPLANT_TOLERANCE = 1e-4  # the torch head must give the fitted classifier's probabilities


class Extract(Strategy):
    name = "extract"
    summary = "frozen backbone, cached embeddings, logistic regression (or an MLP)"
    uses = frozenset({"classifier", "cut_layer", "head_pool"})
    defaults = {"classifier": "logistic", "head_pool": "avg"}

    def resolve(self, values: dict, given: set[str]) -> dict:
        if values.get("cut_layer") is None and "head_pool" not in given:
            values["head_pool"] = None  # nothing to pool: the backbone gives vectors
        return values

    def network(self, config: TrainConfig, num_classes: int
                ) -> tuple[ClassifierNet, HeadSpec, Preprocessing, int]:
        backbone, pre = backbone_for(config)
        hidden = MLP_HIDDEN if config.classifier == "mlp" else ()
        net, spec = build_network(backbone, pre, num_classes, hidden=hidden,
                                  pool=config.head_pool or "avg")
        return net, spec, pre, count_parameters(net.head)

    def fit(self, data: ImageFolderData, config: TrainConfig, context: FitContext) -> TrainedModel:
        torch.manual_seed(config.seed)
        backbone, pre = backbone_for(config)
        probe = fit_probe(data, config, backbone, pre, context.show_progress)
        return TrainedModel(
            network=ClassifierNet(backbone, probe.head.eval()), head=probe.spec, preprocessing=pre,
            trainable=count_parameters(probe.head),
            timings=Timings(train_s=probe.fit_s, embed_s=probe.embedding.seconds,
                            embed_images_per_s=probe.embedding.images_per_s,
                            embedded=probe.embedding.embedded, cached=probe.embedding.cached),
            train_fit=probe.train_fit,
            details={"classifier": config.classifier,
                     "precision": {"embedding": config.precision,
                                   "transplant_max_abs_diff": probe.transplant_error},
                     "engine": probe.embedding.engine},
            outputs=probe.outputs)


@dataclass
class Probe:
    """A classifier fitted on the frozen backbone's embeddings and transplanted into a torch head:
    extract's model, and the head that finetune and head start from (linear probing, then
    fine-tuning)."""

    spec: HeadSpec
    head: nn.Sequential  # pooling (for a cut backbone's feature map), then the fitted layers
    outputs: dict[str, NetworkOutputs]  # the head's logits and features by split
    train_fit: dict
    transplant_error: float
    fit_s: float
    embedding: EmbeddingStats


def fit_probe(data: ImageFolderData, config: TrainConfig, backbone: nn.Module, pre: Preprocessing,
              show_progress: bool) -> Probe:
    """Embed every image with the frozen `backbone` (cached), fit `config.classifier` on the training
    split and transplant it into a torch head; it must give the classifier's probabilities."""
    pool = _pool(config)
    features, stats = embed_splits(data, backbone, pre, config, show_progress)
    labels = np.array(data.labels("train"), dtype=np.int64)
    if len(set(labels.tolist())) < 2:
        raise DataError(f"{data.root}: the training split holds only one class; add images")

    started = time.perf_counter()
    estimator = classifier(config).fit(features["train"], labels)
    fit_s = time.perf_counter() - started
    if stats.check_embeddings is not None:  # the engine's embeddings, judged by what they decide
        expected, got = (estimator.predict_proba(x) for x in stats.check_embeddings)
        stats.engine["classifier_parity"] = probability_parity(expected, got)
    spec, head = head_from_sklearn(estimator, num_classes=len(data.classes), pool=pool)
    linear = head[len(pooling(pool)):]  # the layers after pooling, which the embeddings skip

    outputs = {name: _head_outputs(linear, features[name]) for name in SPLITS}
    transplant_error = float(np.abs(outputs["train"].softmax()
                                    - estimator.predict_proba(features["train"])).max())
    if transplant_error > TRANSPLANT_TOLERANCE:
        raise RuntimeError(f"torch head differs from the fitted classifier by {transplant_error:.2e}")
    return Probe(spec, head, outputs, _training_fit(estimator, features["train"], labels),
                 transplant_error, fit_s, stats)


def _head_outputs(linear: nn.Sequential, embeddings: np.ndarray) -> NetworkOutputs:
    """The head's logits and penultimate features for embeddings, as the saved network computes
    them from images (ClassifierNet.logits_and_features)."""
    with torch.no_grad():
        logits, features = head_outputs(linear, torch.as_tensor(embeddings, dtype=torch.float32))
        return NetworkOutputs(logits.numpy(), features.numpy())


def _pool(config: TrainConfig) -> str:
    """How a cut backbone's feature map is pooled into an embedding ("" for a whole backbone)."""
    return config.head_pool if config.cut_layer is not None else ""


def embed_splits(data: ImageFolderData, backbone: nn.Module, pre: Preprocessing, config: TrainConfig,
                 show_progress: bool) -> tuple[dict[str, np.ndarray], EmbeddingStats]:
    """Every image's embedding by the frozen `backbone` (pooled when it is cut; from the cache where
    it is there), split by split."""
    pool = _pool(config)
    embedder = nn.Sequential(backbone, *pooling(pool)) if pool else backbone
    order = [i for name in SPLITS for i in data.split[name]]
    images = [data.scan.images[i] for i in order]
    embeddings, stats = embed_files(
        embedder.eval(), [im.path for im in images], [im.sha256 for im in images], pre,
        cache_dir=Path(config.cache_dir) if config.cache_dir else None, batch_size=config.batch_size,
        workers=config.workers, device=config.device, precision=config.precision,
        engine=config.engine, show_progress=show_progress)
    features, start = {}, 0
    for name in SPLITS:
        count = len(data.split[name])
        features[name] = embeddings[start:start + count]
        start += count
    return features, stats


def classifier(config: TrainConfig):
    """A StandardScaler, then logistic regression or an MLP: the scaler is folded into the head."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if config.classifier == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier(
            hidden_layer_sizes=MLP_HIDDEN, random_state=config.seed, max_iter=300))
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))


def _training_fit(estimator, features: np.ndarray, labels: np.ndarray) -> dict:
    """How well the classifier fits its own training embeddings: with val loss, the overfitting gap."""
    from sklearn.metrics import log_loss

    proba = estimator.predict_proba(features)
    return {"loss": float(log_loss(labels, proba, labels=estimator.classes_)),
            "accuracy": float((estimator.classes_[proba.argmax(1)] == labels).mean()),
            "measured_on": "training embeddings"}
