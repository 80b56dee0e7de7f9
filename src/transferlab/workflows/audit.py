"""The data audit: what is wrong with a labelled image folder, from the frozen backbone's cached
embeddings of its images (evaluation/labels.py and outliers.py) and their pixels (data/quality.py).

`audit()` audits every image of a folder into a folder of its own (`transferlab audit`);
`audit_training_split()` audits a run's training split into RUN/audit/ (`train`: by default for
extract, whose embeddings are in the cache by then, and with `--audit` for the other strategies).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.folder import ImageFolderData
from ..data.quality import measure_all, quality_flags
from ..data.transforms import Preprocessing
from ..devices import resolve_device, resolve_precision
from ..evaluation.labels import find_label_issues, out_of_fold_probabilities
from ..evaluation.outliers import NEIGHBOURS, find_outliers, label_conflicts
from ..inference.embeddings import embed_files
from ..inference.graphs import ENGINES
from ..models.backbones import DEFAULT_BACKBONE, create_backbone, resolve_name
from ..options import check
from ..process import reused_memory
from ..reporting.report import write_audit_page
from ..rundir.atomic import check_writable, write_json
from ..rundir.audit import (CONFLICT_COLUMNS, LABEL_ISSUES_COLUMNS, OUTLIER_COLUMNS, QUALITY_COLUMNS,
                            AuditFiles, write_table)
from ..rundir.layout import (check_outside, claim_output, default_run_dir, locked, provenance)

log = logging.getLogger(__name__)


@dataclass
class Audit:
    dir: Path
    summary: dict  # what audit.json holds


@dataclass(frozen=True)
class Embedder:
    """Which frozen backbone embeds the images, and where and how it runs."""

    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    cache_dir: str | None = None
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    engine: str = "auto"  # inference.graphs: torch, or a compiled graph

    def embed(self, data: ImageFolderData, indices: list[int], show_progress: bool) -> np.ndarray:
        """The embeddings of `data`'s images at `indices` (from the cache where they are there: the
        same cache `train --strategy extract` fills)."""
        backbone = create_backbone(self.backbone, self.weights).eval()
        images = [data.scan.images[i] for i in indices]
        device = resolve_device(self.device)  # as train resolves them: the same cache entries
        embeddings, _ = embed_files(backbone, [im.path for im in images], [im.sha256 for im in images],
                                    Preprocessing.from_model(backbone),
                                    cache_dir=Path(self.cache_dir) if self.cache_dir else None,
                                    batch_size=self.batch_size, workers=self.workers,
                                    device=device, precision=resolve_precision(self.precision, device),
                                    engine=self.engine, show_progress=show_progress)
        return embeddings


def audit(data: ImageFolderData | str | os.PathLike, *, out: str | os.PathLike | None = None,
          backbone: str | None = None, weights: str = "imagenet", folds: int = 5, seed: int = 0,
          batch_size: int = 32, workers: int | None = None, device: str = "auto",
          precision: str = "auto", cache_dir: str | None = "default", overwrite: bool = False,
          show_progress: bool = True, engine: str = "auto") -> Audit:
    """Audit every image of `data` into `out` (default runs/audit-DATA-TIME): label_issues.csv,
    outliers.csv, conflicts.csv, quality.csv, audit.json and audit.html. An `out` holding results
    is refused unless `overwrite`."""
    backbone = backbone or DEFAULT_BACKBONE
    check({"backbone": backbone, "weights": weights, "folds": folds, "seed": seed,
           "batch_size": batch_size, "workers": workers, "device": device, "precision": precision,
           "engine": engine}, {"engine": ENGINES})
    resolve_name(backbone)
    if not isinstance(data, ImageFolderData):
        data = ImageFolderData(data, seed=seed, cache_dir=cache_dir)
    resolve_device(device)  # a device the machine does not have is refused before any work
    embedder = Embedder(backbone, weights, str(data.cache_dir) if data.cache_dir else None,
                        batch_size, workers, device, precision, engine)
    folder = Path(out) if out else default_run_dir("audit", data.root.name)
    check_writable(folder)
    check_outside(folder, data.root)
    started = time.perf_counter()
    data.scan  # noqa: B018 - bad data is refused before anything is written
    with locked(folder), reused_memory():
        claim_output(folder, overwrite)
        indices = list(range(len(data.scan.images)))
        embeddings = embedder.embed(data, indices, show_progress)
        summary = audit_images(data, indices, embeddings, AuditFiles(folder), folds=folds, seed=seed,
                               started=started, embedder=embedder, scope="all images")
    return Audit(folder, summary)


def audit_training_split(data: ImageFolderData, folder: Path, embedder: Embedder, *, seed: int = 0,
                         show_progress: bool = True) -> dict:
    """Audit the training split of `data` into `folder` (a run's audit/), embedded by `embedder`
    (from the cache, warm after extract)."""
    started = time.perf_counter()
    indices = data.split["train"]
    embeddings = embedder.embed(data, indices, show_progress)
    return audit_images(data, indices, embeddings, AuditFiles(folder), folds=5, seed=seed,
                        started=started, embedder=embedder, scope="training split")


def audit_images(data: ImageFolderData, indices: list[int], embeddings: np.ndarray, files: AuditFiles,
                 *, folds: int, seed: int, started: float, embedder: Embedder, scope: str) -> dict:
    """Find label issues, outliers, conflicts and quality flags among `data`'s images at `indices`
    and write the audit's files; returns audit.json's content."""
    scan = data.scan
    labels = np.array([scan.labels[i] for i in indices], dtype=np.int64)
    component = {i: n for n, group in enumerate(data.duplicates.components) for i in group}
    groups = np.array([component[i] for i in indices])
    proba, folds_used = out_of_fold_probabilities(embeddings, labels, groups, len(scan.classes),
                                                  folds=folds, seed=seed)
    issues = find_label_issues(proba, labels)
    outliers = find_outliers(embeddings, labels, NEIGHBOURS)
    position = {i: n for n, i in enumerate(indices)}
    conflicts = label_conflicts([[i for i in group if i in position] for group in data.duplicates.near],
                                scan.labels)
    images = [scan.images[i] for i in indices]
    flags = quality_flags(images, measure_all(images, data.cache_dir))
    name, classes = scan.relative, scan.classes
    write_table(files.label_issues, LABEL_ISSUES_COLUMNS, [
        (name(indices[x.index]), classes[x.given], classes[x.suggested], x.given_probability,
         x.suggested_probability, x.score, rank) for rank, x in enumerate(issues.issues, 1)])
    write_table(files.outliers, OUTLIER_COLUMNS, [
        (name(indices[i]), classes[labels[i]], float(outliers.scores[i]), rank)
        for rank, i in enumerate(outliers.flagged, 1)])
    write_table(files.conflicts, CONFLICT_COLUMNS, [
        (number, name(i), classes[scan.labels[i]]) for number, group in enumerate(conflicts, 1)
        for i in group])
    write_table(files.quality, QUALITY_COLUMNS, [
        (name(indices[f.index]), classes[labels[f.index]], " ".join(f.flags), f.detail) for f in flags])
    counts = {"images": len(indices), "label_issues": len(issues.issues),
              "outliers": len(outliers.flagged), "conflict_groups": len(conflicts),
              "quality_flags": len(flags)}
    for kind in ("small", "aspect", "uniform", "blurry"):
        counts[kind] = sum(kind in f.flags for f in flags)
    summary = {
        "root": data.location, "scope": scope, "classes": classes, "counts": counts,
        "parameters": {"backbone": embedder.backbone, "weights": embedder.weights, "folds": folds_used,
                       "seed": seed, "neighbours": outliers.neighbours,
                       "class_thresholds": dict(zip(classes, issues.thresholds)),
                       "outlier_threshold": outliers.threshold},
        "seconds": round(time.perf_counter() - started, 3), **provenance()}
    write_json(files.json, summary)
    write_audit_page(files.path)
    log.info("audit: %d label issues, %d outliers, %d conflicting duplicate groups, %d quality flags "
             "in %.1f s", counts["label_issues"], counts["outliers"], counts["conflict_groups"],
             counts["quality_flags"], summary["seconds"])
    return summary
