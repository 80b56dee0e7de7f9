"""Backends: how a saved bundle becomes a Predictor, by the engine that runs it (torch on any device,
or its ONNX export in onnxruntime). `load_model(folder, backend=NAME)` picks one from BACKENDS."""

from __future__ import annotations

from pathlib import Path

import torch

from ..devices import resolve_device
from ..options import check
from .bundle import BundleConfig, checked_export, load_network, read_config
from .engines import Engine, OnnxEngine, TorchEngine
from .predictor import Predictor


def _torch_engine(folder: Path, device: torch.device) -> tuple[Engine, BundleConfig]:
    net, config = load_network(folder)
    return TorchEngine(net, config.preprocessing, device), config


def _onnx_engine(folder: Path, device: torch.device) -> tuple[Engine, BundleConfig]:
    path = checked_export(folder)
    config = read_config(folder)
    return OnnxEngine(path, config.preprocessing, device), config


# How each backend runs a bundle; `load_model(backend=NAME)`.
BACKENDS = {"torch": _torch_engine, "onnx": _onnx_engine}


def load_model(folder: str | Path, backend: str = "torch", device: str = "auto") -> Predictor:
    """A Predictor for the bundle in `folder`: the torch network, or (backend="onnx") its exported
    model.onnx in onnxruntime (see `transferlab export`), on `device` (auto: a GPU when there is
    one). Every backend predicts through the same decoding, batching and softmax."""
    check({"backend": backend, "device": device}, {"backend": BACKENDS})
    engine, config = BACKENDS[backend](Path(folder), resolve_device(device))
    return Predictor(engine, config.classes, config.preprocessing, config=config)

