"""Option values that ended in a traceback, or were accepted and did harm, each refused before any
work in one line (exit 2); exports whose output could not be written refused before the export;
bundles whose config.json the service accepted and then answered 500 for."""

import json
import math
import shutil

import pytest
from fastapi.testclient import TestClient

from transferlab.deploy import serve
from transferlab.errors import BundleError

from conftest import TINY_BACKBONE
from messy import read_only_prefix, run_cli, run_main

TINY = ["--backbone", TINY_BACKBONE, "--weights", "none", "--no-cache", "-q"]


def _one_line(result, fragment):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--strategy", "finetune", "--momentum", "-0.5"], "momentum=-0.5"),
    (["--workers", "-1"], "workers=-1"),
    (["--strategy", "head", "--accelerator", "tpu"], "accelerator='tpu'"),
    (["--strategy", "head", "--distributed", "foo"], "distributed='foo'"),
    (["--seed", "123456789012345678901"], "seed=123456789012345678901"),
    (["--classifier", "mlp", "--seed", "-1"], "seed=-1"),
    (["--strategy", "finetune", "--backbone-lr-scale", "-1"], "backbone_lr_scale=-1.0"),
    (["--strategy", "head", "--grad-clip", "-1"], "grad_clip=-1.0"),
    (["--strategy", "head", "--early-stopping", "0"], "early_stopping=0"),
    (["--strategy", "finetune", "--warmup-epochs", "-3"], "warmup_epochs=-3"),
    (["--strategy", "head", "--lr", "inf"], "lr=inf"),
    (["--strategy", "finetune", "--momentum", "nan"], "momentum=nan"),
    (["--layout", "sideways"], "layout='sideways'"),
])
def test_training_options(args, fragment, image_folder, tmp_path, capsys):
    _one_line(run_main(capsys, "train", image_folder, *TINY, *args, "--out", tmp_path / "run"), fragment)
    assert not (tmp_path / "run").exists()


def test_a_split_that_leaves_nothing_to_train_on(image_folder, tmp_path, capsys):
    result = run_main(capsys, "train", image_folder, *TINY, "--val", "0.5", "--test", "0.49",
                      "--out", tmp_path / "run")
    _one_line(result, "leave no image to train on")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, fragment", [
    (["summary", TINY_BACKBONE, "--classes", "-1"], "classes=-1"),
    (["summary", TINY_BACKBONE, "--depth", "-5"], "depth=-5"),
    (["serve", "MODEL", "--max-upload-mb", "nan"], "max_upload_mb=nan"),
    (["serve", "MODEL", "--port", "70000"], "port=70000"),
    (["serve", "MODEL", "--batch-window-ms", "nan"], "batch_window_ms=nan"),
    (["serve", "MODEL", "--workers", "0"], "workers=0"),
    (["predict", "MODEL", "x.png", "--batch-size", "0"], "batch_size=0"),
    (["export", "MODEL", "--opset", "99"], "opset=99"),
])
def test_other_commands(args, fragment, tiny_run, capsys):
    args = [str(tiny_run.model_dir) if arg == "MODEL" else arg for arg in args]
    _one_line(run_main(capsys, *args), fragment)


def test_exports_that_could_not_be_written_are_refused_before_exporting(tiny_run, tmp_path, capsys):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "model")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    _one_line(run_main(capsys, "export", bundle, "--out", folder), "is a folder")
    long_name = tmp_path / ("m" * 248 + ".onnx")  # a legal name; its temporary used to be too long
    assert run_main(capsys, "export", bundle, "--out", long_name).returncode == 0 and long_name.is_file()
    locked = tmp_path / "locked"
    shutil.copytree(tiny_run.model_dir, locked / "model")
    result = run_cli("export", locked / "model", "--out", tmp_path / "elsewhere.onnx",
                     prefix=read_only_prefix(locked))
    _one_line(result, "cannot write")  # config.json could not record it: refused before the export
    assert not (tmp_path / "elsewhere.onnx").exists()


def _edited(tiny_run, tmp_path, edit):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "bundle")
    config = json.loads((bundle / "config.json").read_text())
    edit(config)
    (bundle / "config.json").write_text(json.dumps(config, allow_nan=True) if not isinstance(
        edit, str) else edit)
    return bundle


@pytest.mark.parametrize("name, edit", [
    ("training is text", lambda c: c.update(training="x")),
    ("exports is a list", lambda c: c.update(exports=[1])),
    ("4 channels", lambda c: c["preprocessing"].update(input_size=[4, 64, 64], mean=[0.5] * 4,
                                                       std=[0.5] * 4)),
    ("nan mean", lambda c: c["preprocessing"].update(mean=[math.nan, 0.5, 0.5])),
    ("tiny crop", lambda c: c["preprocessing"].update(crop_pct=0.02)),
    ("huge input", lambda c: c["preprocessing"].update(input_size=[3, 20000, 20000])),
])
def test_a_bundle_the_service_accepts_never_answers_500(name, edit, tiny_run, image_folder, tmp_path):
    bundle = _edited(tiny_run, tmp_path, edit)
    try:
        app = serve.create_app(bundle, max_batch=1)
    except BundleError as error:  # refused at start, naming the field: fine
        assert "config.json" in str(error)
        return
    image = next(image_folder.rglob("*.png")).read_bytes()
    with TestClient(app) as client:
        for path in ("/model", "/health", "/"):
            assert client.get(path).status_code == 200, (name, path)
        answer = client.post("/predict", files={"file": ("a.png", image)})
        assert answer.status_code < 500, (name, answer.text)


def test_a_deeply_nested_config_is_malformed_json_not_a_recursion_error(tiny_run, tmp_path, capsys):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "bundle")
    (bundle / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    result = run_main(capsys, "predict", bundle, "x.png")
    _one_line(result, "malformed JSON")
