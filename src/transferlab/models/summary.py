"""A layer table with output shapes and parameter counts, like Keras's model.summary(), for
`transferlab summary` and the report: of a saved bundle, or of the network a strategy would train."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..data.transforms import Preprocessing
from .backbones import count_parameters, feature_stages


@dataclass
class Summary:
    title: str
    rows: list[dict]  # name, type, output_shape, parameters
    total: int
    trainable: int
    stages: list[dict]  # where --cut-layer can cut

    @property
    def non_trainable(self) -> int:
        return self.total - self.trainable

    def to_dict(self) -> dict:
        return {"title": self.title, "layers": self.rows, "total": self.total,
                "trainable": self.trainable, "non_trainable": self.non_trainable,
                "cut_layers": self.stages}


def summarize(net: nn.Module, pre: Preprocessing, title: str, trainable: int,
              depth: int = 2) -> Summary:
    """The layer table of `net` (a ClassifierNet: backbone and head) to `depth` levels of nesting,
    with output shapes from one forward pass of a zero image through Lightning's ModelSummary;
    `trainable` is what its strategy trains (after any warm-up), which `net` itself cannot tell."""
    import torch
    from lightning.pytorch.utilities.model_summary import ModelSummary

    with torch.no_grad():
        summary = ModelSummary(_summarised(net, pre), max_depth=depth + 1)
    rows = [{"name": name.removeprefix("net."), "type": kind, "output_shape": shape,
             "parameters": int(count)}
            for name, kind, shape, count in zip(summary.layer_names, summary.layer_types,
                                                summary.out_sizes, summary.param_nums)
            if name.startswith("net.")]
    return Summary(title, rows, count_parameters(net), trainable, feature_stages(net.backbone))


def _summarised(net: nn.Module, pre: Preprocessing):
    """ModelSummary reads a LightningModule: `net` wrapped in one, with an example input."""
    import lightning as L
    import torch

    class Wrapper(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.example_input_array = torch.zeros((1, *pre.input_size))

        def forward(self, images):
            return self.net(images)

    return Wrapper()
