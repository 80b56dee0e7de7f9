"""train(): one run from start to end, whatever the strategy.

1. the options are checked and resolved by the strategy (training/strategies), before any work;
2. the data is scanned, deduplicated and split; split.json and run.json are written;
3. the strategy fits (training/strategies/NAME.py) and hands back a TrainedModel;
4. the model is measured on val and test through the Predictor that will serve it
   (evaluation/heldout.py), saved as a bundle, and metrics.json, predictions.csv and report.html
   are written.
`resume` continues an interrupted run with its configuration and split.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..data.cache import default_cache_dir
from ..data.describe import log_split
from ..data.edits import Edits
from ..data.folder import ImageFolderData, data_location
from ..errors import ConfigError, DataError
from ..evaluation.heldout import HELD_OUT, evaluate_held_out
from ..inference.bundle import save_model
from ..inference.engines import TorchEngine
from ..inference.predictor import Predictor
from ..models.backbones import DEFAULT_BACKBONE, SIMPLE_CNN, count_parameters, resolve_name
from ..models.network import WithFeatures
from ..options import OPTIONS, check
from ..process import reused_memory
from ..reporting.model_card import write_model_card_or_warn
from ..reporting.report import write_report_or_warn
from ..rundir.atomic import check_writable, remove_temporaries, write_json
from ..rundir.layout import (RunDir, check_outside, claim_output, default_run_dir, locked,
                            read_json, write_run_record)
from ..rundir.predictions import PredictionTable
from ..training.config import TrainConfig
from ..training.strategies import FitContext, Strategy, TrainedModel, configure, get_strategy
from ..training.strategies.base import COMMON_OPTIONS
from ..training.trainer import is_main_process
from .audit import Embedder, audit_training_split

log = logging.getLogger(__name__)

RESUMABLE = {name for name, option in OPTIONS.items() if option.resumable}


@dataclass
class Run:
    dir: Path
    metrics: dict

    @property
    def model_dir(self) -> Path:
        return RunDir(self.dir).model


def train(data: ImageFolderData | str | os.PathLike | None = None, strategy: str | None = None,
          backbone: str | None = None, *, out: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, overwrite: bool = False,
          show_progress: bool = True, audit: bool | None = None, **options) -> Run | None:
    """Train `strategy` (default extract) on `data` and write a run directory (model/,
    metrics.json, split.json, ...).

    `options` are the strategy's (see `transferlab train --help`); `cache_dir=None` turns the cache
    off. An `out` that holds the results of an earlier run is refused unless `overwrite`.
    `resume` continues the run in that directory from its last checkpoint, with its
    configuration, data and split; only `epochs` and how it runs (workers, devices, ...) may
    change. extract has no checkpoint: it starts again, and its embedding cache keeps the images a
    killed run embedded. In a distributed run, processes other than the main one return None.
    `audit` audits the training split into RUN/audit/ and the report (default: on for extract, whose
    embeddings are at hand, off for the others); a resumed run does what it did first.
    """
    check({"audit": audit})
    if resume is not None:
        data, chosen, config = _resume(Path(resume), options, data=data, strategy=strategy, out=out)
        run_dir = Path(resume)
        audit = (read_json(RunDir(run_dir).run) or {}).get("audit") if audit is None else audit
    else:
        chosen, config = configure(strategy or "extract",
                                   {"backbone": backbone, **with_default_cache(options)})
        run_dir = Path(out) if out else default_run_dir(config.strategy, config.backbone)
        data = _as_data(data, config)
    check_writable(run_dir)
    check_outside(run_dir, data.root)
    started = time.perf_counter()
    data.split  # scan, find duplicates and split: bad data is refused before anything is written
    scan_s = time.perf_counter() - started
    # Only the main process writes the run directory; the helper processes of a distributed run
    # (Lightning starts them with their rank in the environment) only train.
    main = is_main_process()
    with locked(run_dir) if main else contextlib.nullcontext(), reused_memory():
        if main and resume is None:
            claim_output(run_dir, overwrite)
        try:
            return _run(data, chosen, config, run_dir, resumed=resume is not None, main=main,
                        show_progress=show_progress, started=started, scan_s=scan_s,
                        audit=chosen.name == "extract" if audit is None else audit)
        except BaseException as error:
            if main and not isinstance(error, Exception):  # interrupted, terminated, exiting
                log.warning("stopped; `transferlab train --resume %s` continues the run", run_dir)
            raise


def _as_data(data, config: TrainConfig) -> ImageFolderData:
    if isinstance(data, ImageFolderData):
        return data
    if data is None:
        raise ConfigError("data: give the folder of labelled images to train on")
    return ImageFolderData(data, seed=config.seed, cache_dir=config.cache_dir)


def _run(data: ImageFolderData, chosen: Strategy, config: TrainConfig, run_dir: Path, *,
         resumed: bool, main: bool, show_progress: bool, started: float, scan_s: float,
         audit: bool) -> Run | None:
    log_split(data)
    paths = RunDir(run_dir)
    if main:
        if not resumed:
            write_json(paths.split, data.split_record())
        write_run_record(run_dir, config=config.to_dict(), data=data.options(), audit=audit)
    model = chosen.fit(data, config, FitContext(run_dir, show_progress))
    if model is None or not main:
        return None
    metrics = _finish(data, config, run_dir, model)
    if audit:
        _audit(metrics, data, config, paths.audit, show_progress)
    metrics["timing"].update(scan_s=round(scan_s, 3), total_s=round(time.perf_counter() - started, 3))
    write_json(paths.metrics, metrics)
    write_model_card_or_warn(run_dir)  # model/README.md: needs the val and test metrics
    write_report_or_warn(run_dir)
    # A run killed earlier in this directory may have left temporaries (killed between a write and
    # its rename). Removed here, by the main process of a complete run: nothing can be writing one.
    for folder in (run_dir, paths.checkpoints):
        remove_temporaries(folder)
    return Run(run_dir, metrics)


def _audit(metrics: dict, data: ImageFolderData, config: TrainConfig, folder: Path,
           show_progress: bool) -> None:
    """The data audit of the training split (workflows/audit.py); its counts go into `metrics`
    (`audit`) and its seconds under `timing`. A failure is a warning, not a lost run. The frozen backbone embeds the images through the
    embedding cache (which extract has just filled): the run's own backbone when it is pretrained,
    else the default one."""
    pretrained = config.weights != "none" and config.backbone not in (SIMPLE_CNN, None)
    embedder = Embedder(config.backbone if pretrained else DEFAULT_BACKBONE,
                        config.weights if pretrained else "imagenet", config.cache_dir,
                        config.batch_size, config.workers, config.device, config.precision,
                        config.engine)
    try:
        summary = audit_training_split(data, folder, embedder, seed=config.seed,
                                       show_progress=show_progress)
    except Exception as error:  # noqa: BLE001 - the model is trained and measured already
        log.warning("data audit not written (%s: %s); the run's other results are complete",
                    type(error).__name__, error)
        return
    metrics["audit"] = summary["counts"]
    metrics["timing"]["audit_s"] = summary["seconds"]


def with_default_cache(options: dict) -> dict:
    """`options` with the default cache folder unless `cache_dir` was given (None turns it off)."""
    return options if "cache_dir" in options else {**options, "cache_dir": str(default_cache_dir())}


def _finish(data: ImageFolderData, config: TrainConfig, run_dir: Path, model: TrainedModel) -> dict:
    """Measure on val and test, save the bundle and predictions.csv, and assemble metrics.json."""
    engine = TorchEngine(WithFeatures(model.network), model.preprocessing, config.device)
    held_out = evaluate_held_out(Predictor(engine, data.classes, model.preprocessing), data,
                                 batch_size=config.batch_size, workers=config.workers,
                                 precision=config.precision, outputs=model.outputs)
    paths = RunDir(run_dir)
    PredictionTable.concat(data.classes, {
        name: (data.relative_files(name), data.labels(name), held_out.probabilities[name],
               held_out.novelty[name], held_out.unknown[name])
        for name in HELD_OUT}).write(paths.predictions)
    total = count_parameters(model.network)
    params = {"total": total, "trainable": model.trainable, "non_trainable": total - model.trainable}
    short = {name: {k: held_out.metrics[name].get(k) for k in ("accuracy", "loss", "macro_f1")}
             for name in HELD_OUT}
    backbone = model.backbone or config.backbone
    save_model(model.network, paths.model, backbone=resolve_name(backbone), classes=data.classes,
               head=model.head, preprocessing=model.preprocessing,
               training={"strategy": config.strategy, "weights": config.weights, "params": params,
                         **short}, trust=held_out.trust)
    details = dict(model.details)
    details["precision"] = {**details.get("precision", {}), **held_out.parity}
    return {"strategy": config.strategy, "backbone": backbone, "weights": config.weights,
            "classes": data.classes, "data": {"root": data.location},
            "split": data.summary(), **held_out.metrics, "timing": model.timings.to_dict(),
            "params": params, "preprocessing": model.preprocessing.to_dict(), "train": model.train_fit,
            "trust": held_out.trust.to_dict(), **details}


def _resume(run_dir: Path, options: dict, *, data=None, strategy: str | None = None,
            out=None) -> tuple[ImageFolderData, Strategy, TrainConfig]:
    """The data, strategy and configuration of the run in `run_dir`, refusing anything given that
    differs from how it started (options that may change are RESUMABLE), and images whose content
    changed since."""
    record, split = _resumable(run_dir)
    stored = {name: record["config"][name] for name in TrainConfig.names() if name in record["config"]}
    changed = sorted(k for k, v in options.items()
                     if v is not None and k not in RESUMABLE and v != stored.get(k))
    if strategy is not None and strategy != stored.get("strategy"):
        changed.append("strategy")
    if data is not None:
        changed += [f"data {k}" for k, v in _data_options(data).items() if record["data"].get(k) != v]
    if out is not None and Path(out).resolve() != run_dir.resolve():
        changed.append(f"--out (the run is in {run_dir})")
    if changed:
        raise ConfigError(f"--resume continues a run as it was configured; {', '.join(changed)} cannot "
                          "change (start a new run instead)")
    used = get_strategy(stored.get("strategy", "")).uses | COMMON_OPTIONS
    given = {k: v for k, v in stored.items() if k in used}
    chosen, config = configure(stored["strategy"], {**given, **{k: v for k, v in options.items()
                                                                if v is not None}})
    data = ImageFolderData(**record["data"], cache_dir=config.cache_dir)
    _check_same_images(run_dir, data, split)
    return data, chosen, config


def _data_options(data) -> dict:
    """The data options given with --resume: an ImageFolderData's, a folder's root, or a mapping of
    ImageFolderData's arguments (the command line passes those the user gave)."""
    if isinstance(data, ImageFolderData):
        return data.options()
    if isinstance(data, Mapping):  # --exclude and --relabel CSVs as the lists run.json records
        edits = Edits.given(data.get("exclude"), data.get("relabel")).to_options()
        return {**data, "root": data_location(data["root"]),
                **{name: edits[name] for name in ("exclude", "relabel") if data.get(name) is not None}}
    return {"root": data_location(data)}


def _resumable(run_dir: Path) -> tuple[dict, dict]:
    """run.json and split.json of a run that can be resumed; one clear error otherwise."""
    paths = RunDir(run_dir)
    if not paths.run.is_file():  # such as a run killed before it saved its configuration
        raise ConfigError(f"{run_dir}: nothing to resume, it holds no {paths.run.name}; start the run "
                          f"again with `transferlab train DATA --out {run_dir}`")
    try:
        record, split = read_json(paths.run), read_json(paths.split)
        if split is None:
            raise FileNotFoundError(f"no {paths.split}")
        # what resuming reads, present and of the right shape (else KeyError or TypeError)
        record["config"]["strategy"], record["data"]["root"]  # noqa: B018
        for name in ("train", *HELD_OUT):
            [item["file"] for item in split[name]]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{run_dir}: not a resumable run directory ({error}); give the "
                          "directory of an interrupted `transferlab train`") from None
    return record, split


def _check_same_images(run_dir: Path, data: ImageFolderData, split: dict) -> None:
    """The same files in the same splits, with the same content (split.json records each file's
    sha256; runs from before it did are checked by name only)."""
    for name in ("train", *HELD_OUT):
        items = split[name]
        if [item["file"] for item in items] != data.relative_files(name):
            raise DataError(f"{data.root}: the images changed since {run_dir} started ({name} split "
                            "differs from split.json); start a new run")
        changed = [item["file"] for item, digest in zip(items, data.hashes(name))
                   if item.get("sha256", digest) != digest]
        if changed:
            raise DataError(f"{data.root}: {len(changed)} image(s) of the {name} split changed content "
                            f"since {run_dir} started, such as {changed[0]}; start a new run")
