"""`transferlab export --format openvino`: the bundle's network as OpenVINO IR (model.xml and its
weights, model.bin), converted from the same ONNX graph `--format onnx` writes, kept in fp32 and
checked against torch like the ONNX export before it is kept. The openvino package is an optional
extra (`pip install 'transferlab[openvino]'`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..data.decode import sha256_of
from ..devices import resolve_device
from ..errors import ConfigError
from ..inference.bundle import BundleConfig, load_network, load_trust, record_export
from ..inference.engines import OpenVinoEngine
from ..options import check
from .export import (DEFAULT_OPSET, INPUT_NAME, ExportResult, _export_graph, check_export_target,
                     export_name, measure_parity, require_fp32_parity)


def export_openvino(model_dir: str | Path, out: str | Path | None = None, *,
                    quantize: str | None = None, images: Sequence[str | Path] | None = None,
                    labels: Sequence[int] | None = None, opset: int = DEFAULT_OPSET,
                    batch_size: int = 32, workers: int | None = None,
                    device: str = "auto") -> ExportResult:
    """Write MODEL_DIR/model.xml and model.bin (or `out` and the .bin beside it), check them
    against the torch network in fp32 (probabilities within 1e-4, or nothing is written; see
    export.export_onnx for `images` and `labels`) and record them in config.json."""
    try:
        import openvino
    except ImportError:
        raise ConfigError("--format openvino needs the openvino package: pip install "
                          "'transferlab[openvino]'") from None
    if quantize:
        raise ConfigError("--quantize int8 applies to --format onnx for now; drop --quantize")
    check({"batch_size": batch_size, "workers": workers, "opset": opset})
    out = check_export_target(model_dir, out, None, "openvino")
    net, config = load_network(model_dir)
    with tempfile.TemporaryDirectory(prefix="transferlab-openvino-", dir=out.parent) as scratch:
        graph, staged = Path(scratch) / "model.onnx", Path(scratch) / out.name
        _export_graph(net, config, graph, opset)
        # fp32 weights: save_model halves them by default, which the 1e-4 check would refuse
        openvino.save_model(openvino.convert_model(graph), staged, compress_to_fp16=False)
        parity = measure_parity(net, OpenVinoEngine(staged, config.preprocessing), config, images,
                                labels, batch_size=batch_size, workers=workers,
                                device=resolve_device(device), trust=load_trust(model_dir, config),
                                export_format="openvino")
        require_fp32_parity(parity, out, "OpenVINO", "keep using the torch or onnx backend")
        weights = out.with_suffix(".bin")
        os.replace(staged.with_suffix(".bin"), weights)  # the weights first: model.xml names them
        os.replace(staged, out)
    result = ExportResult(out, opset, None, sha256_of(out), parity)
    _record(Path(model_dir), out, weights, config, result, openvino.__version__)
    return result


def _record(model_dir: Path, out: Path, weights: Path, config: BundleConfig, result: ExportResult,
            version: str) -> None:
    record_export(model_dir, export_name(model_dir, out), {
        "format": "openvino", "sha256": result.sha256, "bin_sha256": sha256_of(weights),
        "weights_sha256": config.weights_sha256, "precision": "fp32",
        "input": {"name": INPUT_NAME, "shape": ["batch", *config.preprocessing.input_size],
                  "dtype": "float32"},
        "outputs": ["logits", "features"], "parity": result.parity,
        "versions": {"torch": torch.__version__, "openvino": version}})
