"""Which parts of a backbone train: blocks, freezing, and the BatchNorm policy of fine-tuning.

Blocks come from timm's own layer grouping (`group_matcher`, the one its layer-wise learning-rate
decay uses), bottom to top, so "the top N blocks" means the same thing for every timm model. Models
outside timm fall back to their top-level children.
"""

from __future__ import annotations

import contextlib
import types

import torch
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


@contextlib.contextmanager
def batchnorm_as_affine(backbone: nn.Module):
    """Inside, every BatchNorm of `backbone` in inference mode runs as the fixed per-channel map it
    is, x * scale + shift: one multiply-add in the activation's own dtype, whose backward is one
    multiply. Under bf16 autocast on the CPU, torch's batch_norm backward over bf16 channels_last
    activations took a fifth of a fine-tuning step. The graph recorded inside keeps the affine ops
    for the backward pass after the block; the modules are unchanged outside (state_dict, export)."""
    frozen = [module for module in backbone.modules()
              if isinstance(module, _BatchNorm) and not module.training and module.affine
              and module.running_var is not None]
    for module in frozen:
        module.forward = types.MethodType(_affine_forward, module)
    try:
        yield
    finally:
        for module in frozen:
            del module.forward  # back to the class's forward


def _affine_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    scale = self.weight * (self.running_var + self.eps).rsqrt()
    shift = self.bias - self.running_mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x = torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))
    # timm's BatchNormAct2d applies its dropout and activation after the normalisation
    return self.act(self.drop(x)) if hasattr(self, "act") else x
