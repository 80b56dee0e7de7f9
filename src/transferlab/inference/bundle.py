"""Model bundles (model.safetensors + config.json) and the Predictor that serves them.

Nothing here unpickles: weights are safetensors, configuration is JSON, and the weights' sha256 is
checked before they are used.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..runs.atomic import DIR_MODE, FILE_MODE, temporary_beside, write_json
from ..errors import BundleError, ConfigError
from ..models.heads import HeadSpec, build_head
from ..data.decode import DEFAULT_MAX_PIXELS, sha256_of
from ..inference.batches import TorchEngine, progress_bar, resolve_precision, run_batches
from ..data.transforms import Preprocessing

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ClassifierNet(nn.Module):
    """The whole model: backbone features -> head logits. Inputs are normalised NCHW batches."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def save_model(net: ClassifierNet, folder: str | Path, *, backbone: str, classes: list[str],
               head: HeadSpec, preprocessing: Preprocessing, cut_layer: int | None = None,
               training: dict | None = None) -> Path:
    """Write the bundle into `folder`, replacing any bundle there only once the new one is complete."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(**temporary_beside(folder)))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE))
        os.chmod(staging / WEIGHTS_FILE, FILE_MODE)
        os.chmod(staging, DIR_MODE)
        config = {"format_version": FORMAT_VERSION, "transferlab_version": __version__,
                  "backbone": backbone, "cut_layer": cut_layer, "head": head.to_dict(),
                  "classes": list(classes), "preprocessing": preprocessing.to_dict(),
                  "training": training or {}, "weights_sha256": sha256_of(staging / WEIGHTS_FILE)}
        write_json(staging / CONFIG_FILE, config)
        if folder.exists():
            retired = folder.with_name(f".{folder.name}.old.tmp")  # a temporary too, if killed here
            shutil.rmtree(retired, ignore_errors=True)
            folder.rename(retired)
            staging.rename(folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise BundleError(f"{folder}: not a model bundle (no {CONFIG_FILE}); give the model/ folder "
                          "of a run, such as runs/NAME/model")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path}: malformed JSON ({error})") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if not isinstance(version, int):
        raise BundleError(f"{path}: no format_version; not a transferlab bundle")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {version} is newer than this transferlab "
                          f"({__version__}, format {FORMAT_VERSION}); upgrade transferlab")
    missing = [k for k in ("backbone", "head", "classes", "preprocessing", "weights_sha256")
               if k not in config]
    if missing:
        raise BundleError(f"{path}: missing {', '.join(missing)}")
    try:
        _check_fields(config)
    except (KeyError, TypeError, ValueError) as error:
        text = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise BundleError(f"{path}: {text}; not a usable transferlab bundle, re-save or re-train "
                          "the model") from None
    return config


def _check_fields(config: dict) -> None:
    """Every field the loader uses has the type and shape it needs: a config.json may come from
    anywhere, and a wrong value must be refused here rather than fail somewhere inside torch."""
    classes = config["classes"]
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise ValueError(f"classes={classes!r}: expected a list of distinct class names")
    for name in ("backbone", "weights_sha256"):
        if not isinstance(config[name], str):
            raise ValueError(f"{name}={config[name]!r}: expected text")
    cut_layer = config.get("cut_layer")
    if cut_layer is not None and (not isinstance(cut_layer, int) or isinstance(cut_layer, bool)):
        raise ValueError(f"cut_layer={cut_layer!r}: expected a feature stage index")
    for name, parse in (("head", HeadSpec.from_dict), ("preprocessing", Preprocessing.from_dict)):
        if not isinstance(config[name], dict):
            raise ValueError(f"{name}: expected an object")
        try:
            parsed = parse(config[name])
        except KeyError as error:
            raise ValueError(f"{name}: missing {error}") from None
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}: {error}") from None
        if name == "head" and parsed.num_classes != len(classes):
            raise ValueError(f"head: {parsed.num_classes} outputs for {len(classes)} classes")


def load_network(folder: str | Path) -> tuple[ClassifierNet, dict]:
    """The network with its weights, after checking the weights' hash; no network access."""
    from safetensors.torch import load_file

    from ..models.backbones import create_backbone

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{folder}: {WEIGHTS_FILE} is missing")
    if sha256_of(weights) != config["weights_sha256"]:
        raise BundleError(f"{weights}: sha256 does not match config.json; the weights were altered "
                          "or truncated, re-save or re-train the model")
    try:
        backbone = create_backbone(config["backbone"], "none", config.get("cut_layer"))
        net = ClassifierNet(backbone, build_head(HeadSpec.from_dict(config["head"])))
        net.load_state_dict(load_file(str(weights)))
    except Exception as error:
        raise BundleError(f"{folder}: weights do not fit the configured model ({error})") from None
    return net.eval(), config


BACKENDS = ("torch", "onnx")


def load_model(folder: str | Path, backend: str = "torch") -> "Predictor":
    """A Predictor for the bundle in `folder`: the torch network, or (backend="onnx") its exported
    model.onnx in onnxruntime (see `transferlab export`). Both predict through the same code."""
    if backend == "torch":
        net, config = load_network(folder)
        return Predictor(net, config)
    if backend == "onnx":
        from ..deploy.export import load_onnx_engine

        engine, config = load_onnx_engine(folder)
        return Predictor(engine, config)
    raise ConfigError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")


@dataclass
class Prediction:
    file: str
    top_k: list[tuple[str, float]]
    error: str = ""

    def to_dict(self) -> dict:
        if self.error:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "top_k": [{"label": l, "probability": p} for l, p in self.top_k]}


class Predictor:
    """Top-k predictions for image files with a loaded bundle.

    `network` is the torch ClassifierNet, or an engine with the same call as `runner.TorchEngine`
    (normalised NCHW batch, precision) -> logits, such as `export.OnnxEngine`. Decoding, normalising,
    test-time augmentation and softmax are shared; only running the network differs.
    """

    def __init__(self, network: nn.Module | Callable[[torch.Tensor, str], torch.Tensor], config: dict):
        self.engine = TorchEngine(network) if isinstance(network, nn.Module) else network
        self.config = config
        self.classes: list[str] = config["classes"]
        self.preprocessing = Preprocessing.from_dict(config["preprocessing"])

    def predict_batch(self, batch: torch.Tensor, precision: str = "auto",
                      tta: bool = False) -> torch.Tensor:
        """Probabilities for one normalised float NCHW batch (see `transforms.normalize`).

        tta: also predict the horizontally flipped images and average the two probabilities, a
        two-view ensemble for twice the compute; only for classes that a mirror image keeps.
        """
        precision = resolve_precision(precision)
        proba = self.engine(batch, precision).softmax(dim=1)
        if tta:
            flipped = self.engine(batch.flip(dims=(3,)), precision).softmax(dim=1)
            proba = (proba + flipped) / 2
        return proba

    def predict_proba(self, paths: Sequence[str | Path], *, batch_size: int = 32,
                      workers: int | None = None, precision: str = "auto", tta: bool = False,
                      show_progress: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                      ) -> tuple[np.ndarray, list[str]]:
        """(len(paths), classes) probabilities and a per-file error ("" when it was read; images over
        `max_pixels` are refused unread).

        `precision` (auto, bf16 or 32) applies to the torch backend; an ONNX model runs as exported.
        """
        paths = [Path(p) for p in paths]
        proba = np.zeros((len(paths), len(self.classes)), dtype=np.float32)
        errors = [""] * len(paths)
        forward = functools.partial(self.predict_batch, tta=tta)
        with progress_bar("predicting", len(paths), show_progress) as advance:
            for positions, batch_proba, batch_errors in run_batches(
                    forward, paths, self.preprocessing, batch_size=batch_size, workers=workers,
                    precision=precision, progress=advance, max_pixels=max_pixels):
                proba[positions.start:positions.stop] = batch_proba.numpy()
                errors[positions.start:positions.stop] = batch_errors
        return proba, errors

    def predict(self, paths: Sequence[str | Path], top_k: int = 1, **kwargs) -> list[Prediction]:
        paths = [Path(p) for p in paths]
        proba, errors = self.predict_proba(paths, **kwargs)
        k = max(1, min(top_k, len(self.classes)))
        results = []
        for path, row, error in zip(paths, proba, errors):
            order = np.argsort(-row)[:k]
            results.append(Prediction(str(path), [(self.classes[i], float(row[i])) for i in order],
                                      error))
        return results


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (every file below, hidden ones skipped) and glob patterns, in a stable order."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists() or not glob.has_magic(item):
            paths.append(path)  # a missing file is reported by predict as unreadable
        else:
            paths += sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
    return paths
