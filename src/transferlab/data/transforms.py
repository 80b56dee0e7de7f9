"""Preprocessing that travels with a model: resize, crop and normalisation from timm's data config."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..options import check


MIN_SIDE, MAX_SIDE = 8, 2048
MIN_CROP_PCT, MAX_CROP_PCT = 0.5, 1.5


@dataclass(frozen=True)
class Preprocessing:
    """timm's data config, as stored in a bundle's config.json."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Preprocessing":
        from timm.data import resolve_data_config

        return cls.from_dict(resolve_data_config({}, model=model))

    @classmethod
    def from_dict(cls, config: dict) -> "Preprocessing":
        """From timm's data config or a bundle's config.json; a ValueError names any bad field
        (a bundle may come from anywhere)."""
        def numbers(name: str, kind: type, length: int, positive: bool = True) -> tuple:
            value = config[name]
            if (not isinstance(value, (list, tuple)) or len(value) != length
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v) and (v > 0 or not positive) for v in value)):
                raise ValueError(f"{name}={value!r}: expected {length} finite "
                                 f"{'positive ' * positive}numbers")
            return tuple(kind(v) for v in value)

        input_size = numbers("input_size", int, 3)
        # What timm's models use (3 channels; sides 106 to 1024 px; crop_pct 0.875 to 1.15), with
        # room: a config.json outside these would make every image cost hundreds of MB, or fail.
        if input_size[0] != 3 or not all(MIN_SIDE <= side <= MAX_SIDE for side in input_size[1:]):
            raise ValueError(f"input_size={list(input_size)}: expected 3 channels and sides of "
                             f"{MIN_SIDE} to {MAX_SIDE} pixels")
        crop_pct = config["crop_pct"]
        if (not isinstance(crop_pct, (int, float)) or isinstance(crop_pct, bool)
                or not MIN_CROP_PCT <= crop_pct <= MAX_CROP_PCT):
            raise ValueError(f"crop_pct={crop_pct!r}: expected a number in [{MIN_CROP_PCT}, "
                             f"{MAX_CROP_PCT}]")
        interpolation, crop_mode = config["interpolation"], config.get("crop_mode", "center")
        if interpolation not in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"):
            raise ValueError(f"interpolation={interpolation!r}: not an interpolation timm knows")
        if crop_mode not in ("center", "squash", "border"):
            raise ValueError(f"crop_mode={crop_mode!r}: use center, squash or border")
        return cls(input_size=input_size, interpolation=interpolation,
                   mean=numbers("mean", float, input_size[0], positive=False),
                   std=numbers("std", float, input_size[0]), crop_pct=float(crop_pct), crop_mode=crop_mode)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["resize"] = self.resize_size
        return data

    @property
    def resize_size(self) -> int:
        """Shorter side after resizing, before the centre crop."""
        return math.floor(max(self.input_size[1:]) / self.crop_pct)


def eval_transform(pre: Preprocessing):
    """PIL image -> uint8 CHW tensor, resized and centre-cropped as timm's evaluation transform does;
    normalisation happens per batch (see `normalize`), which keeps worker-to-main transfers four
    times smaller."""
    from timm.data import create_transform

    side = pre.input_size[1]
    if (pre.crop_mode == "center" and pre.input_size[2] == side and pre.resize_size >= side
            and pre.interpolation in ResizeCenterCrop.FILTERS):
        return ResizeCenterCrop(pre.resize_size, side, pre.interpolation)
    return create_transform(input_size=pre.input_size, interpolation=pre.interpolation,
                            mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct,
                            crop_mode=pre.crop_mode, is_training=False, use_prefetcher=True)


class ResizeCenterCrop:
    """timm's centre-crop evaluation (torchvision's Resize of the short side to `resize`, CenterCrop
    to `crop`, a uint8 tensor) with torch's uint8 resampling, which ports Pillow's antialiased
    bilinear and bicubic filters to vector code: within 2 of 255 of timm's output (under 0.5% of
    the values differ at all) in 40% of its time. Decoding shares the cores with the network, so this
    is throughput: 1.0 ms of timm's 1.6 ms per face-mask photo went into PIL's resize."""

    FILTERS = ("bilinear", "bicubic")

    def __init__(self, resize: int, crop: int, interpolation: str):
        self.resize, self.crop, self.mode = resize, crop, interpolation

    def __call__(self, image) -> torch.Tensor:
        width, height = image.size
        if width <= height:  # torchvision's sizes (the long side truncated) and crop offsets
            size = (int(self.resize * height / width), self.resize)
        else:
            size = (self.resize, int(self.resize * width / height))
        top, left = (int(round((side - self.crop) / 2.0)) for side in size)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        if size != (height, width):  # (channels_last: the layout the vector kernels take)
            pixels = torch.nn.functional.interpolate(pixels[None], size=size, mode=self.mode,
                                                     antialias=True)[0]
        return pixels[:, top:top + self.crop, left:left + self.crop]

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(resize={self.resize}, crop={self.crop}, mode={self.mode})"


def normalize(batch: torch.Tensor, pre: Preprocessing, channels_last: bool = True) -> torch.Tensor:
    """uint8 NCHW batch -> float32 normalised batch, channels_last when asked.

    The layout changes while the data is still uint8, and (x / 255 - mean) / std is one fused
    multiply-add, so the float batch is written once: this step took 0.46 ms per image in three passes.
    """
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    std = torch.tensor(pre.std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return torch.addcmul(-mean / std, batch.float(), 1.0 / (255.0 * std))


# Keras's ImageDataGenerator recipe. Its shear_range=0.2 was radians when the recipe was written
# (Keras 1) and is degrees today, which makes it invisible; we keep the original ~11.5 degrees.
STANDARD_SHEAR_DEGREES = math.degrees(0.2)


def train_transform(pre: Preprocessing, preset: str = "standard"):
    """PIL image -> augmented uint8 CHW tensor of the model's input size, for training only.

    none: the evaluation transform; light: random crop (80-100% of the area) and horizontal flip;
    standard: rotation 40 degrees, shifts 0.2, shear 0.2 rad, zoom 0.2, horizontal flip (Keras's
    classic recipe), filled with the mean colour so filled pixels normalise to zero;
    strong: random crop (35-100%), flip and RandAugment (2 operations, magnitude 9).
    """
    from torchvision.transforms import v2

    check({"augment": preset})
    if preset == "none":
        return eval_transform(pre)
    size = list(pre.input_size[1:])
    interpolation = v2.InterpolationMode(pre.interpolation)
    fill = tuple(round(255 * m) for m in pre.mean)
    if preset == "light":
        steps = [v2.RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=interpolation),
                 v2.RandomHorizontalFlip()]
    elif preset == "standard":
        steps = [v2.Resize(pre.resize_size, interpolation=interpolation), v2.CenterCrop(size),
                 v2.RandomAffine(degrees=40, translate=(0.2, 0.2), scale=(0.8, 1.2),
                                 shear=STANDARD_SHEAR_DEGREES, interpolation=v2.InterpolationMode.BILINEAR,
                                 fill=fill),
                 v2.RandomHorizontalFlip()]
    else:
        steps = [v2.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=interpolation),
                 v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=9, fill=fill)]
    return v2.Compose([*steps, v2.PILToTensor()])
