"""`transferlab evaluate` and `report`: a saved model measured on labelled images, and the report
of any run, evaluation or comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import app, err, given, out, setup_logging
from .flags import flag


@app.command()
def evaluate(model: Path = typer.Argument(..., help="A model bundle folder, such as runs/NAME/model."),
             data: Path = typer.Argument(..., help="Labelled data, as train takes it (a folder, a "
                                         "CSV, or hf:PATH_OR_NAME[:config]), its classes named as "
                                         "the model's."),
             split: str = flag("split", default="all"),
             seed: int = flag("seed", default=0),
             val: float = flag("val", default=0.15),
             test: float = flag("test", default=0.15),
             out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for metrics.json, "
                                                    "predictions.csv and report.html [default: "
                                                    "runs/evaluate-DATA-TIME]."),
             batch_size: Optional[int] = flag("batch_size"),
             precision: Optional[str] = flag("precision"),
             device: Optional[str] = flag("device"),
             backend: Optional[str] = flag("backend"),
             engine: Optional[str] = flag("engine"),
             max_pixels: Optional[int] = flag("max_pixels"),
             layout: Optional[str] = flag("layout"),
             labels: Optional[Path] = flag("labels"),
             exclude: Optional[Path] = flag("exclude"),
             relabel: Optional[Path] = flag("relabel"),
             image_column: Optional[str] = flag("image_column"),
             label_column: Optional[str] = flag("label_column"),
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results an --out "
                                            "folder holds."),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")):
    """Accuracy, loss, F1, per-class scores, confusion matrix, ROC-AUC, calibration and a
    bootstrap interval of a saved model on a labelled folder."""
    setup_logging()
    from ..data.folder import ImageFolderData
    from ..options import check
    from ..workflows.evaluate import EVALUATED, evaluate as evaluate_model

    check({"split": split})
    dataset = ImageFolderData(data, val=val, test=test, seed=seed, min_classes=1 if split == "all" else 2,
                              **given(max_pixels=max_pixels, layout=layout, labels=labels,
                                      exclude=exclude, relabel=relabel, image_column=image_column,
                                      label_column=label_column))
    result = evaluate_model(model, dataset, out=out_dir, split=split, show_progress=not quiet,
                            overwrite=overwrite,
                            **given(batch_size=batch_size, precision=precision, device=device,
                                    backend=backend, engine=engine))
    print_metrics(result.metrics[EVALUATED], result.metrics["classes"],
                  f"{escape(str(model))} on {escape(str(data))} ({split})")
    out.print(f"metrics.json, predictions.csv and report.html in [bold]{escape(str(result.dir))}[/]")


def print_metrics(metrics: dict, classes: list[str], title: str) -> None:
    """The evaluation in three tables: headline numbers, per class, confusion matrix."""
    low, high = metrics["accuracy_ci95"]
    table = Table(title=title)
    for column in ("images", "accuracy (95% CI)", "loss", "macro F1", "ROC-AUC", "ECE"):
        table.add_column(column, justify="right")
    table.add_row(str(metrics["size"]), f"{metrics['accuracy']:.2%} [{low:.1%}, {high:.1%}]",
                  f"{metrics['loss']:.4f}", f"{metrics['macro_f1']:.4f}",
                  "–" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.4f}", f"{metrics['ece']:.4f}")
    out.print(table)
    per_class = Table(title="per class")
    for column in ("class", "precision", "recall", "F1", "support"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for name, row in metrics["per_class"].items():
        per_class.add_row(escape(name), f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                          f"{row['f1']:.3f}", str(row["support"]))
    out.print(per_class)
    matrix = Table(title="confusion matrix (rows: true, columns: predicted)")
    matrix.add_column("")
    for name in classes:
        matrix.add_column(escape(name), justify="right")
    for name, row in zip(classes, metrics["confusion_matrix"]):
        matrix.add_row(escape(name), *(str(v) for v in row))
    out.print(matrix)


@app.command()
def report(folder: Path = typer.Argument(..., help="A run, evaluation or comparison folder.")):
    """(Re)write FOLDER/report.html from the files a run, evaluation or comparison left there, and a
    training run's model card (model/README.md)."""
    setup_logging(verbose=False)
    from ..errors import TransferlabError
    from ..reporting.model_card import write_model_card_or_warn
    from ..reporting.report import write_report

    try:
        path = write_report(folder)
    except TransferlabError:
        raise
    except Exception as error:  # noqa: BLE001 - a report that cannot be drawn is one line, not a traceback
        err.print(f"[bold red]error:[/] {escape(str(folder))}: report.html not written "
                  f"({type(error).__name__}: {escape(str(error)[:300])})", highlight=False)
        raise typer.Exit(1) from None
    out.print(f"wrote [bold]{escape(str(path))}[/]")
    write_model_card_or_warn(folder)
