"""Data folders that hung or were misread: a named pipe among the images (it hung `info` and
`train` forever), a class called "train", an extra folder beside train/ and val/, and many classes
of one image."""

import os
import threading

import numpy as np
import pytest
from PIL import Image

from transferlab.data.folder import ImageFolderData
from transferlab.errors import DataError

from messy import run_main


def _images(folder, count, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")


def test_a_named_pipe_among_the_images_is_skipped_not_waited_for(tmp_path, capsys):
    _images(tmp_path / "data" / "a", 4)
    _images(tmp_path / "data" / "b", 4, seed=1)
    os.mkfifo(tmp_path / "data" / "a" / "pipe.jpg")
    result = {}
    worker = threading.Thread(target=lambda: result.update(info=run_main(
        capsys, "info", tmp_path / "data", "--json", "--no-cache")), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "info hung on the pipe"
    assert result["info"].returncode == 0 and "pipe.jpg" in result["info"].stdout
    assert "not a regular file" in result["info"].stdout


def test_a_class_called_train_is_a_class(tmp_path):
    for name in ("train", "bus", "car"):
        _images(tmp_path / "vehicles" / name, 5, seed=len(name))
    data = ImageFolderData(tmp_path / "vehicles", cache_dir=None)
    assert data.classes == ["bus", "car", "train"] and data.scan.presplit is None


def test_an_extra_folder_beside_train_and_val_must_be_chosen(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("a", "b"):
            _images(root / split / name, 3, seed=len(split + name))
    _images(root / "extra", 3)
    with pytest.raises(DataError, match="--layout split.*--layout flat"):
        ImageFolderData(root, cache_dir=None).scan
    split = ImageFolderData(root, cache_dir=None, layout="split")
    assert split.classes == ["a", "b"] and split.scan.presplit is not None
    flat = ImageFolderData(root, cache_dir=None, layout="flat")
    assert flat.classes == ["extra", "train", "val"]


def test_info_on_a_pre_split_folder_counts_the_groups_that_span_splits(tmp_path, capsys):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for seed, name in enumerate(("a", "b")):
            _images(root / split / name, 3, seed=seed)  # the same images in train and val
    result = run_main(capsys, "info", root, "--no-cache")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "the folder came split: 6 groups span splits" in text
    assert "keeps each group together" not in text


def test_many_classes_of_one_image_say_so_once(tmp_path, caplog):
    for index in range(60):
        _images(tmp_path / "data" / f"class{index:02d}", 1, seed=index)
    data = ImageFolderData(tmp_path / "data", cache_dir=None)
    data.split
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) <= 7 and "55 more classes" in caplog.text
    assert "nothing to evaluate" in caplog.text
