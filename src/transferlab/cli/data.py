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


@app.command()
def info(data: Path = typer.Argument(..., help="Folder with one sub-folder per class."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
         duplicates: bool = typer.Option(False, "--duplicates", help="List every duplicate group."),
         max_pixels: Optional[int] = flag("max_pixels"),
         layout: Optional[str] = flag("layout"),
         no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the scan "
                                       "cache.")):
    """What is in a data folder, and what is wrong with it."""
    setup_logging(verbose=False)
    from ..data.describe import describe
    from ..data.folder import ImageFolderData

    cache = {"cache_dir": None} if no_cache else {}
    report = describe(ImageFolderData(data, **given(max_pixels=max_pixels, layout=layout), **cache))
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
    kept = ("a split keeps each group together" if report["layout"] == "class folders" else
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
