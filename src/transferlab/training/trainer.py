"""Run a ClassifierModule with Lightning: checkpoints, early stopping, logs, resume, distribution.

The Trainer is assembled from callbacks; nothing here knows which strategy is running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..devices import lightning_accelerator, lightning_precision
from ..errors import ConfigError, WeightsError
from ..rundir.atomic import atomic_path
from ..rundir.layout import BEST_CHECKPOINT, LOGS_DIR, RunDir
from .callbacks import EpochLog, History, Throughput
from .kernels import fp32_where_bf16_is_slower
from .module import VAL_SELECTION_METRIC


@dataclass
class Distribution:
    """Where Lightning runs: `accelerator` cpu|gpu|mps|auto, `devices` per node (a count, or the
    indices of the GPUs to use), `strategy` (ddp, ...)."""

    accelerator: str = "cpu"
    devices: int | list[int] = 1
    num_nodes: int = 1
    strategy: str = "auto"

    @classmethod
    def resolve(cls, device: torch.device, accelerator: str | None = None, devices: int | None = None,
                num_nodes: int = 1, strategy: str = "auto") -> "Distribution":
        """Lightning's settings from the resolved --device, unless --accelerator / --devices say
        otherwise: `--device cuda:1` trains on the second GPU, `--devices 4` on four."""
        derived, indices = lightning_accelerator(device)
        if accelerator in (None, "auto"):
            accelerator = derived
        elif accelerator == "cuda":
            accelerator = "gpu"
        if accelerator != derived:
            raise ConfigError(f"accelerator={accelerator!r} and device={str(device)!r} disagree; "
                              "give one of them")
        if indices is not None and devices not in (None, 1):
            raise ConfigError(f"devices={devices} with device={str(device)!r}: name one GPU with "
                              "--device cuda:N, or several with --devices N and --device cuda")
        return cls(accelerator, indices or devices or 1, num_nodes, strategy)


def is_main_process() -> bool:
    """False in the helper processes of a distributed run, from the rank Lightning's launcher (or
    torchrun, or SLURM) gives them in their environment; only the main process writes files. On the
    other machines of a multi-node run, the process started by hand has rank 0 until Lightning sets
    its global rank; NODE_RANK (Lightning's multi-node set-up) tells it first."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    return getattr(rank_zero_only, "rank", 0) == 0 and node == "0"


@dataclass
class FitResult:
    epochs: int
    best_epoch: int | None
    train_s: float
    train_images_per_s: float | None
    stopped_early: bool
    is_main_process: bool


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their final name, fsynced and renamed into place (a killed run leaves
    the previous checkpoint intact), and read back with weights_only=True (tensors and plain data
    only: a checkpoint is never a way to run code)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        return read_checkpoint(path)


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as tensors and plain data (weights_only=True): anything else, such as
    a pickle that would run code, is refused with one clear error rather than a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise WeightsError(f"{path}: refused to load this checkpoint ({reason}); only plain tensor "
                           "checkpoints are read (weights_only=True). If it is not yours, delete it; "
                           "otherwise start a new run") from None


def fit(module: L.LightningModule, datamodule: L.LightningDataModule, run_dir: Path, *,
        epochs: int, precision: str, distribution: Distribution, grad_clip: float | None = None,
        early_stopping: int | None = None, callbacks: list[L.Callback] = (),
        show_progress: bool = True, max_time_s: float | None = None) -> FitResult:
    """Train, resuming from run_dir/checkpoints/last.ckpt when it exists, then load the weights of the
    epoch with the lowest validation loss into `module`.

    What this writes into run_dir is replaced atomically (checkpoints, history.csv), except logs/:
    TensorBoard's event files are an append-only record stream, read while it grows, so a kill can
    tear the last record of the killed process's file. TensorBoard's reader stops at a torn record,
    and a resumed run appends to a new event file, so nothing is lost that was whole. (Lightning also
    writes logs/hparams.yaml once, plainly; it holds only "{}", as no hyperparameters are logged.)"""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    paths = RunDir(run_dir)
    has_val = len(datamodule.data.split["val"]) > 0
    checkpoint = ModelCheckpoint(dirpath=paths.checkpoints, filename=BEST_CHECKPOINT, save_last=True,
                                 monitor=VAL_SELECTION_METRIC if has_val else None, mode="min",
                                 save_top_k=1,
                                 enable_version_counter=False)
    timer = Throughput()
    behaviours: list[L.Callback] = [checkpoint, History(paths.history), timer, *callbacks]
    if early_stopping and has_val:
        behaviours.append(EarlyStopping(monitor=VAL_SELECTION_METRIC, mode="min",
                                        patience=early_stopping))
    bars = show_progress and sys.stderr.isatty()  # else one log line per epoch (EpochLog)
    if show_progress:
        behaviours.append(RichProgressBar() if bars else EpochLog(epochs))
    with _quiet_lightning():
        trainer = L.Trainer(
            max_epochs=epochs, max_time={"seconds": max_time_s} if max_time_s else None,
            accelerator=distribution.accelerator, devices=distribution.devices,
            num_nodes=distribution.num_nodes, strategy=distribution.strategy,
            precision=lightning_precision(precision),
            gradient_clip_val=grad_clip, callbacks=behaviours, plugins=[AtomicCheckpointIO()],
            logger=TensorBoardLogger(paths.path, name=LOGS_DIR, version="", default_hp_metric=False),
            enable_progress_bar=bars, enable_model_summary=False, num_sanity_val_steps=0,
            log_every_n_steps=10, limit_val_batches=1.0 if has_val else 0)
        last = paths.last_checkpoint
        with fp32_where_bf16_is_slower(module, precision, distribution.accelerator):
            trainer.fit(module, datamodule=datamodule, ckpt_path=last if last.is_file() else None,
                        weights_only=True)

    best_epoch = None
    if checkpoint.best_model_path and Path(checkpoint.best_model_path).is_file():
        state = read_checkpoint(checkpoint.best_model_path)
        module.load_state_dict(state["state_dict"])
        best_epoch = int(state["epoch"])
    images = len(datamodule.data.split["train"]) * timer.epochs
    return FitResult(epochs=trainer.current_epoch, best_epoch=best_epoch, train_s=timer.seconds,
                     train_images_per_s=images / timer.seconds if timer.seconds else None,
                     stopped_early=trainer.should_stop and trainer.current_epoch < epochs,
                     is_main_process=trainer.is_global_zero)


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's start-up chatter (accelerators found, tips) and warnings that do not apply to our
    set-up: on small machines we decode in the main process on purpose (see data.loaders.default_workers),
    tiny data sets have fewer batches than the logging interval, frozen modules are in eval mode by
    design, and a resumed run finds its checkpoint folder full."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                        ".*LeafSpec.*", ".*litlogger.*", ".*module\\(s\\) in eval mode.*",
                        ".*exists and is not empty.*"):
            warnings.filterwarnings("ignore", message=message)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
