"""One validation mechanism: every bad option value, and every option the chosen strategy does not
use, is refused before any work with one line naming it (options.py, training/strategies)."""

import math
import subprocess
import sys

import pytest

from transferlab import train
from transferlab.devices import resolve_device
from transferlab.errors import ConfigError
from transferlab.options import OPTIONS, check
from transferlab.training.strategies import STRATEGIES, configure

from conftest import TINY_BACKBONE


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main()",
                           *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("options, message", [
    ({"strategy": "head", "weight_decay": -1.0}, "weight_decay=-1.0: must be at least 0"),
    ({"strategy": "head", "epochs": 0}, "epochs=0: must be at least 1"),
    ({"strategy": "head", "epochs": -3}, "epochs=-3: must be at least 1"),
    ({"strategy": "head", "batch_size": 0}, "batch_size=0: must be at least 1"),
    ({"strategy": "head", "lr": 0.0}, "lr=0.0: must be above 0"),
    ({"strategy": "head", "lr": -1e-3}, "lr=-0.001: must be above 0"),
    ({"strategy": "head", "lr": math.nan}, "lr=nan: expected a finite number"),
    ({"strategy": "head", "lr": math.inf}, "lr=inf: expected a finite number"),
    ({"strategy": "head", "optimizer": "lbfgs"}, "optimizer='lbfgs': use one of sgd, adam, adamw"),
    ({"strategy": "head", "dropout": 1.0}, r"dropout=1.0: must be in \[0, 1\)"),
    ({"strategy": "finetune", "backbone_lr_scale": -1.0}, "backbone_lr_scale=-1.0: must be above 0"),
    ({"strategy": "head", "grad_clip": -1.0}, "grad_clip=-1.0: must be above 0"),
    ({"strategy": "head", "early_stopping": 0}, "early_stopping=0: must be at least 1"),
    ({"strategy": "finetune", "warmup_epochs": -3}, "warmup_epochs=-3: must be at least 0"),
    ({"strategy": "head", "workers": -1}, "workers=-1: must be at least 0"),
    ({"strategy": "head", "seed": 10**21}, "seed=1000000000000000000000: must be in"),
    ({"strategy": "head", "seed": -1}, "seed=-1: must be in"),
    ({"strategy": "head", "accelerator": "tpu"}, "accelerator='tpu': use one of"),
    ({"strategy": "head", "distributed": "foo"}, "distributed='foo': use one of"),
    ({"strategy": "head", "precision": "8"}, "precision='8': use one of"),
    ({"strategy": "head", "device": "tpu"}, "device='tpu': use auto, cpu, cuda, cuda:N or mps"),
    ({"strategy": "head", "epochs": "3"}, "epochs='3': expected a whole number"),
    ({"strategy": "magic"}, "strategy='magic': available strategies are extract, head"),
    # parts of the backbone, checked on its architecture before the data is read
    ({"strategy": "head", "cut_layer": "layer9"}, "cut_layer='layer9': not a feature stage"),
    ({"strategy": "finetune", "unfreeze": "99"}, "unfreeze='99': this backbone has"),
    ({"strategy": "finetune", "unfreeze_from": "nope"}, "unfreeze_from='nope': no such layer"),
])
def test_bad_values_are_named_before_any_work(image_folder, tmp_path, options, message, monkeypatch):
    import transferlab.data.folder

    def no_work(*args, **kwargs):
        raise AssertionError("the data was scanned before the options were checked")

    monkeypatch.setattr(transferlab.data.folder, "scan_folder", no_work)
    with pytest.raises(ConfigError, match=message):
        train(image_folder, out=tmp_path / "run", backbone=TINY_BACKBONE, weights="none", **options)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("strategy, options, used_by", [
    ("extract", {"epochs": 3}, "head, finetune, scratch use it"),
    ("extract", {"lr": 0.1}, "head, finetune, scratch use it"),
    ("head", {"unfreeze": "2"}, "finetune uses it"),
    ("head", {"classifier": "mlp"}, "extract uses it"),
    ("scratch", {"warmup_epochs": 2}, "finetune uses it"),
])
def test_an_option_the_strategy_does_not_use_is_refused(strategy, options, used_by):
    name = next(iter(options))
    with pytest.raises(ConfigError, match=f"{name}: the {strategy} strategy does not use .*; {used_by}"):
        configure(strategy, {"backbone": TINY_BACKBONE, "weights": "none", **options})


@pytest.mark.parametrize("strategy, options, message", [
    ("head", {"momentum": 0.5}, "momentum=0.5: only used with optimizer sgd or rmsprop, not optimizer adam"),
    ("head", {"head_pool": "flatten"}, "head_pool='flatten': only used with --cut-layer"),
    ("finetune", {"unfreeze": "2", "unfreeze_from": "blocks.2"}, "give --unfreeze-from or --unfreeze"),
])
def test_options_that_mean_nothing_together_are_refused(strategy, options, message):
    with pytest.raises(ConfigError, match=message):
        configure(strategy, {"backbone": TINY_BACKBONE, "weights": "none", **options})


def test_the_resolved_configuration_records_only_what_is_used():
    _, extract = configure("extract", {"backbone": TINY_BACKBONE, "weights": "none"})
    assert extract.epochs is None and extract.lr is None and extract.head_pool is None
    assert extract.classifier == "logistic" and extract.device == str(resolve_device("auto"))
    _, finetune = configure("finetune", {"backbone": TINY_BACKBONE, "weights": "none"})
    assert finetune.optimizer == "adamw" and finetune.momentum is None  # no momentum option
    assert finetune.unfreeze == "all" and finetune.classifier is None and finetune.head_init == "probe"
    _, head = configure("head", {"backbone": TINY_BACKBONE, "weights": "none", "optimizer": "adamw"})
    assert head.momentum is None and head.lr == 1e-4 and head.epochs == 5


def test_every_option_a_strategy_uses_is_declared():
    for strategy in STRATEGIES.values():
        assert strategy.uses <= set(OPTIONS), strategy.name
        assert set(strategy.defaults) <= set(OPTIONS), strategy.name
        for name in strategy.uses:
            assert OPTIONS[name].per_strategy, f"{name} is used by some strategies only"


def test_check_passes_good_values_and_unset_ones():
    check({"epochs": 3, "lr": 1e-3, "val": 0.0, "unfreeze": "all", "device": "cuda:1", "seed": None})
    with pytest.raises(ConfigError, match="unknown_option: no such option"):
        check({"unknown_option": 1})


@pytest.mark.parametrize("args, message", [
    (["--strategy", "extract", "--epochs", "3"], "epochs: the extract strategy does not use --epochs"),
    (["--strategy", "head", "--weight-decay", "-1"], "weight_decay=-1.0: must be at least 0"),
    (["--strategy", "head", "--lr", "nan"], "lr=nan: expected a finite number"),
    (["--strategy", "extract", "--device", "cuda"], "no CUDA GPU is available"),
])
def test_the_command_line_says_it_in_one_line(image_folder, tmp_path, args, message):
    result = _cli("train", image_folder, "--backbone", TINY_BACKBONE, "--weights", "none",
                  "--out", tmp_path / "run", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr and result.stderr.startswith("error:")
    assert not (tmp_path / "run").exists()
