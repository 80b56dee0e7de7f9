"""model/README.md (the model card) and model/labels.txt of every trained bundle."""

import logging
import shutil

import yaml
from typer.testing import CliRunner

from transferlab import train
from transferlab.cli import app
from transferlab.data.synthetic import make_image_folder
from transferlab.models.backbones import weights_license
from transferlab.reporting.model_card import markdown_text, write_model_card_or_warn

from conftest import TINY_BACKBONE


def split_card(text: str) -> tuple[dict, str]:
    """The front matter (parsed by a YAML parser) and the markdown of a model card."""
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_every_trained_bundle_has_a_card_and_labels(tiny_run):
    model = tiny_run.model_dir
    classes = tiny_run.metrics["classes"]
    assert (model / "labels.txt").read_text(encoding="utf-8") == "".join(f"{c}\n" for c in classes)
    meta, body = split_card((model / "README.md").read_text(encoding="utf-8"))
    assert meta["library_name"] == "transferlab" and meta["pipeline_tag"] == "image-classification"
    assert "transfer-learning" in meta["tags"] and "test_efficientnet" in meta["tags"]
    assert meta["license"] == "unknown"  # random initialisation: no upstream weights
    [entry] = meta["model-index"]
    results = {r["dataset"]["split"]: r for r in entry["results"]}
    assert set(results) == {"val", "test"}
    for split, result in results.items():
        assert result["task"]["type"] == "image-classification"
        assert result["dataset"]["name"] == "shapes"
        values = {m["type"]: m["value"] for m in result["metrics"]}
        assert values["accuracy"] == tiny_run.metrics[split]["accuracy"]
        assert values["f1"] == tiny_run.metrics[split]["macro_f1"]
    for section in ("## Intended use", "## Data", "## Results", "## Limitations", "## How to use"):
        assert section in body
    test = tiny_run.metrics["test"]
    low, high = test["accuracy_ci95"]
    assert f"95% CI {low:.2%} – {high:.2%}" in body
    assert f"{test['ece']:.4f}" in body and f"{test['temperature']:.4f}" in body
    assert "transferlab predict" in body and "from transferlab import load_model" in body
    assert f"seed {tiny_run.metrics['split']['seed']}" in body


def test_names_with_yaml_and_markdown_specials_round_trip(tmp_path):
    names = {"circles": "a: b #c", "squares": "- x", "triangles": "*[x]| <b>&"}
    root = make_image_folder(tmp_path / "data: [x] #1", classes=tuple(names), per_class=12, size=48)
    for old, new in names.items():
        (root / old).rename(root / new)
    run = train(root, backbone=TINY_BACKBONE, weights="none", out=tmp_path / "run",
                cache_dir=None, show_progress=False)
    classes = sorted(names.values())
    assert run.metrics["classes"] == classes
    assert (run.model_dir / "labels.txt").read_text(encoding="utf-8").splitlines() == classes
    meta, body = split_card((run.model_dir / "README.md").read_text(encoding="utf-8"))
    assert all(r["dataset"]["name"] == "data: [x] #1" for r in meta["model-index"][0]["results"])
    for name in classes:
        assert markdown_text(name) in body
    assert "\n- x" not in body and "| - x |" not in body  # never a list item or a bare cell
    assert "<b>" not in body
    assert "Few training images" in body  # 12 images a class, fewer in training


def test_markdown_text_escapes_what_markdown_would_read():
    assert markdown_text("a|b") == "a\\|b"
    assert markdown_text("# x_y*") == "\\# x\\_y\\*"
    assert markdown_text("two\nlines") == "two lines"


def test_weights_license():
    assert weights_license("resnet50", "imagenet") == "apache-2.0"  # timm's pretrained_cfg
    assert weights_license("efficientnet_lite0", "imagenet") == "unknown"  # its package declares none
    assert weights_license("resnet50", "none") == "unknown"


def test_a_card_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        write_model_card_or_warn(tmp_path)  # no metrics.json
    assert "model card (model/README.md) not written" in caplog.text


def test_report_rewrites_the_card(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.dir, copy)
    card = copy / "model" / "README.md"
    card.unlink()
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    meta, _ = split_card(card.read_text(encoding="utf-8"))
    assert meta["library_name"] == "transferlab"
