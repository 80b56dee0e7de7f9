"""What every strategy is and returns: a `Strategy` declares its name, its defaults and the options it
uses, and its `fit()` returns a `TrainedModel`. `configure()` is the one place a strategy's options
are resolved and checked (through options.py), before any work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Mapping

from torch import nn

from ...data.folder import ImageFolderData
from ...data.transforms import Preprocessing
from ...devices import resolve_device, resolve_precision
from ...errors import ConfigError
from ...inference.graphs import ENGINES
from ...inference.predictor import NetworkOutputs
from ...models.backbones import DEFAULT_BACKBONE, create_backbone, resolve_name
from ...models.heads import HeadSpec
from ...models.network import ClassifierNet
from ...options import check, check_relations, check_used
from ..config import TrainConfig

# What every strategy uses, whichever it is.
COMMON_OPTIONS = frozenset({"strategy", "backbone", "weights", "seed", "batch_size", "workers",
                            "precision", "device", "engine", "cache_dir"})
COMMON_DEFAULTS = {"backbone": DEFAULT_BACKBONE, "weights": "imagenet"}


@dataclass
class Timings:
    """Seconds and speeds of a fit: training, and for extract the embedding that precedes it."""

    train_s: float
    train_images_per_s: float | None = None
    embed_s: float | None = None
    embed_images_per_s: float | None = None
    embedded: int | None = None
    cached: int | None = None

    def to_dict(self) -> dict:
        """metrics.json's "timing": the embedding's numbers only for a run that embedded."""
        values = {k: (round(v, 3 if k.endswith("_s") else 1) if isinstance(v, float) else v)
                  for k, v in asdict(self).items()}
        if self.embedded is None:
            return {k: values[k] for k in ("train_s", "train_images_per_s")}
        return {k: values[k] for k in ("embed_s", "embed_images_per_s", "embedded", "cached",
                                       "train_s")}


@dataclass
class TrainedModel:
    """What a strategy's fit() hands back: the network (backbone + head) ready to save and evaluate."""

    network: ClassifierNet
    head: HeadSpec
    preprocessing: Preprocessing
    trainable: int  # parameters that trained by the end (after any warm-up)
    timings: Timings
    history: list[dict] = field(default_factory=list)  # history.csv's rows (trained strategies)
    train_fit: dict = field(default_factory=dict)  # loss and accuracy on the training data
    details: dict = field(default_factory=dict)  # the strategy's own entries in metrics.json
    # raw outputs by split when the strategy computed them already (extract, from its embeddings)
    outputs: dict[str, NetworkOutputs] | None = None
    backbone: str | None = None  # the backbone the network holds, when the strategy chose it


@dataclass
class FitContext:
    """Where a fit writes (checkpoints, history.csv, logs), whether it shows progress and how long it
    may train."""

    run_dir: Path
    show_progress: bool = True
    time_limit_s: float | None = None  # training stops at this many seconds (auto's budget)


class Strategy:
    """A transfer-learning method. Subclasses set `name`, `uses` (the per-strategy options of
    options.py they take) and `defaults`, and implement `fit` and `network`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for listings
    uses: ClassVar[frozenset[str]] = frozenset()
    defaults: ClassVar[Mapping[str, Any]] = {}

    def configure(self, given: Mapping[str, Any], users_of: Mapping[str, list[str]]) -> TrainConfig:
        """The resolved configuration for `given` options (None: not given), or a ConfigError naming
        the first bad one: a value an option does not allow, an option this strategy does not use
        (and who uses it), or a combination that means nothing."""
        given = {k: v for k, v in given.items() if k != "strategy"}
        unknown = sorted(set(given) - set(TrainConfig.names()))
        if unknown:
            raise ConfigError(f"{unknown[0]}: not an option of train; see `transferlab train --help`")
        check(given, {"engine": ENGINES})
        named = [name for name, value in given.items() if value is not None]
        check_used(named, self.name, self.uses, users_of)
        values = {**COMMON_DEFAULTS, **self.defaults,
                  **{k: v for k, v in given.items() if v is not None}, "strategy": self.name}
        values = self.resolve(values, set(named))
        check_relations(values, named)
        resolve_name(values["backbone"])
        if {"cut_layer", "unfreeze", "unfreeze_from"} & set(named):
            self.check_architecture(values)
        device = resolve_device(values.get("device") or "auto")
        return TrainConfig(**{**values, "device": str(device),
                              "precision": resolve_precision(values.get("precision") or "auto",
                                                             device)})

    def resolve(self, values: dict, given: set[str]) -> dict:
        """Defaults that depend on other values (such as momentum on the optimizer), and a
        strategy's own checks; `given` names the options the caller set."""
        return values

    def check_architecture(self, values: dict) -> None:
        """Options that name parts of the backbone (a stage to cut at, blocks to unfreeze), checked
        on its architecture alone: built on the meta device, it holds no weights and costs nothing."""
        import torch

        with torch.device("meta"):
            backbone = create_backbone(values["backbone"], "none", values.get("cut_layer"))
        self.check_backbone(backbone, values)

    def check_backbone(self, backbone: nn.Module, values: dict) -> None:
        """A strategy's own checks of options that name parts of `backbone` (on the meta device)."""

    def fit(self, data: ImageFolderData, config: TrainConfig, context: FitContext) -> TrainedModel | None:
        """Train on `data` (None on the helper processes of a distributed run)."""
        raise NotImplementedError

    def network(self, config: TrainConfig, num_classes: int) -> tuple[ClassifierNet, HeadSpec,
                                                                       Preprocessing, int]:
        """The network this strategy would train for `config` (before training) and how many of its
        parameters would train: what `transferlab summary BACKBONE --strategy NAME` shows."""
        raise NotImplementedError


def backbone_for(config: TrainConfig) -> tuple[nn.Module, Preprocessing]:
    """The configured backbone (cut where told) and the preprocessing its weights expect."""
    backbone = create_backbone(config.backbone, config.weights, config.cut_layer)
    return backbone, Preprocessing.from_model(backbone)


def for_summary(config: TrainConfig, **changes) -> TrainConfig:
    """`config` with random weights: a summary shows shapes and counts, and downloads nothing."""
    return replace(config, weights="none", **changes)
