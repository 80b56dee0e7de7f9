"""The LightningModule of every trained strategy: a ClassifierNet, its loss, optimizer and schedule.

It holds the model and its optimisation only. Which parameters train and when is decided outside:
the strategy freezes parameters and passes explicit parameter groups; the fine-tuning schedule is a
callback that switches `requires_grad` on (see callbacks.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..data.transforms import Preprocessing, normalize
from ..errors import TransferlabError
from ..inference.trust import calibrated_log_loss
from ..models.freezing import keep_inference_mode
from ..models.network import ClassifierNet


VAL_SELECTION_METRIC = "val_loss_calibrated"  # what checkpointing and early stopping follow


class TrainingDiverged(TransferlabError):
    """The training loss is no longer a finite number."""


@dataclass
class Optimization:
    """The optimizer and schedule (options.py declares and checks the values)."""

    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float | None = None  # sgd and rmsprop only
    weight_decay: float = 0.0
    schedule: str = "constant"
    label_smoothing: float = 0.0  # of the training loss only


@dataclass
class ParameterGroup:
    """Parameters trained at `lr_scale` times the base learning rate (discriminative rates)."""

    name: str
    parameters: list[nn.Parameter]
    lr_scale: float = 1.0


def build_optimizer(groups: list[ParameterGroup], opt: Optimization) -> torch.optim.Optimizer:
    param_groups = [{"params": g.parameters, "lr": opt.lr * g.lr_scale, "name": g.name}
                    for g in groups if g.parameters]
    kwargs = {"lr": opt.lr, "weight_decay": opt.weight_decay}
    if opt.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=opt.momentum or 0.0, **kwargs)
    if opt.optimizer == "rmsprop":
        return torch.optim.RMSprop(param_groups, momentum=opt.momentum or 0.0, **kwargs)
    if opt.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, **kwargs)
    return torch.optim.Adam(param_groups, **kwargs)


WARMUP_SHARE = 0.05  # of the run's steps, over which cosine's rate rises linearly from ~0


def build_schedule(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    """A per-step learning-rate schedule over the whole run, or None for a constant rate. Cosine
    starts with a short linear warm-up: Adam's first steps, with its moment estimates still empty,
    would otherwise take full-size steps that disturb the pretrained (and probed) weights."""
    total_steps = max(2, total_steps)
    if schedule == "cosine":
        warmup = max(1, round(WARMUP_SHARE * total_steps))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps)
    return None


class ClassifierModule(L.LightningModule):
    """Takes uint8 image batches, normalises them (channels_last) and trains `net` with cross-entropy."""

    def __init__(self, net: ClassifierNet, pre: Preprocessing, groups: list[ParameterGroup],
                 optimization: Optimization, num_classes: int, freeze_batchnorm: bool = False,
                 class_weights: torch.Tensor | None = None):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)
        self.pre = pre
        self.groups = groups
        self.optimization = optimization
        self.freeze_batchnorm = freeze_batchnorm
        self.loss = nn.CrossEntropyLoss(weight=class_weights)  # validation: what selects the epoch
        self.training_loss = nn.CrossEntropyLoss(weight=class_weights,
                                                 label_smoothing=optimization.label_smoothing)
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.example_input_array = torch.zeros((1, *pre.input_size), dtype=torch.uint8)
        self.val_outputs = []
        # Lightning (2.2+) keeps each submodule in the mode it finds it in, and restores those modes
        # after every validation, so the policy is applied now, before fit() sees the modules.
        self.train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(images, self.pre))

    def train(self, mode: bool = True):
        """Frozen parts and (when fine-tuning) BatchNorm stay in inference mode through every call,
        or running statistics would drift."""
        super().train(mode)
        if mode:
            keep_inference_mode(self.net.backbone, self.freeze_batchnorm)
        return self

    def training_step(self, batch, batch_index):
        images, labels, _ = batch  # (images, labels, errors): see data.loaders.ImageDataset
        logits = self(images)
        loss = self.training_loss(logits.float(), labels)
        if not torch.isfinite(loss):  # everything after would be NaN: stop now, and say why
            raise TrainingDiverged(
                f"training diverged: the loss became {float(loss.detach())} at epoch "
                f"{self.current_epoch + 1}, batch {batch_index + 1}; lower --lr (it is "
                f"{self.optimization.lr:g}) or set --grad-clip")
        self.train_accuracy(logits, labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(labels), sync_dist=True)
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_index):
        images, labels, _ = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.log("val_loss", self.loss(logits.float(), labels), on_epoch=True, prog_bar=True,
                 batch_size=len(labels), sync_dist=True)
        self.log("val_acc", self.val_accuracy, on_epoch=True, prog_bar=True)
        self.val_outputs.append((logits.detach().float().cpu(), labels.cpu()))

    def on_validation_epoch_start(self) -> None:
        self.val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_epoch_end(self) -> None:
        """The val loss after temperature scaling, which selects the epoch kept (see
        inference.trust.calibrated_log_loss); in a distributed run, the mean over the processes'
        shards."""
        if not self.val_outputs:
            return
        logits, labels = (torch.cat(parts).numpy() for parts in zip(*self.val_outputs))
        self.log(VAL_SELECTION_METRIC, calibrated_log_loss(logits, labels), sync_dist=True)
        self.val_outputs = []

    def configure_optimizers(self):
        optimizer = build_optimizer(self.groups, self.optimization)
        schedule = build_schedule(optimizer, self.optimization.schedule,
                                  int(self.trainer.estimated_stepping_batches))
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
