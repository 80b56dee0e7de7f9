"""Backends: how a saved bundle becomes a Predictor, by the engine that runs it (torch on any device,
or its ONNX export in onnxruntime). `load_model(folder, backend=NAME)` picks one from BACKENDS."""

from __future__ import annotations

from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import BundleError
from ..options import check
from ..models.network import WithFeatures
from .bundle import (OPENVINO_FILE, BundleConfig, checked_export, load_network, load_trust,
                     read_config)
from .engines import Engine, OnnxEngine, OpenVinoEngine, TorchEngine
from .predictor import Predictor


def _torch_engine(folder: Path, device: torch.device) -> tuple[Engine, BundleConfig]:
    net, config = load_network(folder)
    module = WithFeatures(net) if config.trust.get("novelty") else net
    return TorchEngine(module, config.preprocessing, device), config


def _onnx_engine(folder: Path, device: torch.device) -> tuple[Engine, BundleConfig]:
    path = checked_export(folder)
    config = read_config(folder)
    engine = OnnxEngine(path, config.preprocessing, device)
    if config.trust.get("novelty") and not engine.has_features:
        raise BundleError(f"{path} was exported before the bundle scored novelty: export it again "
                          f"with `transferlab export {folder}`")
    return engine, config


def _openvino_engine(folder: Path, device: torch.device) -> tuple[Engine, BundleConfig]:
    path = checked_export(folder, OPENVINO_FILE)
    config = read_config(folder)
    engine = OpenVinoEngine(path, config.preprocessing, device)
    if config.trust.get("novelty") and not engine.has_features:
        raise BundleError(f"{path} has no features output: export it again with "
                          f"`transferlab export {folder} --format openvino`")
    return engine, config


# How each backend runs a bundle; `load_model(backend=NAME)`.
BACKENDS = {"torch": _torch_engine, "onnx": _onnx_engine, "openvino": _openvino_engine}


def load_model(folder: str | Path, backend: str = "torch", device: str = "auto") -> Predictor:
    """A Predictor for the bundle in `folder`: the torch network, or (backend="onnx") its exported
    model.onnx in onnxruntime (see `transferlab export`), on `device` (auto: a GPU when there is
    one). Every backend predicts through the same decoding, batching and softmax."""
    check({"backend": backend, "device": device}, {"backend": BACKENDS})
    folder = Path(folder)
    engine, config = BACKENDS[backend](folder, resolve_device(device))
    return Predictor(engine, config.classes, config.preprocessing, config=config,
                     trust=load_trust(folder, config))

