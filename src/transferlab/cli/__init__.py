"""The `transferlab` command: parse, call the library, print. torch loads only inside commands."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
import typing
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import TransferlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # help texts show "[default: ...]" literally
                  help="Train image classifiers by transfer learning from a folder of labelled images.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error, one line


def main() -> None:
    """Console-script entry point: user errors become one line on stderr, not a traceback."""
    try:
        app()
    except TransferlabError as error:
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


def _setup_logging(verbose: bool = True) -> None:
    """Rich log lines on a terminal; plain "LEVEL: message" lines otherwise, so that a file name in
    a warning is never wrapped mid-word in a CI log or a redirected file."""
    from rich.logging import RichHandler

    if err.is_terminal:
        handler: logging.Handler = RichHandler(console=err, show_time=False, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


MAX_PIXELS_OPTION = typer.Option(None, min=1, help="Refuse images with more pixels than this, read "
                                 "from the header before decoding (decompression bombs) "
                                 "[default: 100,000,000].")


def _given(**options) -> dict:
    """Only the options the user set: None never overrides a library default."""
    return {k: v for k, v in options.items() if v is not None}


@app.command()
def info(data: Path = typer.Argument(..., help="Folder with one sub-folder per class."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
         duplicates: bool = typer.Option(False, "--duplicates", help="List every duplicate group."),
         max_pixels: Optional[int] = MAX_PIXELS_OPTION):
    """What is in a data folder, and what is wrong with it."""
    _setup_logging(verbose=False)
    from ..data.folder import ImageFolderData
    from ..data.describe import describe

    report = describe(ImageFolderData(data, **_given(max_pixels=max_pixels)))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_info(report, duplicates)


def _print_info(report: dict, list_duplicates: bool) -> None:
    table = Table(title=f"{report['root']}: {report['images']} images, {len(report['classes'])} classes")
    for column in ("class", "images", "formats", "modes"):
        table.add_column(column, justify="right" if column == "images" else "left")
    for name, row in report["classes"].items():
        table.add_row(escape(name), str(row["images"]), _counts(row["formats"]), _counts(row["modes"]))
    out.print(table)
    size = report["image_size"]
    out.print(f"image size: width {size['min_width']}-{size['max_width']}, "
              f"height {size['min_height']}-{size['max_height']} px (median {size['median']})")
    out.print(f"duplicates: {report['duplicate_groups']} groups of byte-identical files, "
              f"{report['near_duplicate_groups']} groups of near-identical images "
              f"(a split keeps each group together)")
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


def _shared_training_options(
        weights: Optional[str] = typer.Option(None, help="imagenet, none, or a weights file "
                                              "[default: imagenet; scratch: none]."),
        val: float = typer.Option(0.15, help="Validation fraction."),
        test: float = typer.Option(0.15, help="Test fraction."),
        seed: Optional[int] = typer.Option(None, help="Seed of the split, initialisation and "
                                           "shuffling [default: 0]."),
        max_pixels: Optional[int] = MAX_PIXELS_OPTION,
        dedupe_split: bool = typer.Option(True, help="Keep duplicate images within one split "
                                          "(--no-dedupe-split only to measure how much leakage inflates "
                                          "test accuracy)."),
        classifier: Optional[str] = typer.Option(None, help="extract: logistic or mlp "
                                                 "[default: logistic]."),
        epochs: Optional[int] = typer.Option(None, help="Training epochs [default: head 5, "
                                             "finetune 3, scratch 10]."),
        optimizer: Optional[str] = typer.Option(None, help="sgd, adam, adamw or rmsprop "
                                                "[default: finetune sgd, else adam]."),
        lr: Optional[float] = typer.Option(None, help="Learning rate of the head [default: "
                                           "finetune 1e-3, else 1e-4]."),
        momentum: Optional[float] = typer.Option(None, help="SGD momentum [default: 0.9]."),
        weight_decay: Optional[float] = typer.Option(None, help="Weight decay [default: 0]."),
        schedule: Optional[str] = typer.Option(None, help="constant, cosine or onecycle "
                                               "[default: constant]."),
        grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm to this."),
        augment: Optional[str] = typer.Option(None, help="none, light, standard or strong "
                                              "[default: finetune light, else standard]."),
        class_weights: Optional[str] = typer.Option(None, help="balanced: weight the loss by "
                                                    "inverse class frequency."),
        early_stopping: Optional[int] = typer.Option(None, help="Stop after this many epochs "
                                                     "without a lower val loss."),
        cut_layer: Optional[str] = typer.Option(None, help="Cut the backbone at this feature stage "
                                                "(index or name; see `transferlab summary`)."),
        head_dim: Optional[int] = typer.Option(None, help="Width of the head's hidden Dense layer "
                                               "[default: 256]."),
        dropout: Optional[float] = typer.Option(None, help="Dropout of the head [default: 0.5]."),
        head_pool: Optional[str] = typer.Option(None, help="avg or flatten, for a cut backbone "
                                                "[default: avg]."),
        unfreeze: Optional[str] = typer.Option(None, help="finetune: top blocks to train, or all "
                                               "[default: all]."),
        unfreeze_from: Optional[str] = typer.Option(None, help="finetune: train every block from "
                                                    "this layer up (such as blocks.5)."),
        warmup_epochs: Optional[int] = typer.Option(None, help="finetune: head-only epochs first "
                                                    "[default: 1]."),
        backbone_lr_scale: Optional[float] = typer.Option(None, help="finetune: backbone learning "
                                                          "rate relative to the head's [default: 0.1]."),
        batch_size: Optional[int] = typer.Option(None, help="Images per batch [default: 32]."),
        workers: Optional[int] = typer.Option(None, help="DataLoader worker processes."),
        precision: Optional[str] = typer.Option(None, help="auto, bf16 (bf16-mixed) or 32 "
                                                "[default: auto: bf16 where the CPU has it]."),
        accelerator: Optional[str] = typer.Option(None, help="cpu, gpu or auto [default: auto: a "
                                                  "GPU when there is one]."),
        devices: Optional[int] = typer.Option(None, help="Devices (processes) per node [default: 1]."),
        num_nodes: Optional[int] = typer.Option(None, help="Machines [default: 1]."),
        distributed: Optional[str] = typer.Option(None, "--distributed", "--strategy-dist",
                                                  help="Lightning's distribution strategy, such "
                                                  "as ddp [default: auto]."),
        cache_dir: Optional[Path] = typer.Option(None, help="Cache folder for embeddings and scans "
                                                 "[default: ~/.cache/transferlab]."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the cache."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """Declarations only: the options `train` and `compare` share, added to both by
    `_with_training_options` so that they are written once."""


def _with_training_options(command):
    """Add every option of `_shared_training_options` to `command`, which receives them as one
    dict, `settings`. Typer reads a command's options from its signature, so the wrapper gets the
    combined one."""
    shared = inspect.signature(_shared_training_options).parameters
    hints = {**typing.get_type_hints(_shared_training_options), **typing.get_type_hints(command)}
    own = [p for name, p in inspect.signature(command).parameters.items() if name != "settings"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        settings = {name: kwargs.pop(name) for name in shared}
        return command(**kwargs, settings=settings)

    parameters = [p.replace(annotation=hints[p.name]) for p in (*own, *shared.values())]
    wrapper.__signature__ = inspect.Signature(parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def _split_settings(settings: dict) -> tuple[dict, dict, bool]:
    """(ImageFolderData's arguments, train()'s options that were given, show progress)."""
    settings = dict(settings)
    show_progress = not settings.pop("quiet")
    no_cache, cache_dir = settings.pop("no_cache"), settings.pop("cache_dir")
    dataset = {name: settings.pop(name) for name in ("val", "test", "dedupe_split")}
    dataset.update(_given(max_pixels=settings.pop("max_pixels")))
    options = _given(**settings, cache_dir=str(cache_dir) if cache_dir else None)
    if no_cache:
        options["cache_dir"] = None
    dataset.update(seed=options.get("seed", 0), cache_dir=options.get("cache_dir", "default"))
    return dataset, options, show_progress


@app.command()
@_with_training_options
def train(data: Optional[Path] = typer.Argument(None, help="Folder with one sub-folder per class "
                                                "(not needed with --resume)."),
          strategy: str = typer.Option("extract", help="extract, head, finetune or scratch."),
          backbone: Optional[str] = typer.Option(None, help="timm model name, alias or simple-cnn "
                                                 "[default: efficientnet_lite0; scratch: simple-cnn]."),
          out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory "
                                                 "[default: runs/STRATEGY-BACKBONE-TIME]."),
          resume: Optional[Path] = typer.Option(None, help="Continue the interrupted run in this "
                                                "directory from its last checkpoint."),
          settings: dict = None):
    """Train a classifier on DATA and write a run directory (model/, metrics.json, report.html, ...)."""
    _setup_logging()
    from ..data.folder import ImageFolderData
    from ..errors import ConfigError
    from ..workflows.train import train as train_run

    dataset, options, show_progress = _split_settings(settings)
    if resume is not None:
        run = train_run(resume=resume, show_progress=show_progress, **options)
    else:
        if data is None:
            raise ConfigError("give DATA, the folder of labelled images, or --resume RUN_DIR")
        run = train_run(ImageFolderData(data, **dataset), strategy=strategy, out=out_dir,
                        show_progress=show_progress, **_given(backbone=backbone), **options)
    if run is not None:  # None on the helper processes of a distributed run
        print_run(run)


@app.command()
@_with_training_options
def compare(data: Path = typer.Argument(..., help="Folder with one sub-folder per class."),
            strategies: str = typer.Option("extract,head,finetune,scratch",
                                           help="Comma-separated strategies to compare."),
            backbones: Optional[str] = typer.Option(None, help="Comma-separated backbones "
                                                    "[default: each strategy's default]."),
            repeats: int = typer.Option(1, min=1, help="Train each combination with this many seeds "
                                        "(seed, seed+1, ...) on the same split; report mean ± std."),
            out_dir: Optional[Path] = typer.Option(None, "--out", help="Comparison folder, one run "
                                                   "directory per combination [default: "
                                                   "runs/compare-DATA-TIME]."),
            settings: dict = None):
    """Train every strategy × backbone on the same split; write comparison.csv, .md and report.html."""
    _setup_logging()
    from ..workflows.compare import compare as compare_runs
    from ..data.folder import ImageFolderData

    dataset, options, show_progress = _split_settings(settings)
    comparison = compare_runs(ImageFolderData(data, **dataset), _names(strategies),
                              _names(backbones) if backbones else [None], repeats=repeats,
                              out=out_dir, show_progress=show_progress, **options)
    print_comparison(comparison)
    if comparison.failed:
        raise typer.Exit(1)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def print_comparison(comparison) -> None:
    from ..workflows.compare import format_row

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
              f"report: {escape(str(run.dir / 'report.html'))})")


@app.command()
def evaluate(model: Path = typer.Argument(..., help="A model bundle folder, such as runs/NAME/model."),
             data: Path = typer.Argument(..., help="Labelled folder: one sub-folder per class, named "
                                         "as the model's classes."),
             split: str = typer.Option("all", help="all images, or the train, val or test part of "
                                       "DATA's split (with --seed, --val, --test)."),
             seed: int = typer.Option(0, help="Seed of DATA's split, for --split."),
             val: float = typer.Option(0.15, help="Validation fraction, for --split."),
             test: float = typer.Option(0.15, help="Test fraction, for --split."),
             out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for metrics.json, "
                                                    "predictions.csv and report.html [default: "
                                                    "runs/evaluate-DATA-TIME]."),
             batch_size: Optional[int] = typer.Option(None, help="Images per batch [default: 32]."),
             precision: Optional[str] = typer.Option(None, help="auto, bf16 or 32 [default: auto]."),
             max_pixels: Optional[int] = MAX_PIXELS_OPTION,
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")):
    """Accuracy, loss, F1, per-class scores, confusion matrix, ROC-AUC, calibration and a
    bootstrap interval of a saved model on a labelled folder."""
    _setup_logging()
    from ..data.folder import ImageFolderData
    from ..workflows.evaluate import EVALUATED, evaluate as evaluate_model

    dataset = ImageFolderData(data, val=val, test=test, seed=seed, min_classes=1 if split == "all" else 2,
                              **_given(max_pixels=max_pixels))
    result = evaluate_model(model, dataset, out=out_dir, split=split, show_progress=not quiet,
                            **_given(batch_size=batch_size, precision=precision))
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
    """(Re)write FOLDER/report.html from the files a run, evaluation or comparison left there."""
    _setup_logging(verbose=False)
    from ..reporting.report import write_report

    out.print(f"wrote [bold]{escape(str(write_report(folder)))}[/]")


@app.command()
def predict(model: Path = typer.Argument(..., help="A model bundle folder, such as runs/NAME/model."),
            inputs: List[str] = typer.Argument(..., help="Image files, folders or glob patterns."),
            top_k: int = typer.Option(1, "--top-k", min=1, help="Classes to show per image."),
            output_format: str = typer.Option("table", "--format", help="table, json or csv."),
            batch_size: Optional[int] = typer.Option(None, help="Images per batch [default: 32]."),
            precision: Optional[str] = typer.Option(None, help="torch backend: auto, bf16 or 32 "
                                                    "[default: auto]."),
            backend: str = typer.Option("torch", help="torch, or onnx: the bundle's model.onnx in "
                                        "onnxruntime (made by `transferlab export`)."),
            tta: bool = typer.Option(False, "--tta", help="Average the probabilities of each image "
                                     "and its mirror image (twice the compute)."),
            max_pixels: Optional[int] = MAX_PIXELS_OPTION):
    """Top-k classes with probabilities for images."""
    from ..errors import ConfigError

    if output_format not in ("table", "json", "csv"):
        raise ConfigError(f"--format {output_format!r}: use table, json or csv")
    if backend == "onnx" and precision not in (None, "auto", "32"):
        raise ConfigError(f"--precision {precision}: applies to the torch backend; an ONNX model "
                          "runs as it was exported, drop --precision")
    _setup_logging(verbose=False)
    from ..inference.bundle import expand_inputs, load_model

    predictor = load_model(model, backend=backend)
    paths = expand_inputs(inputs)
    if not paths:
        raise ConfigError(f"no files match {' '.join(inputs)}")
    results = predictor.predict(paths, top_k=top_k, show_progress=output_format == "table", tta=tta,
                                **_given(batch_size=batch_size, precision=precision,
                                         max_pixels=max_pixels))
    good = [r for r in results if not r.error]
    if output_format == "json":
        print(json.dumps({"predictions": [r.to_dict() for r in results]}, indent=2))
    elif output_format == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "rank", "label", "probability"])
        for result in good:
            for rank, (label, probability) in enumerate(result.top_k, 1):
                writer.writerow([result.file, rank, label, f"{probability:.6f}"])
    else:
        table = Table()
        table.add_column("file")
        for rank in range(1, min(top_k, len(predictor.classes)) + 1):
            table.add_column(f"#{rank}")
        for result in good:
            table.add_row(escape(result.file), *(f"{escape(l)} {p:.1%}" for l, p in result.top_k))
        out.print(table)
    bad = [r for r in results if r.error]
    for result in bad:
        err.print(f"[bold red]error:[/] {escape(result.file)}: cannot read image ({escape(result.error)})",
                  highlight=False)
    if bad:
        raise typer.Exit(1)


@app.command()
def export(model: Path = typer.Argument(..., help="A model bundle folder, such as runs/NAME/model."),
           output_format: str = typer.Option("onnx", "--format", help="onnx (the only format)."),
           out_file: Optional[Path] = typer.Option(None, "--out", help="Output file [default: "
                                                   "MODEL/model.onnx, or MODEL/model.int8.onnx]."),
           quantize: Optional[str] = typer.Option(None, help="int8: dynamic int8 quantisation "
                                                  "(smaller; compare its accuracy below)."),
           opset: Optional[int] = typer.Option(None, help="ONNX opset, 18 or newer [default: 18].")):
    """Export MODEL's whole network to ONNX, checked against torch, and record it in config.json.

    The check uses the run's validation images when MODEL is a run's model/ folder (64 of them; all
    of them with --quantize, to measure the accuracy change), random noise otherwise."""
    from ..errors import ConfigError

    if output_format != "onnx":
        raise ConfigError(f"--format {output_format!r}: only onnx is supported")
    _setup_logging(verbose=False)
    from ..runs.atomic import check_writable
    from ..deploy.export import PARITY_IMAGES, export_onnx, export_path, run_val_images

    check_writable(export_path(model, out_file, quantize).parent)  # before reading any image
    labelled = run_val_images(model, limit=None if quantize else PARITY_IMAGES)
    images, labels = labelled or (None, None)
    result = export_onnx(model, out_file, quantize=quantize, images=images, labels=labels,
                         **_given(opset=opset))
    parity = result.parity
    source = ("validation images of the run" if parity["source"] == "images" else
              "random-noise images (MODEL is not in a run directory with its data)")
    out.print(f"wrote [bold]{escape(str(result.path))}[/] (opset {result.opset}, "
              f"{result.quantization or 'fp32'}, sha256 {result.sha256[:12]}…)")
    out.print(f"parity with torch on {parity['images']} {source}: top-1 agreement "
              f"{parity['top1_agreement']:.2%}, largest probability difference "
              f"{parity['max_abs_prob_diff']:.2e} (mean {parity['mean_abs_prob_diff']:.2e})")
    if "accuracy" in parity:
        accuracy = parity["accuracy"]
        out.print(f"accuracy: torch {accuracy['torch']:.2%}, onnx {accuracy['onnx']:.2%} "
                  f"(change {100 * accuracy['change']:+.2f} points)")


@app.command()
def serve(model: Path = typer.Argument(..., help="A model bundle folder, such as runs/NAME/model."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every "
                                   "interface)."),
          port: int = typer.Option(8000, help="Port to listen on."),
          workers: int = typer.Option(1, min=1, help="Processes, each with its own copy of the "
                                      "model; the cores are shared out between them."),
          backend: str = typer.Option("torch", help="torch, or onnx: the bundle's model.onnx in "
                                      "onnxruntime (made by `transferlab export`)."),
          max_upload_mb: float = typer.Option(10.0, help="Largest request body, in MB (2^20 bytes)."),
          max_pixels: Optional[int] = typer.Option(None, help="Most pixels per image, checked "
                                                   "before decoding [default: 50,000,000]."),
          max_files: Optional[int] = typer.Option(None, help="Most images per request "
                                                  "[default: 16]."),
          max_concurrent: Optional[int] = typer.Option(None, help="Most /predict requests "
                                                       "holding uploads in memory at once; more "
                                                       "wait 3 s, then get 503 [default: 16]."),
          top_k: Optional[int] = typer.Option(None, "--top-k", help="Classes per image when the "
                                              "request does not say [default: 3]."),
          max_batch: Optional[int] = typer.Option(None, help="Most images per model call, gathered "
                                                  "across concurrent requests; 1 turns batching off "
                                                  "[default: 32]."),
          batch_window_ms: Optional[float] = typer.Option(None, help="How long a batch waits for "
                                                          "more images [default: 0].")):
    """Serve MODEL over HTTP: POST /predict (multipart field `file`), GET /health, GET /model, a
    page to try it at / and the API docs at /docs."""
    from ..errors import ConfigError

    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {max_upload_mb}: give a positive size")
    _setup_logging(verbose=False)
    from ..deploy.serve import serve as run_service

    err.print(f"loading {escape(str(model))} ({backend}); once it runs, try it at http://{host}:{port}/ "
              f"(API docs: http://{host}:{port}/docs)", highlight=False)
    run_service(model, host=host, port=port, workers=workers, backend=backend,
                max_upload_bytes=round(max_upload_mb * 2**20),
                **_given(max_pixels=max_pixels, max_files=max_files, max_concurrent=max_concurrent,
                         top_k=top_k, max_batch=max_batch, batch_window_ms=batch_window_ms))


@app.command()
def summary(target: str = typer.Argument(..., help="A model bundle folder or a backbone name."),
            strategy: str = typer.Option("finetune", help="For a backbone: the strategy whose "
                                         "trainable parameters to count."),
            classes: int = typer.Option(2, help="For a backbone: number of classes."),
            cut_layer: Optional[str] = typer.Option(None, help="For a backbone: cut it here."),
            unfreeze: Optional[str] = typer.Option(None, help="For finetune: top blocks to train."),
            depth: int = typer.Option(2, help="Levels of nested layers to show."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Layers, output shapes and total / trainable / non-trainable parameters."""
    from ..models.summary import summarize

    result = summarize(target, depth=depth, strategy=strategy, num_classes=classes,
                       **_given(cut_layer=cut_layer, unfreeze=unfreeze))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=escape(result.title))
    for column in ("layer", "type", "output shape", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for row in result.rows:
        table.add_row(escape(row["name"]), row["type"], escape(str(row["output_shape"])),
                      f"{row['parameters']:,}")
    out.print(table)
    out.print(f"total parameters: {result.total:,}\ntrainable parameters: {result.trainable:,}\n"
              f"non-trainable parameters: {result.non_trainable:,}")
    if result.stages:
        out.print("cut layers (--cut-layer): " + ", ".join(
            f"{s['index']}={s['module']} ({s['channels']} ch, /{s['stride']})" for s in result.stages))


@app.command()
def demo(out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory "
                                                "[default: runs/demo-TIME]."),
         per_class: int = typer.Option(40, help="Synthetic images per class.")):
    """Train `extract` on a small synthetic data set made on the spot: a one-minute tour."""
    _setup_logging()
    import tempfile
    from datetime import datetime

    from ..workflows.train import train as train_run
    from ..data.synthetic import make_image_folder

    with tempfile.TemporaryDirectory(prefix="transferlab-demo-") as folder:
        data = make_image_folder(Path(folder) / "shapes", per_class=per_class)
        out.print(f"synthetic data: {per_class} images each of circles and squares in {escape(str(data))}")
        run_dir = out_dir or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
        run = train_run(data, strategy="extract", out=run_dir, cache_dir=None)
    print_run(run)


if __name__ == "__main__":
    main()
