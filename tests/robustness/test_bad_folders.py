"""Data folders that are wrong as a whole, and output folders that cannot be written: one clear error,
before any work, or a split that works and says what it did."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from transferlab import ImageFolderData
from transferlab.errors import DataError

from conftest import TINY_BACKBONE
from messy import read_only_prefix, run_cli, run_main


def _images(folder, count, seed=0, size=16):
    """`count` distinct noise images (no two are near-duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")


def _one_error_line(result, *fragments):
    """Exit code 2 and one `error:` line containing `fragments`; any other line is a whole log line."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(line.startswith(("WARNING: ", "INFO: ", "error:")) for line in lines), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def test_empty_class_folder_is_ignored_by_name(tmp_path, caplog):
    _images(tmp_path / "a", 6, 0)
    _images(tmp_path / "b", 6, 1)
    (tmp_path / "c").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with caplog.at_level(logging.WARNING):
        data = ImageFolderData(tmp_path, cache_dir=None)
        assert data.classes == ["a", "b"]  # a folder of unreadable files is no class either
    assert f"{tmp_path / 'c'}" in caplog.text and f"{tmp_path / 'd'}" in caplog.text
    assert [path.name for path, _ in data.scan.unreadable] == ["broken.jpg"]


def test_a_single_class_is_one_clear_error(tmp_path, capsys):
    _images(tmp_path / "data" / "only", 6)
    (tmp_path / "data" / "empty").mkdir()
    with pytest.raises(DataError, match="at least 2 classes"):
        ImageFolderData(tmp_path / "data", cache_dir=None).scan
    result = run_main(capsys, "train", tmp_path / "data", "--out", tmp_path / "run", "--no-cache")
    _one_error_line(result, "at least 2 classes", "only", "empty")
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("layout", ["nothing", "only text", "images at the top", "broken images"])
def test_a_folder_without_usable_images_says_what_it_found(tmp_path, layout, capsys):
    root = tmp_path / "data"
    root.mkdir()
    expected = {"nothing": "no class folders",
                "only text": "no readable images",
                "images at the top": "sub-folder per class",
                "broken images": "no readable images"}[layout]
    if layout == "only text":
        for name in ("a", "b"):
            (root / name).mkdir()
            (root / name / "notes.txt").write_text("hello")
    elif layout == "images at the top":
        _images(root, 4)
    elif layout == "broken images":
        for name in ("a", "b"):
            (root / name).mkdir()
            (root / name / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=expected):
        ImageFolderData(root, cache_dir=None).scan
    _one_error_line(run_main(capsys, "info", root), expected, str(root))


def test_classes_with_one_or_two_images_still_split_and_it_is_said(tmp_path, caplog):
    _images(tmp_path / "many", 20, 0)
    _images(tmp_path / "one", 1, 1)
    _images(tmp_path / "two", 2, 2)
    with caplog.at_level(logging.WARNING):
        data = ImageFolderData(tmp_path, cache_dir=None)
        split = data.split
    assert sorted(i for part in split.values() for i in part) == list(range(23))
    for name, count in (("one", 1), ("two", 2)):
        assert f"class {name!r} has only {count} image" in caplog.text
        label = data.classes.index(name)
        assert sum(data.scan.labels[i] == label for i in split["train"]) >= 1  # trainable
    notes = data.split_record()["notes"]
    assert any("'one'" in note for note in notes) and any("'two'" in note for note in notes)


def test_tiny_classes_train_end_to_end(tmp_path, capsys, caplog):
    _images(tmp_path / "data" / "many", 12, 0)
    _images(tmp_path / "data" / "two", 2, 2)
    result = run_main(capsys, "train", tmp_path / "data", "--backbone", TINY_BACKBONE, "--weights", "none",
                     "--out", tmp_path / "run", "--no-cache", "--quiet")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "'two' has only 2 images" in caplog.text
    assert "&#39;two&#39; has only 2 images" in (tmp_path / "run" / "report.html").read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["classes"] == ["many", "two"] and metrics["test"]["size"] >= 1


@pytest.mark.parametrize("command", ["train", "compare", "evaluate", "export"])
def test_read_only_output_is_refused_before_any_work(command, tiny_run, image_folder, tmp_path):
    locked = tmp_path / "locked"
    prefix = read_only_prefix(locked)
    cache = tmp_path / "cache"
    env = {**os.environ, "TRANSFERLAB_CACHE": str(cache)}
    out = locked / "out"
    args = {"train": ["train", image_folder, "--backbone", TINY_BACKBONE, "--weights", "none"],
            "compare": ["compare", image_folder, "--strategies", "extract", "--backbones", TINY_BACKBONE,
                        "--weights", "none"],
            "evaluate": ["evaluate", tiny_run.model_dir, image_folder],
            "export": ["export", tiny_run.model_dir]}[command]
    result = run_cli(*args, "--out", out / "model.onnx" if command == "export" else out, env=env,
                     prefix=prefix)
    _one_error_line(result, str(out), "cannot write")
    assert not cache.exists(), "the data was scanned before the output folder was checked"


def test_a_class_of_near_duplicates_stays_in_train_not_wholly_in_test(tmp_path, caplog):
    _images(tmp_path / "varied", 12, 0)
    same = tmp_path / "same"
    same.mkdir()
    for index in range(12):  # one scene, slightly brighter each time: a single near-duplicate group
        Image.fromarray(np.full((16, 16, 3), 100 + index, np.uint8)).save(same / f"{index}.png")
    with caplog.at_level(logging.WARNING):
        data = ImageFolderData(tmp_path, cache_dir=None)
        assert len(data.duplicates.near) == 1 and len(data.duplicates.near[0]) == 12
        assert set(data.labels("train")) == {0, 1}  # both classes can be learnt
    assert len(data.split["test"]) == 2 and set(data.labels("test")) == {data.classes.index("varied")}
    assert "class 'same' has 12 images in duplicate groups too large" in caplog.text
