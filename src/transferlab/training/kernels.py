"""Layers that bf16 training computes in fp32 on the CPU, because oneDNN's bf16 kernels for them
are slower than its fp32 ones.

Depthwise convolutions with a 5x5 window or a stride of 2 (EfficientNet's and MobileNet's) took
most of a fine-tuning step: forward and backward of one such layer on a batch of 32, in ms, bf16
against fp32, channels_last, on the 2-core AMD EPYC with AVX-512 BF16: 144 channels 56 px 5x5
stride 2, 197 against 53; 672 channels 14 px 5x5, 61 against 26; 96 channels 112 px 3x3 stride 2,
167 against 124. A 3x3 stride-1 one is faster in bf16 (29 against 64) and stays there.
"""

from __future__ import annotations

import contextlib

import torch


class Float32DepthwiseConv2d(torch.nn.Conv2d):
    """A depthwise convolution computed in fp32 inside a bf16 autocast region (the same parameters
    and state_dict as the Conv2d it stands in for)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def slower_in_bf16(layer: torch.nn.Module) -> bool:
    """A plain depthwise Conv2d with a 5x5 (or larger) window or a stride over 1."""
    return (type(layer) is torch.nn.Conv2d and layer.groups > 1
            and layer.groups == layer.in_channels == layer.out_channels
            and (max(layer.kernel_size) >= 5 or max(layer.stride) > 1))


@contextlib.contextmanager
def fp32_where_bf16_is_slower(module: torch.nn.Module, precision: str, accelerator: str):
    """While training `module` in bf16 on the CPU, its slower_in_bf16 layers compute in fp32;
    afterwards they are plain Conv2d again (inference keeps bf16's faster forward)."""
    layers = ([layer for layer in module.modules() if slower_in_bf16(layer)]
              if precision == "bf16" and accelerator == "cpu" else [])
    for layer in layers:
        layer.__class__ = Float32DepthwiseConv2d
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__class__ = torch.nn.Conv2d
