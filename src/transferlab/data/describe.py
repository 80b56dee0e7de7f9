"""What a data folder holds and what is wrong with it: `transferlab info`, and the lines a run logs
about its split."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from .folder import ImageFolderData

log = logging.getLogger(__name__)


def describe(data: ImageFolderData) -> dict:
    """Per-class counts, formats and modes; image sizes; unreadable files; duplicate groups."""
    scan, duplicates = data.scan, data.duplicates
    classes = {}
    for index, name in enumerate(scan.classes):
        members = [im for im, label in zip(scan.images, scan.labels) if label == index]
        classes[name] = {"images": len(members), "formats": dict(Counter(m.format for m in members)),
                         "modes": dict(Counter(m.mode for m in members))}
    widths = np.array([im.width for im in scan.images])
    heights = np.array([im.height for im in scan.images])
    conflicts = [group for group in duplicates.near if len({scan.labels[i] for i in group}) > 1]
    return {
        "root": data.location if data.hf else str(scan.root), "images": len(scan.images),
        "classes": classes,
        "layout": "Hugging Face dataset" + (" (split given)" if scan.presplit is not None else "")
                  if data.hf else _layout(scan), "presplit": scan.presplit is not None,
        "labels_file": None if scan.source is None else str(scan.source),
        "image_size": {"min_width": int(widths.min()), "max_width": int(widths.max()),
                       "min_height": int(heights.min()), "max_height": int(heights.max()),
                       "median": f"{int(np.median(widths))}x{int(np.median(heights))}"},
        "duplicate_groups": len(duplicates.exact), "near_duplicate_groups": len(duplicates.near),
        "duplicate_group_files": scan.relative_groups(duplicates.exact),
        "near_duplicate_group_files": scan.relative_groups(duplicates.near),
        "label_conflicts": scan.relative_groups(conflicts),
        "groups_across_splits": len(data.groups_across_splits()),
        "unreadable": [{"file": str(p), "reason": r} for p, r in scan.unreadable],
        "ignored": len(scan.ignored),
        "split_notes": data.notes(),
    }


def _layout(scan) -> str:
    if scan.source is not None:
        return f"labels from {scan.source.name}" + (" (split given)" if scan.presplit is not None else "")
    return "train/val/test folders" if scan.presplit is not None else "class folders"


def log_split(data: ImageFolderData) -> None:
    """The split in a few log lines, with a warning when duplicates span splits."""
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
