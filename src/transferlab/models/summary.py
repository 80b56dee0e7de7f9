"""`transferlab summary`: a layer table with output shapes and parameter counts, like Keras's
model.summary(), for a saved bundle or for the network a strategy would train on a backbone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models.backbones import count_parameters, feature_stages


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


def summarize(target: str, depth: int = 2, strategy: str = "finetune", num_classes: int = 2,
              **options) -> Summary:
    """`target` is a bundle folder or a backbone name; for a name, the network is built as `strategy`
    would build it (random weights: nothing is downloaded) and its trainable parameters are those the
    strategy trains, counted after any fine-tuning warm-up; for a bundle, those its run trained."""
    import torch
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from ..inference.bundle import load_network
    from ..training.module import ClassifierModule, Optimization
    from ..training.recipes import build_network, plan
    from ..workflows.train import TrainConfig
    from ..data.transforms import Preprocessing

    if Path(target).is_dir():
        net, config = load_network(target)
        pre = Preprocessing.from_dict(config["preprocessing"])
        title = f"{target}: {config['backbone']}, {len(config['classes'])} classes"
        trainable = int(config.get("training", {}).get("params", {}).get("trainable", 0))
    else:
        config = TrainConfig(strategy="head" if strategy == "extract" else strategy, backbone=target,
                             weights="none", **options).resolved()
        net, _, pre = build_network(config, num_classes)
        trainable = plan(config.strategy, net, config).trainable
        title = f"{target} as {config.strategy}, {num_classes} classes"
    module = ClassifierModule(net, pre, [], Optimization(), num_classes=max(2, net.head[-1].out_features))
    with torch.no_grad():
        summary = ModelSummary(module, max_depth=depth + 1)
    rows = [{"name": name.removeprefix("net."), "type": kind, "output_shape": shape,
             "parameters": int(count)}
            for name, kind, shape, count in zip(summary.layer_names, summary.layer_types,
                                                summary.out_sizes, summary.param_nums)
            if name.startswith("net.")]
    return Summary(title, rows, count_parameters(net), trainable, feature_stages(net.backbone))
