"""train(): every strategy through one entry point, one configuration and one run directory.

`extract` (extract.py) fits a classifier on cached embeddings; `head`, `finetune` and `scratch`
(recipes.py) train a network with Lightning. All of them end the same way: a bundle, val/test metrics
computed from the saved bundle's predictions, and metrics.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..runs.atomic import check_writable, remove_temporaries, write_json
from ..models.backbones import DEFAULT_BACKBONE, CutBackbone, count_parameters, resolve_name
from ..inference.bundle import Predictor, save_model
from ..data.cache import default_cache_dir
from ..data.folder import ImageFolderData
from ..errors import ConfigError, DataError
from ..training.strategies.extract import CLASSIFIERS, evaluate_probabilities, fit_extract
from ..models.heads import POOLS
from ..evaluation.metrics import probability_agreement
from ..training.module import OPTIMIZERS, SCHEDULES
from ..runs.predictions import FILE as PREDICTIONS_FILE, PredictionTable
from ..runs.layout import (HISTORY_FILE, METRICS_FILE, MODEL_DIR, RUN_FILE, SPLIT_FILE, environment,
                       read_history)
from ..training.recipes import RECIPES, train_network
from ..inference.batches import resolve_precision
from ..training.trainer import CHECKPOINTS
from ..data.transforms import AUGMENTATIONS

log = logging.getLogger(__name__)

STRATEGIES = ("extract", *RECIPES)
PARITY_IMAGES = 64  # validation images predicted in fp32 too, to check that bf16 changes nothing
RUN_DIR_ENV = "TRANSFERLAB_RUN_DIR"  # lets the processes of a distributed run share one directory
RESUMABLE_OPTIONS = {"epochs", "workers", "early_stopping", "devices", "num_nodes", "accelerator",
                     "distributed"}


@dataclass
class TrainConfig:
    """Everything that decides a run; written, resolved, to run.json. None means the strategy's
    default (see recipes.RECIPES)."""

    strategy: str = "extract"
    backbone: str | None = None
    weights: str | None = None
    seed: int = 0
    batch_size: int = 32
    workers: int | None = None
    precision: str = "auto"
    cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))
    # extract
    classifier: str = "logistic"
    # head, finetune, scratch
    epochs: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str | None = None
    grad_clip: float | None = None
    augment: str | None = None
    class_weights: str | None = None
    early_stopping: int | None = None
    cut_layer: str | None = None
    head_dim: int = 256
    dropout: float = 0.5
    head_pool: str = "avg"
    unfreeze: str = "all"
    unfreeze_from: str | None = None
    warmup_epochs: int = 1
    backbone_lr_scale: float = 0.1
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    distributed: str = "auto"

    def resolved(self) -> "TrainConfig":
        """The strategy's defaults filled in and the input checked, naming any bad value."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}: available strategies are "
                              f"{', '.join(STRATEGIES)}")
        on_gpu = self.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        config = replace(self, precision=resolve_precision(self.precision, on_gpu and
                                                           self.strategy != "extract"))
        recipe = RECIPES.get(self.strategy)
        if recipe is None:
            config = replace(config, backbone=config.backbone or DEFAULT_BACKBONE,
                             weights=config.weights or "imagenet")
        else:
            defaults = {"backbone": recipe.backbone or DEFAULT_BACKBONE, "weights": recipe.weights,
                        "epochs": recipe.epochs, "optimizer": recipe.optimizer, "lr": recipe.lr,
                        "schedule": recipe.schedule, "augment": recipe.augment}
            config = replace(config, **{name: value for name, value in defaults.items()
                                        if getattr(config, name) is None})
        config._check()
        return config

    def _check(self) -> None:
        choices = {"classifier": CLASSIFIERS, "optimizer": OPTIMIZERS + (None,),
                   "schedule": SCHEDULES + (None,), "augment": AUGMENTATIONS + (None,),
                   "head_pool": POOLS, "class_weights": ("balanced", None)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                listed = ", ".join(str(a) for a in allowed if a is not None)
                raise ConfigError(f"{name}={getattr(self, name)!r}: use one of {listed}")
        for name in ("batch_size", "epochs", "head_dim", "devices", "num_nodes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: the learning rate must be positive, such as 1e-3")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}: must be in [0, 1)")
        if self.strategy == "scratch" and self.weights != "none":
            raise ConfigError(f"weights={self.weights!r}: scratch trains from random weights; drop "
                              "--weights or use --strategy finetune")
        if self.unfreeze != "all" and not str(self.unfreeze).isdigit():
            raise ConfigError(f"unfreeze={self.unfreeze!r}: a number of top blocks, or 'all'")
        resolve_name(self.backbone)


@dataclass
class Run:
    dir: Path
    metrics: dict

    @property
    def model_dir(self) -> Path:
        return self.dir / MODEL_DIR


def default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.strategy}-{config.backbone.replace('/', '_')}-{stamp}"


def train(data: ImageFolderData | str | os.PathLike | None = None, strategy: str = "extract",
          backbone: str | None = None, *, out: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, show_progress: bool = True, **options) -> Run | None:
    """Train `strategy` on `data` and write a run directory (model/, metrics.json, split.json, ...).

    `resume` continues the run in that directory from its last checkpoint, with its configuration
    and split; only `epochs` and how it runs (workers, devices, ...) may change. extract has no
    checkpoint: it starts again, and its embedding cache keeps the images a killed run embedded.
    In a distributed run, processes other than the main one return None.
    """
    if resume is not None:
        data, config, run_dir = _resume(Path(resume), options)
    else:
        config = TrainConfig(strategy=strategy, backbone=backbone, **options).resolved()
        run_dir = Path(out or os.environ.get(RUN_DIR_ENV) or default_run_dir(config))
    if not isinstance(data, ImageFolderData):
        if data is None:
            raise ConfigError("data: give the folder of labelled images to train on")
        data = ImageFolderData(data, seed=config.seed, cache_dir=config.cache_dir)
    check_writable(run_dir)

    started = time.perf_counter()
    data.split  # scan, find duplicates and split now, so their cost is timed on its own
    scan_s = time.perf_counter() - started
    _log_data(data)
    if resume is None:
        write_json(run_dir / SPLIT_FILE, data.split_record())
    write_json(run_dir / RUN_FILE, {"config": asdict(config), "data": data.options(),
                                      "command": sys.argv, "transferlab_version": __version__,
                                      "environment": environment()})
    if config.strategy == "extract":
        result = fit_extract(data, config, show_progress)
    else:
        os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
        try:
            result = train_network(data, config, run_dir, show_progress)
        finally:
            os.environ.pop(RUN_DIR_ENV, None)
        if result is None:
            return None
    metrics = _finish(data, config, run_dir, result)
    metrics["timing"].update(scan_s=round(scan_s, 3), total_s=round(time.perf_counter() - started, 3))
    write_json(run_dir / METRICS_FILE, metrics)
    _write_report(run_dir)
    # A run killed earlier in this directory may have left temporaries (killed between a write and
    # its rename). Removed here, by the main process of a complete run: nothing can be writing one.
    for folder in (run_dir, run_dir / CHECKPOINTS):
        remove_temporaries(folder)
    return Run(run_dir, metrics)


def _write_report(run_dir: Path) -> None:
    """report.html; the run is complete without it, so a failure here is a warning, not lost work."""
    from ..reporting.report import write_report

    try:
        write_report(run_dir)
    except Exception as error:  # noqa: BLE001 - the model and metrics are already safely written
        log.warning("report.html not written (%s: %s); the run is complete, retry with "
                    "`transferlab report %s`", type(error).__name__, error, run_dir)


def _finish(data: ImageFolderData, config: TrainConfig, run_dir: Path, result: dict) -> dict:
    """Evaluate on val and test (through the Predictor that serves the bundle, unless extract already
    has the probabilities), save the bundle and assemble metrics.json."""
    net, pre = result["net"], result["preprocessing"]
    predictor = Predictor(net, {"classes": data.classes, "preprocessing": pre.to_dict()})
    probabilities = result.get("probabilities") or {
        name: predictor.predict_proba(data.files(name), batch_size=config.batch_size,
                                      precision=config.precision)[0] for name in ("val", "test")}
    results = evaluate_probabilities(data, probabilities)
    split_summary = data.summary()
    if split_summary["groups_across_splits"]:
        results["test"]["leakage"] = _leakage(data, probabilities["test"])
    PredictionTable.concat(data.classes, {
        name: (data.relative_files(name), data.labels(name), probabilities[name])
        for name in ("val", "test")}).write(run_dir / PREDICTIONS_FILE)
    extra = result["extra"]
    if "train" not in extra:
        extra["train"] = _best_epoch_training(run_dir / HISTORY_FILE, extra.get("best_epoch"))
    extra.setdefault("precision", {}).update(_precision_parity(predictor, data, probabilities["val"],
                                                               config))
    short = {name: {k: results[name].get(k) for k in ("accuracy", "loss", "macro_f1")}
             for name in results}
    total = count_parameters(net)
    params = {"total": total, "trainable": result["trainable"], "non_trainable": total - result["trainable"]}
    save_model(net, run_dir / MODEL_DIR, backbone=resolve_name(config.backbone), classes=data.classes,
               head=result["head"], preprocessing=pre,
               cut_layer=net.backbone.index if isinstance(net.backbone, CutBackbone) else None,
               training={"strategy": config.strategy, "weights": config.weights, "params": params,
                         **short})
    return {"strategy": config.strategy, "backbone": config.backbone, "weights": config.weights,
            "classes": data.classes, "data": {"root": str(data.root.resolve())}, "split": split_summary,
            "val": results["val"], "test": results["test"], "timing": result["timing"],
            "params": params, "preprocessing": pre.to_dict(), **extra}


def _leakage(data: ImageFolderData, proba: np.ndarray) -> dict:
    """Test accuracy separately on the images with a copy in training and on the rest: how much a
    leaky split flatters the model."""
    copied = np.array(data.has_copy_in_training("test"), dtype=bool)
    correct = proba.argmax(1) == np.array(data.labels("test"))

    def accuracy(mask: np.ndarray) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    return {"images_with_copy_in_train": int(copied.sum()), "accuracy_on_those": accuracy(copied),
            "accuracy_on_the_rest": accuracy(~copied)}


def _best_epoch_training(history: Path, best_epoch: int | None) -> dict:
    """Training loss and accuracy of the epoch whose weights were kept, as logged during training
    (averaged over its batches, with augmentation and dropout)."""
    row = next((r for r in read_history(history) if r["epoch"] == best_epoch), None)
    if row is None:
        return {}
    return {"loss": row["train_loss"], "accuracy": row["train_acc"], "measured_on": "best epoch's batches"}


def _precision_parity(predictor, data: ImageFolderData, fast: np.ndarray, config: TrainConfig) -> dict:
    """Predict a few validation images in fp32 and compare with the bf16 predictions."""
    if config.precision != "bf16":
        return {}
    count = min(PARITY_IMAGES, len(data.split["val"]))
    if not count:
        return {}
    exact, _ = predictor.predict_proba(data.files("val")[:count], batch_size=config.batch_size,
                                       precision="32")
    agreement = probability_agreement(exact, fast[:count])
    if agreement["top1_agreement"] < 0.98:
        log.warning("bf16 and fp32 predictions agree on only %.1f%% of %d validation images; "
                    "consider --precision 32", 100 * agreement["top1_agreement"], count)
    return {"parity_images": count, **{f"parity_{key}": value for key, value in agreement.items()}}


def _resume(run_dir: Path, options: dict) -> tuple[ImageFolderData, TrainConfig, Path]:
    path = run_dir / RUN_FILE
    if not path.is_file():  # such as a run killed before it saved its configuration
        raise ConfigError(f"{run_dir}: nothing to resume, it holds no {RUN_FILE}; start the run again "
                          f"with `transferlab train DATA --out {run_dir}`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        stored = {f.name: record["config"][f.name] for f in fields(TrainConfig)
                  if f.name in record["config"]}
        data_options = record["data"]
        recorded = {name: [item["file"] for item in json.loads(
            (run_dir / SPLIT_FILE).read_text(encoding="utf-8"))[name]] for name in ("train", "val", "test")}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{run_dir}: not a resumable run directory ({error}); give the "
                          "directory of an interrupted `transferlab train`") from None
    changed = sorted(k for k, v in options.items() if k not in RESUMABLE_OPTIONS and v != stored.get(k))
    if changed:
        raise ConfigError(f"--resume continues a run as it was configured; {', '.join(changed)} cannot "
                          "change (start a new run instead)")
    config = replace(TrainConfig(**stored), **options).resolved()
    data = ImageFolderData(**data_options, cache_dir=config.cache_dir)
    for name in ("train", "val", "test"):
        if recorded[name] != data.relative_files(name):
            raise DataError(f"{data.root}: the images changed since {run_dir} started ({name} split differs "
                            "from split.json); start a new run")
    return data, config, run_dir


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
