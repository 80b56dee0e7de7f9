"""Labels from a file: a CSV as DATA or with --labels, and Hugging Face's imagefolder metadata file."""

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SHARED_FACE_MASK, TINY_BACKBONE, needs_real_weights_and_data
from transferlab.cli import app
from transferlab.data.folder import ImageFolderData
from transferlab.errors import ConfigError, DataError


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                  and p.parent != root)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _labels_csv(root: Path, path: Path, prefix: str = "") -> Path:
    """A CSV naming every image of a class-folder tree, rows in reverse order (order must not matter)."""
    return _write_csv(path, ["file", "label"], [[prefix + f, f.split("/")[0]]
                                                for f in reversed(_files(root))])


def _train(data, out: Path, **options):
    from transferlab import train

    return train(data, backbone=TINY_BACKBONE, weights="none", out=out, audit=False,
                 cache_dir=str(out.parent / "cache"), show_progress=False, **options)


def test_folder_csv_and_metadata_give_the_same_split_and_metrics(image_folder, tmp_path):
    root = shutil.copytree(image_folder, tmp_path / "shapes")
    from_folder = _train(root, tmp_path / "folder")
    from_csv = _train(_labels_csv(root, root / "labels.csv"), tmp_path / "csv")
    _write_csv(root / "metadata.csv", ["file_name", "shape"],
               [[f, f.split("/")[0]] for f in _files(root)])
    from_metadata = _train(root, tmp_path / "metadata")
    runs = (from_folder, from_csv, from_metadata)
    splits = [(run.dir / "split.json").read_bytes() for run in runs]
    assert splits[0] == splits[1] == splits[2]
    for name in ("val", "test", "split"):
        assert runs[0].metrics[name] == runs[1].metrics[name] == runs[2].metrics[name]
    recorded = json.loads((from_csv.dir / "run.json").read_text())["data"]
    assert recorded["root"] == str((root / "labels.csv").resolve())


def test_labels_option_paths_are_relative_to_data_and_split_column_is_used(image_folder, tmp_path):
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    files = _files(image_folder)
    split = {f: ("test" if i % 5 == 0 else "val" if i % 5 == 1 else "train") for i, f in enumerate(files)}
    labels = _write_csv(elsewhere / "labels.csv", ["file", "label", "split"],
                        [[f, f.split("/")[0], split[f].upper()] for f in files])
    data = ImageFolderData(image_folder, labels=labels, cache_dir=None)
    assert data.classes == ["circles", "squares"] and len(data.scan.images) == len(files)
    assert data.scan.presplit is not None
    for name in ("train", "val", "test"):
        assert sorted(data.relative_files(name)) == sorted(f for f in files if split[f] == name)
    assert data.options()["labels"] == str(labels.resolve())
    assert ImageFolderData(**data.options(), cache_dir=None).split == data.split


def test_paths_outside_the_csv_folder_and_absolute_paths(image_folder, tmp_path):
    files = _files(image_folder)
    lists = tmp_path / "lists"
    lists.mkdir()
    up = Path(os.path.relpath(image_folder, lists)).as_posix()
    rows = [[str(image_folder / f) if i % 2 else f"{up}/{f}", f.split("/")[0]]
            for i, f in enumerate(files)]
    data = ImageFolderData(_write_csv(lists / "labels.csv", ["file", "label"], rows), cache_dir=None)
    assert data.scan.root == lists
    assert sorted(data.scan.relative(i) for i in range(len(files))) == [f"{up}/{f}" for f in files]


def test_bad_rows_are_named_and_left_out(image_folder, tmp_path, caplog):
    files = _files(image_folder)
    rows = [[f, f.split("/")[0]] for f in files[2:]]
    rows += [["circles/missing.jpg", "circles"], [files[0], ""], [files[1], "circles"],
             [files[1], "squares"], ["", ""]]
    path = _write_csv(tmp_path / "labels.csv", ["file", "label"], rows)
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image_folder / f, tmp_path / f)
    (tmp_path / "squares" / "broken.png").write_bytes(b"not an image")
    path = _write_csv(path, ["file", "label"], [*rows, ["squares/broken.png", "squares"]])
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        data = ImageFolderData(path, cache_dir=None)
        scan = data.scan
    assert len(scan.images) == len(files) - 2
    assert {p.name for p, _ in scan.unreadable} == {"missing.jpg", "broken.png"}
    lines = [r.getMessage() for r in caplog.records]
    n = len(files)  # the header is row 1, files[2:] fill rows 2 to n-1
    assert any(f"labels.csv row {n}: circles/missing.jpg: no such file" in line for line in lines)
    assert any(f"labels.csv row {n + 1}: no label for {files[0]}" in line for line in lines)
    assert any(f"labels.csv row {n + 3}: {files[1]} is labelled 'squares' here and 'circles' in row "
               f"{n + 2}" in line for line in lines)
    assert any("broken.png" in line for line in lines)


def test_a_missing_column_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"labels.csv: no column named label .*\(file, kind, size\)"):
        ImageFolderData(_write_csv(tmp_path / "labels.csv", ["file", "kind", "size"], [["a", "b", "c"]]),
                        cache_dir=None).scan
    with pytest.raises(ConfigError, match=r"labels.csv: no column named file \(or file_name\)"):
        ImageFolderData(_write_csv(tmp_path / "labels.csv", ["path", "label"], [["a", "b"]]),
                        cache_dir=None).scan
    with pytest.raises(ConfigError, match="--labels .*nope.csv: no such file"):
        ImageFolderData(tmp_path, labels=tmp_path / "nope.csv")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder, a .csv or a .jsonl file"):
        ImageFolderData(tmp_path / "notes.txt")


def test_a_partial_split_column_is_an_error(image_folder, tmp_path):
    files = _files(image_folder)
    rows = [[f, f.split("/")[0], "train" if i else ""] for i, f in enumerate(files)]
    path = _write_csv(tmp_path / "labels.csv", ["file", "label", "split"],
                      [[str(image_folder / f), label, s] for f, label, s in rows])
    with pytest.raises(DataError, match="split column is empty in row 2"):
        ImageFolderData(path, cache_dir=None).scan


def test_metadata_jsonl_and_info(image_folder, tmp_path):
    root = shutil.copytree(image_folder, tmp_path / "shapes")
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for name in _files(root):
            f.write(json.dumps({"file_name": name, "label": name.split("/")[0], "note": 1}) + "\n")
    result = CliRunner().invoke(app, ["info", str(root), "--json", "--no-cache"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["layout"] == "labels from metadata.jsonl"
    assert report["images"] == len(_files(image_folder))
    csv_path = _labels_csv(image_folder, tmp_path / "labels.csv")
    result = CliRunner().invoke(app, ["info", str(image_folder), "--labels", str(csv_path), "--json",
                                      "--no-cache"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["labels_file"] == str(csv_path)


def _with(marks):
    def decorate(test):
        for mark in marks:
            test = mark(test)
        return test
    return decorate


@_with(needs_real_weights_and_data())
def test_face_mask_subset_folder_csv_and_metadata_agree(tmp_path):
    from transferlab import train

    root = tmp_path / "face-mask"
    for name in ("with_mask", "without_mask"):
        (root / name).mkdir(parents=True)
        for path in sorted((SHARED_FACE_MASK / name).iterdir())[:15]:
            shutil.copy(path, root / name / path.name)
    options = dict(strategy="extract", audit=False, show_progress=False,
                   cache_dir=str(tmp_path / "cache"))
    runs = [train(root, out=tmp_path / "folder", **options)]
    runs.append(train(_labels_csv(root, root / "labels.csv"), out=tmp_path / "csv", **options))
    _write_csv(root / "metadata.csv", ["file_name", "label"], [[f, f.split("/")[0]] for f in _files(root)])
    runs.append(train(root, out=tmp_path / "metadata", **options))
    splits = [(run.dir / "split.json").read_bytes() for run in runs]
    assert splits[0] == splits[1] == splits[2]
    assert runs[0].metrics["test"] == runs[1].metrics["test"] == runs[2].metrics["test"]
