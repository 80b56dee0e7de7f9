"""Saliency maps: Grad-CAM (Selvaraju et al., 2017) of a bundle's network, and the overlay picture
that the report and `predict --explain` show.

Our own hooks rather than the grad-cam package: that package needs OpenCV for its resizing and
colours (torch and matplotlib do both here), and it leaves the choice of layer, and the reshape of a
ViT's tokens, to its caller, which is most of the work. The layer is chosen from the backbone's
structure (`target_layer`): timm's last feature stage, the stage a backbone is cut at, or the last
convolution of a network timm gives no stages.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..data.decode import DEFAULT_MAX_PIXELS, UnreadableImage
from ..data.loaders import decode_image
from ..data.transforms import Preprocessing, eval_transform, normalize
from ..models.backbones import CutBackbone
from ..models.network import ClassifierNet

OVERLAY_ALPHA = 0.45  # how much the heat map covers the image
COLORMAP = "jet"  # what Grad-CAM pictures conventionally use: red where the class's evidence is


@dataclass(frozen=True)
class Target:
    """Where Grad-CAM looks: a module's output, or its input (`use_input`); `channels` (the stage's
    width, from timm's feature_info) tells a channels-last map from a channels-first one, and
    `prefix_tokens` how many tokens (class, distillation, registers) precede a ViT's patches."""

    module: nn.Module
    channels: int | None = None
    prefix_tokens: int = 0
    use_input: bool = False


def target_layer(net: ClassifierNet) -> Target:
    """The layer whose activations a class's gradients weigh: the last feature map before pooling.

    A backbone cut at a feature stage: that stage. A whole timm model: its last feature stage
    (timm's feature_info); for a ViT with a class token, that last block's input, since after the
    last block nothing carries the patches' gradients to the class token. Otherwise (SimpleCNN, a
    model timm gives no stages) the last convolution.
    """
    backbone = net.backbone
    model = backbone.model if isinstance(backbone, CutBackbone) else backbone
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and hasattr(model, "forward_intermediates"):
        stage = info[backbone.index if isinstance(backbone, CutBackbone) else -1]
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        return Target(model.get_submodule(stage["module"]), stage["num_chs"], prefix,
                      use_input=prefix > 0 and not isinstance(backbone, CutBackbone))
    convolutions = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        raise ValueError(f"{type(model).__name__}: no feature stage or convolution for Grad-CAM")
    return Target(convolutions[-1])


def grad_cam(net: ClassifierNet, images: torch.Tensor, pre: Preprocessing,
             classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (images, height, width) in [0, 1] at the input size, for a uint8 NCHW batch of
    resized, cropped images, and the class each map is for: `classes`, or the top-1 prediction.
    The network runs on its own device, in eval mode. Autograd starts at the target layer: the
    layers before it run without recording (with the whole forward recorded, eight Lite0 images
    held about 480 MB of activations for a gradient that never goes below the last stage)."""
    target = target_layer(net)
    device = next(net.parameters()).device
    captured = []

    def start_here(tensor: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(True)  # for the rest of this forward: the no_grad block restores it
        captured.append(tensor.detach().requires_grad_(True))
        return captured[-1]

    def before(module, inputs):
        return (start_here(inputs[0]), *inputs[1:])

    def after(module, inputs, output):
        return start_here(output)

    training = net.training
    hook = (target.module.register_forward_pre_hook(before) if target.use_input
            else target.module.register_forward_hook(after))
    try:
        with torch.no_grad():
            logits = net.eval()(normalize(images.to(device), pre, channels_last=False))
            chosen = (logits.argmax(1) if classes is None
                      else torch.as_tensor(list(classes), device=device))
            score = logits.gather(1, chosen.view(-1, 1)).sum()
            activations = captured[-1]
            gradients, = torch.autograd.grad(score, activations)
    finally:
        hook.remove()
        net.train(training)
    height, width = images.shape[-2:]
    maps = _weighted(_as_grid(activations.detach(), target, height, width),
                     _as_grid(gradients, target, height, width), (height, width))
    return maps.cpu().numpy(), chosen.cpu().numpy()


def _as_grid(tensor: torch.Tensor, target: Target, height: int, width: int) -> torch.Tensor:
    """A stage's output as NCHW: channels-last maps (Swin) transposed, a ViT's patch tokens laid
    back on their grid (the input's aspect ratio gives its sides)."""
    tensor = tensor.float()
    if tensor.dim() == 4:
        if target.channels and tensor.shape[1] != target.channels and tensor.shape[-1] == target.channels:
            tensor = tensor.permute(0, 3, 1, 2)
        return tensor
    if tensor.dim() != 3:
        raise ValueError(f"Grad-CAM needs a feature map or tokens, not a {tuple(tensor.shape)} tensor")
    patches = tensor[:, target.prefix_tokens:]
    cells = patches.shape[1]
    rows = max(1, round(math.sqrt(cells * height / width)))
    if cells % rows:
        raise ValueError(f"{cells} tokens do not make a grid for a {height}x{width} input")
    return patches.reshape(len(tensor), rows, cells // rows, -1).permute(0, 3, 1, 2)


def _weighted(activations: torch.Tensor, gradients: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each channel weighted by its mean gradient, summed, positive part, upsampled, scaled to a
    maximum of 1 per image (all zeros when nothing speaks for the class)."""
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).view(-1, 1, 1)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return torch.nan_to_num(cam, nan=0.0).clamp(0, 1)


def overlay(image: torch.Tensor, cam: np.ndarray):
    """A uint8 CHW image with its Grad-CAM map (same height and width) in colour over it, as a PIL
    image."""
    from matplotlib import colormaps
    from PIL import Image

    heat = colormaps[COLORMAP](np.asarray(cam, dtype=np.float32))[..., :3] * 255.0
    picture = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    blend = (1 - OVERLAY_ALPHA) * picture + OVERLAY_ALPHA * heat
    return Image.fromarray(np.clip(blend, 0, 255).round().astype(np.uint8), "RGB")


@dataclass
class Explanation:
    """One file's Grad-CAM: the overlay (a PIL image at the network's input size) for class `label`,
    or why the file could not be read."""

    file: Path
    picture: object | None = None
    label: int | None = None
    error: str = ""


def explain_files(net: ClassifierNet, pre: Preprocessing, paths: Sequence[str | Path],
                  classes: Sequence[int] | None = None, *, batch_size: int = 8,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Explanation]:
    """Overlays of each file's Grad-CAM for its class in `classes` (the top-1 prediction when None),
    batch by batch. The files are decoded as the Predictor decodes them, so the map lies on what
    the network saw; an unreadable file gives its error."""
    transform = eval_transform(pre)
    paths = [Path(p) for p in paths]
    for start in range(0, len(paths), batch_size):
        images, read, wanted, failed = [], [], [], {}
        for position in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(decode_image(paths[position], transform, pre.resize_size, max_pixels))
                read.append(position)
                wanted.append(None if classes is None else classes[position])
            except UnreadableImage as error:
                failed[position] = str(error) or "unreadable"
        done = {}
        if images:
            batch = torch.stack(images)
            maps, labels = grad_cam(net, batch, pre, None if classes is None else wanted)
            done = {position: Explanation(paths[position], overlay(image, cam), int(label))
                    for position, image, cam, label in zip(read, batch, maps, labels)}
        for position in range(start, min(start + batch_size, len(paths))):
            yield done.get(position) or Explanation(paths[position], error=failed[position])


def save_overlays(net: ClassifierNet, pre: Preprocessing, paths: Sequence[str | Path],
                  folder: str | Path, **options) -> list[Path]:
    """One PNG of each readable file's top-1 Grad-CAM overlay in `folder` (made if needed), named
    after the file (`overlay_names`); the PNGs written. Options as explain_files's."""
    from ..rundir.atomic import write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    names = overlay_names(paths)
    for name, explanation in zip(names, explain_files(net, pre, paths, **options)):
        if explanation.picture is None:
            continue
        buffer = io.BytesIO()
        explanation.picture.save(buffer, format="PNG")
        write_bytes(folder / name, buffer.getvalue())
        written.append(folder / name)
    return written


def overlay_names(paths: Sequence[str | Path]) -> list[str]:
    """<stem>.png per file; files of the same stem (from other folders, or other formats) get
    <stem>-2.png, <stem>-3.png, ... in input order."""
    names, taken = [], set()
    for path in paths:
        stem = Path(path).stem or "image"
        name, number = f"{stem}.png", 1
        while name.lower() in taken:  # case-insensitive file systems would merge A.png and a.png
            number += 1
            name = f"{stem}-{number}.png"
        taken.add(name.lower())
        names.append(name)
    return names
