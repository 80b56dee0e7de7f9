"""`export --format openvino` and `--backend openvino`: OpenVINO IR checked against torch like the
ONNX export, and predictions (probabilities and novelty) equal to torch's."""

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from transferlab import load_model
from transferlab.deploy.export import FP32_TOLERANCE
from transferlab.deploy.formats import EXPORT_FORMATS
from transferlab.errors import BundleError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                reason="openvino is not installed (pip install 'transferlab[openvino]')")


@pytest.fixture(scope="module")
def exported(tiny_run, image_folder, tmp_path_factory):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path_factory.mktemp("openvino") / "model")
    images = sorted(image_folder.rglob("*.*"))[::5]
    labels = [0 if path.parent.name == "circles" else 1 for path in images]
    return bundle, EXPORT_FORMATS["openvino"](bundle, images=images, labels=labels), images


def test_the_export_is_checked_and_recorded(exported):
    bundle, result, images = exported
    assert result.path == bundle / "model.xml" and (bundle / "model.bin").is_file()
    assert result.parity["max_abs_prob_diff"] <= FP32_TOLERANCE
    assert result.parity["max_abs_novelty_diff"] <= FP32_TOLERANCE
    assert set(result.parity["accuracy"]) == {"torch", "openvino", "change"}
    record = json.loads((bundle / "config.json").read_text())["exports"]["model.xml"]
    assert record["format"] == "openvino" and record["sha256"] == result.sha256
    assert len(record["bin_sha256"]) == 64


def test_the_openvino_backend_predicts_what_torch_predicts(exported):
    bundle, _, images = exported
    expected, _ = load_model(bundle).predict_scores(images, precision="32")
    got, errors = load_model(bundle, backend="openvino").predict_scores(images)
    assert errors == [""] * len(images)
    np.testing.assert_allclose(got.proba, expected.proba, atol=FP32_TOLERANCE)
    np.testing.assert_allclose(got.novelty, expected.novelty, atol=FP32_TOLERANCE)


def test_changed_weights_are_refused(exported, tmp_path):
    bundle, _, _ = exported
    copy = shutil.copytree(bundle, tmp_path / "model")
    (copy / "model.bin").write_bytes((copy / "model.bin").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="sha256"):
        load_model(copy, backend="openvino")


def test_the_command_line_exports_and_predicts(tiny_run, image_folder, tmp_path):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "model")

    def cli(*args):
        return subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main()",
                               *args], capture_output=True, text=True, timeout=300)

    exported = cli("export", str(bundle), "--format", "openvino")
    assert exported.returncode == 0, exported.stderr
    assert "model.xml" in exported.stdout and "parity with torch" in exported.stdout
    image = str(next(image_folder.rglob("*.png")))
    answer = json.loads(cli("predict", str(bundle), image, "--backend", "openvino", "--format",
                            "json").stdout)["predictions"][0]
    assert answer["label"] in ("circles", "squares") and "novelty" in answer
