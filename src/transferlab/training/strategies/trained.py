"""The shared run of the strategies that train a network with Lightning (head, finetune, scratch).

Each of them only says what trains, at which rate and from which epoch (`plan`); building the
network, the LightningModule and the data, and running the Trainer happen here, the same way for all.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from ...data.folder import ImageFolderData
from ...data.loaders import ImageFolderDataModule
from ...data.transforms import Preprocessing
from ...models.heads import HeadSpec
from ...models.network import ClassifierNet, build_network
from ...process import scoped_environment
from ...rundir.layout import RunDir, read_history
from ..config import TrainConfig
from ..module import ClassifierModule, Optimization, ParameterGroup
from ..trainer import Distribution, fit
from .base import FitContext, Strategy, Timings, TrainedModel, backbone_for

TRAINING_OPTIONS = frozenset({
    "epochs", "optimizer", "lr", "momentum", "weight_decay", "schedule", "grad_clip", "augment",
    "class_weights", "early_stopping", "cut_layer", "head_pool", "head_dim", "dropout",
    "accelerator", "devices", "num_nodes", "distributed"})
TRAINING_DEFAULTS = {"weight_decay": 0.0, "schedule": "constant", "head_dim": 256, "dropout": 0.5,
                     "head_pool": "avg", "num_nodes": 1, "distributed": "auto"}
MOMENTUM = {"sgd": 0.9, "rmsprop": 0.0}  # the usual SGD momentum; Keras's RMSprop has none


@dataclass
class Plan:
    """What a strategy decided: parameter groups (each at its own rate), callbacks (such as an
    unfreeze schedule) and whether BatchNorm stays in inference mode."""

    groups: list[ParameterGroup]
    callbacks: list[L.Callback]
    freeze_batchnorm: bool

    @property
    def trainable(self) -> int:
        """Parameters that train by the end of the run (after any warm-up)."""
        return sum(p.numel() for group in self.groups for p in group.parameters)


class NetworkStrategy(Strategy):
    """A strategy that trains (part of) a network on the images with Lightning."""

    uses = TRAINING_OPTIONS

    def plan(self, net: ClassifierNet, config: TrainConfig) -> Plan:
        raise NotImplementedError

    def resolve(self, values: dict, given: set[str]) -> dict:
        if values.get("momentum") is None:
            values["momentum"] = MOMENTUM.get(values["optimizer"])
        if values.get("cut_layer") is None and "head_pool" not in given:
            values["head_pool"] = None  # nothing to pool: the backbone gives vectors
        return values

    def network(self, config: TrainConfig, num_classes: int
                ) -> tuple[ClassifierNet, HeadSpec, Preprocessing, int]:
        net, spec, pre, plan = self.build(config, num_classes)
        return net, spec, pre, plan.trainable

    def build(self, config: TrainConfig, num_classes: int):
        """The network, its head spec, its preprocessing and the plan of what trains."""
        backbone, pre = backbone_for(config)
        net, spec = build_network(backbone, pre, num_classes, hidden=(config.head_dim,),
                                  dropout=config.dropout, pool=config.head_pool or "avg")
        return net, spec, pre, self.plan(net, config)

    def fit(self, data: ImageFolderData, config: TrainConfig, context: FitContext) -> TrainedModel | None:
        # Lightning hands the seed to DataLoader workers (and DDP processes) in the environment:
        # set for this fit only
        with scoped_environment():
            return self._fit(data, config, context)

    def _fit(self, data: ImageFolderData, config: TrainConfig, context: FitContext) -> TrainedModel | None:
        L.seed_everything(config.seed, workers=True, verbose=False)
        net, spec, pre, plan = self.build(config, len(data.classes))
        optimization = Optimization(config.optimizer, config.lr, config.momentum, config.weight_decay,
                                    config.schedule)
        module = ClassifierModule(net, pre, plan.groups, optimization, num_classes=len(data.classes),
                                  freeze_batchnorm=plan.freeze_batchnorm,
                                  class_weights=class_weights(data) if config.class_weights else None)
        device = torch.device(config.device)
        datamodule = ImageFolderDataModule(data, pre, config.augment, config.batch_size, config.workers,
                                           pin_memory=device.type == "cuda")
        distribution = Distribution.resolve(device, config.accelerator, config.devices,
                                            config.num_nodes, config.distributed)
        result = fit(module, datamodule, context.run_dir, epochs=config.epochs,
                     precision=config.precision, distribution=distribution,
                     grad_clip=config.grad_clip, early_stopping=config.early_stopping,
                     callbacks=plan.callbacks, show_progress=context.show_progress)
        if not result.is_main_process:
            return None
        history = read_history(RunDir(context.run_dir).history)
        return TrainedModel(
            network=module.net.eval(), head=spec, preprocessing=pre, trainable=plan.trainable,
            timings=Timings(train_s=result.train_s, train_images_per_s=result.train_images_per_s),
            history=history, train_fit=kept_epoch_fit(history, result.best_epoch),
            details={"epochs_run": result.epochs, "best_epoch": result.best_epoch,
                     "stopped_early": result.stopped_early, "augment": config.augment,
                     "precision": {"training": config.precision}})


def kept_epoch_fit(history: list[dict], best_epoch: int | None) -> dict:
    """Training loss and accuracy of the epoch whose weights were kept, as logged during training
    (averaged over its batches, with augmentation and dropout)."""
    row = next((r for r in history if r["epoch"] == best_epoch), None)
    if row is None:
        return {}
    return {"loss": row["train_loss"], "accuracy": row["train_acc"], "measured_on": "best epoch's batches"}


def class_weights(data: ImageFolderData) -> torch.Tensor:
    """scikit-learn's "balanced" weights: n_samples / (n_classes * count of the class)."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array(data.labels("train"))
    present = np.unique(labels)
    weights = np.ones(len(data.classes), dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.as_tensor(weights)
