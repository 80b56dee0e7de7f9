"""Backends: how a saved bundle becomes a Predictor, by the engine that runs it (torch on any device,
its ONNX exports in onnxruntime, its OpenVINO exports, or its LiteRT one). `load_model(folder,
backend=NAME)` picks one from BACKENDS."""

from __future__ import annotations

from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import BundleError
from ..models.network import WithFeatures
from ..options import check
from .bundle import (EXPORT_OPTIONS, INT8_FILE, ONNX_FILE, OPENVINO_FILE, OPENVINO_INT8_FILE,
                     TFLITE_FILE, BundleConfig, checked_export, load_network, load_trust, read_config)
from .engines import (Engine, OnnxEngine, OpenVinoEngine, OpenVinoInt8Engine, TfliteEngine,
                      TorchEngine)
from .predictor import Predictor


def _torch_engine(folder: Path, device: torch.device) -> tuple[Engine, BundleConfig]:
    net, config = load_network(folder)
    module = WithFeatures(net) if config.trust.get("novelty") else net
    return TorchEngine(module, config.preprocessing, device), config


def _exported(file: str, engine_class):
    """A backend that runs the export `file` of a bundle (made by `transferlab export`, with the
    options bundle.EXPORT_OPTIONS names) with `engine_class`."""

    def engine(folder: Path, device: torch.device) -> tuple[Engine, BundleConfig]:
        path = checked_export(folder, file)
        config = read_config(folder)
        found = engine_class(path, config.preprocessing, device)
        if config.trust.get("novelty") and not found.has_features:
            raise BundleError(f"{path} was exported before the bundle scored novelty: export it "
                              f"again with `transferlab export {folder}{EXPORT_OPTIONS[file]}`")
        return found, config

    return engine


# How each backend runs a bundle; `load_model(backend=NAME)`.
BACKENDS = {"torch": _torch_engine, "onnx": _exported(ONNX_FILE, OnnxEngine),
            "onnx-int8": _exported(INT8_FILE, OnnxEngine),
            "openvino": _exported(OPENVINO_FILE, OpenVinoEngine),
            "openvino-int8": _exported(OPENVINO_INT8_FILE, OpenVinoInt8Engine),
            "tflite": _exported(TFLITE_FILE, TfliteEngine)}


def load_model(folder: str | Path, backend: str = "torch", device: str = "auto") -> Predictor:
    """A Predictor for the bundle in `folder`: the torch network, its exported model.onnx in
    onnxruntime (backend="onnx"; "onnx-int8": model.int8.onnx), model.xml in OpenVINO
    (backend="openvino"; "openvino-int8": model.int8.xml) or model.tflite in LiteRT
    (backend="tflite"; see `transferlab export`), on `device` (auto: a GPU when there is one).
    Every backend predicts through the same decoding, batching, temperature, softmax and novelty."""
    check({"backend": backend, "device": device}, {"backend": BACKENDS})
    folder = Path(folder)
    engine, config = BACKENDS[backend](folder, resolve_device(device))
    return Predictor(engine, config.classes, config.preprocessing, config=config,
                     trust=load_trust(folder, config))

