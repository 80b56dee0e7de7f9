"""Generate a large labelled image folder for the scale benchmark (bench_scale.py); prints JSON.

Run: python benchmarks/make_large_folder.py /work/large [--images 200000] [--seed 0]
     [--face-mask ../shared/datasets/face-mask]

Writes --images small varied images (64-160 px on each side, one of five shapes of random colour
and size on a noisy background, JPEG of varied quality or PNG) under OUT/<shape>/, and links the
face-mask set's class folders in beside them (hard links, or copies across file systems), so the
folder holds real photos and their real duplicates. Image i depends only on (--seed, i): the same
command writes the same bytes, in any number of processes. Files that already exist are kept, so
an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circles", "squares", "triangles", "stripes", "rings")
DEFAULT_FACE_MASK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "face-mask"
CHUNK = 2_000  # images per task: large enough that the pool's overhead is negligible


def image_path(out: Path, index: int) -> Path:
    shape = SHAPES[index % len(SHAPES)]
    suffix = ".png" if index % 4 == 3 else ".jpg"  # a quarter PNG, the rest JPEG
    return out / shape / f"{shape}_{index:07d}{suffix}"


def draw(index: int, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(64, 161, 2))
    background = rng.integers(0, 256, 3)
    # coarse blotches (a few pixels of noise scaled up) plus fine grain: cheaper than a blur
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
    blotches = np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    mix = rng.uniform(0.5, 0.9)
    pixels = (background * mix + blotches * (1 - mix) + grain).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    canvas = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    extent = rng.uniform(0.35, 0.8) * min(width, height)
    x0, y0 = rng.uniform(0, width - extent), rng.uniform(0, height - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    shape = SHAPES[index % len(SHAPES)]
    if shape == "circles":
        canvas.ellipse(box, fill=colour)
    elif shape == "squares":
        canvas.rectangle(box, fill=colour)
    elif shape == "triangles":
        canvas.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    elif shape == "stripes":
        step = max(4, int(extent / 6))
        for x in range(int(x0), int(x0 + extent), 2 * step):
            canvas.rectangle((x, y0, x + step, y0 + extent), fill=colour)
    else:
        canvas.ellipse(box, outline=colour, width=max(3, int(extent / 8)))
    return image


def write_chunk(out: Path, start: int, stop: int, seed: int) -> int:
    """Write images start..stop-1 that do not exist yet; returns how many were written."""
    written = 0
    for index in range(start, stop):
        path = image_path(out, index)
        if path.exists():
            continue
        image = draw(index, seed)
        rng = np.random.default_rng([seed, index, 1])
        partial = path.with_name(f".{path.name}.partial")  # hidden: the scan ignores a leftover
        if path.suffix == ".png":
            image.save(partial, format="PNG", compress_level=1)  # fast; size is not the point
        else:
            image.save(partial, format="JPEG", quality=int(rng.integers(60, 96)))
        os.replace(partial, path)
        written += 1
    return written


def link_tree(source: Path, out: Path) -> int:
    """Hard-link (or copy) every file of `source`'s class folders into out/<class>/."""
    linked = 0
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        target = out / path.relative_to(source)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        linked += 1
    return linked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--face-mask", default=str(DEFAULT_FACE_MASK),
                        help="a labelled folder linked in beside the shapes ('' for none)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    started = time.perf_counter()
    for shape in SHAPES:
        (args.out / shape).mkdir(parents=True, exist_ok=True)
    starts = range(0, args.images, CHUNK)
    with ProcessPoolExecutor(args.workers) as pool:
        written = sum(pool.map(write_chunk, [args.out] * len(starts), starts,
                               [min(s + CHUNK, args.images) for s in starts], [args.seed] * len(starts)))
    linked = link_tree(Path(args.face_mask), args.out) if args.face_mask else 0
    print(json.dumps({"out": str(args.out), "images": args.images, "written": written,
                      "face_mask_files_linked": linked, "seconds": round(time.perf_counter() - started, 1)},
                     indent=2))


if __name__ == "__main__":
    main()
