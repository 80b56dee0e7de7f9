"""`export --format coreml`: a package with the bundle's image input and class labels, replaced
atomically, recorded in config.json, and a command that says numerical parity was not run (Core ML
runs models only on Apple systems)."""

import builtins
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from transferlab.data.decode import sha256_of_folder
from transferlab.deploy import coreml
from transferlab.deploy.formats import EXPORT_FORMATS
from transferlab.errors import ConfigError, ExportError
from transferlab.inference.bundle import read_config

needs_coremltools = pytest.mark.skipif(
    importlib.util.find_spec("coremltools") is None,
    reason="coremltools is not installed (pip install 'transferlab[coreml]')")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    if importlib.util.find_spec("coremltools") is None:
        pytest.skip("coremltools is not installed (pip install 'transferlab[coreml]')")
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path_factory.mktemp("coreml") / "model")
    return bundle, EXPORT_FORMATS["coreml"](bundle)


def test_the_package_has_the_bundles_input_and_labels(exported):
    import coremltools

    bundle, result = exported
    config = read_config(bundle)
    assert result.path == bundle / "model.mlpackage" and (result.path / "Manifest.json").is_file()
    spec = coremltools.models.MLModel(str(result.path), skip_model_load=True).get_spec()
    image = spec.description.input[0].type.imageType
    assert (image.height, image.width) == tuple(config.preprocessing.input_size[1:])
    assert coreml.class_labels(spec) == config.classes
    assert [o.name for o in spec.description.output] == ["classLabel", "classLabel_probs"]


def test_the_export_is_recorded_with_parity_not_run(exported):
    bundle, result = exported
    record = json.loads((bundle / "config.json").read_text())["exports"]["model.mlpackage"]
    assert record["format"] == "coreml" and record["sha256"] == sha256_of_folder(result.path)
    assert record["classes"] == read_config(bundle).classes
    assert record["input"]["color_layout"] == "RGB" and "crop the centre" in record["preprocessing"]["note"]
    assert record["parity"]["run"] is False and "macOS" in record["parity"]["reason"]
    assert record["parity"]["folded_in_torch"]["max_abs_prob_diff"] <= 1e-5


@needs_coremltools
def test_a_failed_conversion_keeps_the_older_package(exported, tmp_path, monkeypatch):
    bundle = shutil.copytree(exported[0], tmp_path / "model")
    before = sha256_of_folder(bundle / "model.mlpackage")

    def broken(coremltools, module, config):
        raise ExportError("conversion failed")

    monkeypatch.setattr(coreml, "_convert", broken)
    with pytest.raises(ExportError, match="conversion failed"):
        coreml.export_coreml(bundle)
    assert sha256_of_folder(bundle / "model.mlpackage") == before
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith(".")) == []


def test_a_folder_that_is_not_a_package_is_not_replaced(tiny_run, tmp_path):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "model")
    (tmp_path / "mine.mlpackage").mkdir()
    with pytest.raises(ConfigError, match="only an older package is replaced"):
        EXPORT_FORMATS["coreml"](bundle, tmp_path / "mine.mlpackage")
    with pytest.raises(ConfigError, match="ending in .mlpackage"):
        EXPORT_FORMATS["coreml"](bundle, tmp_path / "model.onnx")


def test_quantize_is_refused_in_one_line(tiny_run):
    with pytest.raises(ConfigError, match="drop --quantize"):
        EXPORT_FORMATS["coreml"](tiny_run.model_dir, quantize="int8")


def test_a_missing_coremltools_says_what_to_install(tiny_run, monkeypatch):
    real_import = builtins.__import__

    def without_coremltools(name, *args, **kwargs):
        if name == "coremltools":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_coremltools)
    with pytest.raises(ConfigError, match=r"pip install 'transferlab\[coreml\]'"):
        EXPORT_FORMATS["coreml"](tiny_run.model_dir)


@needs_coremltools
def test_the_command_line_says_parity_was_not_run(tiny_run, tmp_path):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "model")
    done = subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main()",
                           "export", str(bundle), "--format", "coreml"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "300"})  # one line per message
    assert done.returncode == 0, done.stderr
    assert "model.mlpackage" in done.stdout and "opset" not in done.stdout
    assert "numerical parity with torch: not run" in done.stdout
    assert "Failed to load" not in done.stderr  # coremltools' Linux chatter is silenced
