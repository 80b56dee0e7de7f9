"""Command-line flags built from the option declarations (transferlab/options.py): one place holds
each option's type, help, default and rule, and the commands' signatures name them."""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from ..options import OPTIONS


def flag(name: str, *names: str, default: Any = None, help: str | None = None, **settings: Any) -> Any:
    """The typer.Option of the declared option `name`, with its help ([default: ...] added where
    typer cannot show it: the default lives in the library) unless `help` replaces it."""
    option = OPTIONS[name]
    shown = f" [default: {option.default}]" if option.default and default is None else ""
    return typer.Option(default, *(names or (option.cli_flag,)), help=help or option.help + shown,
                        **settings)


def annotation(name: str) -> Any:
    return Optional[OPTIONS[name].type]


# The options `train` and `compare` share, in the order --help lists them.
TRAINING_FLAGS = (
    "weights", "layout", "val", "test", "seed", "max_pixels", "dedupe_split", "labels", "image_column",
    "label_column", "exclude", "relabel", "time_budget", "cut_layer", "head_pool",
    "classifier", "epochs", "optimizer", "lr", "momentum", "weight_decay", "schedule", "grad_clip",
    "augment", "label_smoothing", "class_weights", "early_stopping", "head_init", "head_dim",
    "dropout", "unfreeze", "unfreeze_from",
    "warmup_epochs", "backbone_lr_scale", "batch_size", "workers", "precision", "device",
    "engine", "accelerator", "devices", "num_nodes", "distributed")
_EXTRA = {"distributed": ("--distributed", "--strategy-dist")}


def _training_parameters() -> list[inspect.Parameter]:
    parameters = []
    for name in TRAINING_FLAGS:
        if OPTIONS[name].type is bool:  # --name/--no-name; unset (None) unless given
            dashed = name.replace("_", "-")
            default = flag(name, f"--{dashed}/--no-{dashed}", default=None)
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=Optional[bool]))
            continue
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                            default=flag(name, *_EXTRA.get(name, ())),
                                            annotation=annotation(name)))
    parameters.append(inspect.Parameter(
        "cache_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=flag("cache_dir")))
    parameters.append(inspect.Parameter(
        "no_cache", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--no-cache", help="Do not read or write the cache.")))
    parameters.append(inspect.Parameter(
        "quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--quiet", "-q", help="No progress bars.")))
    return parameters


def with_training_options(command):
    """Add the TRAINING_FLAGS (and --cache-dir, --no-cache, --quiet) to `command`, which receives
    them as one dict, `settings`. Typer reads a command's options from its signature, so the
    wrapper gets the combined one."""
    shared = _training_parameters()
    hints = typing.get_type_hints(command)
    own = [p.replace(annotation=hints[p.name])
           for name, p in inspect.signature(command).parameters.items() if name != "settings"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        settings = {p.name: kwargs.pop(p.name) for p in shared}
        return command(**kwargs, settings=settings)

    parameters = [*own, *shared]
    wrapper.__signature__ = inspect.Signature(parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def names(text: str | None) -> list[str] | None:
    """A comma-separated flag value as a list of names (None stays None)."""
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


def split_settings(settings: dict) -> tuple[dict, dict, bool]:
    """(ImageFolderData's arguments, train()'s options that were given, show progress)."""
    settings = dict(settings)
    show_progress = not settings.pop("quiet")
    no_cache, cache_dir = settings.pop("no_cache"), settings.pop("cache_dir")
    dataset = {name: settings.pop(name) for name in ("val", "test", "dedupe_split", "max_pixels",
                                                      "layout", "labels", "image_column", "label_column",
                                                      "exclude", "relabel")}
    dataset = {k: v for k, v in dataset.items() if v is not None}
    if "labels" in dataset:  # as run.json records it, so that --resume compares it
        dataset["labels"] = str(Path(dataset["labels"]).resolve())
    options = {k: v for k, v in settings.items() if v is not None}
    if cache_dir is not None:
        options["cache_dir"] = str(cache_dir)
    if no_cache:
        options["cache_dir"] = None
    dataset.update(seed=options.get("seed", 0), cache_dir=options.get("cache_dir", "default"))
    return dataset, options, show_progress

REJECT_HELP = ("Answer `unknown` instead of a class for an image unlike the training images (novelty "
               "over the threshold set on the validation images).")
