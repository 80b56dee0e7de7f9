"""Backends: how a saved bundle becomes a Predictor, by the engine that runs it (torch on any device,
its ONNX exports in onnxruntime, its OpenVINO exports, or its LiteRT one). `load_model(folder,
backend=NAME)` picks one from BACKENDS."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.cache import default_cache_dir
from ..devices import resolve_device
from ..errors import BundleError, ConfigError
from ..models.network import WithFeatures
from ..options import check
from .bundle import (EXPORT_OPTIONS, INT8_FILE, ONNX_FILE, OPENVINO_FILE, OPENVINO_INT8_FILE,
                     TFLITE_FILE, BundleConfig, checked_export, load_network, load_trust, read_config)
from .engines import Engine, OnnxEngine, OpenVinoEngine, OpenVinoInt8Engine, TfliteEngine
from .graphs import ENGINES, FEATURES, LOGITS, GraphSpec, compile_engine
from .predictor import Predictor


def _torch_engine(folder: Path, device: torch.device, engine: str = "auto",
                  precision: str = "auto", cache_dir: Path | None = None,
                  images: float = 0) -> tuple[Engine, BundleConfig]:
    """The bundle's network run by `engine` (graphs.compile_engine: torch, or its compiled graph,
    checked against torch fp32 on the first batch it is given)."""
    net, config = load_network(folder)
    outputs = (LOGITS, FEATURES) if config.trust.get("novelty") else (LOGITS,)
    module = WithFeatures(net) if config.trust.get("novelty") else net
    found = compile_engine(GraphSpec(module, config.preprocessing, outputs), engine, device=device,
                           precision=precision, cache_dir=cache_dir, images=images)
    return found, config


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


def load_model(folder: str | Path, backend: str = "torch", device: str = "auto",
               engine: str = "auto", *, precision: str = "auto",
               cache_dir: str | Path | None = "default", images: float = 0) -> Predictor:
    """A Predictor for the bundle in `folder`: the torch network, its exported model.onnx in
    onnxruntime (backend="onnx"; "onnx-int8": model.int8.onnx), model.xml in OpenVINO
    (backend="openvino"; "openvino-int8": model.int8.xml) or model.tflite in LiteRT
    (backend="tflite"; see `transferlab export`), on `device` (auto: a GPU when there is one).
    Every backend predicts through the same decoding, batching, temperature, softmax and novelty.

    With backend="torch", `engine` says what runs the network (inference.graphs): torch, or its
    graph compiled for onnx or openvino in `precision`, cached in `cache_dir` ("default": the one
    train uses; None: built for this process only); auto builds a graph that is not cached only
    for `images` (the images the caller expects to run) of graphs.AUTO_BUILD_IMAGES or more."""
    check({"backend": backend, "device": device, "engine": engine, "precision": precision},
          {"backend": BACKENDS, "engine": ENGINES})
    if backend != "torch" and engine != "auto":
        raise ConfigError(f"engine={engine!r}: chooses what runs the bundle's torch network; "
                          f"backend={backend!r} runs its export file as it was exported; drop "
                          "--engine or use --backend torch")
    folder = Path(folder)
    if backend == "torch":
        cache = default_cache_dir() if cache_dir == "default" else cache_dir
        found, config = _torch_engine(folder, resolve_device(device), engine, precision,
                                      Path(cache) if cache else None, images)
    else:
        found, config = BACKENDS[backend](folder, resolve_device(device))
    return Predictor(found, config.classes, config.preprocessing, config=config,
                     trust=load_trust(folder, config))
