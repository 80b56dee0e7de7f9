import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from transferlab import load_model
from transferlab.inference.bundle import load_network
from transferlab.cli import app
from transferlab.errors import BundleError, ConfigError, ExportError
from transferlab.deploy.export import FP32_TOLERANCE, export_onnx
from transferlab.inference.engines import OnnxEngine
from transferlab.inference.predictor import Predictor
from transferlab.data.transforms import normalize


def _copy_bundle(tiny_run, folder):
    """A private copy of the session's bundle, which the tests must not change."""
    return shutil.copytree(tiny_run.model_dir, folder / "model")


def _images(image_folder, count=8):
    return sorted(image_folder.rglob("*.*"))[::40 // count][:count]  # both classes, both formats


@pytest.fixture(scope="module")
def exported(tiny_run, image_folder, tmp_path_factory):
    """One fp32 export of a copy of the tiny bundle, checked on real (synthetic) images."""
    bundle = _copy_bundle(tiny_run, tmp_path_factory.mktemp("exported"))
    return bundle, export_onnx(bundle, images=_images(image_folder))


def test_fp32_export_matches_torch_and_is_recorded(exported, tiny_run):
    bundle, result = exported
    assert result.path == bundle / "model.onnx" and result.path.is_file()
    parity = result.parity
    assert parity["source"] == "images" and parity["images"] == 8
    assert parity["max_abs_prob_diff"] <= FP32_TOLERANCE and parity["top1_agreement"] == 1.0
    before = json.loads((tiny_run.model_dir / "config.json").read_text())
    after = json.loads((bundle / "config.json").read_text())
    record = after.pop("exports")["model.onnx"]
    assert after == before  # weights_sha256 and everything else intact
    assert record["sha256"] == result.sha256 and record["opset"] == result.opset == 18
    assert record["quantization"] is None and record["parity"]["tolerance"] == FP32_TOLERANCE
    assert record["input"]["shape"] == ["batch", *before["preprocessing"]["input_size"]]
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "config.json", "labels.txt",
                                                        "model.onnx", "model.safetensors",
                                                        "novelty.safetensors"]
    assert record["parity"]["max_abs_novelty_diff"] <= FP32_TOLERANCE


def test_the_batch_axis_is_dynamic(exported):
    bundle, result = exported
    net, config = load_network(bundle)
    pre = config.preprocessing
    engine = OnnxEngine(result.path, pre)
    for size in (1, 5):
        pixels = torch.randint(0, 256, (size, *pre.input_size), dtype=torch.uint8)
        batch = normalize(pixels, pre)
        with torch.inference_mode():
            logits, features = net.logits_and_features(batch)
        got_logits, got_features = engine(pixels)  # the graph outputs the features too
        assert got_logits.shape == (size, len(config.classes))
        torch.testing.assert_close(got_logits.softmax(1), logits.softmax(1), atol=FP32_TOLERANCE,
                                   rtol=0)
        torch.testing.assert_close(got_features, features, atol=1e-4, rtol=1e-4)


def test_onnx_runtime_threads_do_not_spin_between_batches(exported):
    """They would spin on the cores torch's threads need between batches (engines.OnnxEngine)."""
    options = OnnxEngine(exported[1].path, load_network(exported[0])[1].preprocessing
                         ).session.get_session_options()
    for pool in ("intra_op", "inter_op"):
        assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == "0"


def test_without_images_the_check_uses_noise_and_says_so(tiny_run, tmp_path):
    result = export_onnx(_copy_bundle(tiny_run, tmp_path))
    assert result.parity["source"] == "random-noise" and result.parity["images"] == 8
    assert result.parity["max_abs_prob_diff"] <= FP32_TOLERANCE


def test_an_export_that_disagrees_is_refused_and_leaves_no_file(tiny_run, image_folder, tmp_path,
                                                                  monkeypatch):
    bundle = _copy_bundle(tiny_run, tmp_path)
    config_before = (bundle / "config.json").read_bytes()
    faithful = OnnxEngine.__call__

    def skewed(self, batch, precision="32"):  # shifts one class's logit: probabilities change
        logits, features = faithful(self, batch, precision)
        return logits + torch.tensor([0.0, 0.01]), features

    monkeypatch.setattr(OnnxEngine, "__call__", skewed)
    with pytest.raises(ExportError, match="not written.*more than 0.0001"):
        export_onnx(bundle, images=_images(image_folder))
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "config.json", "labels.txt",
                                                        "model.safetensors", "novelty.safetensors"]
    assert (bundle / "config.json").read_bytes() == config_before


def test_int8_export_reports_agreement_and_accuracy(exported, image_folder):
    bundle, fp32 = exported
    images = _images(image_folder)
    labels = [0 if path.parent.name == "circles" else 1 for path in images]
    result = export_onnx(bundle, quantize="int8", images=images, labels=labels)
    assert result.path == bundle / "model.int8.onnx" and result.quantization == "int8"
    assert result.path.stat().st_size < fp32.path.stat().st_size
    parity = result.parity
    # the reported numbers are those of the int8 file itself against torch's fp32 predictions
    reference = load_model(bundle)
    expected, _ = reference.predict_proba(images, precision="32")
    pre = reference.preprocessing
    got, _ = Predictor(OnnxEngine(result.path, pre), reference.classes, pre,
                       trust=reference.trust).predict_proba(images)
    assert parity["tolerance"] is None
    assert parity["top1_agreement"] == pytest.approx((expected.argmax(1) == got.argmax(1)).mean())
    assert parity["max_abs_prob_diff"] == pytest.approx(np.abs(expected - got).max(), abs=1e-6)
    assert parity["accuracy"]["onnx"] == pytest.approx((got.argmax(1) == labels).mean())
    assert parity["accuracy"]["change"] == pytest.approx(parity["accuracy"]["onnx"]
                                                         - parity["accuracy"]["torch"])
    via_backend, _ = load_model(bundle, backend="onnx-int8").predict_proba(images)
    np.testing.assert_array_equal(via_backend, got)
    exports = json.loads((bundle / "config.json").read_text())["exports"]
    assert set(exports) == {"model.onnx", "model.int8.onnx"}  # the fp32 record is kept
    assert exports["model.int8.onnx"]["sha256"] == result.sha256


def test_bad_arguments_are_refused(tiny_run, tmp_path):
    bundle = _copy_bundle(tiny_run, tmp_path)
    with pytest.raises(ConfigError, match="quantize='int4'"):
        export_onnx(bundle, quantize="int4")
    with pytest.raises(ConfigError, match="opset=17"):
        export_onnx(bundle, opset=17)
    with pytest.raises(ConfigError, match="labels: 1 given for 0 images"):
        export_onnx(bundle, labels=[0])
    with pytest.raises(ConfigError, match="backend='tensorrt'"):
        load_model(bundle, backend="tensorrt")


def test_torch_and_onnx_predictors_agree(exported, image_folder):
    bundle, _ = exported
    files = sorted(image_folder.rglob("*.*"))
    torch_proba, _ = load_model(bundle).predict_proba(files, precision="32")
    onnx_predictor = load_model(bundle, backend="onnx")
    onnx_proba, errors = onnx_predictor.predict_proba(files)
    assert errors == [""] * len(files)
    np.testing.assert_array_equal(torch_proba.argmax(1), onnx_proba.argmax(1))
    np.testing.assert_allclose(onnx_proba, torch_proba, atol=FP32_TOLERANCE)
    top = onnx_predictor.predict(files[:1], top_k=2)[0]
    assert {label for label, _ in top.top_k} == {"circles", "squares"}


def test_tta_averages_the_mirror_image_on_both_backends(exported, image_folder):
    bundle, _ = exported
    files = _images(image_folder)
    results = {}
    for backend in ("torch", "onnx"):
        predictor = load_model(bundle, backend=backend)
        plain, _ = predictor.predict_proba(files, precision="32")
        averaged, _ = predictor.predict_proba(files, precision="32", tta=True)
        assert not np.allclose(plain, averaged, atol=1e-6)
        np.testing.assert_allclose(averaged.sum(1), 1.0, atol=1e-5)
        results[backend] = averaged
        batch = torch.randint(0, 256, (3, *predictor.preprocessing.input_size), dtype=torch.uint8)
        views = predictor.predict_batch(batch, "32"), predictor.predict_batch(batch.flip(3), "32")
        torch.testing.assert_close(predictor.predict_batch(batch, "32", tta=True), sum(views) / 2)
    np.testing.assert_allclose(results["onnx"], results["torch"], atol=FP32_TOLERANCE)


def test_missing_or_altered_onnx_files_are_refused(exported, tiny_run, tmp_path):
    with pytest.raises(BundleError, match=r"model.onnx is missing.*`transferlab export "):
        load_model(_copy_bundle(tiny_run, tmp_path), backend="onnx")
    bundle = shutil.copytree(exported[0], tmp_path / "altered")
    onnx_file = bundle / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"sha256 does not match.*`transferlab export "):
        load_model(bundle, backend="onnx")
    config = json.loads((bundle / "config.json").read_text())
    del config["exports"]  # a model.onnx that config.json knows nothing about
    (bundle / "config.json").write_text(json.dumps(config))
    shutil.copy(exported[1].path, onnx_file)
    with pytest.raises(BundleError, match="sha256 does not match"):
        load_model(bundle, backend="onnx")


def test_cli_export_and_predict_with_onnx(tiny_run, image_folder, tmp_path):
    runner = CliRunner()
    run_dir = shutil.copytree(tiny_run.dir, tmp_path / "run")  # with split.json: validation images
    model = str(run_dir / "model")
    result = runner.invoke(app, ["export", model, "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "model" / "model.onnx").is_file()
    assert "validation images of the run" in result.output  # the run's split.json was found
    assert "top-1 agreement 100.00%" in result.output
    image = str(image_folder / "circles" / "circles_000.jpg")
    outputs = {}
    for options in (["--precision", "32"], ["--backend", "onnx"], ["--backend", "onnx", "--tta"]):
        result = runner.invoke(app, ["predict", model, image, "--format", "json", "--top-k", "2",
                                     *options])
        assert result.exit_code == 0, result.output
        top_k = json.loads(result.output)["predictions"][0]["top_k"]
        outputs[" ".join(options)] = {row["label"]: row["probability"] for row in top_k}
    assert outputs["--precision 32"] == pytest.approx(outputs["--backend onnx"], abs=FP32_TOLERANCE)
    assert outputs["--backend onnx"] != outputs["--backend onnx --tta"]
    quantized = runner.invoke(app, ["export", model, "--quantize", "int8", "--out",
                                    str(tmp_path / "small.onnx")])
    assert quantized.exit_code == 0, quantized.output
    assert "accuracy: torch" in quantized.output and (tmp_path / "small.onnx").is_file()
    wrong = runner.invoke(app, ["export", model, "--format", "keras"])
    assert wrong.exit_code != 0 and "use one of onnx, openvino" in str(wrong.exception)
    wrong = runner.invoke(app, ["predict", model, image, "--backend", "onnx", "--precision", "bf16"])
    assert wrong.exit_code != 0 and "applies to the torch backend" in str(wrong.exception)
