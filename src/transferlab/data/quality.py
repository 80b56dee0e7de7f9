"""Image-quality flags: very small, extreme aspect ratio, nearly uniform (blank, black, over-exposed)
and blurred images.

Size and shape come from the scan (the header). The other two need pixels: each image is decoded
small (JPEG's draft mode skips the detail a 128 px grey copy does not need), in threads, one at a
time per thread, so memory stays flat whatever the data set's size. The two numbers per image are
cached by content hash beside the scan cache, so a second audit decodes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..rundir.atomic import write_json
from .decode import MAX_ASPECT, ImageInfo, UnreadableImage, open_rgb

log = logging.getLogger(__name__)

QUALITY_CACHE_FORMAT = 1
SAMPLE_PX = 128  # the grey copy's longer side: enough for contrast and sharpness, cheap to decode
MIN_SIDE = 32  # a shorter side under this many pixels is "small"
UNIFORM_STD = 6.0  # grey levels (0-255): below this standard deviation an image is nearly uniform
# Blur is relative to the data set: the variance of the Laplacian of the grey copy under this
# fraction of the data set's median (photos of one kind share a typical sharpness).
BLUR_FRACTION = 0.05


@dataclass(frozen=True)
class Pixels:
    """What the small grey copy of an image says."""

    mean: float  # 0-255
    std: float
    sharpness: float  # variance of the Laplacian


@dataclass
class QualityFlag:
    index: int  # the image's position in the list given
    flags: list[str]  # small, aspect, uniform, blurry
    detail: str  # the numbers behind them, in words


def measure(path: Path) -> Pixels | None:
    """Pixels of one image file, or None when it cannot be decoded any more."""
    from scipy.ndimage import laplace

    try:
        image = open_rgb(path, draft_size=SAMPLE_PX)
    except UnreadableImage:
        return None
    image.thumbnail((SAMPLE_PX, SAMPLE_PX))
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    return Pixels(float(grey.mean()), float(grey.std()), float(laplace(grey).var()))


class QualityCache:
    """Pixels by sha256 of the file's content, in one JSON file per cache folder."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / "quality" / f"pixels-{QUALITY_CACHE_FORMAT}-{SAMPLE_PX}.json"

    def load(self) -> dict[str, Pixels]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
            return {key: Pixels(*map(float, value)) for key, value in entries.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError, RecursionError) as error:
            log.warning("ignoring unreadable quality cache %s (%s)", self.path, error)
            return {}

    def save(self, known: dict[str, Pixels]) -> None:
        try:
            write_json(self.path, {key: [p.mean, p.std, p.sharpness] for key, p in known.items()})
        except OSError as error:  # a read-only cache costs speed, never the audit
            log.warning("could not write the quality cache %s (%s)", self.path, error)


def measure_all(images: list[ImageInfo], cache_dir: str | os.PathLike | None = None,
                workers: int | None = None) -> list[Pixels | None]:
    """Pixels of every image, from the cache where the content was measured before."""
    cache = QualityCache(Path(cache_dir)) if cache_dir else None
    known = cache.load() if cache else {}
    todo = [im for im in images if im.sha256 not in known]
    if todo:
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            for image, pixels in zip(todo, pool.map(lambda im: measure(im.path), todo)):
                if pixels is not None:
                    known[image.sha256] = pixels
        if cache:
            cache.save(known)
    return [known.get(im.sha256) for im in images]


def quality_flags(images: list[ImageInfo], pixels: list[Pixels | None]) -> list[QualityFlag]:
    """The images with at least one flag, in the order given."""
    sharpness = [p.sharpness for p in pixels if p is not None and p.std >= UNIFORM_STD]
    blur_limit = BLUR_FRACTION * float(np.median(sharpness)) if sharpness else 0.0
    found = []
    for index, (image, measured) in enumerate(zip(images, pixels)):
        flags, detail = [], []
        short, long = sorted((image.width, image.height))
        if short < MIN_SIDE:
            flags.append("small")
        if long > MAX_ASPECT * max(short, 1):
            flags.append("aspect")
        if flags:
            detail.append(f"{image.width}x{image.height} px")
        if measured is not None and measured.std < UNIFORM_STD:
            flags.append("uniform")
            detail.append(f"grey level {measured.mean:.0f} ± {measured.std:.1f}")
        elif measured is not None and measured.sharpness < blur_limit:
            flags.append("blurry")
            detail.append(f"sharpness {measured.sharpness:.0f} (data set median "
                          f"{blur_limit / BLUR_FRACTION:.0f})")
        if flags:
            found.append(QualityFlag(index, flags, "; ".join(detail)))
    return found

