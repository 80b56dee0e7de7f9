"""Decoding image files: recognised by content, any mode to RGB, EXIF orientation applied."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
# The plugins of the supported formats, registered by importing them (Image.OPEN below).
from PIL import (BmpImagePlugin, GifImagePlugin, JpegImagePlugin, MpoImagePlugin,  # noqa: F401
                 PngImagePlugin, TiffImagePlugin, WebPImagePlugin)

# The formats README promises; anything else is treated as "not an image".
SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}
DEFAULT_MAX_PIXELS = 100_000_000  # refuse decompression bombs above this many pixels
MAX_ASPECT = 4.0  # longer side at most this many times the shorter before any resize (limit_aspect)
_BACKGROUND = (255, 255, 255)  # transparent pixels become white, not whatever colour they hide


class StoredImage(Protocol):
    """An image held elsewhere than in a file of its own, such as a row of a Hugging Face dataset
    (data/hf.py): str() names it, read_bytes() gives its encoded bytes."""

    def read_bytes(self) -> bytes: ...


Source = str | Path | BinaryIO | StoredImage  # what open_rgb and read_info read


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header of one image file (or a StoredImage) says, plus its content hashes. One per
    image of a data set, held for the whole run: slots, not a dict per instance (at 204,094 files
    the scan and split held 349-376 MB against 386-387)."""

    path: Path | StoredImage
    format: str
    mode: str
    width: int
    height: int
    sha256: str
    phash: int | None = None


class UnreadableImage(Exception):
    """The file is not an image we can decode; the message says why, in a few words."""


class TooManyPixels(UnreadableImage):
    """The header claims more pixels than allowed: refused before decoding (decompression bomb)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_folder(folder: Path) -> str:
    """One sha256 for a folder's files (a package such as a Core ML .mlpackage): over each file's
    path relative to `folder` and its sha256, in sorted path order, so it changes when any file is
    added, removed, renamed or altered."""
    digest = hashlib.sha256()
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for name in files:
        digest.update(f"{name}\0{sha256_of(folder / name)}\n".encode())
    return digest.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: Source, draft_size: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` (a file name, a binary file object such as io.BytesIO of an upload, or a
    StoredImage) as an
    RGB image with EXIF orientation applied.

    `draft_size` lets JPEG decoding skip detail finer than needed for that output size, which makes
    decoding large photos several times faster without changing what a resize to that size sees.
    Raises UnreadableImage with a short reason; TooManyPixels, before decoding, for more than
    `max_pixels`.
    """
    try:
        with _open_checked(path, max_pixels) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.seek(0)  # first frame of animations and multi-page files
            return to_rgb(ImageOps.exif_transpose(image))
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as error:
        # PIL's TIFF decoder repeats PIL's own check (179 MP) while loading, outside _open_checked
        raise TooManyPixels(f"too many pixels for PIL's decoder of this format ({error})") from None
    except _DECODE_ERRORS as error:
        raise UnreadableImage(_reason(error, path)) from None


def limit_aspect(image: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """The central part of `image` no longer than `max_aspect` times its short side.

    Every transform scales the short side to the network's size (256 px, say), so a long thin
    image would become enormous: a 16000x1 PNG of 94 bytes, within any pixel limit, resized to
    256 x 4,096,000 pixels took 5 GB. What the network sees is cut from the middle anyway (the
    evaluation crop keeps 1/crop_pct of the short side, about 1.14x; random crops keep an aspect
    ratio of at most 4:3), so cutting the excess first changes nothing a model uses.
    """
    width, height = image.size
    short = min(width, height)
    limit = max(1, int(short * max_aspect))
    if width > limit:
        left = (width - limit) // 2
        return image.crop((left, 0, left + limit, height))
    if height > limit:
        top = (height - limit) // 2
        return image.crop((0, top, width, top + limit))
    return image


def read_info(path: Path | StoredImage, with_phash: bool = False,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Header facts, a content hash and (optionally) a perceptual hash; the file is fully decoded so
    that truncated files are caught here rather than during training."""
    source = path if isinstance(path, (str, os.PathLike)) else _stored_bytes(path)  # read once
    try:
        with _open_checked(source, max_pixels) as image:
            fmt, mode, (width, height) = image.format, image.mode, image.size
    except UnreadableImage:
        raise
    except _DECODE_ERRORS as error:
        raise UnreadableImage(_reason(error, path)) from None
    # Decoding at 64 px is enough for the 32x32 perceptual hash and proves the data is decodable.
    rgb = open_rgb(source, draft_size=64, max_pixels=max_pixels)
    phash = _phash(rgb) if with_phash else None
    digest = sha256_of(path) if source is path else hashlib.sha256(source.getvalue()).hexdigest()
    return ImageInfo(path, fmt, mode, width, height, digest, phash)


def _stored_bytes(image: StoredImage) -> io.BytesIO:
    try:
        return io.BytesIO(image.read_bytes())
    except OSError as error:  # such as a dataset row that names a file which is gone
        raise UnreadableImage(_reason(error, "")) from None


def _phash(image: Image.Image) -> int:
    import imagehash

    bits = imagehash.phash(image, hash_size=8).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)
# What Image.open's own loop treats as "not this format, try the next plugin".
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, struct.error)
# The plugins of the supported formats, in the order Image.open tries them (JPEG's also opens MPO).
_PLUGINS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@contextmanager
def _open_checked(source: Source, max_pixels: int):
    """The image with only its header read, after our pixel limit; nothing is decoded yet.

    Image.open applies PIL's process-wide limit (a warning above 89 MP, an error above 179 MP) the
    moment the header is read, so `max_pixels` could not be raised above it, and switching it off
    for a moment would switch it off for every thread. So the header is read the way Image.open
    reads it, by the format's own plugin, and our limit replaces PIL's check of the header; PIL's
    global is never touched (its decoders still apply it to GIF frames and TIFF tiles).
    """
    named = isinstance(source, (str, os.PathLike))
    handle = (_open_regular_file(source) if named else
              _stored_bytes(source) if hasattr(source, "read_bytes") else source)
    try:
        image = _identify(handle, os.fspath(source) if named else "")
        with image:
            if image.format not in SUPPORTED_FORMATS:
                raise UnreadableImage(f"unsupported format {image.format}")
            width, height = image.size
            if width * height > max_pixels:
                raise TooManyPixels(f"{width}x{height} pixels exceeds the limit of {max_pixels:,} "
                                    "(possible decompression bomb; raise --max-pixels / max_pixels "
                                    "to accept it)")
            yield image
    finally:
        if handle is not source:
            handle.close()


def _open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """The file opened for reading, refused unless it is a regular file: opening a FIFO waits for
    a writer forever (a named pipe in a data folder hung `info`), a device reads without end.
    Opened without blocking, then checked, so nothing can swap the file in between."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise UnreadableImage("not a regular file (a pipe, socket or device)")
    if hasattr(os, "set_blocking"):
        os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def _identify(handle: BinaryIO, filename: str) -> Image.Image:
    """Image.open's identification loop over the supported formats' plugins, without its
    decompression-bomb check (see _open_checked)."""
    handle.seek(0)
    prefix = handle.read(16)
    for name in _PLUGINS:
        factory, accept = Image.OPEN[name]
        accepted = accept(prefix)
        if not accepted or isinstance(accepted, str):  # a string: the plugin's codec is missing
            continue
        try:
            handle.seek(0)
            return factory(handle, filename)
        except _NOT_THIS_FORMAT:
            continue
    raise UnidentifiedImageError("cannot identify image file")


def _reason(error: Exception, source: str | Path | BinaryIO) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "empty file (0 bytes)" if _is_empty(source) else "not a recognised image format"
    text = str(error).split("\n")[0] or type(error).__name__
    return text[:200]


def _is_empty(source: str | Path | BinaryIO) -> bool:
    try:
        if isinstance(source, (str, os.PathLike)):
            return os.stat(source).st_size == 0
        return source.seek(0, os.SEEK_END) == 0
    except (OSError, AttributeError, ValueError):
        return False
