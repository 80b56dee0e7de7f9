import numpy as np
import pytest
from PIL import Image

from transferlab.data.decode import UnreadableImage, read_info, to_rgb


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
