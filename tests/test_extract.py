import json

import numpy as np

import pytest

from transferlab import load_model, train
from transferlab.errors import ConfigError
from transferlab.rundir.predictions import PredictionTable

from conftest import TINY_BACKBONE


def test_run_directory_follows_the_contract(tiny_run):
    metrics = json.loads((tiny_run.dir / "metrics.json").read_text())
    assert metrics["strategy"] == "extract" and metrics["classes"] == ["circles", "squares"]
    assert {"train", "val", "test", "seed", "duplicate_groups", "near_duplicate_groups"} <= set(
        metrics["split"])
    assert metrics["split"]["train"] + metrics["split"]["val"] + metrics["split"]["test"] == 40
    table = PredictionTable.read(tiny_run.dir / "predictions.csv")
    for name in ("val", "test"):  # the metrics are those of the predictions the run wrote
        rows = table.select(name)
        right = (table.proba[rows].argmax(1) == table.labels[rows]).mean()
        assert metrics[name]["accuracy"] == pytest.approx(right) and metrics[name]["loss"] > 0
    test = metrics["test"]
    assert set(test["per_class"]) == {"circles", "squares"}
    assert sum(map(sum, test["confusion_matrix"])) == metrics["split"]["test"]
    assert {"total_s", "embed_images_per_s", "train_s"} <= set(metrics["timing"])
    assert metrics["params"]["trainable"] == 2 * 256 + 2  # two-logit linear head on 256 features
    split = json.loads((tiny_run.dir / "split.json").read_text())
    assert len(split["test"]) == metrics["split"]["test"]
    assert (tiny_run.model_dir / "model.safetensors").is_file()
    assert json.loads((tiny_run.dir / "run.json").read_text())["config"]["backbone"] == TINY_BACKBONE


def test_second_run_uses_the_cache_and_gives_identical_metrics(tiny_run, image_folder, tmp_path):
    cache = tiny_run.dir.parent / "cache"
    again = train(image_folder, backbone=TINY_BACKBONE, weights="none", out=tmp_path / "again",
                  cache_dir=str(cache), show_progress=False)
    assert again.metrics["timing"]["embedded"] == 0 and again.metrics["timing"]["cached"] == 40
    # other random weights would give other embeddings: "none" is seeded, so results repeat
    assert again.metrics["test"] == tiny_run.metrics["test"]


def test_mlp_classifier(image_folder, tmp_path):
    run = train(image_folder, backbone=TINY_BACKBONE, weights="none", classifier="mlp",
                out=tmp_path / "mlp", cache_dir=None, show_progress=False)
    config = json.loads((run.model_dir / "config.json").read_text())
    assert config["head"]["hidden"] == [250, 100]
    assert run.metrics["precision"]["transplant_max_abs_diff"] < 1e-4


def test_bad_options_fail_before_any_work(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="strategy='magic'"):
        train(image_folder, strategy="magic", out=tmp_path / "x")
    with pytest.raises(ConfigError, match="classifier='svm'"):
        train(image_folder, classifier="svm", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_extract_from_an_intermediate_stage(image_folder, tmp_path):
    run = train(image_folder, backbone=TINY_BACKBONE, weights="none", cut_layer="blocks.2",
                precision="32", out=tmp_path / "cut", cache_dir=None, show_progress=False)
    config = json.loads((run.model_dir / "config.json").read_text())
    assert config["cut_layer"] == 2 and config["head"]["pool"] == "avg"
    assert config["head"]["in_features"] == 32  # channels of test_efficientnet's third stage
    recorded = json.loads((run.dir / "run.json").read_text())["config"]
    assert recorded["cut_layer"] == "blocks.2" and recorded["head_pool"] == "avg"
    assert recorded["epochs"] is None  # extract has no epochs, and says so
    # the bundle predicts from that stage: the run's val/test predictions came from the pooled
    # stage-2 embeddings, the bundle's from the images
    table = PredictionTable.read(run.dir / "predictions.csv")
    proba, errors = load_model(run.model_dir).predict_proba([image_folder / f for f in table.files],
                                                             precision="32")
    assert not any(errors)
    np.testing.assert_allclose(proba, table.proba, atol=1e-4)
    whole = train(image_folder, backbone=TINY_BACKBONE, weights="none", precision="32",
                  out=tmp_path / "whole", cache_dir=None, show_progress=False)
    assert whole.metrics["params"]["trainable"] != run.metrics["params"]["trainable"]
