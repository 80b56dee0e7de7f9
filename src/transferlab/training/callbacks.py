"""Training behaviours as Lightning callbacks: the fine-tuning unfreeze schedule, history.csv and the
training throughput."""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import lightning as L
from torch import nn

from ..rundir.atomic import write_text
from ..rundir.layout import HISTORY_COLUMNS


class UnfreezeSchedule(L.Callback):
    """From epoch `at_epoch` on, `parameters` train. They are already in the optimizer (at their own
    lower learning rate) with requires_grad off, so the switch needs no new parameter group and every
    learning-rate schedule covers them from the start. Also right after a resume past `at_epoch`."""

    def __init__(self, parameters: list[nn.Parameter], at_epoch: int):
        self.parameters = parameters
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.at_epoch and not all(p.requires_grad for p in self.parameters):
            for parameter in self.parameters:
                parameter.requires_grad_(True)
            pl_module.train()  # re-apply the inference-mode policy to the now partly trainable backbone


class History(L.Callback):
    """history.csv, one row per epoch, rewritten atomically after each epoch. On resume the rows of
    epochs that will be run again are dropped, so the file always describes the model in hand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after a resume's checkpoint is restored, so current_epoch is the first epoch to run
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                self.rows = [row for row in csv.DictReader(handle)
                             if int(row["epoch"]) < trainer.current_epoch]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics

        def value(key: str) -> str:
            return f"{float(metrics[key]):.6f}" if key in metrics else ""

        self.rows.append({"epoch": trainer.current_epoch, "train_loss": value("train_loss"),
                          "train_acc": value("train_acc"), "val_loss": value("val_loss"),
                          "val_acc": value("val_acc"),
                          "val_loss_calibrated": value("val_loss_calibrated"),
                          "lr": f"{trainer.optimizers[0].param_groups[0]['lr']:.3g}",
                          "seconds": f"{time.perf_counter() - self.started:.2f}"})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, buffer.getvalue())


class EpochLog(L.Callback):
    """One plain log line per epoch, for output that is not a terminal (CI, nohup, a log file),
    where a progress bar would stay silent for minutes."""

    def __init__(self, epochs: int):
        self.epochs, self.started = epochs, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [f"{name} {float(metrics[key]):.4f}" for key, name in (
            ("train_loss", "train loss"), ("val_loss", "val loss"), ("val_acc", "val accuracy"))
            if key in metrics]
        logging.getLogger(__name__).info("epoch %d/%d: %s (%.1f s)", trainer.current_epoch + 1,
                                         self.epochs, ", ".join(parts),
                                         time.perf_counter() - self.started)


class Throughput(L.Callback):
    """Seconds spent in training batches (forward, backward, step; validation excluded)."""

    def __init__(self):
        self.seconds, self.epochs, self._started = 0.0, 0, 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._started:
            self._stop()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._started:
            self._stop()

    def _stop(self) -> None:
        self.seconds += time.perf_counter() - self._started
        self.epochs += 1
        self._started = 0.0
