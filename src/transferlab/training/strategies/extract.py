"""`extract`: a frozen backbone embeds every image once (cached), a scikit-learn classifier is fitted
on the embeddings and transplanted into a torch head, so the saved model is one network.

With `cut_layer`, the embedding is an intermediate stage's feature map, pooled (`head_pool`: avg or
flatten); the head of the saved network pools the same way, so the bundle predicts from that stage.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...data.folder import ImageFolderData
from ...data.split import SPLITS
from ...data.transforms import Preprocessing
from ...errors import ConfigError, DataError
from ...inference.embeddings import EmbeddingStats, embed_files
from ...inference.graphs import probability_parity
from ...inference.predictor import NetworkOutputs
from ...inference.rows import RowFile
from ...models.backbones import count_parameters
from ...models.heads import HeadSpec, head_from_sklearn, pooling
from ...models.network import ClassifierNet, build_network, feature_shape, head_outputs
from ..config import TrainConfig
from ..streamed import fit_streamed
from ..distributed_embedding import embed_into_cache
from ..trainer import Distribution
from .base import FitContext, Strategy, Timings, TrainedModel, backbone_for

MLP_HIDDEN = (250, 100)  # scikit-learn's MLPClassifier as Keras-era tutorials sized it
# Embeddings (all splits, float32) above which logistic regression is fitted streaming
# (training/streamed.py): the in-memory fit holds them, a standardised copy of the training ones
# and the head's outputs, about three times this; 512 MB is 100,000 images of Lite0's 1,280 features.
STREAM_ABOVE_BYTES = 512 * 2**20
TRANSPLANT_TOLERANCE = 1e-4  # the torch head must give the fitted classifier's probabilities
log = logging.getLogger(__name__)


class Extract(Strategy):
    name = "extract"
    summary = "frozen backbone, cached embeddings, logistic regression (or an MLP)"
    uses = frozenset({"classifier", "cut_layer", "head_pool", "accelerator", "devices", "num_nodes",
                      "distributed"})
    defaults = {"classifier": "logistic", "head_pool": "avg", "num_nodes": 1, "distributed": "auto"}

    def resolve(self, values: dict, given: set[str]) -> dict:
        if values.get("cut_layer") is None and "head_pool" not in given:
            values["head_pool"] = None  # nothing to pool: the backbone gives vectors
        if distributed(values):
            processes = f"devices={values.get('devices') or 1}, num_nodes={values['num_nodes']}"
            if not values.get("cache_dir"):
                raise ConfigError(f"{processes} with the cache off: extract's processes hand their "
                                  "embeddings over through the cache; drop --no-cache")
            if values["distributed"] not in EMBEDDING_STRATEGIES:
                raise ConfigError(f"distributed={values['distributed']!r}: extract's frozen backbone "
                                  f"is spread with {', '.join(EMBEDDING_STRATEGIES)}; use one of them")
        return values

    def network(self, config: TrainConfig, num_classes: int
                ) -> tuple[ClassifierNet, HeadSpec, Preprocessing, int]:
        backbone, pre = backbone_for(config)
        hidden = MLP_HIDDEN if config.classifier == "mlp" else ()
        net, spec = build_network(backbone, pre, num_classes, hidden=hidden,
                                  pool=config.head_pool or "avg")
        return net, spec, pre, count_parameters(net.head)

    def fit(self, data: ImageFolderData, config: TrainConfig, context: FitContext) -> TrainedModel | None:
        torch.manual_seed(config.seed)
        backbone, pre = backbone_for(config)
        distribution = (Distribution.resolve(torch.device(config.device), config.accelerator,
                                             config.devices, config.num_nodes, config.distributed)
                        if distributed(config.to_dict()) else None)
        probe = fit_probe(data, config, backbone, pre, context.show_progress, distribution)
        if probe is None:  # a helper process of a distributed embedding: its part is done
            return None
        return TrainedModel(
            network=ClassifierNet(backbone, probe.head.eval()), head=probe.spec, preprocessing=pre,
            trainable=count_parameters(probe.head),
            timings=Timings(train_s=probe.fit_s, embed_s=probe.embedding.seconds,
                            embed_images_per_s=probe.embedding.images_per_s,
                            embedded=probe.embedding.embedded, cached=probe.embedding.cached),
            train_fit=probe.train_fit,
            details={"classifier": config.classifier,
                     **({"distribution": asdict(distribution)} if distribution else {}),
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
              show_progress: bool, distribution: Distribution | None = None) -> Probe | None:
    """Embed every image with the frozen `backbone` (cached), fit `config.classifier` on the training
    split and transplant it into a torch head; it must give the classifier's probabilities.
    With a `distribution`, the embedding is spread over its processes and only the main one fits
    (the others return None). Above STREAM_ABOVE_BYTES of embeddings, logistic regression is fitted
    streaming instead (_fit_probe_streamed), so memory stays flat however many images there are."""
    labels = np.array(data.labels("train"), dtype=np.int64)
    if len(set(labels.tolist())) < 2:
        raise DataError(f"{data.root}: the training split holds only one class; add images")
    if _streams(data, config, backbone, pre):
        return _fit_probe_streamed(data, config, backbone, pre, labels, show_progress, distribution)
    embedded = embed_splits(data, backbone, pre, config, show_progress, distribution)
    if embedded is None:
        return None
    features, stats = embedded
    started = time.perf_counter()
    estimator = classifier(config).fit(features["train"], labels)
    fit_s = time.perf_counter() - started
    _classifier_parity(stats, estimator.predict_proba)
    spec, head = head_from_sklearn(estimator, num_classes=len(data.classes), pool=_pool(config))
    linear = head[len(pooling(_pool(config))):]  # the layers after pooling, which the embeddings skip
    train_fit, transplant_error = _checked_fit(linear, estimator.predict_proba, [features["train"]],
                                               labels, estimator.classes_)
    outputs = {name: _head_outputs(linear, features[name]) for name in SPLITS}
    return Probe(spec, head, outputs, train_fit, transplant_error, fit_s, stats)


def _streams(data: ImageFolderData, config: TrainConfig, backbone: nn.Module,
             pre: Preprocessing) -> bool:
    """Whether the embeddings are too many to hold: only logistic regression has a streamed fit."""
    width = int(np.prod(feature_shape(_embedder(backbone, config), pre)))
    large = 4 * width * sum(len(data.split[name]) for name in SPLITS) > STREAM_ABOVE_BYTES
    if large and config.classifier == "mlp":
        log.warning("%d images: the MLP classifier is fitted on every embedding in memory; "
                    "--classifier logistic fits in chunks", len(data.scan.images))
    return large and config.classifier != "mlp"


def _fit_probe_streamed(data: ImageFolderData, config: TrainConfig, backbone: nn.Module,
                        pre: Preprocessing, labels: np.ndarray, show_progress: bool,
                        distribution: Distribution | None = None) -> Probe | None:
    """fit_probe for many images: the embeddings stay in the cache (a temporary one without
    --cache-dir) and are read back in chunks; the training split's are copied once into a RowFile
    that the fit reads pass after pass. The training split's outputs are not kept (evaluation takes
    the class-balanced sample its novelty bank needs), those of val and test are: their logits in
    memory, their features in RowFiles."""
    embedder = _embedder(backbone, config)
    shape = feature_shape(embedder, pre)
    with contextlib.ExitStack() as stack:
        cache_dir = config.cache_dir or stack.enter_context(tempfile.TemporaryDirectory())
        embedded = _embed_all(data, embedder, pre, config, show_progress, distribution,
                              Path(cache_dir), stream=True)
        if embedded is None:
            return None  # a helper process: the main one fits
        _, stats = embedded
        rows = stack.enter_context(RowFile(stats.cache.chunks(data.hashes("train"), shape)))
        started = time.perf_counter()
        scaler, model = fit_streamed(rows, labels)
        fit_s = time.perf_counter() - started

        def predict_proba(chunk: np.ndarray) -> np.ndarray:
            return model.predict_proba(scaler.transform(chunk))

        _classifier_parity(stats, predict_proba)
        spec, head = head_from_sklearn((scaler, model), num_classes=len(data.classes),
                                       pool=_pool(config))
        linear = head[len(pooling(_pool(config))):]
        train_fit, transplant_error = _checked_fit(linear, predict_proba, rows.chunks(), labels,
                                                   model.classes_)
        outputs = {name: _head_outputs_chunked(linear, stats.cache.chunks(data.hashes(name), shape),
                                               shape) for name in SPLITS if name != "train"}
    log.info("extract: logistic regression fitted streaming on %d embeddings in %.0f s",
             len(labels), fit_s)
    return Probe(spec, head, outputs, train_fit, transplant_error, fit_s, stats)


def _classifier_parity(stats: EmbeddingStats, predict_proba) -> None:
    """The engine's embeddings judged by what they decide: the fitted classifier's probabilities on
    the parity check's images embedded by the engine against torch fp32 (when a check ran)."""
    if stats.check_embeddings is not None:
        expected, got = (predict_proba(x) for x in stats.check_embeddings)
        stats.engine["classifier_parity"] = probability_parity(expected, got)


def _checked_fit(linear: nn.Sequential, predict_proba, chunks, labels: np.ndarray,
                 classes: np.ndarray) -> tuple[dict, float]:
    """How well the classifier fits its own training embeddings (with val loss, the overfitting
    gap), and the torch head's largest difference from its probabilities: an error above
    TRANSPLANT_TOLERANCE. Chunk by chunk, so that it holds for any number of embeddings."""
    from sklearn.metrics import log_loss

    loss, correct, start, transplant_error = 0.0, 0, 0, 0.0
    for chunk in chunks:
        wanted = labels[start:start + len(chunk)]
        start += len(chunk)
        proba = predict_proba(chunk)
        transplant_error = max(transplant_error,
                               float(np.abs(_head_outputs(linear, chunk).softmax() - proba).max()))
        loss += float(log_loss(wanted, proba, labels=classes, normalize=False))
        correct += int((classes[proba.argmax(1)] == wanted).sum())
    if transplant_error > TRANSPLANT_TOLERANCE:
        raise RuntimeError(f"torch head differs from the fitted classifier by {transplant_error:.2e}")
    return {"loss": loss / start, "accuracy": correct / start,
            "measured_on": "training embeddings"}, transplant_error


def _head_outputs(linear: nn.Sequential, embeddings: np.ndarray) -> NetworkOutputs:
    """The head's logits and penultimate features for embeddings, as the saved network computes
    them from images (ClassifierNet.logits_and_features)."""
    with torch.no_grad():
        logits, features = head_outputs(linear, torch.as_tensor(embeddings, dtype=torch.float32))
        return NetworkOutputs(logits.numpy(), features.numpy())


def _head_outputs_chunked(linear: nn.Sequential, chunks, shape: tuple) -> NetworkOutputs:
    """_head_outputs of embeddings read in chunks; the features (as many floats an image as the
    embedding: 1.5 GB for 300,000 images of Lite0) are left in a RowFile, for novelty to be scored
    on in chunks too, and only the logits are held."""
    logits: list[np.ndarray] = []

    def features():
        for chunk in chunks:
            outputs = _head_outputs(linear, chunk)
            logits.append(outputs.logits)
            yield outputs.features

    rows = RowFile(features())
    if not logits:  # no images: the head's outputs for none, for their widths
        rows.close()
        none = _head_outputs(linear, np.empty((0, *shape), dtype=np.float32))
        return NetworkOutputs(none.logits, none.features)
    return NetworkOutputs(np.concatenate(logits), rows)


def _embedder(backbone: nn.Module, config: TrainConfig) -> nn.Module:
    """The frozen backbone, pooled when it is cut: what the embeddings are the outputs of."""
    pool = _pool(config)
    return nn.Sequential(backbone, *pooling(pool)) if pool else backbone


def _pool(config: TrainConfig) -> str:
    """How a cut backbone's feature map is pooled into an embedding ("" for a whole backbone)."""
    return config.head_pool if config.cut_layer is not None else ""


def embed_splits(data: ImageFolderData, backbone: nn.Module, pre: Preprocessing, config: TrainConfig,
                 show_progress: bool, distribution: Distribution | None = None,
                 ) -> tuple[dict[str, np.ndarray], EmbeddingStats] | None:
    """Every image's embedding by the frozen `backbone` (pooled when it is cut; from the cache where
    it is there), split by split; None in the helper processes of a `distribution`."""
    embedded = _embed_all(data, _embedder(backbone, config), pre, config, show_progress, distribution,
                          Path(config.cache_dir) if config.cache_dir else None)
    if embedded is None:
        return None
    embeddings, stats = embedded
    features, start = {}, 0
    for name in SPLITS:
        count = len(data.split[name])
        features[name] = embeddings[start:start + count]
        start += count
    return features, stats


def _embed_all(data: ImageFolderData, embedder: nn.Module, pre: Preprocessing, config: TrainConfig,
               show_progress: bool, distribution: Distribution | None, cache_dir: Path | None,
               stream: bool = False) -> tuple[np.ndarray | None, EmbeddingStats] | None:
    """embed_files of every image, split after split (`stream`: left in the cache). With a
    `distribution`, its processes first embed what the cache lacks into it (None in the helper
    processes); the main process then reads them all from it, and embeds (or names) any a process
    could not read. Spread over processes, each runs the engine the main process chose and
    checked (on the device Lightning gives it), whose cache the main process then reads."""
    paths = [path for name in SPLITS for path in data.files(name)]
    hashes = [h for name in SPLITS for h in data.hashes(name)]
    settings = dict(batch_size=config.batch_size, workers=config.workers, device=config.device,
                    precision=config.precision, engine=config.engine, show_progress=show_progress)
    spread = None
    if distribution:
        spread = embed_into_cache(embedder.eval(), paths, hashes, pre, cache_dir=cache_dir,
                                  distribution=distribution, **settings)
        if spread is None:
            return None
    embeddings, stats = embed_files(embedder.eval(), paths, hashes, pre, cache_dir=cache_dir,
                                    stream=stream, **settings)
    if spread:
        if spread.check_embeddings is not None:  # the check ran before the spread, not here
            stats.engine, stats.check_embeddings = spread.engine, spread.check_embeddings
        stats.embedded += spread.embedded
        stats.cached = len(hashes) - stats.embedded
        stats.seconds += spread.seconds
    return embeddings, stats


EMBEDDING_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork")  # Lightning's, for a predict loop


def distributed(values: dict) -> bool:
    """Whether the options ask for more than one process."""
    return (values.get("devices") or 1) > 1 or (values.get("num_nodes") or 1) > 1


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
