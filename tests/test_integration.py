"""Real EfficientNet-Lite0 ImageNet weights on real photos from ../shared/datasets/face-mask."""

import json
import subprocess
import sys

import numpy as np
import pytest

from transferlab import ImageFolderData, load_model, train

from conftest import SHARED_FACE_MASK, needs_real_weights_and_data

pytestmark = needs_real_weights_and_data()
PER_CLASS = 150


@pytest.fixture(scope="module")
def small_face_mask(tmp_path_factory):
    """The first PER_CLASS photos of each class, linked into a new folder."""
    root = tmp_path_factory.mktemp("face-mask")
    for class_dir in sorted(SHARED_FACE_MASK.iterdir()):
        (root / class_dir.name).mkdir()
        for path in sorted(class_dir.iterdir())[:PER_CLASS]:
            (root / class_dir.name / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="module")
def real_run(small_face_mask, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return train(small_face_mask, out=root / "mask", cache_dir=str(root / "cache"), show_progress=False)


def test_extract_with_real_weights_is_accurate(real_run):
    assert real_run.metrics["backbone"] == "efficientnet_lite0"
    assert real_run.metrics["test"]["accuracy"] >= 0.95
    assert real_run.metrics["val"]["accuracy"] >= 0.95
    assert real_run.metrics["precision"].get("parity_top1_agreement", 1.0) >= 0.98


def test_bundle_round_trip_gives_identical_predictions(real_run, small_face_mask):
    files = [small_face_mask / item["file"] for item in
             json.loads((real_run.dir / "split.json").read_text())["test"]][:32]
    first, _ = load_model(real_run.model_dir).predict_proba(files, precision="32")
    second, _ = load_model(real_run.model_dir).predict_proba(files, precision="32")
    np.testing.assert_array_equal(first, second)
    labels = [item["label"] for item in json.loads((real_run.dir / "split.json").read_text())["test"]][:32]
    classes = real_run.metrics["classes"]
    accuracy = np.mean([classes[i] == label for i, label in zip(first.argmax(1), labels)])
    assert accuracy >= 0.9


def test_predict_names_a_corrupt_file_and_exits_nonzero(real_run, small_face_mask, tmp_path):
    corrupt = tmp_path / "broken photo.jpg"
    good = next((small_face_mask / "with_mask").iterdir())
    corrupt.write_bytes(good.read_bytes()[:0] + b"\xff\xd8\xff\xe0\x00\x10JFIF garbage")
    result = subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main()",
                             "predict", str(real_run.model_dir), str(good), str(corrupt)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "broken photo.jpg" in result.stderr and "Traceback" not in result.stderr
    assert "with_mask" in result.stdout


def test_shared_set_duplicate_groups():
    data = ImageFolderData(SHARED_FACE_MASK)
    assert len(data.scan.images) == 4094
    assert len(data.duplicates.exact) == 87
    for group in data.duplicates.near:
        assert len({name for name, idx in data.split.items() for i in group if i in idx}) == 1


def test_finetune_real_weights_for_one_epoch(small_face_mask, tmp_path):
    """The whole backbone trains (no warm-up) for one epoch on ~200 training photos: 14 steps, so a
    higher rate than the 3-epoch default."""
    run = train(small_face_mask, strategy="finetune", out=tmp_path / "finetune", epochs=1,
                warmup_epochs=0, lr=1e-2, batch_size=16, show_progress=False, cache_dir=None)
    assert run.metrics["epochs_run"] == 1 and run.metrics["params"]["trainable"] > 3_000_000
    assert run.metrics["test"]["accuracy"] >= 0.93
    assert run.metrics["precision"].get("parity_top1_agreement", 1.0) >= 0.98


def test_evaluate_reproduces_the_runs_test_metrics_and_reports_real_mistakes(real_run, small_face_mask,
                                                                              tmp_path):
    from transferlab.workflows.evaluate import evaluate

    result = evaluate(real_run.model_dir, ImageFolderData(small_face_mask, seed=0), split="test",
                      out=tmp_path / "eval", show_progress=False)
    own = real_run.metrics["test"]
    assert result.metrics["test"]["confusion_matrix"] == own["confusion_matrix"]
    assert result.metrics["test"]["accuracy"] >= 0.95
    low, high = result.metrics["test"]["accuracy_ci95"]
    assert low <= result.metrics["test"]["accuracy"] <= high
    html = (real_run.dir / "report.html").read_text()
    assert 'id="wrong"' in html and "with_mask" in html
    mistakes = own["size"] - sum(own["confusion_matrix"][i][i] for i in range(2))
    wrong = html.split('id="wrong"')[1].split("<h2")[0]  # the data audit has thumbnails too
    assert wrong.count('class="thumb"') == min(12, mistakes)
