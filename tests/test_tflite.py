"""`export --format tflite` and `--backend tflite`: a LiteRT file checked against torch like the
ONNX export, refused (nothing written) when it strays, and predictions (probabilities and novelty)
equal to torch's."""

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
from transferlab.deploy import export as export_module
from transferlab.deploy import tflite
from transferlab.deploy.export import FP32_TOLERANCE
from transferlab.deploy.formats import EXPORT_FORMATS
from transferlab.errors import BundleError, ConfigError, ExportError
from transferlab.inference.engines import TfliteEngine

from conftest import SHARED_FACE_MASK, needs_real_weights_and_data

needs_litert = pytest.mark.skipif(
    importlib.util.find_spec("litert_torch") is None
    or importlib.util.find_spec("ai_edge_litert") is None,
    reason="litert-torch / ai-edge-litert are not installed (pip install 'transferlab[tflite]')")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """A copy of the tiny run (its split.json gives the parity images), exported by the command
    line, in this process: the one conversion of this file (litert-torch takes half a minute or
    more, and its import alone over ten seconds)."""
    run = shutil.copytree(tiny_run.model_dir.parent, tmp_path_factory.mktemp("tflite") / "run")
    done = CliRunner().invoke(app, ["export", str(run / "model"), "--format", "tflite"])
    assert done.exit_code == 0, done.output
    return run / "model", done.output


@needs_litert
def test_the_export_is_checked_and_recorded(exported):
    bundle, stdout = exported
    assert "model.tflite" in stdout and "parity with torch" in stdout and "tflite" in stdout
    record = json.loads((bundle / "config.json").read_text())["exports"]["model.tflite"]
    assert record["format"] == "tflite" and record["precision"] == "fp32"
    assert record["sha256"] == export_module.sha256_of(bundle / "model.tflite")
    parity = record["parity"]
    assert parity["source"] == "images" and parity["tolerance"] == FP32_TOLERANCE
    assert parity["max_abs_prob_diff"] <= FP32_TOLERANCE
    assert parity["max_abs_novelty_diff"] <= FP32_TOLERANCE
    assert set(parity["accuracy"]) == {"torch", "tflite", "change"}


@needs_litert
def test_the_tflite_backend_predicts_what_torch_predicts(exported, image_folder):
    bundle, _ = exported
    images = sorted(image_folder.rglob("*.*"))[:11]  # batches of 4, 4 and 3: the input is resized
    expected, _ = load_model(bundle).predict_scores(images, batch_size=4, precision="32")
    got, errors = load_model(bundle, backend="tflite").predict_scores(images, batch_size=4)
    assert errors == [""] * len(images)
    np.testing.assert_allclose(got.proba, expected.proba, atol=FP32_TOLERANCE)
    np.testing.assert_allclose(got.novelty, expected.novelty, atol=FP32_TOLERANCE)


@needs_litert
def test_the_command_line_predicts_with_tflite(exported, image_folder):
    bundle, _ = exported
    image = str(next(image_folder.rglob("*.png")))
    answer = subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main()",
                             "predict", str(bundle), image, "--backend", "tflite", "--format",
                             "json"], check=False, capture_output=True, text=True, timeout=600)
    prediction = json.loads(answer.stdout)["predictions"][0]
    assert prediction["label"] in ("circles", "squares") and "novelty" in prediction


@needs_litert
def test_an_altered_file_is_refused(exported, tmp_path):
    copy = shutil.copytree(exported[0], tmp_path / "model")
    data = (copy / "model.tflite").read_bytes()
    (copy / "model.tflite").write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="sha256"):
        load_model(copy, backend="tflite")


@needs_litert
def test_an_export_that_strays_from_torch_is_not_written(exported, tiny_run, tmp_path, monkeypatch):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "model")
    converted = exported[0] / "model.tflite"  # the conversion itself is tested above; reuse it
    monkeypatch.setattr(tflite, "_convert", lambda _lt, _net, _config, path: shutil.copy(converted,
                                                                                        path))
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", -1.0)  # any difference is too much
    with pytest.raises(ExportError, match="not written; LiteRT's probabilities differ"):
        EXPORT_FORMATS["tflite"](bundle)
    assert sorted(path.name for path in bundle.iterdir()) == sorted(
        path.name for path in tiny_run.model_dir.iterdir())  # no model.tflite, no temporary
    assert "model.tflite" not in json.loads((bundle / "config.json").read_text()).get("exports", {})


@needs_litert
@pytest.mark.parametrize("options, match", [({"quantize": "int8"}, "--quantize int8 applies to"),
                                            ({"opset": 18}, "--opset applies to")])
def test_options_of_other_formats_are_refused_before_work(tiny_run, options, match):
    with pytest.raises(ConfigError, match=match):
        EXPORT_FORMATS["tflite"](tiny_run.model_dir, **options)


def test_a_missing_extra_says_what_to_install(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    install = r"pip install 'transferlab\[tflite\]'"
    with pytest.raises(ConfigError, match=f"--format tflite needs the litert-torch .*: {install}"):
        EXPORT_FORMATS["tflite"](tiny_run.model_dir)
    with pytest.raises(ConfigError, match=f"backend='tflite' needs .*: {install}"):
        TfliteEngine(tmp_path / "model.tflite", None)


def test_a_bundle_without_the_export_says_how_to_make_it(tiny_run):
    with pytest.raises(BundleError, match=r"model.tflite is missing: .* exported that way; export "
                                          r"it with `transferlab export .* --format tflite`"):
        load_model(tiny_run.model_dir, backend="tflite")


def _with_litert_real_weights_and_data(test):
    for mark in (needs_litert, *needs_real_weights_and_data()):
        test = mark(test)
    return test


@_with_litert_real_weights_and_data
def test_a_real_lite0_extract_bundle_exports_within_tolerance(tmp_path):
    """The issue's done-when: Lite0 + head on face-mask photos, within 1e-4 of torch."""
    from transferlab import train
    from transferlab.deploy.export import run_val_images

    subset = tmp_path / "face-mask"
    for class_dir in sorted(SHARED_FACE_MASK.iterdir()):
        (subset / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir())[:40]:
            (subset / class_dir.name / path.name).symlink_to(path)
    run = train(subset, out=tmp_path / "run", cache_dir=str(tmp_path / "cache"),
                show_progress=False)
    images, labels = run_val_images(run.model_dir)
    result = EXPORT_FORMATS["tflite"](run.model_dir, images=images, labels=labels)
    assert result.parity["max_abs_prob_diff"] <= FP32_TOLERANCE
    expected, _ = load_model(run.model_dir).predict_scores(images, precision="32")
    got, _ = load_model(run.model_dir, backend="tflite").predict_scores(images)
    assert (got.proba.argmax(1) == expected.proba.argmax(1)).all()
    np.testing.assert_allclose(got.proba, expected.proba, atol=FP32_TOLERANCE)
