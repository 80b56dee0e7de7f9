"""Every option of every command, declared once, and the one validator that checks them.

Modelled on scikit-learn's `_parameter_constraints`: each option declares its type, the values it
allows and its help text. `check()` refuses a bad value before any work starts, always in the same
shape, "name=value: what is allowed", which the command line prints as one line (exit 2). The
command line builds its flags from these declarations (cli/options.py), and the library functions
call `check()` on what they are given, so Python and the shell refuse the same values the same way.

Options that only some strategies use are marked `per_strategy`; each strategy declares which of
them it uses (training/strategies), and `check_used()` refuses the rest, naming who uses them.
`requires` declares an option that only means something next to another one (momentum with SGD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping

from .errors import ConfigError


class Rule:
    """What values an option allows: `problem(value)` says what is wrong, or None."""

    def problem(self, value: Any) -> str | None:  # pragma: no cover - every rule overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Number(Rule):
    """A whole number (`whole`) or a finite real number within [low, high] (open where told)."""

    whole: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    example: str = ""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                self.whole and not isinstance(value, int)):
            return f"expected {self._kind()}"
        if not math.isfinite(value):
            return f"expected a finite {self._kind().removeprefix('a ')}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            return f"must be {self._range()}" + (f", such as {self.example}" if self.example else "")
        return None

    def _kind(self) -> str:
        return "a whole number" if self.whole else "a number"

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            if self.whole and not self.low_open:
                return f"at least {self.low:g}"
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        return f"{'below' if self.high_open else 'at most'} {self.high:g}"


@dataclass(frozen=True)
class OneOf(Rule):
    """One of fixed `values`, or (with `registry`) one of the names a registry holds, passed to
    `check()` by the layer that owns the registry."""

    values: tuple = ()
    registry: str = ""

    def problem(self, value: Any, allowed: Collection[str] = ()) -> str | None:
        allowed = tuple(allowed) or self.values
        if value in allowed:
            return None
        if len(allowed) == 1:
            return f"only {allowed[0]} is available"
        return f"use one of {', '.join(str(v) for v in allowed)}"


@dataclass(frozen=True)
class Text(Rule):
    """Any non-empty text (what it names is checked where it is used: a backbone, a file...)."""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return "expected non-empty text"
        return None


@dataclass(frozen=True)
class IndexOrName(Rule):
    """A whole number (an index) or non-empty text (a name), such as a feature stage."""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        return Text().problem(value) and "an index or a name"


@dataclass(frozen=True)
class CountOrAll(Rule):
    """A whole number >= 0 (given as a number or its digits), or 'all'."""

    def problem(self, value: Any) -> str | None:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return None
        if isinstance(value, str) and value.isdigit():
            return None
        return "a number of top blocks (0 or more), or 'all'"


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    help: str
    rule: Rule
    default: str = ""  # the default as help shows it; the value itself lives with its owner
    per_strategy: bool = False  # used by some strategies only (each strategy lists its own)
    resumable: bool = False  # may differ when a run is resumed
    requires: tuple[str, tuple] | None = None  # (other option, values it must have; () = any)
    excludes: str | None = None  # an option that cannot be given together with this one
    flag: str = ""  # the command-line flag, when not --name-with-dashes

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """The name errors use: the Python name, or the flag's where the two differ in more than
        dashes (export_format is --format)."""
        return self.flag.lstrip("-").replace("-", "_") if self.flag else self.name


def _whole(low: int = 1, high: int | None = None, example: str = "") -> Number:
    return Number(whole=True, low=low, high=high, example=example)


def _positive(example: str = "") -> Number:
    return Number(whole=False, low=0, low_open=True, example=example)


def _fraction(high_open: bool = True) -> Number:
    return Number(whole=False, low=0, high=1, high_open=high_open)


OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTATIONS = ("none", "light", "standard", "strong")
CLASSIFIERS = ("logistic", "mlp")
POOLS = ("avg", "flatten")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
DISTRIBUTED = ("auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "deepspeed")
PRECISION_NAMES = ("auto", "bf16", "bf16-mixed", "16", "16-mixed", "fp16", "32", "32-true", "fp32")
DEVICE_SYNTAX = "auto, cpu, cuda, cuda:N or mps"
MAX_SEED = 2**32 - 1  # numpy's and torch's generators take seeds below 2**32


@dataclass(frozen=True)
class Duration(Rule):
    """A positive time: seconds, or a number followed by s, m or h ("90s", "10m", "1.5h")."""

    def problem(self, value: Any) -> str | None:
        text = str(value).strip().lower()
        number = text[:-1] if text[-1:] in ("s", "m", "h") else text
        try:
            if math.isfinite(float(number)) and float(number) > 0:
                return None
        except ValueError:
            pass
        return "expected a time such as 90s, 10m or 1.5h"


@dataclass(frozen=True)
class Device(Rule):
    """auto, cpu, cuda, cuda:N or mps; whether the device is on this machine is checked when it is
    resolved (devices.resolve_device), still before any work."""

    def problem(self, value: Any) -> str | None:
        text = str(value).lower()
        kind, _, index = text.partition(":")
        if text in ("auto", "cpu", "mps", "cuda") or (kind == "cuda" and index.isdigit()):
            return None
        return f"use {DEVICE_SYNTAX}"


OPTIONS: dict[str, Option] = {o.name: o for o in [
    # the data and its split
    Option("val", float, "Validation fraction.", _fraction(), "0.15"),
    Option("test", float, "Test fraction.", _fraction(), "0.15"),
    Option("seed", int, "Seed of the split, initialisation and shuffling.", _whole(0, MAX_SEED), "0"),
    Option("max_pixels", int, "Refuse images with more pixels than this, read from the header before "
           "decoding (decompression bombs).", _whole(1), "100,000,000"),
    Option("dedupe_split", bool, "Keep duplicate images within one split (--no-dedupe-split only to "
           "measure how much leakage inflates test accuracy).", OneOf((True, False)), "on"),
    Option("cache_dir", str, "Cache folder for embeddings and scans.", Text(), "~/.cache/transferlab"),
    Option("layout", str, "How DATA is laid out: flat (one folder per class), split (train/ val/ "
           "test/ folders, each with one folder per class) or auto.", OneOf(("auto", "flat", "split")),
           "auto"),
    # what to train
    Option("strategy", str, "extract, head, finetune, scratch, or auto (extract, then fine-tuning "
           "if --time-budget allows; keeps the lower val loss).", OneOf(registry="strategy"),
           "extract"),
    Option("time_budget", str, "auto: wall time to spend, such as 90s, 10m or 1.5h.", Duration(),
           "20 forward passes over the data, at least 2m", per_strategy=True),
    Option("backbone", str, "timm model name, alias or simple-cnn.", Text(),
           "efficientnet_lite0; scratch: simple-cnn"),
    Option("weights", str, "imagenet, none, or a weights file.", Text(), "imagenet; scratch: none"),
    Option("cut_layer", str, "Cut the backbone at this feature stage (index or name; see "
           "`transferlab summary`); extract pools that stage's features.", IndexOrName(),
           per_strategy=True),
    Option("head_pool", str, "How a cut backbone's feature map is pooled: avg or flatten.",
           OneOf(POOLS), "avg", per_strategy=True, requires=("cut_layer", ())),
    Option("classifier", str, "extract: logistic or mlp.", OneOf(CLASSIFIERS), "logistic",
           per_strategy=True),
    Option("head_init", str, "head, finetune: probe (start from the linear classifier extract fits "
           "on the cached embeddings: linear probing, then fine-tuning) or random.",
           OneOf(("probe", "random")), "probe", per_strategy=True),
    Option("head_dim", int, "Width of a hidden Dense layer in the head (with --head-init random).",
           _whole(1), "scratch 256, else none: a linear head", per_strategy=True),
    Option("dropout", float, "Dropout after the head's hidden layer.", _fraction(), "scratch 0.5",
           per_strategy=True, requires=("head_dim", ())),
    # how to train
    Option("epochs", int, "Training epochs.", _whole(1), "head 5, finetune 10, scratch 10",
           per_strategy=True, resumable=True),
    Option("optimizer", str, "sgd, adam, adamw or rmsprop.", OneOf(OPTIMIZERS),
           "finetune adamw, else adam", per_strategy=True),
    Option("lr", float, "Learning rate of the head.", _positive("1e-3"),
           "1e-4", per_strategy=True),
    Option("momentum", float, "Momentum of sgd or rmsprop.", _fraction(), "sgd 0.9, rmsprop 0",
           per_strategy=True, requires=("optimizer", ("sgd", "rmsprop"))),
    Option("weight_decay", float, "Weight decay.", Number(whole=False, low=0), "0",
           per_strategy=True),
    Option("schedule", str, "constant, cosine (after a linear warm-up over the first 5% of steps) "
           "or onecycle.", OneOf(SCHEDULES), "finetune cosine, else constant", per_strategy=True),
    Option("label_smoothing", float, "Label smoothing of the training loss (validation loss, early "
           "stopping and the kept epoch use plain cross-entropy).", _fraction(), "0",
           per_strategy=True),
    Option("grad_clip", float, "Clip the gradient norm to this.", _positive("1.0"),
           per_strategy=True),
    Option("augment", str, "none, light, standard or strong.", OneOf(AUGMENTATIONS),
           "finetune light, else standard", per_strategy=True),
    Option("class_weights", str, "balanced: weight the loss by inverse class frequency.",
           OneOf(("balanced",)), per_strategy=True),
    Option("early_stopping", int, "Stop after this many epochs without a lower val loss.",
           _whole(1), per_strategy=True, resumable=True),
    Option("unfreeze", str, "finetune: top blocks to train, or all.", CountOrAll(), "all",
           per_strategy=True),
    Option("unfreeze_from", str, "finetune: train every block from this layer up (such as "
           "blocks.5).", Text(), per_strategy=True, excludes="unfreeze"),
    Option("warmup_epochs", int, "finetune: head-only epochs first.", _whole(0), "0",
           per_strategy=True),
    Option("backbone_lr_scale", float, "finetune: backbone learning rate relative to the head's.",
           _positive("0.1"), "1.0", per_strategy=True),
    # where and how fast
    Option("batch_size", int, "Images per batch.", _whole(1), "32"),
    Option("workers", int, "DataLoader worker processes.", _whole(0), "0 on 4 cores or fewer",
           resumable=True),
    Option("precision", str, "auto, bf16, 16 or 32 (Lightning's bf16-mixed, 16-mixed, 32-true too).",
           OneOf(PRECISION_NAMES), "auto: bf16 where the CPU or GPU has it, fp16 on other GPUs"),
    Option("device", str, f"Where the network runs: {DEVICE_SYNTAX}.", Device(),
           "auto: a GPU when there is one", resumable=True),
    Option("engine", str, "What runs the network: torch, or its cached onnx/openvino graph (checked "
           "against torch fp32 first).", OneOf(registry="engine"),
           "auto: the fastest for the device whose graph is cached or pays for itself", resumable=True),
    Option("accelerator", str, "Lightning's accelerator for training: cpu, gpu, mps or auto.",
           OneOf(ACCELERATORS), "from --device", per_strategy=True, resumable=True),
    Option("devices", int, "Devices (processes) per node for training or extract's embedding (via "
           "the cache).", _whole(1), "1", per_strategy=True, resumable=True),
    Option("num_nodes", int, "Machines for training or extract's embedding.", _whole(1), "1",
           per_strategy=True, resumable=True),
    Option("distributed", str, "Lightning's distribution strategy, such as ddp.",
           OneOf(DISTRIBUTED), "auto", per_strategy=True, resumable=True, flag="--distributed"),
    # compare
    Option("strategies", str, "Comma-separated strategies to compare.", Text(),
           "extract,head,finetune,scratch"),
    Option("backbones", str, "Comma-separated backbones.", Text(), "each strategy's default"),
    Option("repeats", int, "Train each combination with this many seeds (seed, seed+1, ...) on the "
           "same split; report mean ± std.", _whole(1), "1"),
    # evaluate, predict, export
    Option("split", str, "all images, or the train, val or test part of DATA's split (with --seed, "
           "--val, --test).", OneOf(("all", "train", "val", "test")), "all"),
    Option("top_k", int, "Classes to show per image.", _whole(1), "1", flag="--top-k"),
    Option("output_format", str, "table, json or csv.", OneOf(("table", "json", "csv")), "table",
           flag="--format"),
    Option("backend", str, "Which model file runs: torch (the bundle's network), or an export made "
           "by `transferlab export`: onnx, onnx-int8, openvino, openvino-int8 or tflite.",
           OneOf(registry="backend"), "torch"),
    Option("explain", str, "Write a Grad-CAM map of the top-1 class over each image, one PNG per "
           "image, into this folder (torch backend only).", Text(), requires=("backend", ("torch",))),
    Option("tta", bool, "Average the probabilities of each image and its mirror image (twice the "
           "compute).", OneOf((True, False)), "off"),
    Option("export_format", str, "onnx; openvino (IR: model.xml + model.bin; its int8, and "
           "openvino off x86-64, need transferlab[openvino]); tflite (LiteRT: model.tflite; needs "
           "transferlab[tflite]); coreml (model.mlpackage; needs transferlab[coreml]).",
           OneOf(registry="export_format"),
           "onnx", flag="--format"),
    Option("quantize", str, "int8: onnx: dynamic int8 quantisation; openvino: NNCF's, calibrated "
           "on the run's validation images (smaller; compare its accuracy below).",
           OneOf(("int8",))),
    Option("opset", int, "ONNX opset, 18 or newer.", _whole(18, 30), "18"),
    # serve
    Option("host", str, "Address to listen on (0.0.0.0: every interface).", Text(), "127.0.0.1"),
    Option("port", int, "Port to listen on.", _whole(1, 65535), "8000"),
    Option("allowed_hosts", str, "Comma-separated Host header names the service answers; * for "
           "any.", Text(), "loopback names on a loopback --host, else the --host; any on 0.0.0.0"),
    Option("serve_workers", int, "Processes, each with its own copy of the model; the cores are "
           "shared out between them.", _whole(1), "1", flag="--workers"),
    Option("max_upload_mb", float, "Largest request body, in MB (2^20 bytes).", _positive("10"),
           "10"),
    Option("max_upload_bytes", int, "Largest request body, in bytes (create_app's form of "
           "max_upload_mb).", _whole(1), "10,485,760"),
    Option("max_files", int, "Most images per request.", _whole(1), "16"),
    Option("max_concurrent", int, "Most /predict requests holding uploads in memory at once; more "
           "wait 3 s, then get 503.", _whole(1), "16"),
    Option("max_batch", int, "Most images per model call, gathered across concurrent requests; 1 "
           "turns batching off.", _whole(1), "32"),
    Option("batch_window_ms", float, "How long a batch waits for more images.",
           Number(whole=False, low=0, high=1000), "0"),
    # summary, demo
    Option("classes", int, "For a backbone: number of classes.", _whole(2), "2"),
    Option("depth", int, "Levels of nested layers to show.", _whole(0, 20), "2"),
    Option("per_class", int, "Synthetic images per class.", _whole(3, 10_000), "40"),
    # the data audit, and acting on it
    Option("labels", str, "A CSV with file and label columns (optional split: train, val, test) "
           "giving each image of DATA its label, instead of class folders.", Text()),
    Option("image_column", str, "With DATA hf:PATH_OR_NAME (a Hugging Face dataset): the column "
           "holding the images.", Text(), "image"),
    Option("label_column", str, "With DATA hf:PATH_OR_NAME: the column holding each image's class "
           "(a ClassLabel, text or numbers).", Text(), "label"),
    Option("exclude", str, "A CSV with a file column (such as an edited label_issues.csv): leave "
           "those files (relative to DATA) out.", Text()),
    Option("relabel", str, "A CSV with file and label columns: give those files (relative to DATA) "
           "that label, one of the classes.", Text()),
    Option("audit", bool, "Audit the training split (label issues, outliers, conflicts, image "
           "quality) into RUN/audit/ and the report.", OneOf((True, False)), "extract on, else off"),
    Option("folds", int, "Cross-validation folds for the out-of-fold probabilities of the label "
           "audit.", _whole(2, 20), "5"),
]}


def check(values: Mapping[str, Any], registries: Mapping[str, Iterable[str]] | None = None) -> None:
    """Refuse the first value its option does not allow; None means "not given" and passes.

    `registries` gives the names a registry-backed option allows (strategy, backend, ...): the layer
    that owns the registry passes them, so this module needs none of the layers above it.
    """
    registries = registries or {}
    for name, value in values.items():
        if value is None:
            continue
        option = OPTIONS.get(name)
        if option is None:
            raise ConfigError(f"{name}: no such option")
        rule = option.rule
        if isinstance(rule, OneOf) and rule.registry:
            problem = rule.problem(value, registries.get(rule.registry, ()))
        else:
            problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{option.label}={value!r}: {problem}")


def check_used(given: Iterable[str], user: str, used: Collection[str],
               users_of: Mapping[str, list[str]]) -> None:
    """Refuse options given to `user` (such as a strategy) that it does not use, naming who does."""
    for name in given:
        option = OPTIONS.get(name)
        if option is not None and option.per_strategy and name not in used:
            others = users_of.get(name) or []
            who = f"; {', '.join(others)} use{'s' if len(others) == 1 else ''} it" if others else ""
            raise ConfigError(f"{name}: the {user} strategy does not use {option.cli_flag}{who}; "
                              f"drop it or choose another --strategy")


def check_relations(values: Mapping[str, Any], given: Iterable[str]) -> None:
    """Options given that need another option's value (`requires`) or exclude another (`excludes`);
    `values` are the resolved ones, defaults included."""
    given = set(given)
    for name in sorted(given):
        option = OPTIONS.get(name)
        if option is None:
            continue
        if option.requires:
            other, allowed = option.requires
            value = values.get(other)
            if value is None or (allowed and value not in allowed):
                need = f"{other} {' or '.join(allowed)}" if allowed else OPTIONS[other].cli_flag
                raise ConfigError(f"{name}={values.get(name)!r}: only used with {need}"
                                  + (f", not {other} {value}" if value is not None else "")
                                  + f"; drop {option.cli_flag} or set {OPTIONS[other].cli_flag}")
        if option.excludes and option.excludes in given:
            raise ConfigError(f"{name}: give {option.cli_flag} or {OPTIONS[option.excludes].cli_flag}, "
                              "not both")

