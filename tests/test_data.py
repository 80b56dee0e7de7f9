import shutil

import pytest
from PIL import Image

from transferlab.data.folder import ImageFolderData
from transferlab.data.split import split_groups
from transferlab.errors import ConfigError, DataError
from transferlab.data.synthetic import make_image_folder


def test_split_is_stratified_seeded_and_complete(image_folder):
    data = ImageFolderData(image_folder, val=0.2, test=0.2, seed=3)
    split = data.split
    every = sorted(i for name in split for i in split[name])
    assert every == list(range(len(data.scan.images)))  # each image in exactly one split
    for label in range(2):
        assert sum(data.scan.labels[i] == label for i in split["test"]) == 4  # 20% of 20
    again = ImageFolderData(image_folder, val=0.2, test=0.2, seed=3).split
    other = ImageFolderData(image_folder, val=0.2, test=0.2, seed=4).split
    assert again == split and other != split


def test_duplicates_stay_in_one_split(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=20, size=64)
    source = root / "circles" / "circles_000.jpg"
    for copy in range(3):
        shutil.copy(source, root / "circles" / f"copy_{copy}.jpg")
    Image.open(source).resize((60, 60)).save(root / "circles" / "resized.png")  # near-duplicate
    data = ImageFolderData(root, seed=0)
    assert len(data.duplicates.exact) == 1 and len(data.duplicates.exact[0]) == 4
    group = next(g for g in data.duplicates.near if len(g) == 5)
    homes = {name for name, indices in data.split.items() for i in group if i in indices}
    assert len(homes) == 1
    assert data.summary()["duplicate_groups"] == 1


def test_split_groups_keeps_components_whole():
    labels = [0] * 10 + [1] * 10
    components = [[0, 1, 2, 3], *[[i] for i in range(4, 20)]]
    split = split_groups(labels, components, val=0.2, test=0.2, seed=0)
    holder = [name for name, idx in split.items() if 0 in idx][0]
    assert {1, 2, 3} <= set(split[holder])


def test_presplit_layout_is_respected(tmp_path):
    for name in ("train", "validation", "test"):
        make_image_folder(tmp_path / name, per_class=3, size=32, seed=len(name))
    data = ImageFolderData(tmp_path)
    assert [len(data.split[s]) for s in ("train", "val", "test")] == [6, 6, 6]
    assert data.classes == ["circles", "squares"]


def test_bad_folders_and_fractions_are_clear_errors(tmp_path):
    make_image_folder(tmp_path / "one", classes=("circles",), per_class=3, size=32)
    with pytest.raises(DataError, match="at least 2 classes"):
        ImageFolderData(tmp_path / "one").scan
    with pytest.raises(DataError, match="not a folder"):
        ImageFolderData(tmp_path / "missing").scan
    with pytest.raises(ConfigError, match="val=0.6"):
        ImageFolderData(tmp_path, val=0.6, test=0.5)


def test_split_record_lists_relative_files(image_folder):
    record = ImageFolderData(image_folder).split_record()
    assert record["seed"] == 0 and record["classes"] == ["circles", "squares"]
    files = [item["file"] for name in ("train", "val", "test") for item in record[name]]
    assert len(files) == 40 and all(f.split("/")[0] in record["classes"] for f in files)


def test_leaky_split_is_reported(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=20, size=64)
    for copy in range(12):  # one image with many copies: a plain split scatters them
        shutil.copy(root / "circles" / "circles_000.jpg", root / "circles" / f"copy_{copy}.jpg")
    assert ImageFolderData(root).summary()["groups_across_splits"] == 0
    assert ImageFolderData(root, dedupe_split=False).summary()["groups_across_splits"] == 1


def test_scan_cache_skips_unchanged_files_and_rereads_edited_ones(tmp_path, monkeypatch):
    import transferlab.data.scan

    root = make_image_folder(tmp_path / "d", per_class=4, size=32)
    first = ImageFolderData(root, cache_dir=tmp_path / "cache").scan
    edited = root / "circles" / "circles_000.jpg"
    Image.new("RGB", (40, 30), "green").save(edited, format="JPEG")
    read = []
    original = transferlab.data.scan.read_info
    monkeypatch.setattr(transferlab.data.scan, "read_info", lambda path, **kw: read.append(path) or
                        original(path, **kw))
    second = ImageFolderData(root, cache_dir=tmp_path / "cache").scan
    assert read == [edited]
    assert [im.sha256 for im in second.images if im.path != edited] == [
        im.sha256 for im in first.images if im.path != edited]
    assert next(im for im in second.images if im.path == edited).width == 40
    # read back from the cache's JSON, every file shares one string per format and mode
    assert len({id(im.format) for im in second.images}) == len({im.format for im in second.images})
    assert len({id(im.mode) for im in second.images}) == len({im.mode for im in second.images})
