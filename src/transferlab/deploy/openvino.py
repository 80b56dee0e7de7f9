"""`transferlab export --format openvino`: the bundle's network as OpenVINO IR (model.xml and its
weights, model.bin), converted from the same ONNX graph `--format onnx` writes, kept in fp32 and
checked against torch like the ONNX export before it is kept. With `--quantize int8`, NNCF's
post-training quantisation calibrated on the run's validation images (model.int8.xml and .bin).
openvino is installed with transferlab on x86-64; nncf (for int8), and openvino elsewhere, come
with the extra `pip install 'transferlab[openvino]'`."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..data.decode import sha256_of
from ..data.transforms import Preprocessing, normalize
from ..devices import resolve_device
from ..errors import ConfigError
from ..inference.batches import run_batches
from ..inference.bundle import BundleConfig, load_network, load_trust, record_export
from ..inference.engines import OpenVinoEngine, OpenVinoInt8Engine
from ..options import check
from .export import (DEFAULT_OPSET, INPUT_NAME, ExportResult, _export_graph, check_export_target,
                     export_name, measure_parity, require_fp32_parity)

CALIBRATION_IMAGES = 300  # NNCF's default subset size; taken evenly along the validation split


def export_openvino(model_dir: str | Path, out: str | Path | None = None, *,
                    quantize: str | None = None, images: Sequence[str | Path] | None = None,
                    labels: Sequence[int] | None = None, opset: int = DEFAULT_OPSET,
                    batch_size: int = 32, workers: int | None = None,
                    device: str = "auto") -> ExportResult:
    """Write MODEL_DIR/model.xml and model.bin (or `out` and the .bin beside it), check them
    against the torch network in fp32 (probabilities within 1e-4, or nothing is written; see
    export.export_onnx for `images` and `labels`) and record them in config.json.

    quantize="int8" writes model.int8.xml and .bin instead, quantised by NNCF with `images` (up to
    300 of them) as calibration data; its parity numbers are reported, not judged."""
    check({"quantize": quantize, "batch_size": batch_size, "workers": workers, "opset": opset})
    openvino = _import("openvino", "--format openvino")
    nncf = _import("nncf", "--format openvino --quantize int8") if quantize else None
    if quantize and not images:
        raise ConfigError(f"{model_dir}: --format openvino --quantize int8 calibrates on the run's "
                          "validation images, and this is not the model/ folder of a run whose data "
                          "is in place; export a run's model, or use --format onnx --quantize int8")
    out = check_export_target(model_dir, out, quantize, "openvino")
    net, config = load_network(model_dir)
    engine_class = OpenVinoInt8Engine if quantize else OpenVinoEngine
    with tempfile.TemporaryDirectory(prefix="transferlab-openvino-", dir=out.parent) as scratch:
        graph, staged = Path(scratch) / "model.onnx", Path(scratch) / out.name
        _export_graph(net, config, graph, opset)
        model = openvino.convert_model(graph)
        calibration = None
        if quantize:
            samples = calibration_images(images, config.preprocessing, batch_size, workers)
            # NNCF draws progress bars on stdout, where `export` and scripts print their results
            with contextlib.redirect_stdout(sys.stderr):
                model = nncf.quantize(model, nncf.Dataset(samples, _normalizer(config.preprocessing)),
                                      subset_size=len(samples))
            calibration = {"source": "validation images of the run", "images": len(samples)}
        # fp32 weights: save_model halves them by default, which the 1e-4 check would refuse
        openvino.save_model(model, staged, compress_to_fp16=False)
        parity = measure_parity(net, engine_class(staged, config.preprocessing), config, images,
                                labels, batch_size=batch_size, workers=workers,
                                device=resolve_device(device), trust=load_trust(model_dir, config),
                                export_format="openvino")
        if quantize:
            parity["tolerance"] = None  # int8 always differs: reported, not judged
        else:
            require_fp32_parity(parity, out, "OpenVINO", "keep using the torch or onnx backend")
        weights = out.with_suffix(".bin")
        os.replace(staged.with_suffix(".bin"), weights)  # the weights first: model.xml names them
        os.replace(staged, out)
    result = ExportResult(out, opset, quantize, sha256_of(out), parity)
    versions = {"openvino": openvino.__version__, **({"nncf": nncf.__version__} if nncf else {})}
    _record(Path(model_dir), out, weights, config, result, versions, calibration)
    return result


def _import(package: str, use: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"{use} needs the {package} package: pip install "
                          "'transferlab[openvino]'") from None


def calibration_images(images: Sequence[str | Path], pre: Preprocessing, batch_size: int = 32,
                       workers: int | None = None) -> list:
    """Up to CALIBRATION_IMAGES of `images`, evenly along them (every class of a split), as uint8
    CHW tensors decoded, resized and cropped by the Predictor's loader; unreadable ones left out."""
    if len(images) > CALIBRATION_IMAGES:
        images = images[::math.ceil(len(images) / CALIBRATION_IMAGES)]
    samples = []
    for _, batch, errors in run_batches(lambda batch, _: batch, [Path(p) for p in images], pre,
                                        precision="32", batch_size=batch_size, workers=workers):
        samples += [image for image, error in zip(batch, errors) if not error]
    if not samples:
        raise ConfigError(f"none of the {len(images)} calibration images could be read "
                          f"(first: {images[0]})")
    return samples


def _normalizer(pre: Preprocessing):
    """One uint8 CHW image -> the float32 batch of one the network takes, normalised as every
    engine normalises (single-image batches: NNCF's statistics are per sample)."""
    return lambda image: normalize(image[None], pre, channels_last=False).numpy()


def _record(model_dir: Path, out: Path, weights: Path, config: BundleConfig, result: ExportResult,
            versions: dict, calibration: dict | None) -> None:
    record_export(model_dir, export_name(model_dir, out), {
        "format": "openvino", "sha256": result.sha256, "bin_sha256": sha256_of(weights),
        "weights_sha256": config.weights_sha256, "precision": result.quantization or "fp32",
        **({"calibration": calibration} if calibration else {}),
        "input": {"name": INPUT_NAME, "shape": ["batch", *config.preprocessing.input_size],
                  "dtype": "float32"},
        "outputs": ["logits", "features"], "parity": result.parity,
        "versions": {"torch": torch.__version__, **versions}})
