"""Model bundles: a folder with model.safetensors and config.json, written atomically, read back
without unpickling anything (backends.py turns one into a Predictor on any engine and device).

The weights' sha256 is checked before they are used, and every field of config.json is validated:
a bundle may come from anywhere. Exports (deploy/export.py) live in the bundle too, each recorded
under "exports" with its own sha256, which is checked before an engine runs it; so is the novelty
bank (novelty.safetensors, under "trust" with the temperature; see trust.py). labels.txt lists the
classes, one a line in output order, for tools that read no config.json; README.md, the model card,
is written beside them once the model is measured (reporting/model_card.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import __version__
from ..data.decode import sha256_of
from ..data.transforms import Preprocessing
from ..errors import BundleError
from ..models.heads import HeadSpec, build_head
from ..models.network import ClassifierNet
from ..rundir.atomic import replace_folder, temporary_folder_beside, write_json
from .trust import NOVELTY_FILE, Novelty, Trust

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPENVINO_FILE = "model.xml"  # its weights in model.bin beside it
TFLITE_FILE = "model.tflite"
OPENVINO_INT8_FILE = "model.int8.xml"  # and model.int8.bin
# The `transferlab export` options that write each export (what to run when one is missing).
EXPORT_OPTIONS = {ONNX_FILE: "", INT8_FILE: " --quantize int8", OPENVINO_FILE: " --format openvino",
                  OPENVINO_INT8_FILE: " --format openvino --quantize int8",
                  TFLITE_FILE: " --format tflite"}
COREML_FILE = "model.mlpackage"  # a folder: Core ML's package format
LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class BundleConfig:
    """config.json: what the network is, the classes in output order, the preprocessing its weights
    expect (timm's pretrained_cfg travels with them), how it was trained, and its exports."""

    backbone: str
    classes: list[str]
    head: HeadSpec
    preprocessing: Preprocessing
    weights_sha256: str
    cut_layer: int | None = None
    training: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)
    trust: dict = field(default_factory=dict)  # Trust.to_dict() with the novelty file's sha256
    format_version: int = FORMAT_VERSION
    transferlab_version: str = __version__

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(head=self.head.to_dict(), preprocessing=self.preprocessing.to_dict())
        for name in ("exports", "trust"):
            if not data[name]:
                del data[name]  # a bundle lists its exports once it has one; older ones had no trust
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BundleConfig":
        """Every field checked for the type and shape it needs (ValueError naming the field)."""
        classes = data["classes"]
        if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
                or len(set(classes)) != len(classes)):
            raise ValueError(f"classes={classes!r}: expected a list of distinct class names")
        for name in ("backbone", "weights_sha256"):
            if not isinstance(data[name], str):
                raise ValueError(f"{name}={data[name]!r}: expected text")
        cut_layer = data.get("cut_layer")
        if cut_layer is not None and (not isinstance(cut_layer, int) or isinstance(cut_layer, bool)):
            raise ValueError(f"cut_layer={cut_layer!r}: expected a feature stage index")
        for name in ("training", "exports", "trust"):
            if not isinstance(data.get(name, {}), dict):
                raise ValueError(f"{name}: expected an object")
        Trust.check_record(data.get("trust", {}))
        head = _parse("head", HeadSpec.from_dict, data)
        if head.num_classes != len(classes):
            raise ValueError(f"head: {head.num_classes} outputs for {len(classes)} classes")
        return cls(backbone=data["backbone"], classes=list(classes), head=head,
                   preprocessing=_parse("preprocessing", Preprocessing.from_dict, data),
                   weights_sha256=data["weights_sha256"], cut_layer=cut_layer,
                   training=data.get("training", {}), exports=data.get("exports", {}),
                   trust=data.get("trust", {}),
                   format_version=data["format_version"],
                   transferlab_version=data.get("transferlab_version", "unknown"))


def _parse(name: str, parse, data: dict):
    if not isinstance(data[name], dict):
        raise ValueError(f"{name}: expected an object")
    try:
        return parse(data[name])
    except KeyError as error:
        raise ValueError(f"{name}: missing {error}") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: {error}") from None


def save_model(net: ClassifierNet, folder: str | Path, *, backbone: str, classes: list[str],
               head: HeadSpec, preprocessing: Preprocessing, training: dict | None = None,
               trust: Trust | None = None) -> Path:
    """Write the bundle into `folder`, replacing any bundle there only once the new one is complete.
    `trust`: the temperature and novelty bank its answers go through (inference/trust.py)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_folder_beside(folder)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        # serialised here and written by Python, whose write raises OSError on a full disk;
        # safetensors' own file writer raised its own error type
        (staging / WEIGHTS_FILE).write_bytes(save(tensors))
        config = BundleConfig(backbone=backbone, classes=list(classes), head=head,
                              preprocessing=preprocessing, cut_layer=net.cut_layer,
                              training=training or {}, trust=_save_trust(staging, trust),
                              weights_sha256=sha256_of(staging / WEIGHTS_FILE))
        write_config(staging, config)
        (staging / LABELS_FILE).write_bytes(labels_text(classes).encode("utf-8", "surrogateescape"))
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def labels_text(classes: list[str]) -> str:
    """labels.txt: one class a line, in output order, each line ending in a newline."""
    return "".join(f"{name}\n" for name in classes)


def _save_trust(folder: Path, trust: Trust | None) -> dict:
    from safetensors.torch import save

    if trust is None:
        return {}
    record = trust.to_dict()
    if trust.novelty is not None:
        (folder / NOVELTY_FILE).write_bytes(save(trust.novelty.tensors()))
        record["novelty"]["sha256"] = sha256_of(folder / NOVELTY_FILE)
    return record


def load_trust(folder: str | Path, config: BundleConfig) -> Trust:
    """The bundle's temperature and novelty bank (checked against the sha256 config.json records);
    a bundle from before them gives plain softmax and no novelty."""
    from safetensors.torch import load_file

    record = config.trust
    if not record.get("novelty"):
        return Trust(record.get("temperature", 1.0))
    path = Path(folder) / NOVELTY_FILE
    if not path.is_file() or sha256_of(path) != record["novelty"]["sha256"]:
        raise BundleError(f"{path}: missing, or its sha256 does not match config.json; re-save or "
                          "re-train the model")
    try:
        novelty = Novelty.from_parts(record["novelty"], load_file(str(path)))
    except Exception as error:  # noqa: BLE001 - a bundle may come from anywhere
        raise BundleError(f"{path}: not a usable novelty bank ({error}); re-train the model") from None
    return Trust(record.get("temperature", 1.0), novelty)


def write_config(folder: str | Path, config: BundleConfig) -> None:
    write_json(Path(folder) / CONFIG_FILE, config.to_dict())


def record_export(folder: str | Path, name: str, record: dict) -> None:
    """Add an export to config.json's "exports" (keyed by file name), keeping everything else."""
    config = read_config(folder)  # read again: only "exports" changes
    write_config(folder, replace(config, exports={**config.exports, name: record}))


def read_config(folder: str | Path) -> BundleConfig:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise BundleError(f"{folder}: not a model bundle (no {CONFIG_FILE}); give the model/ folder "
                          "of a run, such as runs/NAME/model")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise BundleError(f"{path}: malformed JSON ({str(error)[:200]})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path}: no format_version; not a transferlab bundle")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {version} is newer than this transferlab "
                          f"({__version__}, format {FORMAT_VERSION}); upgrade transferlab")
    missing = [k for k in ("backbone", "head", "classes", "preprocessing", "weights_sha256")
               if k not in data]
    if missing:
        raise BundleError(f"{path}: missing {', '.join(missing)}")
    try:
        return BundleConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as error:
        text = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise BundleError(f"{path}: {text}; not a usable transferlab bundle, re-save or re-train "
                          "the model") from None


def load_network(folder: str | Path) -> tuple[ClassifierNet, BundleConfig]:
    """The network with its weights (on the CPU), after checking the weights' hash; no network
    access."""
    from safetensors.torch import load_file

    from ..models.backbones import create_backbone

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{folder}: {WEIGHTS_FILE} is missing")
    if sha256_of(weights) != config.weights_sha256:
        raise BundleError(f"{weights}: sha256 does not match config.json; the weights were altered "
                          "or truncated, re-save or re-train the model")
    try:
        backbone = create_backbone(config.backbone, "none", config.cut_layer)
        net = ClassifierNet(backbone, build_head(config.head))
        net.load_state_dict(load_file(str(weights)))
    except Exception as error:
        raise BundleError(f"{folder}: weights do not fit the configured model ({error})") from None
    return net.eval(), config


def checked_export(folder: str | Path, file: str = ONNX_FILE) -> Path:
    """The path of an export in the bundle, after checking it is the file config.json records for
    these weights (and, for OpenVINO IR, that its weights file is the recorded one too)."""
    folder = Path(folder)
    config = read_config(folder)
    path = folder / file
    fix = f"export it with `transferlab export {folder}{EXPORT_OPTIONS.get(file, '')}`"
    if not path.is_file():
        raise BundleError(f"{path} is missing: this model has not been exported that way; {fix}")
    record = config.exports.get(file) or {}
    weights = path.with_suffix(".bin")
    openvino = path.suffix == ".xml"
    if (not isinstance(record, dict) or record.get("sha256") != sha256_of(path)
            or record.get("weights_sha256") != config.weights_sha256
            or (openvino and (not weights.is_file()
                              or record.get("bin_sha256") != sha256_of(weights)))):
        raise BundleError(f"{path}: sha256 does not match the export recorded in {CONFIG_FILE}; the "
                          f"file was altered or belongs to other weights, {fix} again")
    return path
