"""`transferlab summary`: the layers, output shapes and parameter counts of a bundle, or of the
network a strategy would train on a backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import app, given, out
from .flags import flag


@app.command()
def summary(target: str = typer.Argument(..., help="A model bundle folder or a backbone name."),
            strategy: str = flag("strategy", default="finetune", help="For a backbone: the strategy "
                                 "whose trainable parameters to count."),
            classes: int = flag("classes", default=2),
            cut_layer: Optional[str] = flag("cut_layer", help="For a backbone: cut it here."),
            unfreeze: Optional[str] = flag("unfreeze", help="For finetune: top blocks to train."),
            depth: int = flag("depth", default=2),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Layers, output shapes and total / trainable / non-trainable parameters."""
    from ..options import check

    check({"classes": classes, "depth": depth})
    if Path(target).is_dir():
        result = _of_bundle(Path(target), depth)
    else:
        result = _of_strategy(target, strategy, classes, depth, given(cut_layer=cut_layer,
                                                                      unfreeze=unfreeze))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=escape(result.title))
    for column in ("layer", "type", "output shape", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for row in result.rows:
        table.add_row(escape(row["name"]), row["type"], escape(str(row["output_shape"])),
                      f"{row['parameters']:,}")
    out.print(table)
    out.print(f"total parameters: {result.total:,}\ntrainable parameters: {result.trainable:,}\n"
              f"non-trainable parameters: {result.non_trainable:,}")
    if result.stages:
        out.print("cut layers (--cut-layer): " + ", ".join(
            f"{s['index']}={s['module']} ({s['channels']} ch, /{s['stride']})" for s in result.stages))


def _of_bundle(folder: Path, depth: int):
    """A saved bundle: its trainable count is what its run trained."""
    from ..inference.bundle import load_network
    from ..models.summary import summarize

    net, config = load_network(folder)
    trainable = int(config.training.get("params", {}).get("trainable", 0))
    title = f"{folder}: {config.backbone}, {len(config.classes)} classes"
    return summarize(net, config.preprocessing, title, trainable, depth)


def _of_strategy(backbone: str, strategy: str, classes: int, depth: int, options: dict):
    """The network `strategy` would build on `backbone` (random weights: nothing is downloaded), with
    the parameters it would train, counted after any fine-tuning warm-up."""
    from ..models.summary import summarize
    from ..training.strategies import configure

    chosen, config = configure(strategy, {"backbone": backbone, "weights": "none", **options})
    net, _, pre, trainable = chosen.network(config, classes)
    return summarize(net, pre, f"{backbone} as {strategy}, {classes} classes", trainable, depth)
