"""Training strategies as small recipes over data, backbones, embeddings, heads and bundles.

`extract`: a frozen backbone embeds every image once (cached), a scikit-learn classifier is fitted on
the embeddings and transplanted into a torch head, and backbone + head are saved as one network.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .atomic import write_json
from .backbones import DEFAULT_BACKBONE, count_parameters, create_backbone, resolve_name
from .bundle import ClassifierNet, save_model
from .data import SPLITS, ImageFolderData
from .cache import default_cache_dir
from .embeddings import embed_files
from .errors import ConfigError, DataError
from .heads import head_from_sklearn
from .metrics import classification_metrics
from .runner import resolve_precision
from .transforms import Preprocessing

log = logging.getLogger(__name__)

STRATEGIES = ("extract",)
CLASSIFIERS = ("logistic", "mlp")
PARITY_IMAGES = 64  # images re-embedded in fp32 to check that bf16 changes no prediction


@dataclass
class TrainConfig:
    """Everything that decides a run; written to run.json."""

    strategy: str = "extract"
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    classifier: str = "logistic"
    seed: int = 0
    batch_size: int = 32
    workers: int | None = None
    precision: str = "auto"
    cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}: available strategies are "
                              f"{', '.join(STRATEGIES)}")
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(f"classifier={self.classifier!r}: use one of {', '.join(CLASSIFIERS)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be at least 1")
        resolve_precision(self.precision)
        resolve_name(self.backbone)


@dataclass
class Run:
    dir: Path
    metrics: dict

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"


def default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.strategy}-{config.backbone.replace('/', '_')}-{stamp}"


def train(data: ImageFolderData | str | os.PathLike, strategy: str = "extract",
          backbone: str = DEFAULT_BACKBONE, *, out: str | os.PathLike | None = None,
          show_progress: bool = True, **options) -> Run:
    """Train `strategy` on `data` and write a run directory (model/, metrics.json, split.json)."""
    config = TrainConfig(strategy=strategy, backbone=backbone, **options)
    config.validate()
    if not isinstance(data, ImageFolderData):
        data = ImageFolderData(data, seed=config.seed, cache_dir=config.cache_dir)
    run_dir = Path(out) if out else default_run_dir(config)
    _check_writable(run_dir)

    started = time.perf_counter()
    data.split  # scan, find duplicates and split now, so their cost is timed on its own
    scan_s = time.perf_counter() - started
    _log_data(data)
    write_json(run_dir / "split.json", data.split_record())
    write_json(run_dir / "run.json", {"config": asdict(config), "data": str(data.root),
                                      "command": sys.argv, "transferlab_version": __version__})

    metrics = _extract(data, config, run_dir, show_progress)
    metrics["timing"].update(scan_s=round(scan_s, 3),
                             total_s=round(time.perf_counter() - started, 3))
    write_json(run_dir / "metrics.json", metrics)
    return Run(run_dir, metrics)


def _extract(data: ImageFolderData, config: TrainConfig, run_dir: Path, show_progress: bool) -> dict:
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
    net = ClassifierNet(backbone, head.eval())

    def head_proba(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head(torch.as_tensor(x, dtype=torch.float32)).softmax(1).numpy()

    transplant_error = float(np.abs(head_proba(features["train"]) -
                                    estimator.predict_proba(features["train"])).max())
    if transplant_error > 1e-4:
        raise RuntimeError(f"torch head differs from the fitted classifier by {transplant_error:.2e}")

    results = {name: classification_metrics(labels[name], head_proba(features[name]), data.classes)
               for name in ("val", "test")}
    parity = _precision_parity(backbone, head_proba, data, features, pre, config, precision)

    total, trainable = count_parameters(net), count_parameters(head)
    save_model(net, run_dir / "model", backbone=resolve_name(config.backbone), classes=data.classes,
               head=spec, preprocessing=pre,
               training={"strategy": "extract", "classifier": config.classifier,
                         "weights": config.weights, "val": _short(results["val"]),
                         "test": _short(results["test"])})
    return {
        "strategy": "extract", "backbone": config.backbone, "weights": config.weights,
        "classifier": config.classifier, "classes": data.classes, "split": data.summary(),
        "val": results["val"], "test": results["test"],
        "timing": {"embed_s": round(stats.seconds, 3), "embed_images_per_s":
                   round(stats.images_per_s, 1) if stats.images_per_s else None,
                   "embedded": stats.embedded, "cached": stats.cached, "train_s": round(fit_s, 3)},
        "params": {"total": total, "trainable": trainable, "non_trainable": total - trainable},
        "precision": {"embedding": precision, **parity, "transplant_max_abs_diff": transplant_error},
        "preprocessing": pre.to_dict(),
    }


def _precision_parity(backbone, head_proba, data, features, pre, config, precision) -> dict:
    """Re-embed a few validation images in fp32 and compare predictions with the bf16 ones."""
    if precision != "bf16":
        return {}
    count = min(PARITY_IMAGES, len(data.split["val"]))
    sample = [data.scan.images[i] for i in data.split["val"][:count]]
    reference, _ = embed_files(backbone, [im.path for im in sample], [im.sha256 for im in sample],
                               pre, cache_dir=None, batch_size=config.batch_size, workers=0,
                               precision="32", show_progress=False)
    fast, exact = head_proba(features["val"][:count]), head_proba(reference)
    agreement = float((fast.argmax(1) == exact.argmax(1)).mean()) if count else 1.0
    if agreement < 0.98:
        log.warning("bf16 and fp32 predictions agree on only %.1f%% of %d validation images; "
                    "consider --precision 32", 100 * agreement, count)
    return {"parity_images": count, "parity_top1_agreement": agreement,
            "parity_max_abs_prob_diff": float(np.abs(fast - exact).max()) if count else 0.0}


def _short(result: dict) -> dict:
    return {k: result.get(k) for k in ("accuracy", "loss", "macro_f1")}


def _check_writable(run_dir: Path) -> None:
    """Fail before any work if the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{run_dir}: cannot write the run directory ({error.strerror}); "
                          "choose another --out") from None


def _log_data(data: ImageFolderData) -> None:
    summary = data.summary()
    log.info("%d images in %d classes; split train %d / val %d / test %d (seed %d)",
             len(data.scan.images), len(data.classes), summary["train"], summary["val"],
             summary["test"], data.seed)
    log.info("%d groups of identical files, %d of near-identical images", summary["duplicate_groups"],
             summary["near_duplicate_groups"])
    if summary["groups_across_splits"]:
        log.warning("%d duplicate groups have copies in more than one split: test accuracy will be "
                    "optimistic", summary["groups_across_splits"])
    elif summary["near_duplicate_groups"]:
        log.info("every duplicate group is within one split")
