"""`transferlab train`, `compare` and `demo`: runs that write run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError
from ..rundir.layout import RunDir
from .app import app, err, given, out, setup_logging
from .flags import flag, names, split_settings, with_training_options


@app.command()
@with_training_options
def train(data: Optional[Path] = typer.Argument(None, help="Folder with one sub-folder per class "
                                                "(or a metadata.csv), a CSV with file and label "
                                                "columns, or hf:PATH_OR_NAME[:config] (a Hugging Face "
                                                "dataset); not needed with --resume."),
          strategy: Optional[str] = flag("strategy"),
          backbone: Optional[str] = flag("backbone"),
          out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory "
                                                 "[default: runs/STRATEGY-BACKBONE-TIME]."),
          resume: Optional[Path] = typer.Option(None, help="Continue the interrupted run in this "
                                                "directory from its last checkpoint."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results an --out "
                                         "folder holds from an earlier run."),
          audit: Optional[bool] = flag("audit", "--audit/--no-audit"),
          settings: dict = None):
    """Train a classifier on DATA and write a run directory (model/, metrics.json, report.html, ...)."""
    setup_logging()
    from ..data.folder import ImageFolderData
    from ..workflows.train import train as train_run

    dataset, options, show_progress = split_settings(settings)
    if resume is not None:  # anything given must be what the run was started with
        given_data = None if data is None else {"root": data, **{
            k: v for k, v in dataset.items() if k not in ("seed", "cache_dir") and settings[k] is not None}}
        run = train_run(given_data, strategy, resume=resume, out=out_dir, show_progress=show_progress,
                        **given(backbone=backbone, audit=audit), **options)
    else:
        if data is None:
            raise ConfigError("give DATA, the folder of labelled images, or --resume RUN_DIR")
        run = train_run(ImageFolderData(data, **dataset), strategy=strategy, out=out_dir,
                        overwrite=overwrite, show_progress=show_progress,
                        **given(backbone=backbone, audit=audit), **options)
    if run is not None:  # None on the helper processes of a distributed run
        print_run(run)


@app.command()
@with_training_options
def compare(data: Path = typer.Argument(..., help="Folder with one sub-folder per class, or a "
                                        "CSV with file and label columns."),
            strategies: str = flag("strategies", default="extract,head,finetune,scratch"),
            backbones: Optional[str] = flag("backbones"),
            repeats: int = flag("repeats", default=1),
            out_dir: Optional[Path] = typer.Option(None, "--out", help="Comparison folder, one run "
                                                   "directory per combination [default: "
                                                   "runs/compare-DATA-TIME]."),
            settings: dict = None):
    """Train every strategy × backbone on the same split; write comparison.csv, .md and report.html."""
    setup_logging()
    from ..data.folder import ImageFolderData
    from ..workflows.compare import compare as compare_runs

    dataset, options, show_progress = split_settings(settings)
    comparison = compare_runs(ImageFolderData(data, **dataset), names(strategies),
                              names(backbones) or [None], repeats=repeats,
                              out=out_dir, show_progress=show_progress, **options)
    print_comparison(comparison)
    if comparison.failed:
        raise typer.Exit(1)


@app.command()
def demo(out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory "
                                                "[default: runs/demo-TIME]."),
         per_class: int = flag("per_class", default=40)):
    """Train `extract` on a small synthetic data set made on the spot: a one-minute tour."""
    setup_logging()
    import tempfile

    from ..data.synthetic import make_image_folder
    from ..options import check
    from ..rundir.layout import default_run_dir
    from ..workflows.train import train as train_run

    check({"per_class": per_class})
    with tempfile.TemporaryDirectory(prefix="transferlab-demo-") as folder:
        data = make_image_folder(Path(folder) / "shapes", per_class=per_class)
        out.print(f"synthetic data: {per_class} images each of circles and squares in {escape(str(data))}")
        run = train_run(data, strategy="extract", out=out_dir or default_run_dir("demo"), cache_dir=None)
    print_run(run)


def print_comparison(comparison) -> None:
    from ..reporting.tables import format_row

    rows = [format_row(row) for row in comparison.rows]
    table = Table(title=f"comparison: {escape(str(comparison.dir))}")
    columns = ["strategy", "backbone", "epochs", "val accuracy", "test accuracy (95% CI)",
               "wall time (s)"]  # the rest is in comparison.md; a terminal is narrow
    for column in columns:
        table.add_column(column, justify="left" if column in ("strategy", "backbone", "weights", "error")
                         else "right", overflow="fold")
    for row in rows:
        table.add_row(*(escape(str(row.get(c, ""))) for c in columns))
    out.print(table)
    out.print(f"comparison.csv, comparison.md and report.html in [bold]{escape(str(comparison.dir))}[/]")
    for run in comparison.failed:
        err.print(f"[bold red]failed:[/] {escape(run['dir'])}: {escape(run['error'])}", highlight=False)


def print_run(run) -> None:
    metrics = run.metrics
    table = Table(title=f"{metrics['strategy']} · {metrics['backbone']} · {len(metrics['classes'])} classes")
    for column in ("split", "images", "accuracy", "loss", "macro F1"):
        table.add_column(column, justify="right")
    for name in ("val", "test"):
        result = metrics[name]
        if result.get("accuracy") is None:
            continue
        table.add_row(name, str(result["size"]), f"{result['accuracy']:.2%}", f"{result['loss']:.4f}",
                      f"{result['macro_f1']:.4f}")
    out.print(table)
    timing = metrics["timing"]
    if "embedded" in timing:
        speed = (f"{timing['embed_images_per_s']:.0f} images/s" if timing.get("embed_images_per_s")
                 else "all from cache")
        out.print(f"embedded {timing['embedded']} images ({speed}), {timing['cached']} from cache; "
                  f"total {timing['total_s']:.1f} s")
    else:
        speed = timing.get("train_images_per_s") or 0
        out.print(f"trained {metrics['epochs_run']} epochs (best: epoch {metrics['best_epoch']}) at "
                  f"{speed:.0f} images/s; total {timing['total_s']:.1f} s")
    out.print(f"run directory: [bold]{escape(str(run.dir))}[/]  (model: {escape(str(run.model_dir))}, "
              f"report: {escape(str(RunDir(run.dir).report))})")
