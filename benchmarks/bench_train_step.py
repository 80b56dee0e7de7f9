"""Where a `finetune` training step's time goes, on real images; prints one JSON document.

The step is the default finetune's (EfficientNet-Lite0, batch 32, every block trainable, BatchNorm
frozen, AdamW with the module's own optimizer settings, the training precision `auto` resolves to,
channels_last), run by hand so each phase can be timed on its own:

    data       next(batch) from the training DataLoader: decode (PIL) + "light" augmentation + collate
    normalise  uint8 -> float, channels_last (data.transforms.normalize)
    forward    the network and the loss, under autocast when the precision is bf16
    backward   loss.backward()
    optimizer  optimizer.step() and zero_grad()

The CPU runs each phase to completion before the next one starts (no asynchronous device), so
wall-clock timers around each phase are exact. Variants of the optimizer and of the network are timed
in alternating rounds, because this VM's speed drifts:

    python benchmarks/bench_train_step.py [--data DIR] [--steps 8] [--rounds 2]
                                          [--variants fused,fp32,compiled]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "face-mask"
PHASES = ("data", "normalise", "forward", "backward", "optimizer")


def build(data, implementation: str | None):
    """The default finetune's module, with its optimizer; `implementation` overrides how AdamW
    runs (for-loop, foreach or fused) when given, else the module's own choice is timed."""
    from transferlab.training.module import ClassifierModule, Optimization, build_optimizer
    from transferlab.training.strategies import configure

    strategy, config = configure("finetune", {"device": "cpu"})
    net, _, pre, plan = strategy.build(config, len(data.classes))
    for group in plan.groups:  # after the (zero) warm-up epochs, every selected block trains
        for parameter in group.parameters:
            parameter.requires_grad_(True)
    optimization = Optimization(config.optimizer, config.lr, config.momentum, config.weight_decay,
                                config.schedule)
    module = ClassifierModule(net, pre, plan.groups, optimization, len(data.classes),
                              freeze_batchnorm=plan.freeze_batchnorm)
    optimizer = build_optimizer(plan.groups, optimization)
    if implementation is not None:
        for group in optimizer.param_groups:
            group.update(foreach=implementation == "foreach", fused=implementation == "fused")
    return module, optimizer, config, pre


def time_steps(data, steps: int, skip: int, implementation: str | None = None,
               compiled: bool = False, precision: str | None = None,
               all_bf16: bool = False) -> dict:
    """Seconds per step of each phase (mean over `steps` after `skip` warm-up steps), with the
    layers training.kernels keeps in fp32 under bf16 so kept, as `train` does, unless `all_bf16`."""
    from transferlab.training.kernels import fp32_where_bf16_is_slower

    module, optimizer, config, pre = build(data, implementation)
    precision = precision or config.precision
    with fp32_where_bf16_is_slower(module, "32" if all_bf16 else precision, "cpu"):
        return _timed(module, optimizer, config, pre, data, steps, skip, compiled, precision)


def _timed(module, optimizer, config, pre, data, steps, skip, compiled, precision) -> dict:
    from transferlab.data.loaders import ImageFolderDataModule
    from transferlab.data.transforms import normalize
    from transferlab.devices import autocast

    module.train()
    net = torch.compile(module.net) if compiled else module.net
    loader = ImageFolderDataModule(data, pre, config.augment, batch_size=32, workers=0).train_dataloader()
    batches = iter(loader)
    totals = dict.fromkeys(PHASES, 0.0)
    compile_s = None
    for step in range(skip + steps):
        marks = [time.perf_counter()]
        images, labels, _ = next(batches)
        marks.append(time.perf_counter())
        inputs = normalize(images, pre)
        marks.append(time.perf_counter())
        with autocast("cpu", precision):
            logits = net(inputs)
        loss = module.training_loss(logits.float(), labels)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if compiled and step == 0:
            compile_s = round(marks[-1] - marks[0], 1)
        if step >= skip:
            for phase, start, end in zip(PHASES, marks, marks[1:]):
                totals[phase] += end - start
    per_step = {phase: seconds / steps for phase, seconds in totals.items()}
    total = sum(per_step.values())
    result = {"ms_per_step": {k: round(1000 * v, 1) for k, v in per_step.items()},
              "share": {k: round(v / total, 3) for k, v in per_step.items()},
              "images_per_s": round(32 / total, 1), "precision": precision}
    if compiled:
        result["first_step_s_including_compile"] = compile_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="all-bf16,fp32",
                        help="comma-separated, timed beside the default step: forloop, foreach, "
                             "fused (AdamW implementations), compiled (torch.compile of the network), "
                             "fp32 (no autocast), all-bf16 (no layer kept in fp32: the step before "
                             "training.kernels)")
    args = parser.parse_args()
    from transferlab import ImageFolderData

    data = ImageFolderData(args.data, seed=0)
    variants = {"default": lambda: time_steps(data, args.steps, skip=2)}
    for name in filter(None, args.variants.split(",")):
        if name == "compiled":
            variants[name] = lambda: time_steps(data, args.steps, skip=3, compiled=True)
        elif name == "fp32":
            variants[name] = lambda: time_steps(data, args.steps, skip=2, precision="32")
        elif name == "all-bf16":
            variants[name] = lambda: time_steps(data, args.steps, skip=2, all_bf16=True)
        else:
            variants[name] = lambda name=name: time_steps(data, args.steps, skip=2, implementation=name)
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, measure in variants.items():
            rounds[name].append(measure())
    summary = {}
    for name, results in rounds.items():
        summary[name] = {
            "images_per_s": round(sum(r["images_per_s"] for r in results) / len(results), 1),
            "ms_per_step": {phase: round(sum(r["ms_per_step"][phase] for r in results) / len(results), 1)
                            for phase in PHASES},
            "rounds_images_per_s": [r["images_per_s"] for r in results]}
        summary[name]["share"] = {phase: round(ms / sum(summary[name]["ms_per_step"].values()), 3)
                                  for phase, ms in summary[name]["ms_per_step"].items()}
        if "first_step_s_including_compile" in results[0]:
            summary[name]["first_step_s_including_compile"] = [
                r["first_step_s_including_compile"] for r in results]
    report = {"data": str(args.data), "batch_size": 32, "steps_per_round": args.steps,
              "precision": rounds["default"][0]["precision"],
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__},
              "breakdown": summary}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
