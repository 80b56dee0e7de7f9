"""Messy files and folders as they come from the web, made on the spot, and the CLI run as a user runs it.

Each entry of FILE_CASES writes one file and says what transferlab must make of it: an RGB image of a
known size, or an unreadable file whose reason matches a pattern.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image


def _noise(size=(48, 32), mode="RGB", seed=0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1, "CMYK": 4}[mode]
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def zero_bytes() -> bytes:
    return b""


def truncated_jpeg() -> bytes:
    data = _encoded(_noise((64, 64)), "JPEG", quality=90)
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    data = _encoded(_noise((64, 64)), "PNG")
    return data[: len(data) // 2]


def html_named_jpg() -> bytes:
    return b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n"


def text_named_jpg() -> bytes:
    return "just some notes, not a photo\n".encode()


def png_named_jpg() -> bytes:
    return _encoded(_noise((40, 30)), "PNG")


def cmyk_jpeg() -> bytes:
    return _encoded(_noise((40, 30), "CMYK"), "JPEG")


def png_16_bit() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 40, dtype=np.uint16), (30, 1))
    return _encoded(Image.fromarray(ramp), "PNG")


def png_1_bit() -> bytes:
    return _encoded(_noise((40, 30), "L").convert("1"), "PNG")


def palette_png_with_transparency() -> bytes:
    image = _noise((40, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encoded(image, "PNG", transparency=0)


def la_png() -> bytes:
    return _encoded(_noise((40, 30), "LA"), "PNG")


def rgba_png() -> bytes:
    return _encoded(_noise((40, 30), "RGBA"), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 10), "blue")]
    return _encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: a 40x30 sensor image is a 30x40 photo
    return _encoded(_noise((40, 30)), "JPEG", exif=exif)


def one_pixel() -> bytes:
    return _encoded(Image.new("RGB", (1, 1), "white"), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, with a few rows of zeros: what a
    decompression bomb looks like to a reader, without the gigabytes."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\0" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def decompression_bomb() -> bytes:
    return png_header_only(100_000, 100_000)  # 10 gigapixels claimed, a few kB on disk


def huge_jpeg() -> bytes:
    """A real 20000x20000 JPEG (greyscale, flat, so it is small on disk)."""
    return _encoded(Image.new("L", (20_000, 20_000), 128), "JPEG", quality=50)


@dataclass(frozen=True)
class FileCase:
    name: str  # the file name written, extension as found in the wild
    make: Callable[[], bytes]
    size: tuple[int, int] | None = None  # decoded (width, height); None: unreadable
    reason: str = ""  # pattern the unreadable reason must match

    @property
    def readable(self) -> bool:
        return self.size is not None


FILE_CASES = [
    FileCase("zero-byte.jpg", zero_bytes, reason="empty file"),
    FileCase("truncated.jpg", truncated_jpeg, reason="truncated|broken"),
    FileCase("truncated.png", truncated_png, reason="truncated|broken"),
    FileCase("page.html.jpg", html_named_jpg, reason="not a recognised image format"),
    FileCase("notes.jpg", text_named_jpg, reason="not a recognised image format"),
    FileCase("really-a-png.jpg", png_named_jpg, size=(40, 30)),
    FileCase("cmyk.jpg", cmyk_jpeg, size=(40, 30)),
    FileCase("sixteen-bit.png", png_16_bit, size=(40, 30)),
    FileCase("one-bit.png", png_1_bit, size=(40, 30)),
    FileCase("palette-transparent.png", palette_png_with_transparency, size=(40, 30)),
    FileCase("grey-alpha.png", la_png, size=(40, 30)),
    FileCase("rgba.png", rgba_png, size=(40, 30)),
    FileCase("animated.gif", animated_gif, size=(40, 30)),
    FileCase("multipage.tif", multipage_tiff, size=(40, 30)),
    FileCase("exif-rotated.jpg", exif_rotated_jpeg, size=(30, 40)),
    FileCase("one-pixel.png", one_pixel, size=(1, 1)),
    FileCase("bomb.png", decompression_bomb, reason="exceeds the limit"),
]
CASES_BY_NAME = {case.name: case for case in FILE_CASES}


def write_cases(folder: Path, cases=FILE_CASES) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in cases:
        paths[case.name] = folder / case.name
        paths[case.name].write_bytes(case.make())
    return paths


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_main(capsys, *args) -> CliResult:
    """The `transferlab` entry point in this process (seconds faster than run_cli): the same exit
    code and error line; an unexpected exception propagates, as a traceback would."""
    from transferlab.cli import main

    argv, sys.argv = sys.argv, ["transferlab", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def run_cli(*args, env=None, prefix: list[str] = (), timeout: float = 300) -> CliResult:
    """The `transferlab` entry point in a fresh process, as a user runs it (exit code, stderr)."""
    command = [*prefix, sys.executable, "-c", "from transferlab.cli import main; main()", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    return CliResult(result.returncode, result.stdout, result.stderr)


def read_only_prefix(folder: Path) -> list[str]:
    """A command prefix under which `folder` is read-only, even for root (who ignores file modes): a
    private read-only bind mount when running as root, else plain permissions."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ["unshare", "--mount", "sh", "-c", script, str(folder)]
    if not shutil.which("unshare") or subprocess.run([*prefix, "true"]).returncode != 0:
        pytest.skip("running as root without mount namespaces (unshare --mount): cannot make a "
                    "read-only folder here")
    return prefix


def full_disk_prefix(folder: Path, size: str = "300k") -> list[str]:
    """A command prefix under which `folder` is a file system of `size` (a private tmpfs in a mount
    namespace), so that writing more into it fails with ENOSPC, as on a full disk."""
    folder.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"'
    prefix = ["unshare", "--mount", "sh", "-c", script, str(folder)]
    if os.geteuid() != 0 or not shutil.which("unshare") or subprocess.run(
            [*prefix, "true"]).returncode != 0:
        pytest.skip("needs root and mount namespaces (unshare --mount) to make a small file system")
    return prefix
