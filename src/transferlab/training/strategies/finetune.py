"""`finetune`: linear probing, then fine-tuning (LP-FT; Kumar et al., ICLR 2022).

1. the head starts as the linear classifier extract fits on the cached embeddings (`head_init`
   probe), so the first gradients do not come from a random head and distort the pretrained
   features; `warmup_epochs` head-only epochs may follow (0 by default: the probe is the warm-up);
2. then the top `unfreeze` blocks of the backbone train too (all, by default; or every block from
   `unfreeze_from` up), blocks being timm's own layer groups (models/freezing.py), the backbone at
   `backbone_lr_scale` times the head's rate;
3. BatchNorm frozen and in inference mode throughout, so small batches cannot corrupt the running
   statistics the pretrained weights rely on;
4. AdamW at 1e-4 (weight decay 0.01), cosine after a 5% linear warm-up, up to 10 epochs, stopped
   after 3 without a better val loss; the epoch with the lowest val loss after temperature scaling
   is kept, or the probe itself when no epoch beat it. README ("How the recipes were chosen") gives
   the measurements behind each default.
"""

from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ...models.freezing import batchnorm_parameter_names, select_blocks, set_trainable
from ...models.network import ClassifierNet
from ..callbacks import UnfreezeSchedule
from ..config import TrainConfig
from ..module import ParameterGroup
from .trained import TRAINING_DEFAULTS, TRAINING_OPTIONS, NetworkStrategy, Plan


class Finetune(NetworkStrategy):
    name = "finetune"
    summary = "head warm-up, then the top blocks at a lower rate, BatchNorm frozen"
    uses = TRAINING_OPTIONS | {"unfreeze", "unfreeze_from", "warmup_epochs", "backbone_lr_scale",
                               "head_init"}
    defaults = {**TRAINING_DEFAULTS, "optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01,
                "schedule": "cosine", "epochs": 10, "early_stopping": 3,
                "augment": "light", "unfreeze": "all", "warmup_epochs": 0, "backbone_lr_scale": 1.0,
                "head_init": "probe"}

    def check_backbone(self, backbone: nn.Module, values: dict) -> None:
        select_blocks(backbone, values["unfreeze"], values.get("unfreeze_from"))

    def plan(self, net: ClassifierNet, config: TrainConfig) -> Plan:
        set_trainable(net.backbone, None, False)  # 1. only the head trains during the warm-up
        names = set(select_blocks(net.backbone, config.unfreeze, config.unfreeze_from))  # 2.
        names -= batchnorm_parameter_names(net.backbone)  # 4. BatchNorm's own weights stay frozen
        blocks = [p for name, p in net.backbone.named_parameters() if name in names]
        if not blocks:
            raise ConfigError("finetune: no backbone parameters selected to unfreeze; raise --unfreeze "
                              "or use --strategy head")
        groups = [ParameterGroup("head", list(net.head.parameters())),  # 3. discriminative rates
                  ParameterGroup("backbone", blocks, config.backbone_lr_scale)]
        return Plan(groups, [UnfreezeSchedule(blocks, at_epoch=config.warmup_epochs)],
                    freeze_batchnorm=True)
