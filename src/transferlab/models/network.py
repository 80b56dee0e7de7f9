"""The classifier network every strategy ends with: a backbone's features, then a head."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data.transforms import Preprocessing
from .backbones import CutBackbone, SimpleCNN
from .heads import HeadSpec, build_head


class ClassifierNet(nn.Module):
    """The whole model: backbone features -> head logits. Inputs are normalised NCHW batches."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits, and the features the head's last layer sees (the penultimate layer: the
        pooled backbone features for a linear head), which novelty is measured on."""
        return head_outputs(self.head, self.backbone(images))

    @property
    def cut_layer(self) -> int | None:
        """The feature stage the backbone is cut at (see CutBackbone), or None when it is whole."""
        return self.backbone.index if isinstance(self.backbone, CutBackbone) else None


def head_outputs(head: nn.Sequential, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's logits and the features its last layer sees, from what the head takes in."""
    features = head[:-1](inputs)
    return head[-1](features), features


class WithFeatures(nn.Module):
    """A ClassifierNet whose forward gives (logits, penultimate features): what an engine runs when
    predictions carry a novelty score, and what an export's graph outputs."""

    def __init__(self, net: ClassifierNet):
        super().__init__()
        self.net = net
        self.train(net.training)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.logits_and_features(images)


def feature_shape(backbone: nn.Module, pre: Preprocessing) -> tuple[int, ...]:
    """The shape of one image's features (C,) or (C, H, W), from a forward pass on zeros on the
    backbone's own device."""
    training = backbone.training
    device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    with torch.no_grad():
        shape = tuple(backbone.eval()(torch.zeros((1, *pre.input_size), device=device)).shape[1:])
    backbone.train(training)
    return shape


def head_spec(backbone: nn.Module, pre: Preprocessing, num_classes: int, *, hidden: tuple[int, ...],
              dropout: float, pool: str) -> HeadSpec:
    """The head a backbone's features need: pooled (or flattened) when they are a feature map.
    SimpleCNN keeps its classic Flatten -> Dense(classes) head."""
    shape = feature_shape(backbone, pre)
    if isinstance(backbone, SimpleCNN):
        return HeadSpec(math.prod(shape), num_classes, pool="flatten")
    pool = "" if len(shape) == 1 else pool
    width = math.prod(shape) if pool == "flatten" else shape[0]
    return HeadSpec(width, num_classes, hidden=hidden, dropout=dropout, pool=pool)


def build_network(backbone: nn.Module, pre: Preprocessing, num_classes: int, *,
                  hidden: tuple[int, ...] = (), dropout: float = 0.0,
                  pool: str = "avg") -> tuple[ClassifierNet, HeadSpec]:
    """`backbone` with a new, randomly initialised head for `num_classes`."""
    spec = head_spec(backbone, pre, num_classes, hidden=hidden, dropout=dropout, pool=pool)
    return ClassifierNet(backbone, build_head(spec)), spec
