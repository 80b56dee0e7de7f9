"""`transferlab evaluate`: a saved model on a labelled folder, written like a run directory
(metrics.json, predictions.csv, run.json, report.html) so the report reads it the same way."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.folder import ImageFolderData
from ..errors import DataError
from ..evaluation.heldout import measure
from ..inference.backends import load_model
from ..inference.graphs import ENGINES, engine_report
from ..inference.bundle import read_config
from ..inference.predictor import Predictor
from ..options import check
from ..process import reused_memory
from ..reporting.report import write_report_or_warn
from ..rundir.atomic import check_writable, write_json
from ..rundir.layout import (RunDir, check_outside, claim_output, default_run_dir, locked,
                            write_run_record)
from ..rundir.predictions import PredictionTable

log = logging.getLogger(__name__)

EVALUATED = "test"  # the key under which metrics.json and predictions.csv hold the evaluated images


@dataclass
class Evaluation:
    dir: Path
    metrics: dict


def evaluate(model: str | os.PathLike, data: ImageFolderData | str | os.PathLike, *,
             out: str | os.PathLike | None = None, split: str = "all", batch_size: int = 32,
             workers: int | None = None, precision: str = "auto", device: str = "auto",
             backend: str = "torch", overwrite: bool = False, report: bool = True,
             show_progress: bool = True, engine: str = "auto") -> Evaluation:
    """Predict every image of `data` (or one split of it: train, val or test, as `data`'s seed and
    fractions deal them) with the bundle in `model` and measure the result. An `out` holding the
    results of a run, an evaluation or a comparison is refused unless `overwrite`."""
    check({"split": split, "batch_size": batch_size, "workers": workers, "precision": precision,
           "device": device, "engine": engine}, {"engine": ENGINES})
    config = read_config(model)
    if not isinstance(data, ImageFolderData):
        data = ImageFolderData(data, min_classes=1 if split == "all" else 2)
    out = Path(out) if out else default_run_dir("evaluate", data.root.resolve().name)
    check_writable(out)
    check_outside(out, data.root)
    indices = list(range(len(data.scan.images))) if split == "all" else data.split[split]
    predictor = load_model(model, backend=backend, device=device, engine=engine,
                           precision=precision, images=len(indices))
    if not indices:
        raise DataError(f"{data.root}: no readable images{'' if split == 'all' else ' in ' + split}")
    to_model = _class_mapping(data.classes, config.classes, data.root, model)
    with locked(out), reused_memory():
        claim_output(out, overwrite)
        return _evaluate(predictor, Path(model), data, indices, to_model, split, out,
                         batch_size=batch_size, workers=workers, precision=precision, report=report,
                         show_progress=show_progress)


def _evaluate(predictor: Predictor, model: Path, data: ImageFolderData, indices: list[int],
              to_model: list[int], split: str, out: Path, *, batch_size: int, workers: int | None,
              precision: str, report: bool, show_progress: bool) -> Evaluation:
    config = predictor.config
    files = [data.scan.images[i].path for i in indices]
    labels = np.array([to_model[data.scan.labels[i]] for i in indices], dtype=np.int64)
    started = time.perf_counter()
    outputs, errors = predictor.predict_outputs(files, batch_size=batch_size, workers=workers,
                                                precision=precision, show_progress=show_progress)
    seconds = time.perf_counter() - started
    read = np.array([not e for e in errors])
    for file, error in zip(files, errors):
        if error:
            log.warning("%s: skipped, cannot read it now (%s)", file, error)
    relative = [data.scan.relative(i) for i, ok in zip(indices, read) if ok]
    measured = measure(outputs.select(np.flatnonzero(read)), labels[read], config.classes,
                       predictor.trust)

    metrics = {"model": str(model.resolve()), "strategy": config.training.get("strategy"),
               "backbone": config.backbone, "classes": config.classes,
               "data": {"root": data.location, "split": split, "images": int(read.sum()),
                        "classes": data.classes, "unreadable": len(data.scan.unreadable) + int((~read).sum())},
               EVALUATED: measured.metrics,
               "timing": {"predict_s": round(seconds, 3),
                          "images_per_s": round(len(files) / seconds, 1) if seconds else None},
               # what ran the network, and a graph's check against torch fp32 on the first batch
               "engine": engine_report(predictor.engine),
               "trained": {k: config.training.get(k) for k in ("val", "test")}}
    paths = RunDir(out)
    PredictionTable.concat(config.classes, {EVALUATED: (
        relative, labels[read], measured.proba, measured.novelty, measured.unknown)}).write(
        paths.predictions)
    write_run_record(out, model=metrics["model"], data=data.options(), split=split)
    write_json(paths.metrics, metrics)
    if report:
        write_report_or_warn(out)
    return Evaluation(out, metrics)


def _class_mapping(data_classes: list[str], model_classes: list[str], root: Path, model) -> list[int]:
    """For each class index of the data, the model's index of the same class name."""
    unknown = [name for name in data_classes if name not in model_classes]
    if unknown:
        raise DataError(f"{root}: class folder(s) {', '.join(map(repr, unknown))} unknown to the model "
                        f"{model}, which knows {', '.join(map(repr, model_classes))}; rename or remove "
                        "those folders")
    return [model_classes.index(name) for name in data_classes]
