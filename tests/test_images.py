import io

import numpy as np
import pytest
from PIL import Image

from transferlab.images import UnreadableImage, open_rgb, read_info, to_rgb


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def test_every_mode_becomes_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparency shows as white
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).mode == "RGB"


def test_content_not_extension_decides(tmp_path):
    png_named_jpg = _save(tmp_path / "photo.jpg", Image.new("RGB", (10, 6), "blue"), format="PNG")
    info = read_info(png_named_jpg, with_phash=True)
    assert (info.format, info.width, info.height) == ("PNG", 10, 6)
    assert info.phash is not None and len(info.sha256) == 64
    text = tmp_path / "notes.jpg"
    text.write_text("<html>not an image</html>")
    with pytest.raises(UnreadableImage, match="not a recognised image format"):
        read_info(text)


def test_truncated_and_empty_files_are_unreadable(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (truncated, empty):
        with pytest.raises(UnreadableImage):
            read_info(path)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    path = _save(tmp_path / "rotated.jpg", image, exif=exif)
    assert open_rgb(path).size == (10, 20)


def test_pixel_limit_refuses_huge_images(tmp_path):
    path = _save(tmp_path / "big.png", Image.new("L", (300, 300)))
    with pytest.raises(UnreadableImage, match="exceeds the limit"):
        open_rgb(path, max_pixels=10_000)
