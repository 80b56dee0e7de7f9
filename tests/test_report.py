"""report.html, evaluate and compare on tiny synthetic runs."""

import csv
import json
import re
import shutil
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from transferlab.cli import app
from transferlab.workflows.compare import compare
from transferlab.data.folder import ImageFolderData
from transferlab.errors import DataError
from transferlab.workflows.evaluate import evaluate
from transferlab.rundir.predictions import PredictionTable
from transferlab.data.synthetic import make_image_folder

from conftest import TINY_BACKBONE

runner = CliRunner()


class _Resources(HTMLParser):
    """Every address the page would load (img, script, link, iframe, source...) and every link."""

    def __init__(self):
        super().__init__()
        self.loaded, self.links, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for name in ("src", "srcset", "data", "poster"):
            if attrs.get(name):
                self.loaded.append(attrs[name])
        if tag == "link" and attrs.get("href"):
            self.loaded.append(attrs["href"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def _parse(path):
    html = path.read_text(encoding="utf-8")
    parser = _Resources()
    parser.feed(html)
    return html, parser


def assert_self_contained(html, parser):
    assert parser.loaded, "expected embedded pictures"
    assert all(src.startswith("data:") for src in parser.loaded), parser.loaded
    text = re.sub(r"data:[a-z/+.-]+;base64,[A-Za-z0-9+/=]+", "", html)
    assert not re.search(r"[a-z][a-z0-9+.-]*://", text, re.IGNORECASE), "no external address"
    assert not re.search(r"""(src|href)=["']//""", text), "no protocol-relative address"
    assert "url(" not in html and "@import" not in html
    assert all(link.startswith("#") or not re.match(r"[a-z]+:", link) for link in parser.links)


def test_run_report_has_every_section_and_embeds_everything(tiny_head_run):
    html, parser = _parse(tiny_head_run.dir / "report.html")
    assert {"summary", "data", "duplicates", "curves", "results", "wrong", "model", "command"} <= parser.ids
    assert_self_contained(html, parser)
    assert html.count("data:image/png;base64,") >= 5  # counts, 2 curves, confusion, ROC, calibration
    table = PredictionTable.read(tiny_head_run.dir / "predictions.csv")
    wrong = table.confidently_wrong("test")
    assert html.count('class="thumb"') == min(12, len(wrong))
    assert "Every duplicate group" in html or "No duplicates were found" in html
    assert "circles" in html and "test_efficientnet" in html and "history.csv" in html
    metrics = tiny_head_run.metrics["test"]
    assert f"{metrics['accuracy']:.2%}" in html


def test_extract_report_has_no_learning_curves_and_can_be_rewritten(tiny_run):
    path = tiny_run.dir / "report.html"
    before = path.read_text()
    assert 'id="curves"' not in before and 'id="results"' in before
    path.unlink()
    result = runner.invoke(app, ["report", str(tiny_run.dir)])
    assert result.exit_code == 0, result.output
    assert path.is_file() and 'id="results"' in path.read_text()


def test_report_escapes_names_from_the_data(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("circles", "squares"), per_class=10, size=48)
    (root / "squares").rename(root / "<b>sq&amp;")
    from transferlab import train

    run = train(root, backbone=TINY_BACKBONE, weights="none", out=tmp_path / "run", cache_dir=None,
                show_progress=False)
    html = (run.dir / "report.html").read_text()
    assert "<b>sq" not in html and "&lt;b&gt;sq&amp;amp;" in html


def test_leaky_split_is_stated_in_the_report(tmp_path):
    from transferlab import train

    root = make_image_folder(tmp_path / "d", per_class=20, size=48)
    for copy in range(12):
        shutil.copy(root / "circles" / "circles_000.jpg", root / "circles" / f"copy_{copy}.jpg")
    kept = train(ImageFolderData(root, cache_dir=None), backbone=TINY_BACKBONE, weights="none",
                 out=tmp_path / "kept", cache_dir=None, show_progress=False)
    leaky = train(ImageFolderData(root, dedupe_split=False, cache_dir=None), backbone=TINY_BACKBONE,
                  weights="none", out=tmp_path / "leaky", cache_dir=None, show_progress=False)
    assert "Every duplicate group was kept within one split" in (kept.dir / "report.html").read_text()
    html = (leaky.dir / "report.html").read_text()
    assert "Leaky split" in html and "--no-dedupe-split" in html
    assert leaky.metrics["split"]["groups_across_splits"] == 1
    leak = leaky.metrics["test"]["leakage"]
    assert leak["images_with_copy_in_train"] >= 1 and f"{leak['images_with_copy_in_train']} test images have a copy" in html
    assert "leakage" not in kept.metrics["test"]


def test_evaluate_on_the_runs_own_test_split_reproduces_its_metrics(tiny_head_run, image_folder, tmp_path):
    result = evaluate(tiny_head_run.model_dir, ImageFolderData(image_folder, seed=0), split="test",
                      out=tmp_path / "eval", show_progress=False)
    own = tiny_head_run.metrics["test"]
    assert result.metrics["test"]["confusion_matrix"] == own["confusion_matrix"]
    assert result.metrics["test"]["loss"] == pytest.approx(own["loss"], abs=1e-4)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("accuracy", "accuracy_ci95", "loss", "macro_f1", "per_class", "confusion_matrix",
                "roc_auc", "ece"):
        assert key in written["test"], key
    html, parser = _parse(tmp_path / "eval" / "report.html")
    assert "Evaluation of head" in html and {"results", "wrong"} <= parser.ids
    assert_self_contained(html, parser)


def test_evaluate_cli_prints_tables_and_accepts_a_folder_of_one_known_class(tiny_run, image_folder, tmp_path):
    one_class = tmp_path / "only-squares"
    shutil.copytree(image_folder / "squares", one_class / "squares")
    result = runner.invoke(app, ["evaluate", str(tiny_run.model_dir), str(one_class), "--out",
                                 str(tmp_path / "eval"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "per class" in result.output and "confusion matrix" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert metrics["size"] == 20 and metrics["per_class"]["circles"]["support"] == 0
    assert metrics["roc_auc"] is None  # undefined with one class present


def test_evaluate_names_classes_the_model_does_not_know(tiny_run, tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("circles", "triangles"), per_class=5, size=48)
    with pytest.raises(DataError, match="'triangles' unknown to the model"):
        evaluate(tiny_run.model_dir, root, out=tmp_path / "eval", show_progress=False)
    assert not (tmp_path / "eval").exists()


def test_compare_two_strategies_on_one_split(image_folder, tmp_path, caplog):
    out = tmp_path / "cmp"
    args = ["compare", str(image_folder), "--strategies", "extract,head", "--backbones", TINY_BACKBONE,
            "--weights", "none", "--epochs", "1", "--out", str(out), "--no-cache", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with (out / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["strategy"], r["backbone"], r["runs"]) for r in rows] == [
        ("extract", TINY_BACKBONE, "1"), ("head", TINY_BACKBONE, "1")]
    assert rows[0]["epochs"] == "" and rows[1]["epochs"] == "1" and rows[1]["speed_of"] == "training"
    for row in rows:
        assert float(row["test_ci_low"]) <= float(row["test_accuracy"]) <= float(row["test_ci_high"])
        assert int(row["params_trainable"]) < int(row["params_total"])
    markdown = (out / "comparison.md").read_text().splitlines()
    assert len(markdown) == 4 and markdown[0].startswith("| strategy | backbone |")
    assert markdown[2].startswith("| extract |") and markdown[3].startswith("| head |")
    splits = {(out / r["run_dirs"] / "split.json").read_text() for r in rows}
    assert len(splits) == 1  # the very same split for every run
    html, parser = _parse(out / "report.html")
    assert_self_contained(html, parser)
    assert {"table", "plots", "runs", "data"} <= parser.ids
    assert "extract-test_efficientnet/report.html" in parser.links
    # a second call reuses the finished runs instead of training again
    stamp = (out / "head-test_efficientnet" / "metrics.json").stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0
    assert (out / "head-test_efficientnet" / "metrics.json").stat().st_mtime_ns == stamp


def test_compare_repeats_report_mean_and_spread(image_folder, tmp_path):
    result = compare(image_folder, ["head"], [TINY_BACKBONE], repeats=2, out=tmp_path / "cmp",
                     weights="none", epochs=1, cache_dir=None, show_progress=False, report=False)
    assert [run["seed"] for run in result.runs] == [0, 1]
    (row,) = result.rows
    assert row["runs"] == 2 and row["test_accuracy_std"] is not None
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir()) == [
        "head-test_efficientnet-seed0", "head-test_efficientnet-seed1"]
    assert "± " in (tmp_path / "cmp" / "comparison.md").read_text()


def test_compare_checks_every_configuration_before_training(image_folder, tmp_path):
    from transferlab.errors import ConfigError

    with pytest.raises(ConfigError, match="scratch trains from random weights"):
        compare(image_folder, ["extract", "scratch"], [TINY_BACKBONE], out=tmp_path / "cmp",
                weights="imagenet", cache_dir=None, show_progress=False)
    assert not (tmp_path / "cmp").exists()


def test_compare_records_a_failed_run_and_still_writes_the_table(image_folder, tmp_path):
    result = compare(image_folder, ["extract"], [TINY_BACKBONE], out=tmp_path / "cmp",
                     weights=str(tmp_path / "missing.safetensors"), cache_dir=None, show_progress=False)
    assert len(result.failed) == 1 and "missing.safetensors" in result.failed[0]["error"]
    with (tmp_path / "cmp" / "comparison.csv").open() as handle:
        (row,) = csv.DictReader(handle)
    assert row["runs"] == "0" and "missing.safetensors" in row["error"]
    assert "failed" in (tmp_path / "cmp" / "report.html").read_text()
