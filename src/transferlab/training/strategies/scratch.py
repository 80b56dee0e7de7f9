"""`scratch`: the baseline that shows what pretraining buys. Random weights, everything trains:
`simple-cnn` (Conv32-Pool-Conv64-Pool-Flatten-Dense on 128 px), or any timm model with --weights
none. Adam at 1e-4, 10 epochs, augmentation `standard`."""

from __future__ import annotations

from ...errors import ConfigError
from ...models.backbones import SIMPLE_CNN
from ...models.network import ClassifierNet
from ..config import TrainConfig
from ..module import ParameterGroup
from .trained import TRAINING_DEFAULTS, NetworkStrategy, Plan


class Scratch(NetworkStrategy):
    name = "scratch"
    summary = "random weights, everything trains: the baseline"
    defaults = {**TRAINING_DEFAULTS, "backbone": SIMPLE_CNN, "weights": "none", "optimizer": "adam",
                "lr": 1e-4, "epochs": 10, "augment": "standard", "head_dim": 256, "dropout": 0.5}

    def resolve(self, values: dict, given: set[str]) -> dict:
        if values["weights"] != "none":
            raise ConfigError(f"weights={values['weights']!r}: scratch trains from random weights; "
                              "drop --weights or use --strategy finetune")
        return super().resolve(values, given)

    def plan(self, net: ClassifierNet, config: TrainConfig) -> Plan:
        return Plan([ParameterGroup("all", list(net.parameters()))], [], freeze_batchnorm=False)
