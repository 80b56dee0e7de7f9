"""Long thin images: a few hundred bytes that pass any pixel limit, then become gigabytes when the
short side is scaled to the network's size (a 16000x1 PNG became 256 x 4,096,000 pixels, 5 GB in
serve). Every resize now starts from a central part at most 4:1 (data.decode.limit_aspect)."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab import load_model
from transferlab.data.decode import MAX_ASPECT, limit_aspect
from transferlab.data.loaders import decode_image
from transferlab.data.transforms import Preprocessing, eval_transform, train_transform
from transferlab.options import AUGMENTATIONS


def _long_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size, kept", [((16000, 1), (4, 1)), ((1, 100_000), (1, 4)),
                                        ((900, 200), (800, 200)), ((640, 480), (640, 480))])
def test_the_excess_of_a_long_side_is_cut_before_any_resize(size, kept):
    image = Image.new("RGB", size)
    assert limit_aspect(image).size == kept
    assert max(kept) <= MAX_ASPECT * min(kept)


def test_every_transform_of_a_long_image_stays_small():
    pre = Preprocessing(input_size=(3, 64, 64))
    data = _long_png(16000, 1)
    for transform in [eval_transform(pre), *(train_transform(pre, preset) for preset in AUGMENTATIONS)]:
        tensor = decode_image(io.BytesIO(data), transform, pre.resize_size)
        assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.uint8


def test_an_ordinary_photo_is_decoded_exactly_as_before():
    pre = Preprocessing(input_size=(3, 64, 64))
    pixels = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    direct = eval_transform(pre)(Image.fromarray(pixels))
    assert torch.equal(decode_image(buffer, eval_transform(pre), pre.resize_size), direct)


def _peak_rss_mb(*args) -> tuple[int, float]:
    """Exit code and peak resident memory (MB) of `transferlab ARGS` in a fresh process."""
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-c', 'from transferlab.cli import main; main()', "
            "*sys.argv[1:]], capture_output=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                            text=True, timeout=600)
    returncode, kilobytes = result.stdout.split()
    return int(returncode), int(kilobytes) / 1024


def test_predict_on_a_long_thin_file_takes_no_more_memory_than_on_a_photo(tiny_run, tmp_path):
    long_file, photo = tmp_path / "long.png", tmp_path / "photo.png"
    long_file.write_bytes(_long_png(8000, 1))  # before: 2.9 GB in `predict`
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(photo)
    code, baseline = _peak_rss_mb("predict", tiny_run.model_dir, photo, "--format", "json")
    assert code == 0
    code, peak = _peak_rss_mb("predict", tiny_run.model_dir, long_file, "--format", "json")
    assert code == 0 and peak < baseline + 150, (peak, baseline)
    top = load_model(tiny_run.model_dir).predict([long_file])[0]
    assert not top.error and top.top_k
