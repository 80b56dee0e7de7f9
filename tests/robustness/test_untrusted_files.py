"""Model bundles, weights and checkpoints from strangers: nothing is ever unpickled, and anything
altered, truncated, malformed or too new is refused with one clear message naming the file."""

import json
import pickle
import shutil

import pytest
import torch

from transferlab import load_model
from transferlab.models.backbones import create_backbone
from transferlab.errors import BundleError, WeightsError

from conftest import TINY_BACKBONE
from messy import run_main


class _Exploit:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bundle(tiny_run, tmp_path, name="bundle"):
    return shutil.copytree(tiny_run.model_dir, tmp_path / name)


def _edit_config(bundle, edit):
    config = json.loads((bundle / "config.json").read_text())
    edit(config)
    (bundle / "config.json").write_text(json.dumps(config))


def _rehash(bundle):
    """Make config.json vouch for the current weights file, as an attacker editing both would."""
    from transferlab.data.decode import sha256_of

    _edit_config(bundle, lambda c: c.update(weights_sha256=sha256_of(bundle / "model.safetensors")))


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


WEIGHT_DAMAGE = {
    "one byte flipped": (_flip_a_byte, False, "sha256 does not match"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), False,
                  "sha256 does not match"),
    "empty": (lambda p: p.write_bytes(b""), False, "sha256 does not match"),
    "missing": (lambda p: p.unlink(), False, "model.safetensors is missing"),
    "truncated, hash updated": (lambda p: p.write_bytes(p.read_bytes()[:1000]), True,
                                "weights do not fit|not a readable"),
    "pickle, hash updated": (lambda p: torch.save({"w": _Exploit(p.parent / "pwned")}, p), True,
                             "weights do not fit|not a readable"),
}


@pytest.mark.parametrize("damage", WEIGHT_DAMAGE, ids=str)
def test_damaged_weights_are_refused(damage, tiny_run, tmp_path, capsys):
    bundle = _bundle(tiny_run, tmp_path)
    change, rehash, message = WEIGHT_DAMAGE[damage]
    change(bundle / "model.safetensors")
    if rehash:
        _rehash(bundle)
    with pytest.raises(BundleError, match=message):
        load_model(bundle)
    result = run_main(capsys, "predict", bundle, tiny_run.dir / "split.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error:") and str(bundle) in result.stderr
    assert not (bundle / "pwned").exists()


CONFIG_DAMAGE = {
    "not JSON": ("{ not json", "malformed JSON"),
    "binary": (b"\x80\x04\x95 pickled?", "malformed JSON"),
    "a list": ("[1, 2]", "no format_version"),
    "no format_version": ({"format_version": None}, "no format_version"),
    "format_version as text": ({"format_version": "1"}, "no format_version"),
    "newer format": ({"format_version": 2}, "newer than this transferlab"),
    "classes missing": ({"classes": None}, "classes"),
    "classes as text": ({"classes": "with_mask"}, "classes"),
    "classes disagree with the head": ({"classes": ["a", "b", "c"]}, "classes"),
    "head missing a field": ({"head": {"num_classes": 2}}, "head"),
    "head with a wrong type": ({"head": {"in_features": "many", "num_classes": 2}}, "head"),
    "preprocessing missing": ({"preprocessing": {}}, "preprocessing"),
    "preprocessing with wrong types": ({"preprocessing": {"input_size": "big", "interpolation": 3,
                                                          "mean": 1, "std": None, "crop_pct": "x"}},
                                       "preprocessing"),
    "unknown backbone": ({"backbone": "no_such_net_v9"}, "no_such_net_v9"),
    "cut_layer nonsense": ({"cut_layer": "deep"}, "cut"),
    "weights_sha256 a number": ({"weights_sha256": 12}, "sha256"),
}


@pytest.mark.parametrize("damage", CONFIG_DAMAGE, ids=str)
def test_malformed_config_is_refused_naming_the_file(damage, tiny_run, tmp_path, capsys):
    bundle = _bundle(tiny_run, tmp_path)
    change, message = CONFIG_DAMAGE[damage]
    if isinstance(change, dict):
        def edit(config):
            for key, value in change.items():
                if value is None:
                    config.pop(key)
                else:
                    config[key] = value
        _edit_config(bundle, edit)
    elif isinstance(change, bytes):
        (bundle / "config.json").write_bytes(change)
    else:
        (bundle / "config.json").write_text(change)
    with pytest.raises(BundleError, match=message) as refused:
        load_model(bundle)
    assert "config.json" in str(refused.value) or str(bundle) in str(refused.value)
    result = run_main(capsys, "predict", bundle, tiny_run.dir / "split.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_loading_and_predicting_never_unpickle(tiny_run, image_folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    predictor = load_model(tiny_run.model_dir)
    results = predictor.predict(sorted(image_folder.rglob("*.png"))[:3])
    assert all(not r.error for r in results)


def test_a_pth_that_would_run_code_is_refused(image_folder, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Exploit(marker)}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        create_backbone(TINY_BACKBONE, weights=str(path))
    assert not marker.exists()
    # and as --weights of a training run, from the command line
    result = run_main(capsys, "train", image_folder, "--backbone", TINY_BACKBONE, "--weights", path,
                     "--out", tmp_path / "run", "--no-cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(path) in result.stderr and not marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused_on_resume(tiny_head_run, tmp_path, capsys):
    run_dir = shutil.copytree(tiny_head_run.dir, tmp_path / "run")
    marker = tmp_path / "pwned"
    (run_dir / "metrics.json").unlink()  # an interrupted run, as far as --resume can tell
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": _Exploit(marker), "epoch": 0}, checkpoint)
    result = run_main(capsys, "train", "--resume", run_dir, "--epochs", 3, "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(checkpoint) in result.stderr and not marker.exists()
