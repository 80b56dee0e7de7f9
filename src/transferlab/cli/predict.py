"""`transferlab predict`: top-k classes with probabilities for image files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import app, err, given, out, setup_logging
from .flags import REJECT_HELP, flag


@app.command()
def predict(model: Path = typer.Argument(..., help="A model bundle folder, such as runs/NAME/model."),
            inputs: List[str] = typer.Argument(..., help="Image files, folders or glob patterns."),
            top_k: int = flag("top_k", default=1),
            output_format: str = flag("output_format", default="table"),
            batch_size: Optional[int] = flag("batch_size"),
            precision: Optional[str] = flag("precision"),
            device: Optional[str] = flag("device"),
            backend: str = flag("backend", default="torch"),
            engine: Optional[str] = flag("engine"),
            tta: bool = typer.Option(False, "--tta", help="Average the probabilities of each image "
                                     "and its mirror image (twice the compute)."),
            max_pixels: Optional[int] = flag("max_pixels"),
            reject_unknown: bool = typer.Option(False, "--reject-unknown", help=REJECT_HELP),
            explain: Optional[Path] = flag("explain")):
    """Top-k classes with probabilities for images."""
    from ..errors import ConfigError
    from ..inference.graphs import ENGINES
    from ..options import check, check_relations

    explain_dir = None if explain is None else str(explain)
    check({"top_k": top_k, "output_format": output_format, "batch_size": batch_size,
           "precision": precision, "device": device, "max_pixels": max_pixels, "explain": explain_dir,
           "engine": engine}, {"engine": ENGINES})
    check_relations({"backend": backend, "explain": explain_dir}, ["explain"] if explain else [])
    setup_logging(verbose=False)
    from ..inference.backends import load_model
    from ..inference.predictor import expand_inputs
    from ..process import reused_memory

    paths = expand_inputs(inputs)
    if not paths:
        raise ConfigError(f"no files match {' '.join(inputs)}")
    predictor = load_model(model, backend=backend, images=len(paths),
                           **given(device=device, engine=engine, precision=precision))
    results = predictor.iter_predictions(paths, top_k=top_k, tta=tta, reject_unknown=reject_unknown,
                                         **given(
        batch_size=batch_size, precision=precision, max_pixels=max_pixels))
    with reused_memory():
        bad = _stream(results, output_format, min(top_k, len(predictor.classes)))
        if explain is not None:
            _explain(model, paths, explain, predictor.device, **given(max_pixels=max_pixels))
    for result in bad:
        err.print(f"[bold red]error:[/] {escape(result.file)}: cannot read image ({escape(result.error)})",
                  highlight=False)
    if bad:
        raise typer.Exit(1)


def _explain(model: Path, paths: list[Path], folder: Path, device, **options) -> None:
    """--explain: the Grad-CAM overlays, computed by the bundle's network on the predictor's device."""
    from ..inference.bundle import load_network
    from ..inference.saliency import save_overlays

    net, config = load_network(model)
    written = save_overlays(net.to(device), config.preprocessing, paths, folder, **options)
    err.print(f"{len(written)} saliency map{'s' * (len(written) != 1)} written to {escape(str(folder))}",
              highlight=False)


def _stream(results, output_format: str, columns: int) -> list:
    """Print each prediction as its batch is done (JSON stays one valid document); return the
    files that could not be read, for stderr."""
    import csv

    from ..rundir.predictions import spreadsheet_safe

    bad, first = [], True
    if output_format == "json":
        print('{"predictions": [', end="", flush=True)
    elif output_format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "rank", "label", "probability", "novelty", "unknown"])
    for result in results:
        if output_format == "json":
            print(("\n" if first else ",\n") + json.dumps(result.to_dict()), end="", flush=True)
        elif result.error:
            bad.append(result)
        elif output_format == "csv":  # names made safe to open in a spreadsheet
            writer.writerows(_csv_rows(result, spreadsheet_safe))
            sys.stdout.flush()
        else:
            _print_row(result, columns, header=first)
        if result.error and output_format == "json":
            bad.append(result)
        first = False
    if output_format == "json":
        print("\n]}")
    return bad


def _csv_rows(result, safe) -> list[list]:
    """One row per class of the top-k; a rejected input's one row says `unknown`, no probability."""
    novelty = ["", ""] if result.novelty is None else [f"{result.novelty:.6f}",
                                                         str(result.unknown).lower()]
    if result.rejected:
        return [[safe(result.file), 1, result.label, "", *novelty]]
    return [[safe(result.file), rank, safe(label), f"{probability:.6f}", *novelty]
            for rank, (label, probability) in enumerate(result.top_k, 1)]


def _print_row(result, columns: int, header: bool) -> None:
    table = Table(show_header=header, box=None, pad_edge=False)
    table.add_column("file", min_width=40, overflow="fold")
    for rank in range(1, columns + 1):
        table.add_column(f"#{rank}", min_width=18)
    cells = [f"{escape(label)} {p:.1%}" for label, p in result.top_k]
    if result.novelty is not None:
        table.add_column("novelty", min_width=12)
        cells.append(f"[bold yellow]{result.novelty:.2f} unknown[/]" if result.unknown
                     else f"{result.novelty:.2f}")
    if result.rejected:
        cells = ["[bold yellow]unknown[/]", *[""] * (columns - 1), cells[-1]]
    table.add_row(escape(result.file), *cells)
    out.print(table)
