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
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.folder import ImageFolderData
from ..errors import ConfigError, TransferlabError
from ..options import check
from ..reporting.report import write_report_or_warn
from ..reporting.tables import markdown_table
from ..rundir.atomic import check_writable, write_json, write_text
from ..rundir.layout import (COMPARISON_FILE, COMPARISON_TABLES, REPORT_FILE, RunDir, check_outside,
                            default_run_dir, locked, provenance, read_json, results_in)
from ..training.config import TrainConfig
from ..training.strategies import STRATEGIES, configure, get_strategy, users_of
from ..training.strategies.base import COMMON_OPTIONS
from .train import train, with_default_cache

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


def compare(data: ImageFolderData | str | os.PathLike, strategies: list[str] | tuple = tuple(STRATEGIES),
            backbones: list[str | None] | tuple = (None,), *, repeats: int = 1,
            out: str | os.PathLike | None = None, show_progress: bool = True, report: bool = True,
            **options) -> Comparison:
    """Train every strategy with every backbone (None: each strategy's default) on the same split
    of `data`. `options` are train()'s: each run gets those its strategy uses, and an option that
    none of the strategies uses is refused."""
    check({"repeats": repeats})
    if not strategies:
        raise ConfigError(f"strategies: give one or more of {', '.join(STRATEGIES)}")
    for name in strategies:
        get_strategy(name)
    repeated = sorted({name for name in strategies if list(strategies).count(name) > 1})
    if repeated or len(set(backbones)) < len(backbones):
        raise ConfigError(f"strategies={','.join(strategies)}, backbones={backbones}: each "
                          "combination once (two runs of one combination made a fake ± 0.00); "
                          "use --repeats for several seeds")
    _check_used_by_some(strategies, options)
    options = with_default_cache(options)
    if not isinstance(data, ImageFolderData):
        data = ImageFolderData(data, seed=options.get("seed") or 0, cache_dir=options["cache_dir"])
    seed = options.pop("seed", None)
    seed = data.seed if seed is None else seed
    plan = [(strategy, backbone, seed + r) for backbone in backbones for strategy in strategies
            for r in range(repeats)]
    configs = [configure(s, _options_for(s, {**options, "backbone": b, "seed": k}))[1]
               for s, b, k in plan]
    out = Path(out) if out else default_run_dir("compare", data.root.resolve().name)
    check_writable(out)
    check_outside(out, data.root)
    data.split  # once, shared by every run; bad data is refused before anything is written
    with locked(out):
        if set(results_in(out)) - {COMPARISON_FILE, *COMPARISON_TABLES, REPORT_FILE}:
            raise ConfigError(f"{out}: holds the results of a run ({', '.join(results_in(out)[:4])}), "
                              "not of a comparison; choose another --out")
        return _compare(data, plan, configs, out, options, seed, repeats, show_progress, report)


def _compare(data, plan, configs, out: Path, options: dict, seed: int, repeats: int,
             show_progress: bool, report: bool) -> Comparison:
    runs = []
    for (strategy, backbone, run_seed), config in zip(plan, configs):
        name = f"{strategy}-{(config.backbone or 'auto').replace('/', '_')}" + (f"-seed{run_seed}" if repeats > 1 else "")
        log.info("compare: %s (%d of %d)", name, len(runs) + 1, len(plan))
        record = {"strategy": strategy, "backbone": config.backbone, "seed": run_seed, "dir": name}
        try:
            metrics = _finished(out / name, config, data)
            if metrics is None:  # not run yet, or stopped halfway: (re)started
                metrics = train(data, strategy, backbone, out=out / name, overwrite=True,
                                show_progress=show_progress,
                                **_options_for(strategy, {**options, "seed": run_seed})).metrics
            else:
                log.info("compare: %s finished earlier with the same configuration; reused", name)
            record.update(_run_row(metrics))
        except Exception as error:  # noqa: BLE001 - one failed run is a row of the table, not the end
            message = str(error) if isinstance(error, TransferlabError) else \
                f"{type(error).__name__}: {error}"
            log.error("compare: %s failed: %s", name, message)
            record.update(weights=config.weights, error=message)
        runs.append(record)

    rows = _aggregate(runs)
    csv_file, markdown_file = COMPARISON_TABLES
    write_text(out / csv_file, _csv(rows))
    write_text(out / markdown_file, markdown_table(rows))
    write_json(RunDir(out).comparison, {
        "data": data.options(), "split": data.summary(), "seed": seed, "repeats": repeats,
        "options": options, "rows": rows, "runs": runs, **provenance()})
    if report:
        write_report_or_warn(out)
    return Comparison(out, rows, runs)


def _check_used_by_some(strategies, options: dict) -> None:
    """An option that none of the compared strategies uses would do nothing: refuse it."""
    users = users_of()
    for name, value in options.items():
        if value is None or name in COMMON_OPTIONS or name not in users:
            continue
        if not any(name in get_strategy(s).uses for s in strategies):
            raise ConfigError(f"{name}: none of the compared strategies ({', '.join(strategies)}) "
                              f"uses it; {', '.join(users[name])} do")


def _options_for(strategy: str, options: dict) -> dict:
    """The options `strategy` uses, out of those given to the whole comparison."""
    used = get_strategy(strategy).uses | COMMON_OPTIONS
    return {k: v for k, v in options.items() if k in used or k not in users_of()}


def _finished(run_dir: Path, config: TrainConfig, data: ImageFolderData) -> dict | None:
    """The metrics of a run that completed earlier with this very configuration and data."""
    try:
        record = read_json(RunDir(run_dir).run)
        metrics = read_json(RunDir(run_dir).metrics)
    except (OSError, ConfigError):
        return None
    if not record or not metrics:
        return None
    if record.get("config") != config.to_dict() or record.get("data") != data.options():
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
