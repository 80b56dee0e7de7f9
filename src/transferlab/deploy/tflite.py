"""`transferlab export --format tflite`: the bundle's network as a LiteRT (TensorFlow Lite)
flatbuffer, model.tflite, converted from the torch network by litert-torch, kept in fp32 and checked against
torch like the ONNX export before it is kept. litert-torch (the converter) and ai-edge-litert (the
interpreter) are an optional extra (`pip install 'transferlab[tflite]'`).

The file takes what the ONNX graph takes, a float32 NCHW batch named "images" (the converter keeps
torch's layout), and gives "logits" and "features"; it is converted for batch 1 and the engine
resizes the input to each batch (inference.engines.TfliteEngine).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ..data.decode import sha256_of
from ..devices import resolve_device
from ..errors import ConfigError, ExportError
from ..inference.bundle import BundleConfig, load_network, load_trust, record_export
from ..inference.engines import TfliteEngine
from ..models.network import WithFeatures
from ..options import check
from ..rundir.atomic import atomic_path
from .export import (FEATURES_NAME, INPUT_NAME, OUTPUT_NAME, ExportResult, check_export_target,
                     export_name, measure_parity, require_fp32_parity)

INSTALL = "pip install 'transferlab[tflite]'"


def export_tflite(model_dir: str | Path, out: str | Path | None = None, *,
                  quantize: str | None = None, images: Sequence[str | Path] | None = None,
                  labels: Sequence[int] | None = None, opset: int | None = None,
                  batch_size: int = 32, workers: int | None = None,
                  device: str = "auto") -> ExportResult:
    """Write MODEL_DIR/model.tflite (or `out`), check it against the torch network in fp32
    (probabilities within 1e-4, or nothing is written; see export.export_onnx for `images` and
    `labels`) and record it in config.json. `opset` is ONNX's: no ONNX graph is involved here."""
    try:
        import litert_torch
    except ImportError:
        raise ConfigError(f"--format tflite needs the litert-torch package: {INSTALL}") from None
    if quantize:
        raise ConfigError("--quantize int8 applies to --format onnx for now; drop --quantize")
    if opset is not None:
        raise ConfigError("--opset applies to --format onnx and openvino (ONNX graphs); drop it "
                          "for --format tflite")
    check({"batch_size": batch_size, "workers": workers})
    model_dir = Path(model_dir)
    out = check_export_target(model_dir, out, None, "tflite")
    net, config = load_network(model_dir)
    with atomic_path(out) as staged:  # renamed onto `out` only if the check below passes
        _convert(litert_torch, net, config, staged)
        parity = measure_parity(net, TfliteEngine(staged, config.preprocessing), config, images,
                                labels, batch_size=batch_size, workers=workers,
                                device=resolve_device(device), trust=load_trust(model_dir, config),
                                export_format="tflite")
        require_fp32_parity(parity, out, "LiteRT", "keep using the torch or onnx backend")
        digest = sha256_of(staged)
    result = ExportResult(out, None, None, digest, parity)
    _record(model_dir, out, config, result, litert_torch.__version__)
    return result


class _Named(torch.nn.Module):
    """The network WithFeatures, its outputs returned by name: the converter names a signature's
    outputs by a dict's keys (a tuple's would be output_0, output_1)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = WithFeatures(net)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, features = self.net(images)
        return {OUTPUT_NAME: logits, FEATURES_NAME: features}


def _convert(litert_torch, net: torch.nn.Module, config: BundleConfig, path: Path) -> None:
    """Convert for batch 1: with a dynamic batch (torch.export.Dim) litert-torch 0.10 fails while
    lowering EfficientNet's shapes; the interpreter resizes the input instead."""
    example = {INPUT_NAME: torch.zeros(1, *config.preprocessing.input_size)}
    try:
        with _quiet_converter():
            litert_torch.convert(_Named(net).eval(), sample_kwargs=example).export(str(path))
    except Exception as error:  # noqa: BLE001 - the converter raises many types, all fatal here
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(f"litert-torch could not convert backbone {config.backbone!r} "
                          f"({type(error).__name__}: {first_line}); use --format onnx") from None


@contextmanager
def _quiet_converter() -> Iterator[None]:
    """Without litert-torch's progress lines (on stdout, among the command's own) until it ends."""
    key = "LITERT_TORCH_SHOW_PROGRESS"  # read by litert_torch._config on every conversion
    previous = os.environ.get(key)
    os.environ[key] = "n"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def _record(model_dir: Path, out: Path, config: BundleConfig, result: ExportResult,
            version: str) -> None:
    from ai_edge_litert import __version__ as litert_version

    record_export(model_dir, export_name(model_dir, out), {
        "format": "tflite", "sha256": result.sha256, "weights_sha256": config.weights_sha256,
        "precision": "fp32",
        "input": {"name": INPUT_NAME, "shape": ["batch", *config.preprocessing.input_size],
                  "dtype": "float32", "converted_batch": 1},
        "outputs": [OUTPUT_NAME, FEATURES_NAME], "parity": result.parity,
        "versions": {"torch": torch.__version__, "litert-torch": version,
                     "ai-edge-litert": litert_version}})
