"""Training benchmark on ../shared/datasets/face-mask; prints one JSON document.

1. accuracy: extract, head, finetune and scratch with their defaults, on the same seed-0 split;
   per trained strategy, epochs and the seconds until validation accuracy first reached 99%.
2. throughput: training images/s (forward + backward + step, default backbone, batch 32, the whole
   backbone trainable) of our path (Lightning, bf16 autocast where the CPU has it, channels_last,
   frozen BatchNorm) against a naive fp32 PyTorch loop (PIL + ToTensor, NCHW, fp32), in alternating
   rounds because this VM's speed drifts.
3. fastai (only when it is installed, as in benchmarks/README.md's environment): vision_learner +
   fine_tune on the same split with the same EfficientNet-Lite0 weights; time to 99% val accuracy.

    python benchmarks/bench_train.py [--data DIR] [--out DIR] [--reuse] [--skip accuracy,throughput,fastai]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "face-mask"
TARGET = 0.99


def seconds_to_target(history: Path) -> tuple[float | None, int | None]:
    """Cumulative epoch seconds until val_acc first reaches TARGET, and that epoch."""
    elapsed = 0.0
    with history.open(newline="") as handle:
        for row in csv.DictReader(handle):
            elapsed += float(row["seconds"])
            if row["val_acc"] and float(row["val_acc"]) >= TARGET:
                return round(elapsed, 1), int(row["epoch"])
    return None, None


def accuracy(data, out: Path, strategies: list[str], reuse: bool) -> dict:
    from transferlab import train

    results = {}
    for strategy in strategies:
        run_dir = out / strategy
        if not (reuse and (run_dir / "metrics.json").is_file()):
            train(data, strategy=strategy, out=run_dir, show_progress=False, cache_dir=None)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result = {"test_accuracy": metrics["test"]["accuracy"], "val_accuracy": metrics["val"]["accuracy"],
                  "test_confusion": metrics["test"]["confusion_matrix"],
                  "total_s": metrics["timing"]["total_s"], "params": metrics["params"],
                  "timing": metrics["timing"]}
        if strategy != "extract":
            seconds, epoch = seconds_to_target(run_dir / "history.csv")
            result.update(epochs=metrics["epochs_run"], best_epoch=metrics["best_epoch"],
                          seconds_to_val_99=seconds, epoch_reaching_val_99=epoch)
        results[strategy] = result
    return results


class StepTimer:
    """Seconds for training steps after `skip` warm-up steps."""

    def __init__(self, skip: int):
        self.skip, self.steps, self.started, self.seconds = skip, 0, None, 0.0

    def step_done(self) -> None:
        self.steps += 1
        if self.steps == self.skip:
            self.started = time.perf_counter()
        elif self.steps > self.skip:
            self.seconds = time.perf_counter() - self.started


def ours(data, steps: int, skip: int) -> float:
    import lightning as L

    from transferlab.data.loaders import ImageFolderDataModule
    from transferlab.process import reused_memory
    from transferlab.training.kernels import fp32_where_bf16_is_slower
    from transferlab.training.module import ClassifierModule, Optimization
    from transferlab.training.strategies import configure

    strategy, config = configure("finetune", {"warmup_epochs": 0, "device": "cpu"})
    net, _, pre, recipe = strategy.build(config, len(data.classes))
    optimization = Optimization(config.optimizer, config.lr, config.momentum, config.weight_decay,
                                config.schedule)  # the default finetune's (AdamW)
    module = ClassifierModule(net, pre, recipe.groups, optimization, len(data.classes),
                              freeze_batchnorm=recipe.freeze_batchnorm)
    timer = StepTimer(skip)

    class Timing(L.Callback):
        def on_train_batch_end(self, *args):
            timer.step_done()

    trainer = L.Trainer(max_steps=skip + steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        precision="bf16-mixed" if config.precision == "bf16" else "32-true",
                        callbacks=[*recipe.callbacks, Timing()])
    # as training.trainer.fit runs, inside the train workflow's reused_memory
    with fp32_where_bf16_is_slower(module, config.precision, "cpu"), reused_memory():
        trainer.fit(module, datamodule=ImageFolderDataModule(data, pre, config.augment,
                                                             batch_size=32))
    return steps * 32 / timer.seconds


def naive(data, steps: int, skip: int) -> float:
    """What a first PyTorch script does: PIL + ToTensor per image, NCHW fp32, BatchNorm in train mode."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from transferlab.models.backbones import create_backbone

    backbone = create_backbone("efficientnet_lite0")
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, len(data.classes)))
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize([0.5] * 3, [0.5] * 3)])

    class Files(Dataset):
        def __init__(self):
            self.files, self.labels = data.files("train"), data.labels("train")

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            return transform(Image.open(self.files[i]).convert("RGB")), self.labels[i]

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    timer = StepTimer(skip)
    model.train()
    for images, labels in DataLoader(Files(), batch_size=32, shuffle=True):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timer.step_done()
        if timer.steps == skip + steps:
            break
    return steps * 32 / timer.seconds


def throughput(data, steps: int, skip: int, rounds: int) -> dict:
    measured = {"ours": [], "naive": []}
    for _ in range(rounds):
        measured["ours"].append(round(ours(data, steps, skip), 1))
        measured["naive"].append(round(naive(data, steps, skip), 1))
    mean = {k: sum(v) / len(v) for k, v in measured.items()}
    return {"images_per_s": {k: round(v, 1) for k, v in mean.items()}, "rounds": measured,
            "ratio_ours_over_naive": round(mean["ours"] / mean["naive"], 2),
            "images_per_round": steps * 32}


def fastai_fine_tune(data, out: Path, epochs: int = 2) -> dict:
    """fastai's recipe (1 frozen epoch, then `epochs` unfrozen) with our split and weights."""
    try:
        from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, IndexSplitter, Normalize,
                                       Resize, accuracy, aug_transforms, vision_learner)
        from fastai.callback.core import Callback
    except ImportError as error:
        return {"skipped": f"fastai not installed here ({error}); see benchmarks/README.md"}

    from transferlab.models.backbones import create_backbone

    paths = [str(p) for split in ("train", "val") for p in data.files(split)]
    labels = [data.classes[y] for split in ("train", "val") for y in data.labels(split)]
    valid = list(range(len(data.split["train"]), len(paths)))
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=lambda i: paths[i],
                      get_y=lambda i: labels[i], splitter=IndexSplitter(valid),
                      item_tfms=Resize(224), batch_tfms=[*aug_transforms(),
                                                         Normalize.from_stats([0.5] * 3, [0.5] * 3)])
    dls = block.dataloaders(list(range(len(paths))), bs=32, num_workers=0, path=out)

    class Clock(Callback):
        """Wall time from the start of fine_tune (both of its fits) to each epoch's end."""
        order, started, reached = 100, None, None

        def before_fit(self):
            self.started = self.started or time.perf_counter()

        def after_epoch(self):
            if not self.learn.recorder.values:  # get_preds runs epochs that record nothing
                return
            accuracy_now = float(self.learn.recorder.values[-1][2])
            elapsed = round(time.perf_counter() - self.started, 1)
            history.append({"val_acc": accuracy_now, "elapsed_s": elapsed})
            if self.reached is None and accuracy_now >= TARGET:
                self.reached = elapsed

    history: list[dict] = []
    clock = Clock()
    learn = vision_learner(dls, "efficientnet_lite0", pretrained=False, metrics=accuracy, cbs=[clock])
    body = learn.model[0].model  # timm's model inside fastai's TimmBody
    body.load_state_dict(create_backbone("efficientnet_lite0").state_dict())
    started = time.perf_counter()
    with learn.no_bar(), learn.no_logging():  # stdout carries this script's JSON
        learn.fine_tune(epochs)
    wall = time.perf_counter() - started
    learn.remove_cb(clock)
    test_dl = dls.test_dl([str(p) for p in data.files("test")])
    with learn.no_bar():
        predictions, _ = learn.get_preds(dl=test_dl)
    predicted = [dls.vocab[i] for i in predictions.argmax(1).tolist()]
    truth = [data.classes[y] for y in data.labels("test")]
    return {"recipe": f"vision_learner + fine_tune({epochs}), bs 32, Resize(224), aug_transforms",
            "seconds_to_val_99": clock.reached, "epochs": history, "wall_s": round(wall, 1),
            "test_accuracy": sum(p == t for p, t in zip(predicted, truth)) / len(truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("/tmp/transferlab-bench-train"))
    parser.add_argument("--strategies", default="extract,head,finetune,scratch")
    parser.add_argument("--skip", default="", help="comma-separated: accuracy, throughput, fastai")
    parser.add_argument("--reuse", action="store_true",
                        help="read runs already completed in --out instead of training them again")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from transferlab import ImageFolderData

    skip = set(filter(None, args.skip.split(",")))
    data = ImageFolderData(args.data, seed=0)
    report = {"data": str(args.data), "split": data.summary(),
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": torch.get_num_threads(), "torch": torch.__version__}}
    sections = {"accuracy": lambda: accuracy(data, args.out, args.strategies.split(","), args.reuse),
                "throughput": lambda: throughput(data, args.steps, skip=2, rounds=args.rounds),
                "fastai": lambda: fastai_fine_tune(data, args.out / "fastai")}
    for name, measure in sections.items():
        if name in skip:
            continue
        try:
            report[name] = measure()
        except Exception as error:  # one failing section must not lose the others' numbers
            report[name] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
