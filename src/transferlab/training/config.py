"""TrainConfig: everything that decides a run, resolved (a strategy's defaults filled in, the device
and precision chosen) and checked. It is written to run.json as it is; options a strategy does not
use stay None there, so a run's record never claims a setting that did nothing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class TrainConfig:
    strategy: str = "extract"
    backbone: str | None = None
    weights: str | None = None
    seed: int = 0
    batch_size: int = 32
    workers: int | None = None
    precision: str = "auto"
    device: str = "auto"
    engine: str = "auto"
    cache_dir: str | None = None
    cut_layer: str | None = None
    head_pool: str | None = None
    # extract
    classifier: str | None = None
    # auto
    time_budget: str | None = None
    # the trained strategies: head, finetune, scratch
    epochs: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    grad_clip: float | None = None
    augment: str | None = None
    class_weights: str | None = None
    early_stopping: int | None = None
    label_smoothing: float | None = None
    head_init: str | None = None
    head_dim: int | None = None
    dropout: float | None = None
    accelerator: str | None = None
    devices: int | None = None
    num_nodes: int | None = None
    distributed: str | None = None
    # finetune
    unfreeze: str | None = None
    unfreeze_from: str | None = None
    warmup_epochs: int | None = None
    backbone_lr_scale: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
