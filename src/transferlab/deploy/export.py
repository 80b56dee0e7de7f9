"""ONNX export of a bundle's whole network, checked against torch before the file is kept (the
engine that runs it is inference.engines.OnnxEngine).

The exported graph takes what the torch network takes: a float32 NCHW batch, already resized,
cropped and normalised ((pixel / 255 - mean) / std). Those preprocessing constants are not baked into
the graph; they stay in the bundle's config.json, which the Predictor reads for every engine, so
decoding and resizing (PIL, in `data.loaders.ImageDataset`) are the same code whichever engine runs.

`EXPORT_FORMATS` names the formats `transferlab export --format` offers; each exporter checks its
file against torch before keeping it and records it in config.json under "exports".
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.decode import sha256_of
from ..devices import resolve_device
from ..errors import ConfigError, ExportError
from ..evaluation.metrics import probability_agreement
from ..inference.bundle import (COREML_FILE, INT8_FILE, ONNX_FILE, OPENVINO_FILE, OPENVINO_INT8_FILE,
                                TFLITE_FILE, BundleConfig, load_network, load_trust, read_config,
                                record_export)
from ..inference.engines import Engine, OnnxEngine, TorchEngine
from ..inference.graphs import DEFAULT_OPSET, export_onnx_graph
from ..inference.predictor import Predictor
from ..inference.trust import Trust
from ..models.network import WithFeatures
from ..options import check
from ..rundir.atomic import atomic_path, check_writable
from ..rundir.layout import RunDir, read_json

INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = OnnxEngine.INPUT, OnnxEngine.OUTPUT, OnnxEngine.FEATURES
# The torch.export-based exporter writes opset 18 natively; asking it for 17 runs a version
# converter that failed on EfficientNet (ReduceMean's axes) and then silently kept opset 18.
MIN_OPSET = DEFAULT_OPSET
FP32_TOLERANCE = 1e-4  # max |probability difference| an fp32 export may show against torch
QUANTIZATIONS = ("int8",)
NOISE_IMAGES = 8


@dataclass
class ExportResult:
    path: Path
    opset: int | None  # the ONNX opset the export went through; None for a format that uses none
    quantization: str | None
    sha256: str
    parity: dict


def export_path(model_dir: str | Path, out: str | Path | None = None, quantize: str | None = None,
                export_format: str = "onnx") -> Path:
    """Where an export goes: `out`, else model.onnx (model.int8.onnx, model.xml, model.int8.xml,
    model.tflite, model.mlpackage) in the bundle."""
    return Path(out) if out else Path(model_dir) / default_file(export_format, quantize)


def default_file(export_format: str, quantize: str | None = None) -> str:
    if export_format == "onnx":
        return INT8_FILE if quantize else ONNX_FILE
    if export_format == "openvino":
        return OPENVINO_INT8_FILE if quantize else OPENVINO_FILE
    return {"tflite": TFLITE_FILE, "coreml": COREML_FILE}[export_format]


def check_export_target(model_dir: str | Path, out: str | Path | None = None,
                        quantize: str | None = None, export_format: str = "onnx") -> Path:
    """The export's path, after checking, before any work, that it can be written and recorded:
    `out` is not a folder (for coreml: is NAME.mlpackage, and replaces nothing but a package), its
    folder and the bundle's (config.json records the export) can be written."""
    path = export_path(model_dir, out, quantize, export_format)
    if export_format == "coreml":
        if path.suffix != ".mlpackage" or (path.exists() and not is_package(path)):
            raise ConfigError(f"{path}: a Core ML model is a folder named NAME.mlpackage, and only an "
                              "older package is replaced; give --out a new name ending in .mlpackage")
    elif path.is_dir():
        raise ConfigError(f"{path}: is a folder; give --out a file name, such as "
                          f"{path / default_file(export_format, quantize)}")
    check_writable(path.parent)
    if not Path(model_dir).is_dir():
        read_config(model_dir)  # the one clear error for what is not a bundle
    check_writable(model_dir)
    return path


def is_package(path: Path) -> bool:
    """Whether `path` is a Core ML package (a folder with its Manifest.json), which an export may
    replace; any other folder is the user's."""
    return path.is_dir() and (path / "Manifest.json").is_file()


def export_onnx(model_dir: str | Path, out: str | Path | None = None, *, quantize: str | None = None,
                images: Sequence[str | Path] | None = None, labels: Sequence[int] | None = None,
                opset: int = DEFAULT_OPSET, batch_size: int = 32, workers: int | None = None,
                device: str = "auto") -> ExportResult:
    """Export the bundle in `model_dir` to ONNX (default MODEL_DIR/model.onnx, or model.int8.onnx
    with quantize="int8"), check it against the torch network and record it in config.json.

    The check predicts `images` with both and measures the largest difference of a probability and
    the top-1 agreement; with `labels` (class indices in the bundle's order, one per image) also the
    accuracy of each. Without images it falls back to a fixed-seed batch of random noise, which
    checks the arithmetic but not behaviour on real pictures; the result says which it was.
    An fp32 export that differs by more than 1e-4 is refused: nothing is written. int8 exports
    always differ, so their numbers are reported, not judged.
    """
    model_dir = Path(model_dir)
    check({"quantize": quantize, "batch_size": batch_size, "workers": workers})
    if opset < MIN_OPSET:
        raise ConfigError(f"opset={opset}: the torch exporter writes opset {MIN_OPSET} or newer "
                          f"(onnxruntime 1.14 and later run it); use --opset {MIN_OPSET}")
    check({"opset": opset})
    if labels is not None and (images is None or len(labels) != len(images)):
        raise ConfigError(f"labels: {len(labels)} given for {len(images or [])} images; give one "
                          "class index per image")
    out = check_export_target(model_dir, out, quantize)
    net, config = load_network(model_dir)
    with atomic_path(out) as staged:  # renamed onto `out` only if every check below passes
        if quantize:
            with tempfile.TemporaryDirectory(prefix="transferlab-export-") as scratch:
                fp32 = Path(scratch) / ONNX_FILE
                _export_graph(net, config, fp32, opset)
                _quantize_int8(fp32, staged)
        else:
            _export_graph(net, config, staged, opset)
        written = _opset_of(staged)
        if written != opset:
            raise ExportError(f"{out}: asked for opset {opset}, the exporter wrote {written}; "
                              f"use --opset {written}")
        parity = measure_parity(net, OnnxEngine(staged, config.preprocessing), config, images, labels,
                                batch_size=batch_size, workers=workers, device=resolve_device(device),
                                trust=load_trust(model_dir, config))
        if quantize:
            parity["tolerance"] = None
        else:
            require_fp32_parity(parity, out, "onnxruntime",
                                f"the exported {config.backbone} graph does not compute what torch "
                                "does: try another --opset, or keep using the torch backend")
        digest = sha256_of(staged)
    result = ExportResult(out, opset, quantize, digest, parity)
    _record_export(model_dir, out, config, result)
    return result


def _export_graph(net: torch.nn.Module, config: BundleConfig, path: Path, opset: int) -> None:
    """The whole network's ONNX graph (inference.graphs.export_onnx_graph, the one ONNX export),
    with the penultimate features beside the logits, which novelty is scored on."""
    try:
        export_onnx_graph(WithFeatures(net), config.preprocessing.input_size, path,
                          (OUTPUT_NAME, FEATURES_NAME), opset)
    except ExportError as error:
        raise ExportError(f"backbone {config.backbone!r}: {error}") from None


def _quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation: weights stored as uint8, activations quantised on the fly, after
    onnxruntime's recommended pre-processing (shape inference), in a scratch file beside `source`.

    Grouped (depthwise) convolutions stay fp32. On EfficientNet-Lite0 (face-mask, 615 validation
    images) quantising every convolution cut top-1 agreement with fp32 to 95-97% and accuracy from
    98.7% to 94.6-97.2%; keeping the 16 depthwise ones, which hold few weights but wide per-channel
    ranges, gave 99.7% agreement and unchanged accuracy at 4 MB instead of 13. uint8 weights because
    onnxruntime's ConvInteger CPU kernel ran about 3x slower with int8 ones.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    prepared = source.with_name(f"prepared-{source.name}")
    quant_pre_process(str(source), str(prepared))
    graph = onnx.load(str(prepared)).graph
    grouped = [node.name for node in graph.node if node.op_type == "Conv"
               and any(a.name == "group" and a.i > 1 for a in node.attribute)]
    quantize_dynamic(prepared, target, weight_type=QuantType.QUInt8, nodes_to_exclude=grouped)


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def measure_parity(net: torch.nn.Module, engine: Engine, config: BundleConfig,
                   images: Sequence[str | Path] | None = None, labels: Sequence[int] | None = None,
                   *, batch_size: int = 32, workers: int | None = None,
                   device: torch.device | str = "cpu", trust: Trust | None = None,
                   export_format: str = "onnx") -> dict:
    """How closely `engine` reproduces the torch network's fp32 probabilities, and novelty when the
    bundle scores it (see export_onnx); the torch reference runs on `device`. `trust`: the
    bundle's (load_trust), through which both answer; `export_format` names the engine's accuracy."""
    pre = config.preprocessing
    reference = Predictor(TorchEngine(WithFeatures(net), pre, device), config.classes, pre,
                          trust=trust)
    candidate = Predictor(engine, config.classes, pre, trust=trust)
    if images:
        expected, errors = reference.predict_scores(images, batch_size=batch_size, workers=workers,
                                                    precision="32")
        got, _ = candidate.predict_scores(images, batch_size=batch_size, workers=workers)
        read = np.array([not error for error in errors])
        if not read.any():
            raise ConfigError(f"none of the {len(images)} parity images could be read "
                              f"(first: {images[0]}: {errors[0]})")
        source = "images"
    else:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (NOISE_IMAGES, *pre.input_size), generator=generator,
                               dtype=torch.uint8)
        expected = reference.score_batch(pixels, precision="32")
        got = candidate.score_batch(pixels)
        read, source = np.ones(NOISE_IMAGES, dtype=bool), "random-noise"
    parity = {"source": source, "images": int(read.sum()),
              **probability_agreement(expected.proba[read], got.proba[read])}
    if expected.novelty is not None and got.novelty is not None:
        parity["max_abs_novelty_diff"] = float(np.abs(expected.novelty - got.novelty)[read].max())
    expected, got = expected.proba[read], got.proba[read]
    if labels is not None and images:
        truth = np.asarray(labels)[read]
        torch_accuracy = float((expected.argmax(1) == truth).mean())
        export_accuracy = float((got.argmax(1) == truth).mean())
        parity["accuracy"] = {"torch": torch_accuracy, export_format: export_accuracy,
                              "change": export_accuracy - torch_accuracy}
    return parity


def require_fp32_parity(parity: dict, out: Path, runtime: str, advice: str) -> None:
    """Refuse an fp32 export (before it is written) whose probabilities, run by `runtime`, stray
    from torch's by more than FP32_TOLERANCE; else note in `parity` the tolerance it met."""
    if parity["max_abs_prob_diff"] > FP32_TOLERANCE:
        raise ExportError(f"{out}: not written; {runtime}'s probabilities differ from torch's by up "
                          f"to {parity['max_abs_prob_diff']:.2e} (more than {FP32_TOLERANCE:g}) on "
                          f"{parity['images']} {parity['source']} inputs; {advice}")
    parity["tolerance"] = FP32_TOLERANCE


def _record_export(model_dir: Path, out: Path, config: BundleConfig, result: ExportResult) -> None:
    """Add the export to config.json's "exports" (keyed by file name), keeping everything else."""
    import onnx
    import onnxruntime

    record = {"format": "onnx", "opset": result.opset, "quantization": result.quantization,
              "sha256": result.sha256, "weights_sha256": config.weights_sha256,
              "input": {"name": INPUT_NAME, "shape": ["batch", *config.preprocessing.input_size],
                        "dtype": "float32",
                        "expects": "resized, centre-cropped, (pixel / 255 - mean) / std; see "
                                   "preprocessing"},
              "output": {"name": OUTPUT_NAME, "shape": ["batch", len(config.classes)],
                         "expects": "logits; softmax(logits / trust.temperature) gives the "
                                    "probabilities"},
              "features": {"name": FEATURES_NAME, "expects": "penultimate features; novelty is "
                                                             "scored on them (trust.novelty)"},
              "parity": result.parity,
              "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                           "onnxruntime": onnxruntime.__version__}}
    record_export(model_dir, export_name(model_dir, out), record)


def export_name(model_dir: Path, out: Path) -> str:
    """The key of an export in config.json's "exports": a file inside the bundle is named relative
    to it, so the bundle can move; one elsewhere by its absolute path."""
    try:
        return out.resolve().relative_to(model_dir.resolve()).as_posix()
    except ValueError:
        return str(out.resolve())


def run_val_images(model_dir: str | Path, limit: int | None = None,
                   ) -> tuple[list[Path], list[int]] | None:
    """The validation images of the run that holds `model_dir` (MODEL/../split.json) and their class
    indices in the bundle's order; `limit` keeps at most that many, taken evenly along the split
    so that every class is represented. None outside a run directory, or when the data has moved."""
    split = read_json(RunDir(Path(model_dir).resolve().parent).split)
    if split is None:
        return None
    root, classes = Path(split["root"]), read_config(model_dir).classes
    rows = [row for row in split.get("val", []) if row["label"] in classes]
    if not root.is_dir() or not rows:
        return None
    if limit and len(rows) > limit:
        rows = rows[::math.ceil(len(rows) / limit)]
    return [root / row["file"] for row in rows], [classes.index(row["label"]) for row in rows]
