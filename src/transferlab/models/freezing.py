"""Which parts of a backbone train: blocks, freezing, and the BatchNorm policy of fine-tuning.

Blocks come from timm's own layer grouping (`group_matcher`, the one its layer-wise learning-rate
decay uses), bottom to top, so "the top N blocks" means the same thing for every timm model. Models
outside timm fall back to their top-level children.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError


def blocks(backbone: nn.Module) -> list[list[str]]:
    """Parameter names grouped into blocks, bottom (stem) to top."""
    from ..models.backbones import CutBackbone

    model, prefix = backbone, ""
    if isinstance(backbone, CutBackbone):
        model, prefix = backbone.model, "model."
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=False))
        return [[prefix + name for name in names] for _, names in sorted(groups.items())]
    grouped = [[f"{child}.{name}" for name, _ in module.named_parameters()]
               for child, module in backbone.named_children()]
    return [group for group in grouped if group]


def select_blocks(backbone: nn.Module, unfreeze: int | str = "all",
                  unfreeze_from: str | None = None) -> list[str]:
    """Names of the parameters of the top `unfreeze` blocks ("all": every block), or of every block
    from the one holding `unfreeze_from` (a parameter or module name prefix, such as "blocks.5")."""
    groups = blocks(backbone)
    if unfreeze_from is not None:
        for start, names in enumerate(groups):
            if any(name == unfreeze_from or name.startswith(unfreeze_from + ".") for name in names):
                return [name for names in groups[start:] for name in names]
        first = ", ".join(names[0].rsplit(".", 1)[0] for names in groups[:4])
        raise ConfigError(f"unfreeze_from={unfreeze_from!r}: no such layer in the backbone; layers "
                          f"start {first}, ... (see `transferlab summary`)")
    if unfreeze == "all":
        return [name for names in groups for name in names]
    count = int(unfreeze)
    if not 0 <= count <= len(groups):
        raise ConfigError(f"unfreeze={unfreeze!r}: this backbone has {len(groups)} blocks; use 0 to "
                          f"{len(groups)} or 'all'")
    return [name for names in groups[len(groups) - count:] for name in names]


def batchnorm_parameter_names(backbone: nn.Module) -> set[str]:
    return {f"{module_name}.{name}" if module_name else name
            for module_name, module in backbone.named_modules() if isinstance(module, _BatchNorm)
            for name, _ in module.named_parameters(recurse=False)}


def set_trainable(module: nn.Module, names: set[str] | None, trainable: bool) -> None:
    """requires_grad for the named parameters of `module` (all of them when names is None)."""
    for name, parameter in module.named_parameters():
        if names is None or name in names:
            parameter.requires_grad_(trainable)


def keep_inference_mode(backbone: nn.Module, freeze_batchnorm: bool) -> None:
    """After `.train()`: a fully frozen backbone runs in eval mode (no dropout, no statistics), and with
    `freeze_batchnorm` every BatchNorm keeps using, and never updates, its running statistics."""
    if not any(p.requires_grad for p in backbone.parameters()):
        backbone.eval()
    elif freeze_batchnorm:
        for module in backbone.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
