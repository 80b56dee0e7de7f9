"""`transferlab info`: what is in a data folder, and what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import app, given, out, setup_logging
from .flags import flag

DATA_HELP = ("Folder with one sub-folder per class, or with a metadata.csv/jsonl; or a CSV with file "
             "and label columns; or hf:PATH_OR_NAME[:config], a Hugging Face dataset.")


@app.command()
def info(data: Path = typer.Argument(..., help=DATA_HELP),
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
         duplicates: bool = typer.Option(False, "--duplicates", help="List every duplicate group."),
         max_pixels: Optional[int] = flag("max_pixels"),
         layout: Optional[str] = flag("layout"),
         labels: Optional[Path] = flag("labels"),
         image_column: Optional[str] = flag("image_column"),
         label_column: Optional[str] = flag("label_column"),
         no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the scan "
                                       "cache.")):
    """What is in a data folder, and what is wrong with it."""
    setup_logging(verbose=False)
    from ..data.describe import describe
    from ..data.folder import ImageFolderData

    cache = {"cache_dir": None} if no_cache else {}
    report = describe(ImageFolderData(data, **given(max_pixels=max_pixels, layout=layout,
                                                    labels=labels, image_column=image_column,
                                                    label_column=label_column), **cache))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_info(report, duplicates)


def print_info(report: dict, list_duplicates: bool) -> None:
    table = Table(title=f"{report['root']}: {report['images']} images, {len(report['classes'])} classes")
    for column in ("class", "images", "formats", "modes"):
        table.add_column(column, justify="right" if column == "images" else "left")
    for name, row in report["classes"].items():
        table.add_row(escape(name), str(row["images"]), _counts(row["formats"]), _counts(row["modes"]))
    out.print(table)
    size = report["image_size"]
    out.print(f"image size: width {size['min_width']}-{size['max_width']}, "
              f"height {size['min_height']}-{size['max_height']} px (median {size['median']})")
    kept = ("a split keeps each group together" if not report["presplit"] else
             f"the folder came split: {report['groups_across_splits']} groups span splits")
    out.print(f"duplicates: {report['duplicate_groups']} groups of byte-identical files, "
              f"{report['near_duplicate_groups']} groups of near-identical images ({kept})")
    if report["label_conflicts"]:
        out.print(f"[yellow]{len(report['label_conflicts'])} duplicate groups span several classes[/]")
    out.print(f"unreadable files: {len(report['unreadable'])}; ignored hidden/system/stray files: "
              f"{report['ignored']}")
    for item in report["unreadable"]:
        out.print(f"  [red]{escape(item['file'])}[/]: {escape(item['reason'])}")
    if list_duplicates:
        for kind in ("duplicate_group_files", "near_duplicate_group_files"):
            out.print(f"\n{kind.replace('_', ' ')}:")
            for group in report[kind]:
                out.print("  " + escape(" = ".join(group)))


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]))


@app.command()
def audit(data: Path = typer.Argument(..., help=DATA_HELP),
          out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for label_issues.csv, "
                                                 "outliers.csv, conflicts.csv, quality.csv, audit.json "
                                                 "and audit.html [default: runs/audit-DATA-TIME]."),
          backbone: Optional[str] = flag("backbone", help="The frozen backbone that embeds the images: "
                                         "a timm model name or alias [default: efficientnet_lite0]."),
          weights: Optional[str] = flag("weights", help="imagenet, or a weights file [default: "
                                        "imagenet]."),
          folds: Optional[int] = flag("folds"),
          seed: Optional[int] = flag("seed"),
          layout: Optional[str] = flag("layout"),
          labels: Optional[Path] = flag("labels"),
          max_pixels: Optional[int] = flag("max_pixels"),
          exclude: Optional[Path] = flag("exclude"),
          relabel: Optional[Path] = flag("relabel"),
          image_column: Optional[str] = flag("image_column"),
          label_column: Optional[str] = flag("label_column"),
          batch_size: Optional[int] = flag("batch_size"),
          workers: Optional[int] = flag("workers"),
          precision: Optional[str] = flag("precision"),
          device: Optional[str] = flag("device"),
          cache_dir: Optional[Path] = flag("cache_dir"),
          no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the caches."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results an --out "
                                         "folder holds."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")):
    """What is wrong with a labelled folder: likely wrong labels, outliers, copies with different
    labels, and poor images, from the frozen backbone's (cached) embeddings."""
    setup_logging()
    from ..data.cache import default_cache_dir
    from ..data.folder import ImageFolderData
    from ..workflows.audit import audit as audit_folder

    cache = None if no_cache else str(cache_dir or default_cache_dir())
    dataset = ImageFolderData(data, cache_dir=cache, **given(seed=seed, layout=layout,
                                                              max_pixels=max_pixels, exclude=exclude,
                                                              relabel=relabel, labels=labels,
                                                              image_column=image_column,
                                                              label_column=label_column))
    result = audit_folder(dataset, out=out_dir, overwrite=overwrite, show_progress=not quiet,
                          **given(backbone=backbone, weights=weights, folds=folds, seed=seed,
                                  batch_size=batch_size, workers=workers, precision=precision,
                                  device=device))
    counts = result.summary["counts"]
    out.print(f"{counts['images']} images: {counts['label_issues']} label issues, {counts['outliers']} "
              f"outliers, {counts['conflict_groups']} duplicate groups with conflicting labels, "
              f"{counts['quality_flags']} quality flags ({result.summary['seconds']:.1f} s)")
    out.print(f"label_issues.csv, outliers.csv, conflicts.csv, quality.csv and audit.html in "
              f"[bold]{escape(str(result.dir))}[/]")
