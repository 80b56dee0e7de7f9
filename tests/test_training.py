"""The trained strategies (head, finetune, scratch) on a tiny random-weight model."""

import csv
import json

import lightning as L
import numpy as np
import pytest
import torch

from transferlab import ImageFolderData, load_model, train
from transferlab.data.loaders import ImageFolderDataModule
from transferlab.errors import ConfigError
from transferlab.rundir.predictions import PredictionTable
from transferlab.training.module import VAL_SELECTION_METRIC, ClassifierModule, Optimization
from transferlab.training.strategies import configure
from transferlab.training.trainer import Distribution, fit

from conftest import TINY_BACKBONE

FAST = dict(backbone=TINY_BACKBONE, weights="none", show_progress=False, cache_dir=None, batch_size=8)


def history(run_dir):
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Recorder(L.Callback):
    """Per epoch: which backbone parameters may train, and the weights at the end of the epoch."""

    def __init__(self):
        self.trainable, self.weights = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_index):
        if batch_index == 0:
            self.trainable.append(sum(p.requires_grad for p in pl_module.net.backbone.parameters()))

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append(snapshot(pl_module.net))


def fit_tiny(image_folder, tmp_path, strategy, epochs, extra_callbacks=(), **options):
    chosen, config = configure(strategy, dict(backbone=TINY_BACKBONE, weights="none", epochs=epochs,
                                              **options))
    data = ImageFolderData(image_folder, cache_dir=None)
    L.seed_everything(0, verbose=False)
    net, _, pre, recipe = chosen.build(config, len(data.classes))
    module = ClassifierModule(net, pre, recipe.groups, Optimization(config.optimizer, config.lr,
                                                                    config.momentum),
                              num_classes=2, freeze_batchnorm=recipe.freeze_batchnorm)
    before = snapshot(net)
    result = fit(module, ImageFolderDataModule(data, pre, "light", batch_size=8), tmp_path,
                 epochs=epochs, precision="32", distribution=Distribution(),
                 callbacks=[*recipe.callbacks, *extra_callbacks], show_progress=False,
                 early_stopping=options.get("early_stopping"))
    return module, before, result


def test_head_run_directory_and_frozen_backbone(image_folder, tmp_path):
    run = train(image_folder, strategy="head", out=tmp_path / "run", epochs=2, **FAST)
    for name in ("model/model.safetensors", "model/labels.txt", "model/README.md", "metrics.json",
                 "history.csv", "split.json", "run.json", "checkpoints/last.ckpt"):
        assert (run.dir / name).is_file(), name
    assert list((run.dir / "logs").glob("events.out.tfevents.*"))
    rows = history(run.dir)
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(r["train_loss"] and r["val_loss"] and r["val_acc"] and float(r["seconds"]) > 0 for r in rows)
    metrics = run.metrics
    assert metrics["strategy"] == "head" and metrics["epochs_run"] == 2
    assert metrics["params"]["trainable"] == 256 * 2 + 2  # the linear probe it starts from
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == metrics["split"]["test"]
    config = json.loads((run.model_dir / "config.json").read_text())
    assert config["head"]["hidden"] == [] and config["head"]["dropout"] == 0.0
    # the bundle predicts like any other, and as the run did: the run's own test predictions
    table = PredictionTable.read(run.dir / "predictions.csv")
    rows = table.select("test")
    predictions = load_model(run.model_dir).predict([image_folder / table.files[i] for i in rows],
                                                    precision=metrics["precision"]["training"])
    assert [p.top_k[0][0] for p in predictions] == [table.classes[i] for i in table.proba[rows].argmax(1)]
    np.testing.assert_allclose([p.top_k[0][1] for p in predictions], table.proba[rows].max(1), atol=1e-5)


def test_frozen_parameters_receive_no_update(image_folder, tmp_path):
    module, before, _ = fit_tiny(image_folder, tmp_path, "head", epochs=2)
    after = snapshot(module.net)
    backbone_keys = [k for k in before if k.startswith("backbone.")]
    assert backbone_keys and all(torch.equal(before[k], after[k]) for k in backbone_keys)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))


def test_finetune_unfreezes_after_warmup_and_keeps_batchnorm_frozen(image_folder, tmp_path):
    recorder = Recorder()
    module, before, _ = fit_tiny(image_folder, tmp_path, "finetune", epochs=3, warmup_epochs=1,
                                 unfreeze="2", extra_callbacks=[recorder])
    assert recorder.trainable[0] == 0 and recorder.trainable[1] == recorder.trainable[2] > 0
    backbone = [k for k in before if k.startswith("backbone.")]
    warmup = recorder.weights[0]
    assert all(torch.equal(before[k], warmup[k]) for k in backbone)  # nothing moved in warm-up
    final = recorder.weights[2]
    assert any(not torch.equal(before[k], final[k]) for k in backbone)  # top blocks moved after
    batchnorm = [k for k in backbone if ".bn" in k]  # weights, biases and running statistics
    assert batchnorm and all(torch.equal(before[k], final[k]) for k in batchnorm)
    lower = [k for k in backbone if k.startswith("backbone.conv_stem")]
    assert lower and all(torch.equal(before[k], final[k]) for k in lower)  # below the top 2 blocks


class ScriptedValLoss(L.Callback):
    """Overrides the logged val_loss with a script, so the best epoch is known in advance."""

    def __init__(self, losses):
        self.losses = losses

    def on_validation_end(self, trainer, pl_module):  # before early stopping and checkpointing
        for name in ("val_loss", VAL_SELECTION_METRIC):
            trainer.callback_metrics[name] = torch.tensor(self.losses[trainer.current_epoch])


def test_early_stopping_restores_the_best_epoch(image_folder, tmp_path):
    recorder = Recorder()
    module, _, result = fit_tiny(image_folder, tmp_path, "scratch", epochs=10, early_stopping=2,
                                 extra_callbacks=[recorder, ScriptedValLoss([0.9, 0.5, 0.7, 0.8, 0.9,
                                                                             1, 1, 1, 1, 1])])
    assert result.stopped_early and result.epochs == 4 and result.best_epoch == 1
    restored = snapshot(module.net)
    assert all(torch.equal(restored[k], recorder.weights[1][k]) for k in restored)
    assert any(not torch.equal(restored[k], recorder.weights[3][k]) for k in restored)


def test_resume_continues_from_the_last_checkpoint(image_folder, tmp_path):
    first = train(image_folder, strategy="scratch", out=tmp_path / "run", epochs=1,
                  show_progress=False, cache_dir=None)
    assert len(history(first.dir)) == 1
    with pytest.raises(ConfigError, match="lr cannot change"):
        train(resume=first.dir, lr=0.5, show_progress=False)
    again = train(resume=first.dir, epochs=3, show_progress=False)
    assert [r["epoch"] for r in history(again.dir)] == ["0", "1", "2"]
    assert again.metrics["epochs_run"] == 3 and again.metrics["strategy"] == "scratch"
    assert json.loads((again.dir / "run.json").read_text())["config"]["epochs"] == 3


def test_cut_layer_head_bundle_round_trip(image_folder, tmp_path):
    run = train(image_folder, strategy="head", out=tmp_path / "cut", epochs=1, cut_layer="blocks.2",
                **FAST)
    config = json.loads((run.model_dir / "config.json").read_text())
    assert config["cut_layer"] == 2 and config["head"]["pool"] == "avg"
    assert config["head"]["in_features"] == 32  # channels of test_efficientnet's third stage
    proba, errors = load_model(run.model_dir).predict_proba(ImageFolderData(image_folder).files("val"))
    assert proba.shape[1] == 2 and not any(errors)
    with pytest.raises(ConfigError, match="not a feature stage.*0=blocks.0"):
        train(image_folder, strategy="head", out=tmp_path / "bad", cut_layer="layer9", **FAST)


@pytest.mark.parametrize("options, message", [
    ({"strategy": "scratch", "weights": "imagenet"}, "scratch trains from random weights"),
    ({"strategy": "head", "optimizer": "lbfgs"}, "optimizer='lbfgs'"),
    ({"strategy": "head", "augment": "extreme"}, "augment='extreme'"),
    ({"strategy": "finetune", "unfreeze": "some"}, "unfreeze='some'"),
    ({"strategy": "head", "epochs": 0}, "epochs=0"),
])
def test_bad_training_options_are_named(image_folder, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        train(image_folder, out=tmp_path / "x", **options)
    assert not (tmp_path / "x").exists()


def test_cosine_schedule_lowers_the_rate_each_epoch(image_folder, tmp_path):
    run = train(image_folder, strategy="head", out=tmp_path / "cosine", epochs=3, schedule="cosine",
                optimizer="adamw", weight_decay=0.01, grad_clip=1.0, **FAST)
    rates = [float(row["lr"]) for row in history(run.dir)]
    assert rates[0] > rates[1] > rates[2]


def test_balanced_class_weights(tmp_path):
    from transferlab.training.strategies.trained import class_weights as _class_weights
    from transferlab.data.synthetic import make_image_folder

    root = make_image_folder(tmp_path / "data", per_class=10, size=32)
    for path in sorted((root / "squares").iterdir())[:6]:
        path.unlink()
    data = ImageFolderData(root, cache_dir=None)
    counts = [data.labels("train").count(i) for i in range(2)]
    expected = [sum(counts) / (2 * count) for count in counts]
    assert torch.allclose(_class_weights(data), torch.tensor(expected))


def test_same_seed_same_weights(image_folder, tmp_path):
    runs = [train(image_folder, strategy="head", out=tmp_path / str(i), epochs=1, seed=3,
                  precision="32", **FAST) for i in range(2)]
    from safetensors.torch import load_file

    first, second = (load_file(str(run.model_dir / "model.safetensors")) for run in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert runs[0].metrics["test"] == runs[1].metrics["test"]
