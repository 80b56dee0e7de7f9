"""The trained strategies as recipes: which parameters train, at which rate, from which epoch, with
which head. Each recipe only configures the shared parts (ClassifierModule, ImageFolderDataModule,
callbacks); `training.fit` runs them all the same way.

head      backbone frozen and in eval mode (optionally cut); pool -> Dense(256, ReLU) -> Dropout -> Dense
finetune  head warm-up with the backbone frozen, then the top blocks train at a lower rate; BatchNorm
          frozen and in inference mode throughout
scratch   random weights (simple-cnn, or any timm model); everything trains
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from ..models.backbones import SimpleCNN, create_backbone
from ..inference.bundle import ClassifierNet
from ..training.callbacks import UnfreezeSchedule
from ..data.folder import ImageFolderData
from ..data.loaders import ImageFolderDataModule
from ..errors import ConfigError
from ..models.freezing import batchnorm_parameter_names, select_blocks, set_trainable
from ..models.heads import HeadSpec, build_head
from ..training.module import ClassifierModule, Optimization, ParameterGroup
from ..training.trainer import Distribution, fit
from ..data.transforms import Preprocessing


@dataclass
class Recipe:
    """A strategy's defaults; any of them can be overridden by the user."""

    optimizer: str
    lr: float
    epochs: int
    augment: str
    schedule: str = "constant"
    backbone: str | None = None  # None: the library's default backbone
    weights: str = "imagenet"


RECIPES = {
    "head": Recipe(optimizer="adam", lr=1e-4, epochs=5, augment="standard"),
    "finetune": Recipe(optimizer="sgd", lr=1e-3, epochs=3, augment="light"),
    "scratch": Recipe(optimizer="adam", lr=1e-4, epochs=10, augment="standard", backbone="simple-cnn",
                      weights="none"),
}


@dataclass
class Plan:
    """What a recipe decided: parameter groups, callbacks and the BatchNorm policy."""

    groups: list[ParameterGroup]
    callbacks: list[L.Callback]
    freeze_batchnorm: bool

    @property
    def trainable(self) -> int:
        """Parameters that train by the end of the run (after any warm-up)."""
        return sum(p.numel() for group in self.groups for p in group.parameters)


def build_network(config, num_classes: int) -> tuple[ClassifierNet, HeadSpec, Preprocessing]:
    backbone = create_backbone(config.backbone, config.weights, config.cut_layer)
    pre = Preprocessing.from_model(backbone)
    with torch.no_grad():
        shape = tuple(backbone.eval()(torch.zeros((1, *pre.input_size))).shape)
    if isinstance(backbone, SimpleCNN):  # the classic baseline: Flatten -> Dense(classes)
        spec = HeadSpec(math.prod(shape[1:]), num_classes, pool="flatten")
    else:
        pool = "" if len(shape) == 2 else config.head_pool
        width = math.prod(shape[1:]) if pool == "flatten" else shape[1]
        spec = HeadSpec(width, num_classes, hidden=(config.head_dim,), dropout=config.dropout, pool=pool)
    return ClassifierNet(backbone, build_head(spec)), spec, pre


def plan(strategy: str, net: ClassifierNet, config) -> Plan:
    head = ParameterGroup("head", list(net.head.parameters()))
    if strategy == "scratch":
        return Plan([ParameterGroup("all", list(net.parameters()))], [], freeze_batchnorm=False)
    set_trainable(net.backbone, None, False)
    if strategy == "head":
        return Plan([head], [], freeze_batchnorm=True)
    names = set(select_blocks(net.backbone, config.unfreeze, config.unfreeze_from))
    names -= batchnorm_parameter_names(net.backbone)
    parameters = [p for name, p in net.backbone.named_parameters() if name in names]
    if not parameters:
        raise ConfigError("finetune: no backbone parameters selected to unfreeze; raise --unfreeze or "
                          "use --strategy head")
    return Plan([head, ParameterGroup("backbone", parameters, config.backbone_lr_scale)],
                [UnfreezeSchedule(parameters, at_epoch=config.warmup_epochs)], freeze_batchnorm=True)


def train_network(data: ImageFolderData, config, run_dir, show_progress: bool) -> dict | None:
    """Build, train and return the network of a head/finetune/scratch run (None on non-main
    processes of a distributed run)."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    net, spec, pre = build_network(config, len(data.classes))
    recipe = plan(config.strategy, net, config)
    module = ClassifierModule(
        net, pre, recipe.groups, Optimization(config.optimizer, config.lr, config.momentum,
                                              config.weight_decay, config.schedule),
        num_classes=len(data.classes), freeze_batchnorm=recipe.freeze_batchnorm,
        class_weights=_class_weights(data) if config.class_weights == "balanced" else None)
    datamodule = ImageFolderDataModule(data, pre, config.augment, config.batch_size, config.workers)
    result = fit(module, datamodule, run_dir, epochs=config.epochs, precision=config.precision,
                 distribution=Distribution(config.accelerator, config.devices, config.num_nodes,
                                           config.distributed),
                 grad_clip=config.grad_clip, early_stopping=config.early_stopping,
                 callbacks=recipe.callbacks, show_progress=show_progress)
    if not result.is_main_process:
        return None
    return {"net": module.net.eval(), "head": spec, "preprocessing": pre, "trainable": recipe.trainable,
            "timing": {"train_s": round(result.train_s, 3), "train_images_per_s":
                       round(result.train_images_per_s, 1) if result.train_images_per_s else None},
            "extra": {"epochs_run": result.epochs, "best_epoch": result.best_epoch,
                      "stopped_early": result.stopped_early, "augment": config.augment,
                      "precision": {"training": config.precision}}}


def _class_weights(data: ImageFolderData) -> torch.Tensor:
    """scikit-learn's "balanced" weights: n_samples / (n_classes * count of the class)."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array(data.labels("train"))
    present = np.unique(labels)
    weights = np.ones(len(data.classes), dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.as_tensor(weights)
