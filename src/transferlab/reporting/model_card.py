"""model/README.md: the model card of a trained bundle, in Hugging Face's format.

Its front matter (YAML between `---` lines: library, pipeline, tags, the license of the backbone's
pretrained weights, and a `model-index` with the val and test metrics) is written by
yaml.safe_dump, never by formatting strings, so any class or folder name reads back as it is. The
markdown below it (templates/model_card.md) says what the model is for, the data it learned from,
its results with their confidence interval and calibration, its limitations and how to load it;
every name a user chose is escaped for markdown by the `md` filter.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections import Counter
from pathlib import Path

from ..inference.bundle import BundleConfig, read_config
from ..models.backbones import weights_license
from ..rundir.atomic import write_text
from ..rundir.layout import RunDir, RunFiles

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
FEW_IMAGES = 20  # a class with fewer training images than this is named as a limitation
SPLITS = ("train", "val", "test")
_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # ASCII punctuation: CommonMark escapes it


def write_model_card(folder: str | Path) -> Path | None:
    """Write model/README.md of the training run in `folder`; None for an evaluation or a
    comparison folder, or a run without a model (nothing to describe)."""
    paths = RunDir(folder)
    if paths.comparison.is_file():
        return None
    files = RunFiles.read(paths.path)
    if "model" in files.metrics or files.model_dir is None:  # `evaluate` writes "model"
        return None
    path = files.model_dir / CARD_FILE
    write_text(path, render_model_card(files, read_config(files.model_dir)))
    return path


def write_model_card_or_warn(folder: str | Path) -> None:
    """The model card at the end of a run whose model and metrics are already written: a failure is
    a warning saying how to retry, not a lost run."""
    try:
        write_model_card(folder)
    except Exception as error:  # noqa: BLE001 - the model and metrics are already written
        log.warning("model card (model/README.md) not written (%s: %s); the results are complete, "
                    "retry with `transferlab report %s`", type(error).__name__, error, folder)


def render_model_card(files: RunFiles, config: BundleConfig) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    environment = Environment(loader=PackageLoader(__package__, "templates"), autoescape=False,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)
    environment.filters.update(md=markdown_text, pct=_pct, num=_num)
    body = environment.get_template("model_card.md").render(**card_context(files, config))
    return f"---\n{front_matter_text(files, config)}---\n\n{body}"


def front_matter_text(files: RunFiles, config: BundleConfig) -> str:
    import yaml

    return yaml.safe_dump(front_matter(files, config), sort_keys=False, allow_unicode=True)


def front_matter(files: RunFiles, config: BundleConfig) -> dict:
    """The Hugging Face metadata: library, pipeline, tags, license and model-index."""
    metrics = files.metrics
    dataset = _dataset_name(files)
    results = []
    for split in ("val", "test"):
        measured = metrics.get(split) or {}
        if measured.get("accuracy") is None:
            continue
        values = [{"type": "accuracy", "value": measured["accuracy"], "name": f"{split} accuracy"}]
        if measured.get("macro_f1") is not None:
            values.append({"type": "f1", "value": measured["macro_f1"], "name": f"{split} macro F1",
                           "args": {"average": "macro"}})
        results.append({"task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": dataset, "type": "imagefolder", "split": split},
                        "metrics": values})
    weights = config.training.get("weights", metrics.get("weights", "unknown"))
    return {"library_name": "transferlab", "pipeline_tag": "image-classification",
            "tags": ["transfer-learning", config.backbone, metrics.get("strategy") or "transferlab"],
            "license": weights_license(config.backbone, weights),
            "model-index": [{"name": Path(files.dir).resolve().name, "results": results}]}


def card_context(files: RunFiles, config: BundleConfig) -> dict:
    metrics = files.metrics
    model_dir = files.model_dir or RunDir(files.dir).model
    test = metrics.get("test") or {}
    counts = _counts(files, config.classes)
    summary = metrics.get("split") or {}
    return {
        "title": f"{metrics.get('strategy', 'transferlab')} · {config.backbone} on {_dataset_name(files)}",
        "metrics": metrics, "config": config, "classes": config.classes,
        "weights": config.training.get("weights", metrics.get("weights", "unknown")),
        "counts": counts, "totals": {name: sum(row[name] for row in counts) for name in SPLITS},
        "split": summary, "splits": [name for name in ("val", "test") if metrics.get(name)],
        "few": [row for row in counts if row["train"] < FEW_IMAGES],
        "few_images": FEW_IMAGES, "leakage": test.get("leakage"),
        "deduplicated": bool(summary.get("dedupe_split", True)) and not summary.get("groups_across_splits"),
        "command": f"transferlab predict {shlex.quote(str(model_dir))} image.jpg",
        "python_path": repr(str(model_dir)),
    }


def _counts(files: RunFiles, classes: list[str]) -> list[dict]:
    """Images per class in each split, from split.json."""
    split = files.split or {}
    per_split = {name: Counter(item["label"] for item in split.get(name, [])) for name in SPLITS}
    return [{"name": name, **{split_name: per_split[split_name][name] for split_name in SPLITS}}
            for name in classes]


def _dataset_name(files: RunFiles) -> str:
    root = (files.metrics.get("data") or {}).get("root") or (files.split or {}).get("root") or "."
    return Path(root).name or str(root)


def markdown_text(value) -> str:
    """`value` as literal markdown text: ASCII punctuation backslash-escaped (so `|`, `*`, `#`, `<`,
    `[` ... print as themselves, also in a table cell), line breaks as spaces."""
    text = re.sub(r"[\r\n]+", " ", str(value))
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _pct(value) -> str:
    return "–" if value is None else f"{value:.2%}"


def _num(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
