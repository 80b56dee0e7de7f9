"""report.html: one self-contained page for a run, an evaluation or a comparison, rendered from the
files the run wrote (Jinja2 templates in templates/, pictures from plots.py as data URIs)."""

from __future__ import annotations

import json
import logging
import shlex
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import TransferlabError
from ..inference.bundle import load_network
from ..inference.saliency import explain_files
from ..models.summary import summarize
from ..rundir.atomic import write_text
from ..rundir.audit import AuditFiles
from ..rundir.layout import RunDir, RunFiles, file_inside, read_json
from . import plots
from .audit import REPORT_SHOWN, audit_section
from .tables import format_row

log = logging.getLogger(__name__)

WRONG_SHOWN = 12  # most confidently wrong test images in the thumbnail grid
GROUPS_SHOWN = 30  # duplicate groups listed by name


def write_report(folder: str | Path) -> Path:
    """Render `folder`'s report.html (a run, evaluation or compare folder) and return its path."""
    paths = RunDir(folder)
    if paths.comparison.is_file():
        html = render("comparison.html", comparison_context(paths.path))
    else:
        html = render("run.html", run_context(RunFiles.read(paths.path)))
    write_text(paths.report, html)
    return paths.report


def write_report_or_warn(folder: str | Path) -> None:
    """report.html at the end of a command whose results are already safely written: a failure here
    is a warning saying how to retry, not lost work."""
    try:
        write_report(folder)
    except Exception as error:  # noqa: BLE001 - the model and metrics are already written
        log.warning("report.html not written (%s: %s); the results are complete, retry with "
                    "`transferlab report %s`", type(error).__name__, error, folder)


def write_audit_page(folder: str | Path) -> Path:
    """audit.html of the audit in `folder` (rundir/audit.py's files)."""
    files = AuditFiles(folder)
    section = audit_section(folder)
    html = render("audit.html", {"title": f"Data audit of {Path(section['summary']['root']).name}",
                                 "audit": section})
    write_text(files.html, html)
    return files.html


def render(template: str, context: dict) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    environment = Environment(loader=PackageLoader(__package__, "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters.update(pct=_pct, num=_num, count=lambda v: "–" if v is None else f"{v:,}")
    return environment.get_template(template).render(
        **context, generated=datetime.now().isoformat(timespec="seconds"))


def run_context(files: RunFiles) -> dict:
    metrics = files.metrics
    evaluation = "model" in metrics  # written by `evaluate`, not by `train`
    classes = metrics["classes"]
    test = metrics.get("test") or {}
    root = Path(metrics.get("data", {}).get("root") or (files.split or {}).get("root", "."))
    model_dir = Path(metrics["model"]) if evaluation else files.model_dir
    network = _load(model_dir)
    title = (f"Evaluation of {metrics.get('strategy') or 'a'} · {metrics['backbone']} model on {root.name}"
             if evaluation else f"{metrics['strategy']} · {metrics['backbone']} on {root.name}")
    return {
        "title": title, "evaluation": evaluation, "metrics": metrics, "classes": classes,
        "test": test, "val": metrics.get("val") or {}, "headline": _headline(metrics),
        "dataset": _dataset(files, root),
        "curves": [plots.learning_curve(files.history, metric, metrics.get("best_epoch"))
                   for metric in ("loss", "acc")] if files.history else None,
        "history": files.history,
        "results": _results(test, classes, files),
        "wrong": _confidently_wrong(files, root, network),
        "model": _model(model_dir, network),
        "audit": audit_section(RunDir(files.dir).audit, REPORT_SHOWN),
        "command": shlex.join(files.run.get("command") or []) or None,
        "configuration": json.dumps({k: v for k, v in files.run.items() if k not in ("command",)},
                                    indent=2, sort_keys=True),
    }


def comparison_context(folder: Path) -> dict:
    record = read_json(RunDir(folder).comparison)
    rows = record["rows"]
    done = [r for r in rows if r.get("test_accuracy") is not None]
    # each strategy once: its name says which row it is; otherwise the backbone is needed too
    by_strategy = len({r["strategy"] for r in rows}) == len(rows)
    names = [r["strategy"] if by_strategy else f"{r['strategy']} · {r['backbone']}" for r in done]
    first = next((folder / run["dir"] for run in record["runs"] if not run.get("error")), None)
    dataset = None
    if first is not None:
        files = RunFiles.read(first)
        dataset = _dataset(files, Path(record["data"]["root"]))
    return {
        "title": f"Comparison on {Path(record['data']['root']).name}", "record": record,
        "table": [format_row(r) for r in rows],
        "accuracy_plot": plots.accuracy_bars(names, [r["test_accuracy"] for r in done],
                                             [r["test_ci_low"] for r in done],
                                             [r["test_ci_high"] for r in done],
                                             [r["test_accuracy_std"] for r in done]) if done else None,
        "time_plot": plots.accuracy_vs_time(names, [r["wall_s"] for r in done],
                                            [r["test_accuracy"] for r in done]) if done else None,
        "runs": [{**run, "report": RunDir(folder / run["dir"]).report.is_file()} for run in record["runs"]],
        "dataset": dataset, "command": shlex.join(record.get("command") or []) or None,
        "configuration": json.dumps({k: record[k] for k in ("data", "seed", "repeats", "options",
                                                              "transferlab_version", "environment")},
                                    indent=2, sort_keys=True),
    }


def _headline(metrics: dict) -> list[tuple[str, str]]:
    test, val, timing = metrics.get("test") or {}, metrics.get("val") or {}, metrics.get("timing") or {}
    cards = []
    if test.get("accuracy") is not None:
        low, high = test.get("accuracy_ci95") or (None, None)
        ci = f"95% CI {_pct(low)} – {_pct(high)}" if low is not None else ""
        cards.append(("test accuracy", _pct(test["accuracy"]), ci))
        cards.append(("macro F1", _num(test.get("macro_f1")), f"loss {_num(test.get('loss'))}"))
        if test.get("roc_auc") is not None:
            cards.append(("ROC-AUC", _num(test["roc_auc"]), ""))
        before = test.get("ece_uncalibrated")
        cards.append(("calibration error", _num(test.get("ece")), "ECE, 15 bins" + (
            f"; {_num(before)} before temperature {test['temperature']:.2f}"
            if before is not None and test.get("temperature") else "")))
        if test.get("unknown_rate") is not None:
            cards.append(("flagged unknown", _pct(test["unknown_rate"]),
                          "of test images; the threshold passes 95% of val"))
    if val.get("accuracy") is not None:
        cards.append(("val accuracy", _pct(val["accuracy"]), f"loss {_num(val.get('loss'))}"))
    if metrics.get("epochs_run"):
        cards.append(("epochs", str(metrics["epochs_run"]), f"kept epoch {metrics['best_epoch'] + 1}"
                      if metrics.get("best_epoch") is not None else ""))
    seconds = timing.get("total_s") or timing.get("predict_s")
    if seconds is not None:
        speed = timing.get("embed_images_per_s") or timing.get("train_images_per_s") or timing.get("images_per_s")
        cards.append(("wall time", f"{seconds:.1f} s", f"{speed:.0f} images/s" if speed else ""))
    if metrics.get("params"):
        cards.append(("trainable parameters", f"{metrics['params']['trainable']:,}",
                      f"of {metrics['params']['total']:,}"))
    return cards


def _dataset(files: RunFiles, root: Path) -> dict:
    """Class counts per split and how duplicate groups were split, from split.json (a run) or the
    evaluated images (an evaluation)."""
    split, metrics = files.split, files.metrics
    classes = (split or metrics)["classes"]
    if split is not None:
        counts = {name: [Counter(item["label"] for item in split[name])[c] for c in classes]
                  for name in ("train", "val", "test")}
    else:
        table = files.predictions
        labels = Counter(table.classes[i] for i in table.labels) if table is not None else Counter()
        counts = {"evaluated": [labels[c] for c in classes]}
    summary = metrics.get("split") or {}
    home = {item["file"]: name for name in ("train", "val", "test") for item in (split or {}).get(name, [])}
    groups = [[(file, home.get(file, "–")) for file in group]
              for group in (split or {}).get("near_duplicate_group_files", [])]
    return {
        "root": str(root), "classes": classes, "counts": counts,
        "total": {name: sum(values) for name, values in counts.items()},
        "plot": plots.class_counts(classes, counts),
        "summary": summary, "leakage": (metrics.get("test") or {}).get("leakage"),
        "groups": groups[:GROUPS_SHOWN], "more_groups": max(0, len(groups) - GROUPS_SHOWN),
        "unreadable": (split or {}).get("unreadable", []),
        "notes": (split or {}).get("notes", []),
        "unreadable_count": summary.get("unreadable", metrics.get("data", {}).get("unreadable", 0)),
    }


def _results(test: dict, classes: list[str], files: RunFiles) -> dict | None:
    if test.get("confusion_matrix") is None:
        return None
    result = {"confusion": plots.confusion(test["confusion_matrix"], classes), "roc": None,
              "reliability": None}
    table = files.predictions
    if table is not None:
        rows = table.select("test")
        labels, proba = table.labels[rows], table.proba[rows]
        if len(rows):
            predicted = proba.argmax(1)
            result["reliability"] = plots.reliability(predicted == labels, proba.max(1),
                                                      _before_temperature(proba, test))
            if len(classes) == 2 and len(np.unique(labels)) == 2:
                result["roc"] = plots.roc(labels == 1, proba[:, 1], classes[1])
    return result


def _before_temperature(proba: np.ndarray, test: dict) -> np.ndarray | None:
    """The top-class confidences before calibration: softmax(z / T) raised to the power T and
    normalised is softmax(z), so predictions.csv and the temperature are enough."""
    temperature = test.get("temperature")
    if not temperature or temperature == 1:
        return None
    raw = np.power(np.clip(proba, 1e-12, 1.0), temperature)
    return (raw / raw.sum(1, keepdims=True)).max(1)


def _confidently_wrong(files: RunFiles, root: Path, network: tuple | None) -> list[dict]:
    table = files.predictions
    if table is None:
        return []
    shown = []
    for row in table.confidently_wrong("test", WRONG_SHOWN):
        predicted = int(table.proba[row].argmax())
        shown.append({"file": table.files[row], "true": table.classes[table.labels[row]],
                      "predicted": table.classes[predicted], "confidence": float(table.proba[row, predicted]),
                      "path": file_inside(root, table.files[row]), "saliency": None})
    for item in shown:
        item["image"] = plots.thumbnail(item["path"])
    _add_saliency([item for item in shown if item["image"]], network)
    return shown


def _add_saliency(items: list[dict], network: tuple | None) -> None:
    """Each item's Grad-CAM overlay for the class it was predicted as, when the bundle's network is
    there to compute it; the report goes on without maps otherwise."""
    if network is None or not items:
        return
    net, config = network
    known = all(item["predicted"] in config.classes for item in items)
    classes = [config.classes.index(item["predicted"]) for item in items] if known else None
    try:
        explained = explain_files(net, config.preprocessing, [item["path"] for item in items], classes)
        for item, explanation in zip(items, explained):
            if explanation.picture is not None:
                item["saliency"] = plots.picture_uri(explanation.picture)
    except Exception as error:  # noqa: BLE001 - a picture, not worth losing the report for
        log.warning("report: saliency maps left out (%s: %s)", type(error).__name__, error)


def _load(model_dir: Path | None) -> tuple | None:
    """The bundle's network and config.json; None (with a log line) if it cannot be read."""
    if model_dir is None or not model_dir.is_dir():
        return None
    try:
        return load_network(model_dir)
    except TransferlabError as error:
        log.warning("report: model summary and saliency maps left out (%s)", error)
        return None


def _model(model_dir: Path | None, network: tuple | None) -> dict | None:
    """Layer summary and the bundle's configuration, when its network could be loaded."""
    if network is None:
        return None
    net, config = network
    trainable = int(config.training.get("params", {}).get("trainable", 0))
    title = f"{model_dir}: {config.backbone}, {len(config.classes)} classes"
    return {"path": str(model_dir), "summary": summarize(net, config.preprocessing, title, trainable),
            "backbone": config.backbone, "cut_layer": config.cut_layer, "head": config.head.to_dict(),
            "preprocessing": config.preprocessing.to_dict(), "weights_sha256": config.weights_sha256}


def _pct(value) -> str:
    return "–" if value is None else f"{value:.2%}"


def _num(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
