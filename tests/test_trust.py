"""Calibration (a temperature fitted on validation logits) and novelty (a nearest-neighbour bank of
training features): known answers on synthetic numbers, then through a tiny run's bundle on every
surface that answers (Predictor, predict, evaluate, the ONNX export)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from transferlab import load_model
from transferlab.errors import BundleError
from transferlab.evaluation.trust import fit_temperature, fit_trust
from transferlab.inference.bundle import read_config
from transferlab.inference.predictor import NetworkOutputs
from transferlab.inference.rows import RowFile
from transferlab.inference.trust import (MAX_BANK_BYTES, MAX_BANK_IMAGES, MAX_FEATURE_WIDTH,
                                         NOVELTY_FILE, Novelty, balanced_sample)
from transferlab.rundir.predictions import PredictionTable


def over_confident(n: int = 400, scale: float = 8.0, seed: int = 0):
    """Logits of a model that is right 80% of the time but says 99.9%."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    predicted = np.where(rng.random(n) < 0.8, labels, (labels + 1) % 3)
    logits = rng.normal(0, 0.1, (n, 3))
    logits[np.arange(n), predicted] += scale
    return logits, labels


def test_an_over_confident_model_gets_a_temperature_over_one():
    logits, labels = over_confident()
    temperature = fit_temperature(logits, labels)
    assert temperature > 2
    calibrated = torch.as_tensor(logits / temperature).softmax(1).max(1).values.mean().item()
    assert 0.7 < calibrated < 0.9  # the confidence now says what the accuracy is


def test_an_under_confident_model_gets_a_temperature_under_one():
    logits, labels = over_confident(scale=0.5)
    logits[np.arange(len(labels)), labels] += 0.5  # right more often than its spread says
    assert fit_temperature(logits, labels) < 1


def test_nothing_to_fit_on_keeps_temperature_one():
    assert fit_temperature(np.zeros((1, 2)), np.array([0])) == 1.0
    assert fit_temperature(np.ones((5, 2)), np.zeros(5, dtype=int)) == 1.0  # one class only


def clusters(n: int, seed: int, centres: np.ndarray):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centres), n)
    return centres[labels] + rng.normal(0, 0.3, (n, centres.shape[1])), labels


def test_a_far_away_input_is_unknown_and_validation_mostly_passes():
    centres = np.eye(8)[:2] * 5 + 1  # two classes in an 8-wide feature space
    train, train_labels = clusters(300, 0, centres)
    val, _ = clusters(200, 1, centres)
    novelty = Novelty.fit(train, train_labels).with_threshold(val)
    passed = (novelty.score(torch.as_tensor(val)) <= novelty.threshold).float().mean().item()
    assert passed == pytest.approx(0.95, abs=0.011)
    far = torch.as_tensor(-centres.mean(0, keepdims=True))  # the opposite direction
    assert novelty.score(far).item() > 2 * novelty.threshold
    fresh, _ = clusters(200, 2, centres)  # new in-distribution points, not the validation ones
    assert (novelty.score(torch.as_tensor(fresh)) <= novelty.threshold).float().mean() > 0.85


def test_a_large_split_is_scored_in_parts_as_it_is_whole(monkeypatch):
    from transferlab.inference import trust

    centres = np.eye(8)[:2] * 5 + 1
    train, train_labels = clusters(300, 0, centres)
    novelty = Novelty.fit(train, train_labels)
    inputs = torch.as_tensor(clusters(250, 1, centres)[0])
    whole = novelty.score(inputs)
    monkeypatch.setattr(trust, "SCORE_ROWS", 64)  # 250 rows: three parts of 64 and one of 58
    assert torch.allclose(novelty.score(inputs), whole) and whole.shape == (250,)
    with RowFile(inputs.numpy()[i:i + 100] for i in range(0, 250, 100)) as rows:  # not in memory
        assert torch.allclose(novelty.score(rows), whole)
    with RowFile([]) as rows:
        assert novelty.score(rows).shape == (0,)


def test_novelty_is_thresholded_and_measured_on_features_left_in_a_row_file():
    from transferlab.evaluation.heldout import measure
    from transferlab.inference.trust import Trust

    centres = np.eye(8)[:2] * 5 + 1
    train, labels = clusters(60, 0, centres)
    val, val_labels = clusters(40, 1, centres)
    logits = np.zeros((len(val), 2), dtype=np.float32)
    bank = Novelty.fit(train, labels)
    with RowFile([val[:15], val[15:]]) as rows:
        novelty = bank.with_threshold(rows)
        assert novelty.threshold == bank.with_threshold(val).threshold
        trust = Trust(1.0, novelty)
        on_disk = measure(NetworkOutputs(logits, rows), val_labels, ["a", "b"], trust)
    in_memory = measure(NetworkOutputs(logits, val), val_labels, ["a", "b"], trust)
    assert np.array_equal(on_disk.novelty, in_memory.novelty)
    assert on_disk.metrics["unknown_rate"] == in_memory.metrics["unknown_rate"]


def test_an_empty_split_is_measured_as_empty():  # flowers-12 has train/ and val/, no test/
    from transferlab.evaluation.heldout import measure
    from transferlab.inference.trust import Trust

    centres = np.eye(8)[:2] * 5 + 1
    train, labels = clusters(50, 0, centres)
    trust = Trust(1.5, Novelty.fit(train, labels).with_threshold(train))
    nothing = NetworkOutputs(np.zeros((0, 2), dtype=np.float32), np.zeros((0, 8), dtype=np.float32))
    measured = measure(nothing, np.zeros(0, dtype=np.int64), ["a", "b"], trust)
    assert measured.proba.shape == (0, 2) and measured.novelty.shape == (0,)
    assert measured.metrics["size"] == 0


def test_the_bank_is_class_balanced_and_bounded():
    labels = np.r_[np.zeros(10_000, dtype=int), np.ones(50, dtype=int)]  # 50 < MAX_BANK_IMAGES / 2
    keep = balanced_sample(labels, MAX_BANK_IMAGES, seed=0)
    assert len(keep) == MAX_BANK_IMAGES
    assert (labels[keep] == 1).sum() == 50  # the small class is kept whole
    wide = Novelty.fit(np.random.default_rng(0).random((300, 65_536), dtype=np.float32),
                       np.zeros(300, dtype=int))  # a flattened feature map is narrowed
    assert wide.bank.shape == (300, MAX_FEATURE_WIDTH)
    assert wide.bank.numel() * 2 * MAX_BANK_IMAGES / 300 <= MAX_BANK_BYTES
    assert wide.score(torch.ones(2, 65_536)).shape == (2,)  # inputs are narrowed the same way


def test_fit_trust_without_features_is_calibration_only():
    logits, labels = over_confident()
    trust = fit_trust(NetworkOutputs(logits), labels, NetworkOutputs(logits), labels)
    assert trust.novelty is None and trust.temperature > 1


def test_a_run_records_calibration_and_novelty(tiny_run):
    metrics = tiny_run.metrics
    for split in ("val", "test"):
        assert metrics[split]["temperature"] == metrics["trust"]["temperature"] > 0
        assert 0 <= metrics[split]["ece"] <= 1 and 0 <= metrics[split]["ece_uncalibrated"] <= 1
        assert 0 <= metrics[split]["unknown_rate"] <= 1
    # fitted on val to minimise its log loss (ECE, on a few images, need not follow)
    assert metrics["val"]["loss"] <= metrics["val"]["loss_uncalibrated"] + 1e-6
    config = read_config(tiny_run.model_dir)
    assert config.trust["temperature"] == metrics["trust"]["temperature"]
    assert (tiny_run.model_dir / NOVELTY_FILE).is_file()
    table = PredictionTable.read(tiny_run.dir / "predictions.csv")
    assert table.novelty is not None and len(table.novelty) == len(table.files)
    assert table.unknown.mean() == pytest.approx(metrics["test"]["unknown_rate"] * len(table.select(
        "test")) / len(table.files) + metrics["val"]["unknown_rate"] * len(table.select("val"))
        / len(table.files))


def test_predictions_carry_novelty_and_reject_unknown(tiny_run, image_folder, tmp_path):
    from PIL import Image

    noise = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    predictor = load_model(tiny_run.model_dir)
    predictor.trust = type(predictor.trust)(predictor.trust.temperature, Novelty(
        predictor.trust.novelty.bank, threshold=-1.0, k=predictor.trust.novelty.k))  # all unknown
    good = next(image_folder.rglob("*.png"))
    plain, rejected = (predictor.predict([good, noise], top_k=2, reject_unknown=reject)
                       for reject in (False, True))
    assert all(p.unknown and p.novelty is not None for p in plain)
    assert [p.label for p in plain] == [p.top_k[0][0] for p in plain]
    assert [p.to_dict()["label"] for p in rejected] == ["unknown", "unknown"]
    assert rejected[0].to_dict()["top_k"] == plain[0].to_dict()["top_k"]  # still listed


def test_a_changed_novelty_bank_is_refused(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_run.model_dir, copy)
    (copy / NOVELTY_FILE).write_bytes((copy / NOVELTY_FILE).read_bytes()[:-8])
    with pytest.raises(BundleError, match="sha256"):
        load_model(copy)


def test_a_bundle_from_before_trust_still_loads(tiny_run, image_folder, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_run.model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["trust"]
    (copy / "config.json").write_text(json.dumps(config))
    (copy / NOVELTY_FILE).unlink()
    prediction = load_model(copy).predict([next(image_folder.rglob("*.png"))])[0]
    assert prediction.novelty is None and "novelty" not in prediction.to_dict()
    assert load_model(copy).trust.temperature == 1.0


def test_onnx_answers_novelty_like_torch(tiny_run, image_folder, tmp_path):
    import shutil

    from transferlab.deploy.export import export_onnx

    copy = tmp_path / "model"
    shutil.copytree(tiny_run.model_dir, copy)
    result = export_onnx(copy)
    assert result.parity["max_abs_novelty_diff"] < 1e-4
    files = sorted(image_folder.rglob("*.png"))[:8]
    torch_scores, _ = load_model(copy).predict_scores(files, precision="32")
    onnx_scores, _ = load_model(copy, backend="onnx").predict_scores(files)
    np.testing.assert_allclose(onnx_scores.novelty, torch_scores.novelty, atol=1e-4)
    np.testing.assert_allclose(onnx_scores.proba, torch_scores.proba, atol=1e-4)
    np.testing.assert_array_equal(onnx_scores.unknown, torch_scores.unknown)


def test_evaluate_writes_novelty_and_both_eces(tiny_run, image_folder, tmp_path):
    from transferlab.workflows.evaluate import evaluate

    result = evaluate(tiny_run.model_dir, image_folder, out=tmp_path / "eval", split="all",
                      report=False)
    measured = next(v for v in result.metrics.values() if isinstance(v, dict) and "ece" in v)
    assert {"ece", "ece_uncalibrated", "temperature", "unknown_rate"} <= measured.keys()
    table = PredictionTable.read(tmp_path / "eval" / "predictions.csv")
    assert table.novelty is not None and table.unknown.dtype == bool


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def all_unknown(tiny_run, tmp_path_factory):
    """A copy of the tiny bundle whose threshold flags every input (the threshold sits in
    config.json; the bank's sha256 is unchanged)."""
    import shutil

    copy = tmp_path_factory.mktemp("unknown") / "model"
    shutil.copytree(tiny_run.model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["trust"]["novelty"]["threshold"] = -1.0
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_predict_rejects_unknown_inputs_in_every_format(all_unknown, image_folder):
    good = str(next(image_folder.rglob("*.png")))
    plain = json.loads(_cli("predict", str(all_unknown), good, "--format", "json").stdout)
    assert plain["predictions"][0]["unknown"] is True
    assert plain["predictions"][0]["label"] == plain["predictions"][0]["top_k"][0]["label"]
    answer = json.loads(_cli("predict", str(all_unknown), good, "--format", "json",
                             "--reject-unknown").stdout)["predictions"][0]
    assert answer["label"] == "unknown" and answer["novelty"] > -1.0
    rows = _cli("predict", str(all_unknown), good, "--format", "csv", "--reject-unknown"
                ).stdout.splitlines()
    assert len(rows) == 2 and rows[1].split(",")[2:4] == ["unknown", ""]
    assert rows[1].endswith(",true")
    table = _cli("predict", str(all_unknown), good, "--reject-unknown").stdout
    assert "unknown" in table and "novelty" in table


def test_the_service_answers_novelty_and_rejects_unknown(tiny_run, all_unknown, image_folder):
    from fastapi.testclient import TestClient

    from transferlab.deploy.serve import create_app

    path = next(image_folder.rglob("*.png"))
    upload = {"file": (path.name, path.read_bytes(), "image/png")}
    with TestClient(create_app(tiny_run.model_dir)) as client:
        answer = client.post("/predict", files=upload).json()["predictions"][0]
    assert isinstance(answer["novelty"], float) and isinstance(answer["unknown"], bool)
    assert answer["label"] == answer["top_k"][0]["label"]
    with TestClient(create_app(all_unknown, reject_unknown=True)) as client:
        answer = client.post("/predict", files=upload).json()["predictions"][0]
        described = client.get("/model").json()["trust"]
    assert answer["label"] == "unknown" and answer["unknown"] is True
    assert described == {"temperature": pytest.approx(read_config(all_unknown).trust["temperature"]),
                         "novelty_threshold": -1.0, "reject_unknown": True}


@pytest.mark.browser
def test_the_page_says_plainly_when_an_image_is_unknown(browser, all_unknown, image_folder,
                                                        tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import running_server

    with running_server(all_unknown, tmp_path / "server.log", "--reject-unknown") as (url, _):
        browser.get(f"{url}/")
        WebDriverWait(browser, 20).until(
            expected_conditions.text_to_be_present_in_element((By.ID, "model"), "test_efficientnet"))
        image = sorted(image_folder.rglob("*.png"))[0]
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image))
        warning = WebDriverWait(browser, 30).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#result .unknown")))
        assert warning.text.startswith("Unknown:") and "unlike the ones the model was trained on" \
            in warning.text
