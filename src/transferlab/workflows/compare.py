"""`transferlab compare`: every strategy × backbone combination on one split, each in its own run
directory, then one table (comparison.csv, comparison.md, comparison.json) and one report.

The split is made once and shared, so differences between rows come from the methods, not from
which images landed in test. `repeats` re-trains each combination with seeds seed, seed+1, ...
(initialisation, shuffling and augmentation change; the split does not) and reports mean ± std.
A run that already finished with the same configuration is reused, so an interrupted comparison
continues where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from .. import __version__
from ..runs.atomic import check_writable, write_json, write_text
from ..data.folder import ImageFolderData
from ..errors import ConfigError, TransferlabError
from ..runs.layout import COMPARISON_FILE, METRICS_FILE, RUN_FILE, environment
from ..workflows.train import STRATEGIES, TrainConfig, train

log = logging.getLogger(__name__)

COLUMNS = ("strategy", "backbone", "weights", "runs", "epochs", "train_loss", "val_loss",
           "val_accuracy", "val_accuracy_std", "test_accuracy", "test_accuracy_std", "test_ci_low",
           "test_ci_high", "params_total", "params_trainable", "wall_s", "images_per_s", "speed_of",
           "run_dirs", "error")
_AVERAGED = ("epochs", "train_loss", "val_loss", "val_accuracy", "test_accuracy", "test_ci_low",
             "test_ci_high", "params_total", "params_trainable", "wall_s", "images_per_s")
_COUNTS = ("epochs", "params_total", "params_trainable")


@dataclass
class Comparison:
    dir: Path
    rows: list[dict]  # one per strategy × backbone, averaged over repeats (COLUMNS)
    runs: list[dict]  # one per run

    @property
    def failed(self) -> list[dict]:
        return [run for run in self.runs if run.get("error")]


def compare(data: ImageFolderData | str | os.PathLike, strategies: list[str] | tuple = STRATEGIES,
            backbones: list[str | None] | tuple = (None,), *, repeats: int = 1,
            out: str | os.PathLike | None = None, show_progress: bool = True, report: bool = True,
            **options) -> Comparison:
    """Train every strategy with every backbone (None: each strategy's default) on the same split
    of `data`; `options` are train()'s and apply to every run."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(f"strategies={','.join(unknown) or '(none)'}: use some of {', '.join(STRATEGIES)}")
    if repeats < 1:
        raise ConfigError(f"repeats={repeats}: must be at least 1")
    if not isinstance(data, ImageFolderData):
        data = ImageFolderData(data, seed=options.get("seed", 0))
    seed = options.pop("seed", data.seed)
    plan = [(strategy, backbone, seed + r) for backbone in backbones for strategy in strategies
            for r in range(repeats)]
    configs = [TrainConfig(strategy=s, backbone=b, seed=k, **options).resolved() for s, b, k in plan]
    out = Path(out or Path("runs") / f"compare-{data.root.resolve().name}-{datetime.now():%Y%m%d-%H%M%S}")
    check_writable(out)
    data.split  # once, shared by every run

    runs = []
    for (strategy, backbone, run_seed), config in zip(plan, configs):
        name = f"{strategy}-{config.backbone.replace('/', '_')}" + (f"-seed{run_seed}" if repeats > 1 else "")
        log.info("compare: %s (%d of %d)", name, len(runs) + 1, len(plan))
        record = {"strategy": strategy, "backbone": config.backbone, "seed": run_seed, "dir": name}
        try:
            metrics = _finished(out / name, config, data)
            if metrics is None:
                metrics = train(data, strategy, backbone, out=out / name, show_progress=show_progress,
                                **{**options, "seed": run_seed}).metrics
            else:
                log.info("compare: %s finished earlier with the same configuration; reused", name)
            record.update(_run_row(metrics))
        except TransferlabError as error:
            log.error("compare: %s failed: %s", name, error)
            record.update(weights=config.weights, error=str(error))
        runs.append(record)

    rows = _aggregate(runs)
    write_text(out / "comparison.csv", _csv(rows))
    write_text(out / "comparison.md", markdown_table(rows))
    write_json(out / COMPARISON_FILE, {
        "command": sys.argv, "data": data.options(), "split": data.summary(), "seed": seed,
        "repeats": repeats, "options": options, "rows": rows, "runs": runs,
        "transferlab_version": __version__, "environment": environment()})
    if report:
        from ..reporting.report import write_report

        write_report(out)
    return Comparison(out, rows, runs)


def _finished(run_dir: Path, config: TrainConfig, data: ImageFolderData) -> dict | None:
    """The metrics of a run that completed earlier with this very configuration and data."""
    try:
        record = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("config") != json.loads(json.dumps(asdict(config))) or record.get("data") != data.options():
        return None
    return metrics


def _run_row(metrics: dict) -> dict:
    timing, val, test = metrics["timing"], metrics["val"], metrics["test"]
    embedding = "embed_images_per_s" in timing
    low, high = test.get("accuracy_ci95") or (None, None)
    return {"weights": metrics.get("weights"), "epochs": metrics.get("epochs_run"),
            "train_loss": metrics.get("train", {}).get("loss"), "val_loss": val.get("loss"),
            "val_accuracy": val.get("accuracy"), "test_accuracy": test.get("accuracy"),
            "test_ci_low": low, "test_ci_high": high, "params_total": metrics["params"]["total"],
            "params_trainable": metrics["params"]["trainable"], "wall_s": timing.get("total_s"),
            "images_per_s": timing.get("embed_images_per_s" if embedding else "train_images_per_s"),
            "speed_of": "embedding" if embedding else "training"}


def _aggregate(runs: list[dict]) -> list[dict]:
    """One row per strategy × backbone: means over repeats, and the spread of the accuracies."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["strategy"], run["backbone"]), []).append(run)
    rows = []
    for (strategy, backbone), members in groups.items():
        done = [m for m in members if not m.get("error")]
        row = {column: None for column in COLUMNS}
        row.update(strategy=strategy, backbone=backbone, weights=members[0].get("weights"), runs=len(done),
                   run_dirs=" ".join(m["dir"] for m in members),
                   error="; ".join(m["error"] for m in members if m.get("error")) or None)
        if done:
            row["speed_of"] = done[0]["speed_of"]
            for column in _AVERAGED:
                values = [m[column] for m in done if m.get(column) is not None]
                mean = float(np.mean(values)) if values else None
                row[column] = int(mean) if column in _COUNTS and mean is not None and mean.is_integer() else mean
            if len(done) > 1:
                for column in ("val_accuracy", "test_accuracy"):
                    row[f"{column}_std"] = float(np.std([m[column] for m in done], ddof=1))
        rows.append(row)
    return rows


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def format_accuracy(row: dict, split: str = "test") -> str:
    """"99.35% [98.7, 99.8]" for one run (95% bootstrap CI), "99.35% ± 0.21 (n=3)" for repeats."""
    value = row.get(f"{split}_accuracy")
    if value is None:
        return "–"
    if row.get(f"{split}_accuracy_std") is not None:
        return f"{value:.2%} ± {100 * row[f'{split}_accuracy_std']:.2f} (n={row['runs']})"
    if split == "test" and row.get("test_ci_low") is not None:
        return f"{value:.2%} [{100 * row['test_ci_low']:.1f}, {100 * row['test_ci_high']:.1f}]"
    return f"{value:.2%}"


def format_row(row: dict) -> dict:
    """The comparison's columns as people read them (comparison.md and the report)."""
    def number(value, pattern):
        return "–" if value is None else pattern.format(value)

    return {
        "strategy": row["strategy"], "backbone": row["backbone"], "weights": row["weights"] or "–",
        "epochs": number(row["epochs"], "{:.0f}"), "train loss": number(row["train_loss"], "{:.4f}"),
        "val loss": number(row["val_loss"], "{:.4f}"), "val accuracy": format_accuracy(row, "val"),
        "test accuracy (95% CI)": format_accuracy(row, "test"),
        "params (trainable / total)": "–" if row["params_total"] is None else
        f"{row['params_trainable']:,.0f} / {row['params_total']:,.0f}",
        "wall time (s)": number(row["wall_s"], "{:.1f}"),
        "images/s": "–" if row["images_per_s"] is None else f"{row['images_per_s']:.1f} ({row['speed_of']})",
        **({"error": row["error"]} if row.get("error") else {}),
    }


def markdown_table(rows: list[dict]) -> str:
    formatted = [format_row(row) for row in rows]
    columns = list(dict.fromkeys(key for row in formatted for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in formatted:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"
