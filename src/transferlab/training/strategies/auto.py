"""`auto`: the best model a time budget buys.

1. Backbones: when `--backbone` is not given and more than one backbone's ImageNet weights are
   installed (models.backbones.OFFLINE_WEIGHTS), each whose embedding pass fits a share of the budget
   gets a linear probe on its cached embeddings; the one with the best cross-validated accuracy on
   the training split is kept (5 folds; val stays untouched for step 3).
2. `extract` on that backbone: seconds once its embeddings are cached.
3. The cost of a fine-tuning epoch is measured (a few training steps on the device), and `finetune`
   (linear probe, then fine-tuning) runs for as many epochs as the rest of the budget holds, up to
   its own default, only if at least MIN_FINETUNE_EPOCHS fit. Lightning stops it at the budget in any case, so a
   run never exceeds it by more than one training step plus the final evaluation.
4. Whichever model has the lower validation loss after temperature scaling (the loss the saved
   model will have) is kept; extract's on a tie, so auto never returns a model worse on val than
   extract's.

Everything tried, with its seconds and val accuracy and loss, is recorded in metrics.json under
"auto", and the report shows it. The backbone, budget and epochs chosen are written to the run
folder (auto-plan.json) before fine-tuning starts: a resumed run keeps them, reruns extract (from
the embedding cache) and gives fine-tuning the budget again from its own start.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ...data.folder import ImageFolderData
from ...data.transforms import Preprocessing, normalize
from ...devices import autocast
from ...models.backbones import DEFAULT_BACKBONE, create_backbone, offline_backbones
from ...models.network import ClassifierNet, build_network
from ...rundir.atomic import write_json
from ...rundir.layout import RunDir
from ..config import TrainConfig
from ..module import VAL_SELECTION_METRIC
from .base import COMMON_OPTIONS, FitContext, Strategy, TrainedModel, backbone_for
from .extract import Extract, classifier, embed_splits
from .finetune import Finetune
from .trained import epoch_row, val_scores

log = logging.getLogger(__name__)

PASSES_IN_DEFAULT_BUDGET = 20  # default budget: 20 forward passes over the data set
MIN_DEFAULT_BUDGET_S = 120.0
PROBE_SHARE = 0.4  # of the budget, at most, for embedding the images with other backbones
TIMING_OVERHEAD = 1.25  # decoding and augmentation on top of the measured network steps
CV_FOLDS = 5
# Fewer epochs are not worth starting: on flowers-12 fine-tuning's first epoch cost 2 points of val
# accuracy (the features move before the head follows) and the second and third won them back.
MIN_FINETUNE_EPOCHS = 3


class Auto(Strategy):
    name = "auto"
    summary = "extract, then fine-tuning if the time budget allows; keeps the lower val loss"
    uses = frozenset({"time_budget"})

    def configure(self, given, users_of) -> TrainConfig:
        """Without --backbone, the backbone is auto's to choose: None until fit() has chosen."""
        config = super().configure(given, users_of)
        return config if given.get("backbone") else replace(config, backbone=None)

    def network(self, config: TrainConfig, num_classes: int):
        return Extract().network(replace(config, backbone=config.backbone or DEFAULT_BACKBONE),
                                 num_classes)

    def fit(self, data: ImageFolderData, config: TrainConfig, context: FitContext) -> TrainedModel:
        started = time.perf_counter()
        plan_file = RunDir(context.run_dir).auto_plan
        plan = Plan.read(plan_file)  # a resumed run goes on with what it chose first
        tried: list[dict] = []
        if plan is None:
            speeds, budget = self._measure(data, config)
            backbone = self._choose_backbone(data, config, context, speeds, budget, tried)
        else:
            budget, backbone = plan.budget_s, plan.backbone
            log.info("auto: resuming its plan: %s, %d epochs of fine-tuning", backbone, plan.epochs)
        common = {name: getattr(config, name) for name in COMMON_OPTIONS - {"strategy"}}
        clock = time.perf_counter()
        extract = Extract()
        best = extract.fit(data, extract.configure({**common, "backbone": backbone}, {}), context)
        tried.append(_row("extract", backbone, time.perf_counter() - clock,
                          val_scores(best.outputs["val"].logits, data)))
        best_loss, chosen = tried[-1][VAL_SELECTION_METRIC], "extract"

        remaining = budget - (time.perf_counter() - started)
        resumed = plan is not None
        if plan is None:
            epoch_s = speeds[backbone].epoch_s(len(data.split["train"]), len(data.split["val"]))
            epochs = min(int(remaining // epoch_s), Finetune.defaults["epochs"])
            plan = Plan(backbone, round(budget, 1), epochs, round(epoch_s, 1))
        if plan.epochs >= MIN_FINETUNE_EPOCHS and best_loss is not None:
            if not resumed:
                write_json(plan_file, asdict(plan))  # before its first checkpoint
            tuned, scores = self._finetune(data, common, plan, replace(context, time_limit_s=remaining),
                                           tried)
            improved = (tuned.details.get("kept") != "probe"  # else it is extract's model again
                        and scores[VAL_SELECTION_METRIC] is not None
                        and scores[VAL_SELECTION_METRIC] < best_loss)
            if improved:
                best, best_loss, chosen = tuned, scores[VAL_SELECTION_METRIC], "finetune"
        else:
            why = (f"{MIN_FINETUNE_EPOCHS} epochs take about "
                   f"{MIN_FINETUNE_EPOCHS * plan.epoch_estimate_s:.0f} s; "
                   f"{max(0.0, remaining):.0f} s of the budget were left"
                   ) if best_loss is not None else "no validation images"
            tried.append({"strategy": "finetune", "backbone": backbone, "seconds": 0.0,
                          "skipped": why})
        elapsed = time.perf_counter() - started
        log.info("auto: kept %s on %s after %.0f s of a %.0f s budget", chosen, backbone, elapsed,
                 budget)
        best.backbone = backbone
        best.timings.train_s = elapsed
        best.details = {**best.details, "auto": {
            "budget_s": round(budget, 1), "seconds": round(elapsed, 1), "chosen": chosen,
            "backbone": backbone, "epoch_estimate_s": plan.epoch_estimate_s, "resumed": resumed,
            "tried": tried}}
        return best

    @staticmethod
    def _measure(data: ImageFolderData, config: TrainConfig) -> tuple[dict[str, "Speed"], float]:
        """Each candidate backbone's speed, and the budget: the one given, else the default's
        forward passes by the fastest candidate."""
        candidates = [config.backbone] if config.backbone else offline_backbones() or [
            DEFAULT_BACKBONE]
        speeds = {name: Speed.measure(name, config) for name in candidates}
        budget = parse_duration(config.time_budget) if config.time_budget else max(
            MIN_DEFAULT_BUDGET_S, PASSES_IN_DEFAULT_BUDGET * len(data.scan.images)
            * min(speed.forward_s for speed in speeds.values()))
        return speeds, budget

    @staticmethod
    def _finetune(data: ImageFolderData, common: dict, plan: "Plan", context: FitContext,
                  tried: list[dict]) -> tuple[TrainedModel, dict]:
        """finetune for the plan's epochs, its row added to `tried`: (the model, its val scores)."""
        finetune = Finetune()
        config = finetune.configure({**common, "backbone": plan.backbone, "epochs": plan.epochs}, {})
        clock = time.perf_counter()
        tuned = finetune.fit(data, config, context)
        scores = _best_epoch(tuned)
        tried.append(_row(f"finetune ({plan.epochs} epochs)", plan.backbone,
                          time.perf_counter() - clock, scores))
        return tuned, scores

    def _choose_backbone(self, data: ImageFolderData, config: TrainConfig, context: FitContext,
                         speeds: dict[str, "Speed"], budget: float, tried: list[dict]) -> str:
        """The one candidate, or the one whose linear probe cross-validates best among those whose
        embedding fits PROBE_SHARE of the budget (the cheapest is always tried)."""
        if len(speeds) == 1:
            return next(iter(speeds))
        allowance = budget * PROBE_SHARE
        scores: dict[str, float] = {}
        for name in sorted(speeds, key=lambda n: speeds[n].forward_s):  # cheapest first
            cost = len(data.scan.images) * speeds[name].forward_s
            if scores and cost > allowance:
                tried.append({"strategy": "probe", "backbone": name, "seconds": 0.0,
                              "skipped": f"embedding every image would take about {cost:.0f} s"})
                continue
            clock = time.perf_counter()
            scores[name] = cross_validated_probe(data, replace(config, backbone=name), context)
            seconds = time.perf_counter() - clock
            allowance -= seconds
            tried.append({"strategy": "probe", "backbone": name, "seconds": round(seconds, 1),
                          "cv_accuracy": round(scores[name], 4)})
        return max(scores, key=lambda name: scores[name])


@dataclass(frozen=True)
class Plan:
    """What auto chose for a run, kept in its folder (auto-plan.json) before fine-tuning starts: a
    resumed run goes on with the same backbone and number of epochs (the learning-rate schedule
    spans them) instead of choosing again from a new timing of a busier or quieter machine."""

    backbone: str
    budget_s: float
    epochs: int
    epoch_estimate_s: float

    def __post_init__(self):
        if not (isinstance(self.backbone, str) and isinstance(self.epochs, int)
                and all(isinstance(x, (int, float)) for x in (self.budget_s, self.epoch_estimate_s))):
            raise ValueError("not a plan auto wrote")

    @classmethod
    def read(cls, path: Path) -> "Plan | None":
        """The plan in `path`; None when there is none, or it is not one auto wrote (with a
        warning: auto then chooses again)."""
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as error:
            log.warning("ignoring %s (%s); auto chooses its backbone and epochs again", path, error)
            return None


@dataclass
class Speed:
    """Seconds per image of a backbone's forward pass (embedding) and of a training step (forward
    and backward through the whole network), measured on the device on a random batch."""

    forward_s: float
    train_s: float

    @classmethod
    def measure(cls, backbone_name: str, config: TrainConfig, steps: int = 2) -> "Speed":
        backbone = create_backbone(backbone_name, "none")  # speed does not depend on the weights
        pre = Preprocessing.from_model(backbone)
        net, _ = build_network(backbone, pre, 2)
        device = torch.device(config.device)
        net = net.to(device, memory_format=torch.channels_last)
        images = torch.randint(0, 256, (config.batch_size, *pre.input_size), dtype=torch.uint8,
                               device=device)
        forward_s = _per_image(lambda: _forward(net, images, pre, config), steps, len(images))
        train_s = _per_image(lambda: _train_step(net, images, pre, config), steps, len(images))
        return cls(forward_s, train_s)

    def epoch_s(self, train_images: int, val_images: int) -> float:
        return TIMING_OVERHEAD * (train_images * self.train_s + val_images * self.forward_s)


def _per_image(step, repeats: int, images: int) -> float:
    step()  # the first call pays for allocation and kernel selection
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / (repeats * images)


def _forward(net: ClassifierNet, images: torch.Tensor, pre: Preprocessing, config: TrainConfig):
    with torch.inference_mode(), autocast(images.device, config.precision):
        net.eval()(normalize(images, pre))


def _train_step(net: ClassifierNet, images: torch.Tensor, pre: Preprocessing, config: TrainConfig):
    net.train()
    with autocast(images.device, config.precision):
        loss = net(normalize(images, pre)).float().logsumexp(1).mean()
    loss.backward()
    net.zero_grad(set_to_none=True)


def cross_validated_probe(data: ImageFolderData, config: TrainConfig, context: FitContext) -> float:
    """Mean accuracy of extract's classifier over CV_FOLDS stratified folds of the training split's
    embeddings by `config.backbone` (cached for extract to reuse)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    backbone, pre = backbone_for(config)
    features = embed_splits(data, backbone, pre, config, context.show_progress)[0]["train"]
    labels = np.array(data.labels("train"))
    folds = min(CV_FOLDS, int(np.bincount(labels).min()))
    if folds < 2:
        return 0.0
    return float(cross_val_score(classifier(config), features, labels,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=config.seed)).mean())


def parse_duration(text: str) -> float:
    """Seconds in "90s", "10m", "1.5h" or a plain number of seconds (checked by options.Duration)."""
    text = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    return float(text[:-1]) * scale if scale else float(text)


def _best_epoch(model: TrainedModel) -> dict:
    """The val scores of the epoch whose weights a trained model kept (history.csv), or of the
    probe it started from when no epoch beat it."""
    if model.details.get("kept") == "probe":
        return {k: model.details["probe"][k] for k in ("val_acc", "val_loss", VAL_SELECTION_METRIC)}
    row = epoch_row(model.history, model.details.get("best_epoch"))
    if row is None:
        return {"val_acc": None, "val_loss": None, VAL_SELECTION_METRIC: None}
    return {k: row.get(k) for k in ("val_acc", "val_loss", VAL_SELECTION_METRIC)}


def _row(strategy: str, backbone: str, seconds: float, scores: dict) -> dict:
    rounded = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}
    return {"strategy": strategy, "backbone": backbone, "seconds": round(seconds, 1), **rounded}
