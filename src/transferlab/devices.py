"""Where a network runs and in which precision: one resolution for every command.

`--device auto|cpu|cuda|cuda:N|mps` names the device; `auto` takes a CUDA GPU when there is one,
then Apple's MPS, else the CPU. `--precision auto|bf16|16|32` names the arithmetic; `auto` is bf16
autocast on CPUs with native bf16 (AVX512-BF16 or AMX, where it runs about twice as fast as fp32) and
on GPUs that support it, fp16 on other GPUs, and fp32 everywhere else. torch is imported inside the
functions, so that the command line's --help does not load it.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
# Lightning's names are accepted too, so that `--precision bf16-mixed` means what it means there.
PRECISIONS = {"auto": "auto", "bf16": "bf16", "bf16-mixed": "bf16", "16": "16", "16-mixed": "16",
              "fp16": "16", "32": "32", "32-true": "32", "fp32": "32"}


def resolve_device(name: str = "auto") -> "torch.device":
    """The torch device for a --device value; one clear error when it is not on this machine."""
    import torch

    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ConfigError("device='mps': Apple's MPS is not available on this machine; use "
                              "--device cpu or auto")
        return torch.device("mps")
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device={name!r}: use {', '.join(DEVICES)} (such as cuda:1)")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: no CUDA GPU is available on this machine (torch "
                          f"{torch.__version__}); use --device cpu or auto")
    if not index:
        return torch.device("cuda")
    if int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", int(index))


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 autocast is about twice as fast as fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: "torch.device | str" = "cpu") -> str:
    """'auto', a precision or one of Lightning's names -> 'bf16', '16' or '32' for `device`."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: use auto, bf16, 16 or 32 (Lightning's "
                          "bf16-mixed, 16-mixed and 32-true are accepted too)")
    kind = torch.device(device).type
    resolved = PRECISIONS[precision]
    if resolved == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "16"
        if kind == "mps":
            return "16"
        return "bf16" if cpu_has_native_bf16() else "32"
    if resolved == "16" and kind == "cpu":
        raise ConfigError("precision='16': fp16 autocast is for GPUs; on the CPU use bf16 or 32")
    return resolved


def autocast(device: "torch.device | str", precision: str):
    """The autocast context of a resolved precision on `device` (nothing for fp32)."""
    import torch

    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def lightning_precision(precision: str) -> str:
    """A resolved precision as Lightning's Trainer names it."""
    return {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true"}[precision]


def lightning_accelerator(device: "torch.device") -> tuple[str, list[int] | None]:
    """Lightning's accelerator for a resolved device, and the device index list when one was named."""
    if device.type == "cuda":
        return "gpu", [device.index] if device.index is not None else None
    return device.type, None
