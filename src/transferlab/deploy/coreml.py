"""`transferlab export --format coreml`: the bundle as a Core ML model (MODEL/model.mlpackage) for
Apple devices, converted with coremltools (an optional extra: `pip install 'transferlab[coreml]'`).

The model takes an RGB image (an `ImageType`, pixels 0..255, of the bundle's input size) and answers
the class label and a probability per class, the bundle's own: the per-channel normalisation and the
temperature are folded into it. Resizing and cropping are not (Core ML's image input only scales);
the caller does them, as config.json's preprocessing says and the record repeats.

Core ML runs models only on Apple systems, so the export cannot compare its numbers with torch's
here. What can be checked is: in torch, that the folded module computes the bundle's probabilities;
in the saved package, that its input, outputs and class labels are the bundle's. The export records
that numerical parity was not run, and why, and the command says so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.decode import sha256_of_folder
from ..data.transforms import Preprocessing
from ..errors import ConfigError, ExportError, error_summary
from ..inference.bundle import BundleConfig, load_network, load_trust, record_export
from ..inference.engines import TorchEngine
from ..inference.predictor import Predictor
from ..inference.trust import Trust
from ..models.network import ClassifierNet
from ..options import check
from ..rundir.atomic import replace_folder, temporary_folder_beside
from .export import FP32_TOLERANCE, NOISE_IMAGES, ExportResult, check_export_target, export_name

INPUT_NAME = "image"
LABEL_OUTPUT, PROBABILITIES_OUTPUT = "classLabel", "classLabel_probs"  # Core ML's classifier names
DEPLOYMENT_TARGET = "iOS15"  # the first with ML programs: iOS 15, macOS 12
# coremltools' chatter, none of it about this model: the Apple-only runtime that did not load on
# Linux, versions newer than it was tested with, progress bars, and torch's own notices.
QUIET_LOGGERS = ("coremltools", "torch.utils._pytree")


class PixelClassifier(nn.Module):
    """What the Core ML model computes: RGB images with pixels 0..255 (float NCHW) -> the bundle's
    probabilities. The normalisation is per channel, which ImageType's one scale cannot express, so
    it runs inside the model: data.transforms.normalize's (pixel / 255 - mean) / std, written as a
    multiply and an add (coremltools has no addcmul)."""

    def __init__(self, net: ClassifierNet, pre: Preprocessing, temperature: float):
        super().__init__()
        self.net, self.trust = net, Trust(temperature)
        std = torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trust.probabilities(self.net(pixels * self.scale + self.shift))


def export_coreml(model_dir: str | Path, out: str | Path | None = None, *,
                  quantize: str | None = None, images: Sequence[str | Path] | None = None,
                  labels: Sequence[int] | None = None, opset: int | None = None,
                  batch_size: int = 32, workers: int | None = None,
                  device: str = "auto") -> ExportResult:
    """Write MODEL_DIR/model.mlpackage (or `out`, a NAME.mlpackage), replacing an older package only
    once the new one is converted and checked, and record it in config.json.

    `images`, `labels`, `batch_size`, `workers` and `device` are taken for the sake of the export
    command, which passes them to every format; they would serve the parity check, which needs Core
    ML itself (see the module's docstring): the result's parity says it was not run.
    """
    coremltools = _import_coremltools()
    if quantize:
        raise ConfigError("--quantize int8 applies to --format onnx; drop --quantize")
    if opset is not None:
        raise ConfigError("--opset applies to --format onnx and openvino; drop --opset")
    check({"batch_size": batch_size, "workers": workers, "device": device})
    model_dir = Path(model_dir)
    out = check_export_target(model_dir, out, None, "coreml")
    net, config = load_network(model_dir)
    trust = load_trust(model_dir, config)
    module = PixelClassifier(net, config.preprocessing, trust.temperature).eval()
    folded = _check_folding(module, net, config, trust)
    scratch = temporary_folder_beside(out)  # coremltools writes a NAME.mlpackage folder in it
    try:
        staged = scratch / out.name
        _convert(coremltools, module, config).save(str(staged))
        interface = _check_package(coremltools, staged, config, out)
        digest = sha256_of_folder(staged)
        replace_folder(staged, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    parity = {"run": False, "reason": _why_no_parity(), "folded_in_torch": folded}
    result = ExportResult(out, None, None, digest, parity)
    record_export(model_dir, export_name(model_dir, out), {
        "format": "coreml", "sha256": digest, "sha256_of": "the package's files (data.decode."
        "sha256_of_folder)", "weights_sha256": config.weights_sha256, "precision": "fp32",
        "deployment_target": DEPLOYMENT_TARGET, **interface, "classes": list(config.classes),
        "preprocessing": caller_preprocessing(config.preprocessing), "parity": parity,
        "versions": {"torch": torch.__version__, "coremltools": coremltools.__version__}})
    return result


def _import_coremltools():
    try:
        with _quiet():
            import coremltools
    except ImportError:
        raise ConfigError("--format coreml needs the coremltools package: pip install "
                          "'transferlab[coreml]'") from None
    return coremltools


@contextlib.contextmanager
def _quiet():
    """Silence coremltools' chatter (QUIET_LOGGERS, warnings) while it imports and converts; an
    error still raises. stderr is replaced only once coremltools is imported: a logging handler
    created meanwhile would keep writing to the replacement."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_folding(module: PixelClassifier, net: ClassifierNet, config: BundleConfig,
                   trust: Trust) -> dict:
    """The folded module against the bundle's torch predictor on a fixed batch of random pixels:
    what is converted must give the bundle's probabilities before Core ML is involved."""
    pre = config.preprocessing
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (NOISE_IMAGES, *pre.input_size), generator=generator,
                           dtype=torch.uint8)
    expected = Predictor(TorchEngine(net, pre), config.classes, pre,
                         trust=trust).score_batch(pixels, precision="32").proba
    with torch.inference_mode():
        got = module(pixels.float()).numpy()
    difference = float(np.abs(expected - got).max())
    if difference > FP32_TOLERANCE:
        raise ExportError(f"the Core ML export's folded normalisation and temperature give "
                          f"probabilities up to {difference:.2e} from the bundle's; nothing written")
    return {"source": "random-noise", "images": NOISE_IMAGES, "max_abs_prob_diff": difference}


def _convert(coremltools, module: PixelClassifier, config: BundleConfig):
    """An fp32 ML program from torch.export's graph of `module` (TorchScript tracing, the other
    route, is deprecated in torch), with a batch-of-one RGB image input and the classes as labels."""
    ct = coremltools
    shape = (1, *config.preprocessing.input_size)
    try:
        with _quiet(), contextlib.redirect_stderr(io.StringIO()):  # progress bars
            program = torch.export.export(module, (torch.zeros(shape),)).run_decompositions({})
            model = ct.convert(program, convert_to="mlprogram",
                               inputs=[ct.ImageType(name=INPUT_NAME, shape=shape,
                                                    color_layout=ct.colorlayout.RGB)],
                               classifier_config=ct.ClassifierConfig(list(config.classes)),
                               minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
                               compute_precision=ct.precision.FLOAT32)
    except Exception as error:  # noqa: BLE001 - the converters raise many types, all fatal here
        raise ExportError(f"coremltools could not convert backbone {config.backbone!r} "
                          f"({error_summary(error)}); nothing written") from None
    model.short_description = (f"{config.backbone} classifier of {len(config.classes)} classes, "
                               "exported by transferlab")
    model.input_description[INPUT_NAME] = caller_preprocessing(config.preprocessing)["note"]
    return model


def _check_package(coremltools, path: Path, config: BundleConfig, out: Path) -> dict:
    """The saved package's interface, read back from its spec (no Core ML runtime needed), after
    checking it is the bundle's: one RGB image input of the input size, the classifier's outputs,
    the bundle's classes in order."""
    from coremltools.proto import FeatureTypes_pb2

    spec = coremltools.models.MLModel(str(path), skip_model_load=True).get_spec()
    inputs, outputs = spec.description.input, [o.name for o in spec.description.output]
    height, width = config.preprocessing.input_size[1:]
    image = inputs[0].type.imageType if len(inputs) == 1 else None
    found = {"input": {"name": inputs[0].name if inputs else None, "type": "image",
                       "color_layout": FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(
                           image.colorSpace) if image else None,
                       "height": image.height if image else None,
                       "width": image.width if image else None, "pixels": "0..255"},
             "outputs": {"label": LABEL_OUTPUT, "probabilities": PROBABILITIES_OUTPUT}}
    problems = []
    if image is None or inputs[0].type.WhichOneof("Type") != "imageType":
        problems.append(f"takes {len(inputs)} inputs, not one image")
    elif (found["input"]["color_layout"], image.height, image.width) != ("RGB", height, width):
        problems.append(f"takes a {found['input']['color_layout']} image of {image.height}x"
                        f"{image.width}, not RGB {height}x{width}")
    if outputs != [LABEL_OUTPUT, PROBABILITIES_OUTPUT]:
        problems.append(f"outputs {outputs}, not [{LABEL_OUTPUT}, {PROBABILITIES_OUTPUT}]")
    labels = class_labels(spec)
    if labels != config.classes:
        problems.append(f"labels its classes {labels}, not the bundle's {config.classes}")
    if problems:
        raise ExportError(f"{out}: not written; the converted Core ML model {'; '.join(problems)}")
    return found


def class_labels(spec) -> list[str] | None:
    """The class labels of an ML program classifier's `classify` operation, or None without one."""
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for operation in block.operations:
                if operation.type == "classify":
                    value = operation.inputs["classes"].arguments[0].value.immediateValue
                    return [label for item in value.list.values
                            for label in item.immediateValue.tensor.strings.values]
    return None


def caller_preprocessing(pre: Preprocessing) -> dict:
    """What the caller does before the model sees an image: the resize and crop of the bundle's
    preprocessing. The normalisation is inside the model."""
    height, width = pre.input_size[1:]
    if pre.crop_mode == "center":
        steps = (f"resize the shorter side to {pre.resize_size} px ({pre.interpolation}), then "
                 f"crop the centre {height}x{width}")
    else:
        steps = (f"resize and crop to {height}x{width} as timm's eval transform does with "
                 f"crop_mode {pre.crop_mode}, crop_pct {pre.crop_pct}")
    return {"resize": pre.resize_size, "crop": [height, width], "crop_mode": pre.crop_mode,
            "interpolation": pre.interpolation,
            "note": f"before the model: {steps}; it takes RGB pixels 0..255 (the normalisation "
                    "is inside it)"}


def _why_no_parity() -> str:
    if platform.system() != "Darwin":
        return (f"coremltools runs Core ML models only on macOS (this is {platform.system()}); "
                "compare the model's answers with the torch backend's on a Mac")
    return ("transferlab has no Core ML engine yet; compare the model's answers with the torch "
            "backend's in Xcode or with coremltools' predict")
