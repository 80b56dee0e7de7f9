"""Hugging Face datasets as DATA: hf:PATH (save_to_disk, parquet) and hf:NAME (the hub)."""

import json
import logging
import sys
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE
from typer.testing import CliRunner

from transferlab.cli import app, main
from transferlab.data.folder import ImageFolderData
from transferlab.data.hf import HFSpec
from transferlab.errors import ConfigError, DataError

datasets = pytest.importorskip("datasets", reason="datasets not installed (pip install 'transferlab[hf]')")


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path, monkeypatch):
    """load_dataset("parquet") converts to Arrow files in its cache: keep them out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _files(root: Path) -> list[Path]:
    """The class folders' images in the order a folder scan takes them."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def _dataset(files: list[Path], classes: list[str]):
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
         "label": [classes.index(f.parent.name) for f in files]}, features=features)


def _saved(image_folder: Path, out: Path, splits: dict[str, slice] | None = None) -> Path:
    files = _files(image_folder)
    classes = sorted({f.parent.name for f in files})
    if splits is None:
        _dataset(files, classes).save_to_disk(str(out))
    else:
        datasets.DatasetDict({name: _dataset(files[part], classes) for name, part in splits.items()}
                             ).save_to_disk(str(out))
    return out


def _train(data, out: Path, **options):
    from transferlab import train

    return train(data, backbone=TINY_BACKBONE, weights="none", out=out, audit=False,
                 cache_dir=str(out.parent / "cache"), show_progress=False, **options)


def test_spec_parsing(tmp_path):
    assert HFSpec.parse("hf:beans") == HFSpec("beans")
    assert HFSpec.parse("hf:user/set:config") == HFSpec("user/set", "config")
    assert HFSpec.parse(f"hf:{tmp_path}") == HFSpec(str(tmp_path.resolve()))
    assert str(HFSpec.parse("hf:user/set:config")) == "hf:user/set:config"
    with pytest.raises(ConfigError, match="hf:PATH_OR_NAME"):
        HFSpec.parse("hf:")


def test_a_train_only_dataset_splits_as_its_folder_does(image_folder, tmp_path):
    """The same images in the same order give the same split and the same metrics: one code path."""
    saved = _saved(image_folder, tmp_path / "saved")
    from_folder = _train(image_folder, tmp_path / "folder")
    from_hf = _train(f"hf:{saved}", tmp_path / "hf")
    folder_split, hf_split = (json.loads((run.dir / "split.json").read_text())
                              for run in (from_folder, from_hf))
    for name in ("train", "val", "test"):
        assert [i["sha256"] for i in folder_split[name]] == [i["sha256"] for i in hf_split[name]]
        assert [i["label"] for i in folder_split[name]] == [i["label"] for i in hf_split[name]]
        assert runs_metric(from_folder, name) == runs_metric(from_hf, name)
    assert hf_split["root"] == f"hf:{saved.resolve()}"
    assert hf_split["train"][0]["file"].startswith("train/")
    predictions = (from_hf.dir / "predictions.csv").read_text().splitlines()
    assert predictions[1].split(",")[1].startswith("train/") or "train/" in predictions[1]
    assert (from_hf.dir / "report.html").is_file()
    recorded = json.loads((from_hf.dir / "run.json").read_text())["data"]
    assert recorded["root"] == f"hf:{saved.resolve()}"


def runs_metric(run, name):
    return run.metrics.get(name, {}).get("accuracy") if name != "train" else run.metrics["split"]["train"]


def test_its_own_splits_are_honoured(image_folder, tmp_path):
    files = _files(image_folder)
    saved = _saved(image_folder, tmp_path / "saved", {
        "train": slice(0, None, 2), "validation": slice(1, None, 4), "test": slice(3, None, 4)})
    data = ImageFolderData(f"hf:{saved}", cache_dir=None)
    assert data.classes == sorted({f.parent.name for f in files})
    assert [len(data.split[name]) for name in ("train", "val", "test")] == [
        len(files[0::2]), len(files[1::4]), len(files[3::4])]
    assert data.relative_files("val")[0] == "validation/0"
    assert data.summary()["presplit"] is True


def test_train_and_test_only_deals_val_out_of_train(image_folder, tmp_path):
    files = _files(image_folder)
    saved = _saved(image_folder, tmp_path / "saved", {"train": slice(0, None, 2),
                                                       "test": slice(1, None, 2)})
    data = ImageFolderData(f"hf:{saved}", cache_dir=None)
    assert len(data.split["test"]) == len(files[1::2])
    assert data.split["val"] and len(data.split["train"]) + len(data.split["val"]) == len(files[0::2])
    assert all(f.startswith("train/") for f in data.relative_files("val"))


def test_parquet_with_split_files_trains_end_to_end(image_folder, tmp_path):
    files = _files(image_folder)
    classes = sorted({f.parent.name for f in files})
    folder = tmp_path / "parquet"
    folder.mkdir()
    _dataset(files[0::2], classes).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    _dataset(files[1::2], classes).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    run = _train(f"hf:{folder}", tmp_path / "run")
    assert run.metrics["split"]["presplit"] is True
    assert run.metrics["split"]["val"] == len(files[1::2])
    assert run.metrics["val"]["accuracy"] is not None


def test_string_and_integer_labels(image_folder, tmp_path):
    files = _files(image_folder)
    images = [{"bytes": f.read_bytes(), "path": None} for f in files]
    first = files[0].parent.name
    for number, (labels, expected) in enumerate((
            ([f.parent.name for f in files], sorted({f.parent.name for f in files})),
            ([7 if f.parent.name == first else 3 for f in files], ["3", "7"]))):
        dataset = datasets.Dataset.from_dict({"picture": images, "kind": labels}).cast_column(
            "picture", datasets.Image())
        dataset.save_to_disk(str(tmp_path / str(number)))
        data = ImageFolderData(f"hf:{tmp_path / str(number)}", cache_dir=None,
                               image_column="picture", label_column="kind")
        assert data.classes == expected


def test_a_missing_column_names_it_and_the_columns(image_folder, tmp_path):
    saved = _saved(image_folder, tmp_path / "saved")
    with pytest.raises(ConfigError, match=r"no column 'photo'.*columns: image, label.*--image-column"):
        ImageFolderData(f"hf:{saved}", cache_dir=None, image_column="photo").scan  # noqa: B018
    with pytest.raises(ConfigError, match=r"no column 'kind'.*--label-column"):
        ImageFolderData(f"hf:{saved}", cache_dir=None, label_column="kind").scan  # noqa: B018
    with pytest.raises(ConfigError, match="--image-column"):
        ImageFolderData(image_folder, image_column="image")


def test_an_unreadable_row_is_named_and_skipped(image_folder, tmp_path, caplog):
    files = _files(image_folder)
    classes = sorted({f.parent.name for f in files})
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image" if i == 5 else f.read_bytes(), "path": None}
                   for i, f in enumerate(files)],
         "label": [classes.index(f.parent.name) for f in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}))
    dataset.save_to_disk(str(tmp_path / "saved"))
    with caplog.at_level(logging.WARNING):
        data = ImageFolderData(f"hf:{tmp_path / 'saved'}", cache_dir=None)
        assert len(data.scan.images) == len(files) - 1
    assert "train/5" in caplog.text and "not a recognised image format" in caplog.text
    record = data.split_record()
    assert record["unreadable"][0]["file"].endswith("train/5")


def test_info_on_a_saved_dataset(image_folder, tmp_path):
    saved = _saved(image_folder, tmp_path / "saved", {"train": slice(0, None, 2),
                                                       "validation": slice(1, None, 2)})
    result = CliRunner().invoke(app, ["info", f"hf:{saved}", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["layout"] == "Hugging Face dataset (split given)"
    assert report["images"] == len(_files(image_folder))
    assert report["root"] == f"hf:{saved.resolve()}"


def test_a_hub_name_that_cannot_be_loaded_is_one_line(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/beans' on the Hub (LocalEntryNotFoundError)\n...")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"hf:someone/beans:small: could not load 'someone/beans' "
                                        r"from the Hugging Face hub \(Couldn't reach.*local"):
        ImageFolderData("hf:someone/beans:small", cache_dir=None).scan  # noqa: B018
    # on the command line: one line, exit 2
    monkeypatch.setattr(sys, "argv", ["transferlab", "info", "hf:someone/beans"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    assert "hf:someone/beans: could not load 'someone/beans' from the Hugging Face hub" in (
        capsys.readouterr().err.replace("\n", ""))


def test_evaluate_and_audit_take_the_columns_train_took(image_folder, tmp_path):
    files = _files(image_folder)
    classes = sorted({f.parent.name for f in files})
    dataset = datasets.Dataset.from_dict(
        {"picture": [{"bytes": f.read_bytes(), "path": None} for f in files],
         "kind": [f.parent.name for f in files]}).cast_column("picture", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    data, columns = f"hf:{tmp_path / 'saved'}", ["--image-column", "picture", "--label-column", "kind"]
    run = _train(ImageFolderData(data, cache_dir=None, image_column="picture", label_column="kind"),
                 tmp_path / "run")
    assert run.metrics["classes"] == classes
    evaluated = CliRunner().invoke(app, ["evaluate", str(run.model_dir), data, *columns, "-q",
                                         "--out", str(tmp_path / "evaluated")])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "evaluated" / "metrics.json").read_text())
    assert metrics["classes"] == classes and metrics["data"]["images"] == len(files)
    audited = CliRunner().invoke(app, ["audit", data, *columns, "--backbone", TINY_BACKBONE,
                                       "--weights", "none", "--no-cache", "-q",
                                       "--out", str(tmp_path / "audited")])
    assert audited.exit_code == 0, audited.output
    assert json.loads((tmp_path / "audited" / "audit.json").read_text())["counts"]["images"] == len(files)
    without = CliRunner().invoke(app, ["evaluate", str(run.model_dir), data, "-q"])
    assert isinstance(without.exception, ConfigError) and "--image-column" in str(without.exception)
