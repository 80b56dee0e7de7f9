"""Small synthetic labelled image folders: the demo's data set and the tests' fixtures."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circles", "squares", "triangles")


def make_image_folder(root: str | Path, classes: tuple[str, ...] = SHAPES[:2], per_class: int = 40,
                      size: int = 96, seed: int = 0) -> Path:
    """Write `per_class` images of each shape class under root/<class>/; returns root.

    Each image is one shape of random colour, size and position on a blurred noisy background, saved
    as JPEG or PNG in turn, so that classes differ by shape only.
    """
    root = Path(root)
    rng = random.Random(seed)
    for name in classes:
        if name not in SHAPES:
            raise ValueError(f"class {name!r}: synthetic classes are {', '.join(SHAPES)}")
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = _draw(name, size, rng)
            suffix = ".jpg" if index % 2 == 0 else ".png"
            image.save(root / name / f"{name}_{index:03d}{suffix}", quality=90)
    return root


def _draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randrange(256) for _ in range(3))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(128, rng.uniform(20, 60), (size, size, 3))
    image = Image.fromarray(noise.clip(0, 255).astype(np.uint8), "RGB")
    image = Image.blend(image, Image.new("RGB", (size, size), background), 0.6)
    image = image.filter(ImageFilter.GaussianBlur(1))
    draw = ImageDraw.Draw(image)
    colour = tuple(rng.randrange(256) for _ in range(3))
    extent = rng.uniform(0.35, 0.7) * size
    x0 = rng.uniform(0, size - extent)
    y0 = rng.uniform(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circles":
        draw.ellipse(box, fill=colour)
    elif shape == "squares":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    return image


def synthetic_hashes(count: int, seed: int = 0) -> np.ndarray:
    """`count` 64-bit perceptual hashes as a large photo set gives them: 90% random, 8% near copies
    of those (0-4 bits flipped: re-encoded or resized), 2% exact repeats (copied files)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64, int(count * 0.9), dtype=np.uint64, endpoint=False)
    sources = base[rng.integers(0, len(base), int(count * 0.08))]
    flips = np.zeros(len(sources), dtype=np.uint64)
    for _ in range(4):
        bit = rng.integers(0, 64, len(sources)).astype(np.uint64)
        flips ^= np.where(rng.random(len(sources)) < 0.6, np.uint64(1) << bit, np.uint64(0))
    repeats = base[rng.integers(0, len(base), count - len(base) - len(sources))]
    return rng.permutation(np.concatenate([base, sources ^ flips, repeats]))
