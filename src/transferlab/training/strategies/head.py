"""`head`: the backbone frozen and in inference mode (optionally cut at a feature stage); the head
trains on its features, with augmentation, Adam at 1e-4. It starts from extract's linear probe
(`--head-init probe`), which augmentation then refines; Keras's classic "train a classifier on
top", pool -> Dense(256, ReLU) -> Dropout(0.5) -> Dense, is `--head-init random --head-dim 256
--dropout 0.5`."""

from __future__ import annotations

from ...models.freezing import set_trainable
from ...models.network import ClassifierNet
from ..config import TrainConfig
from ..module import ParameterGroup
from .trained import TRAINING_DEFAULTS, TRAINING_OPTIONS, NetworkStrategy, Plan


class Head(NetworkStrategy):
    name = "head"
    summary = "frozen backbone, a new dense head trained with augmentation"
    uses = TRAINING_OPTIONS | {"head_init"}
    defaults = {**TRAINING_DEFAULTS, "optimizer": "adam", "lr": 1e-4, "epochs": 5,
                "augment": "standard", "head_init": "probe"}

    def plan(self, net: ClassifierNet, config: TrainConfig) -> Plan:
        set_trainable(net.backbone, None, False)
        return Plan([ParameterGroup("head", list(net.head.parameters()))], [], freeze_batchnorm=True)
