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
from ...errors import ConfigError
from ...inference.trust import calibrated_log_loss
from ...models.heads import HeadSpec
from ...models.network import ClassifierNet, build_network
from ...process import scoped_environment
from ...rundir.layout import RunDir, read_history
from ..config import TrainConfig
from ..module import VAL_SELECTION_METRIC, ClassifierModule, Optimization, ParameterGroup
from ..trainer import Distribution, fit
from .base import FitContext, Strategy, Timings, TrainedModel, backbone_for
from .extract import fit_probe

TRAINING_OPTIONS = frozenset({
    "epochs", "optimizer", "lr", "momentum", "weight_decay", "schedule", "grad_clip", "augment",
    "class_weights", "early_stopping", "cut_layer", "head_pool", "head_dim", "dropout",
    "label_smoothing", "accelerator", "devices", "num_nodes", "distributed"})
TRAINING_DEFAULTS = {"weight_decay": 0.0, "schedule": "constant", "label_smoothing": 0.0,
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
        if values.get("head_init") == "probe" and values.get("head_dim"):
            raise ConfigError(f"head_dim={values['head_dim']}: the head starts from the linear "
                              "probe (--head-init probe), which has no hidden layer; drop "
                              "--head-dim or add --head-init random")
        return values

    def network(self, config: TrainConfig, num_classes: int
                ) -> tuple[ClassifierNet, HeadSpec, Preprocessing, int]:
        net, spec, pre, plan = self.build(config, num_classes)
        return net, spec, pre, plan.trainable

    def build(self, config: TrainConfig, num_classes: int):
        """The network, its head spec, its preprocessing and the plan of what trains."""
        backbone, pre = backbone_for(config)
        net, spec = build_network(backbone, pre, num_classes,
                                  hidden=(config.head_dim,) if config.head_dim else (),
                                  dropout=config.dropout or 0.0, pool=config.head_pool or "avg")
        return net, spec, pre, self.plan(net, config)

    def fit(self, data: ImageFolderData, config: TrainConfig, context: FitContext) -> TrainedModel | None:
        # Lightning hands the seed to DataLoader workers (and DDP processes) in the environment:
        # set for this fit only
        with scoped_environment():
            return self._fit(data, config, context)

    def _fit(self, data: ImageFolderData, config: TrainConfig, context: FitContext) -> TrainedModel | None:
        L.seed_everything(config.seed, workers=True, verbose=False)
        net, spec, pre, plan = self.build(config, len(data.classes))
        resuming = RunDir(context.run_dir).last_checkpoint.is_file()  # its weights replace these
        probe = start_from_probe(net, data, config, pre, context) if (
            config.head_init == "probe" and not resuming) else None
        optimization = Optimization(config.optimizer, config.lr, config.momentum, config.weight_decay,
                                    config.schedule, config.label_smoothing or 0.0)
        module = ClassifierModule(net, pre, plan.groups, optimization, num_classes=len(data.classes),
                                  freeze_batchnorm=plan.freeze_batchnorm,
                                  class_weights=class_weights(data) if config.class_weights else None)
        device = torch.device(config.device)
        datamodule = ImageFolderDataModule(data, pre, config.augment, config.batch_size, config.workers,
                                           pin_memory=device.type == "cuda")
        distribution = Distribution.resolve(device, config.accelerator, config.devices,
                                            config.num_nodes, config.distributed)
        initial = {k: v.detach().clone() for k, v in net.state_dict().items()} if probe else None
        result = fit(module, datamodule, context.run_dir, epochs=config.epochs,
                     precision=config.precision, distribution=distribution,
                     grad_clip=config.grad_clip, early_stopping=config.early_stopping,
                     callbacks=plan.callbacks, show_progress=context.show_progress,
                     max_time_s=context.time_limit_s)
        if not result.is_main_process:
            return None
        history = read_history(RunDir(context.run_dir).history)
        details = {"epochs_run": result.epochs, "best_epoch": result.best_epoch,
                   "stopped_early": result.stopped_early, "augment": config.augment,
                   "precision": {"training": config.precision}}
        train_fit = kept_epoch_fit(history, result.best_epoch)
        if probe:
            details["probe"] = probe
            best = (epoch_row(history, result.best_epoch) or {}).get(VAL_SELECTION_METRIC)
            if probe[VAL_SELECTION_METRIC] is not None and (
                    best is None or probe[VAL_SELECTION_METRIC] <= best):
                # no epoch beat the probe it started from: keep the probe
                module.net.load_state_dict(initial)
                details.update(best_epoch=None, kept="probe")
                train_fit = probe["train_fit"]
        return TrainedModel(
            network=module.net.eval(), head=spec, preprocessing=pre, trainable=plan.trainable,
            timings=Timings(train_s=result.train_s, train_images_per_s=result.train_images_per_s),
            history=history, train_fit=train_fit, details=details)


def start_from_probe(net: ClassifierNet, data: ImageFolderData, config: TrainConfig,
                     pre: Preprocessing, context: FitContext) -> dict:
    """Give `net` the head extract fits on the frozen backbone's cached embeddings (linear probing,
    then fine-tuning: Kumar et al., ICLR 2022): a random head's first gradients would distort the
    pretrained features before the head is any good. Returns what the probe scored, for
    metrics.json."""
    probe = fit_probe(data, config, net.backbone, pre, context.show_progress)
    net.head.load_state_dict(probe.head.state_dict())
    return {**val_scores(probe.outputs["val"].logits, data), "train_fit": probe.train_fit, "fit_s": round(probe.fit_s, 3),
            "embed_s": round(probe.embedding.seconds, 3), "cached": probe.embedding.cached}


def val_scores(logits: np.ndarray, data: ImageFolderData) -> dict:
    """Val accuracy, loss and calibrated loss of a model's val logits, named and measured as the
    training module logs them each epoch, so that the two compare (None without val images)."""
    labels = np.array(data.labels("val"), dtype=np.int64)
    if not len(labels):
        return {"val_acc": None, "val_loss": None, VAL_SELECTION_METRIC: None}
    loss = torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels))
    return {"val_acc": float((logits.argmax(1) == labels).mean()), "val_loss": float(loss),
            VAL_SELECTION_METRIC: calibrated_log_loss(logits, labels)}


def epoch_row(history: list[dict], epoch: int | None) -> dict | None:
    """history.csv's row of `epoch` (None when there is none, as for no kept epoch)."""
    return next((row for row in history if row["epoch"] == epoch), None)


def kept_epoch_fit(history: list[dict], best_epoch: int | None) -> dict:
    """Training loss and accuracy of the epoch whose weights were kept, as logged during training
    (averaged over its batches, with augmentation and dropout)."""
    row = epoch_row(history, best_epoch)
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
