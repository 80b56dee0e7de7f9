"""`export --format openvino` and `--backend openvino`: OpenVINO IR checked against torch like the
ONNX export, and predictions (probabilities and novelty) equal to torch's; `--quantize int8` through
NNCF and `--backend openvino-int8`."""

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from transferlab import load_model
from transferlab.cli import app
from transferlab.deploy.export import FP32_TOLERANCE
from transferlab.deploy.formats import EXPORT_FORMATS
from transferlab.errors import BundleError, ConfigError

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
    predictor = load_model(bundle, backend="openvino")
    got, errors = predictor.predict_scores(images)
    assert errors == [""] * len(images)
    # its threads free to move off a core that decoding takes (OpenVinoEngine)
    assert predictor.engine.compiled.get_property("ENABLE_CPU_PINNING") is False
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


needs_nncf = pytest.mark.skipif(importlib.util.find_spec("nncf") is None,
                                reason="nncf is not installed (pip install 'transferlab[openvino]')")


@pytest.fixture(scope="module")
def quantized(exported):
    """The int8 export beside the fp32 one, calibrated on the same synthetic images."""
    bundle, _, images = exported
    labels = [0 if path.parent.name == "circles" else 1 for path in images]
    return EXPORT_FORMATS["openvino"](bundle, quantize="int8", images=images, labels=labels)


@needs_nncf
def test_the_int8_export_is_calibrated_measured_and_recorded(exported, quantized):
    bundle, fp32, images = exported
    assert quantized.path == bundle / "model.int8.xml" and (bundle / "model.int8.bin").is_file()
    assert quantized.quantization == "int8" and quantized.parity["tolerance"] is None
    assert set(quantized.parity["accuracy"]) == {"torch", "openvino", "change"}
    exports = json.loads((bundle / "config.json").read_text())["exports"]
    assert exports["model.xml"]["sha256"] == fp32.sha256  # the fp32 record is kept
    record = exports["model.int8.xml"]
    assert record["precision"] == "int8" and record["sha256"] == quantized.sha256
    assert record["calibration"]["images"] == len(images) and "nncf" in record["versions"]


@needs_nncf
def test_the_int8_backend_predicts_what_the_export_measured(exported, quantized):
    bundle, _, images = exported
    expected, _ = load_model(bundle).predict_scores(images, precision="32")
    got, errors = load_model(bundle, backend="openvino-int8").predict_scores(images)
    assert errors == [""] * len(images) and got.novelty is not None
    agreement = (got.proba.argmax(1) == expected.proba.argmax(1)).mean()
    assert agreement == pytest.approx(quantized.parity["top1_agreement"])
    assert agreement >= 0.5  # random weights, near-even probabilities: int8 may flip a few


def test_int8_without_calibration_images_is_refused(tiny_run, tmp_path):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "model")
    with pytest.raises(ConfigError, match="calibrates on the run's validation images"):
        EXPORT_FORMATS["openvino"](bundle, quantize="int8")
    assert not (bundle / "model.int8.xml").exists()


def test_int8_without_nncf_says_what_to_install(tiny_run, image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf raises ImportError
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "model")
    with pytest.raises(ConfigError, match=r"needs the nncf package: pip install "
                                          r"'transferlab\[openvino\]'"):
        EXPORT_FORMATS["openvino"](bundle, quantize="int8", images=[next(image_folder.rglob("*.png"))])


@needs_nncf
def test_the_command_line_quantizes_a_run_and_predicts(tiny_run, image_folder, tmp_path):
    runner = CliRunner()
    run_dir = shutil.copytree(tiny_run.dir, tmp_path / "run")  # with split.json: validation images
    model = str(run_dir / "model")
    missing = runner.invoke(app, ["predict", model, str(image_folder), "--backend", "openvino-int8"])
    assert missing.exit_code != 0
    assert "--format openvino --quantize int8" in str(missing.exception)
    exported = runner.invoke(app, ["export", model, "--format", "openvino", "--quantize", "int8"])
    assert exported.exit_code == 0, exported.output
    printed = exported.output.replace("\n", "")  # Rich wraps a long path
    assert "model.int8.xml" in printed and "accuracy: torch" in printed
    image = str(next(image_folder.rglob("*.png")))
    answer = runner.invoke(app, ["predict", model, image, "--backend", "openvino-int8", "--format",
                                 "json"])
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.output)["predictions"][0]["label"] in ("circles", "squares")
