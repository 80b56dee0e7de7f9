"""A Hugging Face dataset as DATA: `hf:PATH_OR_NAME[:config]`, read with the `datasets` library.

PATH_OR_NAME is a folder written by `save_to_disk`, a parquet file or a folder of them (split names
in the file names, as the hub lays them out), or else a dataset's name on the hub. The image column
(`--image-column`, default image) is read undecoded, as the bytes the dataset holds; each row
becomes a `DatasetImage` that decode.py opens from those bytes, in the scan's threads and in the
DataLoader workers, so no image is written to disk and content sniffing and the pixel limit apply
as to files. The label column (`--label-column`, default label) may be a ClassLabel (its names),
strings, or whole numbers (as text). The dataset's own splits (train, validation or val, test) are
used; one with only a train split is split as a folder is. Rows are named SPLIT/INDEX (the
dataset's split name, the row's index in it) in split.json and predictions.csv.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError
from .decode import DEFAULT_MAX_PIXELS, UnreadableImage
from .scan import Scan, read_images

log = logging.getLogger(__name__)

PREFIX = "hf:"
# The dataset's split names, as transferlab's; other splits (such as "unsupervised") are left out.
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
INSTALL = "pip install 'transferlab[hf]'"


def is_hf(data) -> bool:
    return str(data).startswith(PREFIX)


@dataclass(frozen=True)
class HFSpec:
    """Where a dataset comes from: a local path (absolute) or a hub name, and its configuration."""

    name: str
    config: str | None = None

    @classmethod
    def parse(cls, text: str) -> HFSpec:
        body = str(text)[len(PREFIX):]
        name, config = body, None
        if not Path(body).exists() and ":" in body:  # a colon in an existing path is the path's
            name, config = body.rsplit(":", 1)
        if not name or config == "":
            raise ConfigError(f"{text}: give hf:PATH_OR_NAME or hf:PATH_OR_NAME:CONFIG, such as "
                              "hf:./my_dataset or hf:beans")
        path = Path(name).expanduser()
        return cls(str(path.resolve()) if path.exists() else name, config)

    def __str__(self) -> str:
        return PREFIX + self.name + (f":{self.config}" if self.config else "")

    @property
    def local(self) -> Path | None:
        path = Path(self.name)
        return path if path.exists() else None

    @property
    def root(self) -> Path:
        """The folder an output must stay out of, and whose name names runs."""
        return self.local or Path(self.name)


class Rows:
    """One split of a dataset with its image column undecoded: where a row's bytes are read.

    A datasets.Dataset pickles as a reference to its memory-mapped Arrow files, so DataLoader
    workers reopen it rather than receive the images."""

    def __init__(self, dataset, column: str, name: str):
        self.dataset, self.column, self.name = dataset.select_columns([column]), column, name

    def read_bytes(self, index: int) -> bytes:
        value = self.dataset[index][self.column] or {}
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):  # a dataset that refers to image files instead of holding them
            return Path(value["path"]).read_bytes()
        raise UnreadableImage("the row holds no image")


@dataclass(frozen=True)
class DatasetImage:
    """One row's image: decode.py reads it through read_bytes(), as it opens a file."""

    rows: Rows = field(compare=False, repr=False)
    split: str
    index: int

    @property
    def name(self) -> str:
        """SPLIT/INDEX: how split.json and predictions.csv name the row."""
        return f"{self.split}/{self.index}"

    def read_bytes(self) -> bytes:
        return self.rows.read_bytes(self.index)

    def __str__(self) -> str:
        return f"{self.rows.name} {self.name}"


def load_splits(spec: HFSpec) -> dict:
    """The dataset's splits by their own names: datasets.Dataset each."""
    datasets = _datasets()
    local = spec.local
    if local is not None and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(local))
    elif local is not None and (local.suffix == ".parquet" or any(local.rglob("*.parquet"))):
        options = {"data_files": str(local)} if local.is_file() else {"data_dir": str(local)}
        loaded = datasets.load_dataset("parquet", **options)
    elif local is not None:
        raise DataError(f"{spec}: neither a save_to_disk folder (dataset_dict.json or state.json) nor "
                        "parquet files; give one of those, or a dataset's name on the hub")
    else:
        loaded = _from_hub(datasets, spec)
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _from_hub(datasets, spec: HFSpec):
    try:
        return datasets.load_dataset(spec.name, spec.config)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, private: all one line
        reason = str(error).split("\n")[0][:200] or type(error).__name__
        raise DataError(f"{spec}: could not load {spec.name!r} from the Hugging Face hub ({reason}); "
                        "check the name and the network, or give a local save_to_disk folder or "
                        "parquet files as hf:PATH") from None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"hf: DATA needs the datasets package: {INSTALL}") from None
    return datasets


def scan_hf(spec: HFSpec, image_column: str = "image", label_column: str = "label",
            near_duplicates: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
            workers: int | None = None, min_classes: int = 2) -> Scan:
    """A Scan of the dataset's rows, read as scan_folder reads files (scan.read_images)."""
    splits = _used_splits(spec, load_splits(spec))
    items, images = [], []
    for split_name, dataset in splits.items():
        rows = Rows(_undecoded(spec, dataset, image_column, split_name), image_column, str(spec))
        for index, label in enumerate(_labels(spec, dataset, label_column, split_name)):
            if label is not None:
                items.append((SPLIT_NAMES[split_name], label))
                images.append(DatasetImage(rows, split_name, index))
    readable, unreadable = read_images(items, images, None, near_duplicates, max_pixels, workers)
    classes = sorted({label for (_, label), _ in readable})
    if len(classes) < min_classes:
        raise DataError(f"{spec}: {len(classes)} class(es) with readable images {classes} "
                        f"({len(unreadable)} rows unreadable); at least {min_classes} are needed")
    given = {split for (split, _), _ in readable}
    presplit = [split for (split, _), _ in readable] if given != {"train"} else None
    if presplit is not None and "train" not in given:
        raise DataError(f"{spec}: no train rows among the splits {sorted(splits)}; a dataset needs a "
                        "train split")
    return Scan(spec.root, classes, [info for _, info in readable],
                [classes.index(label) for (_, label), _ in readable], presplit, unreadable)


def _used_splits(spec: HFSpec, splits: dict) -> dict:
    unused = sorted(set(splits) - set(SPLIT_NAMES))
    if unused:
        log.warning("%s: split(s) %s left out (only train, validation or val, and test are used)",
                    spec, ", ".join(unused))
    used = {name: splits[name] for name in splits if name in SPLIT_NAMES}
    if not used:
        raise DataError(f"{spec}: no train, validation or test split among {sorted(splits)}")
    return used


def _column(spec: HFSpec, dataset, column: str, flag: str, split: str):
    if column not in dataset.features:
        raise ConfigError(f"{spec}: no column {column!r} in the {split} split (columns: "
                          f"{', '.join(dataset.features)}); name the right one with {flag}")
    return dataset.features[column]


def _undecoded(spec: HFSpec, dataset, column: str, split: str):
    """The dataset with `column` as {"bytes", "path"}, which are decoded later, in the workers."""
    datasets = _datasets()
    if not isinstance(_column(spec, dataset, column, "--image-column", split), datasets.Image):
        raise ConfigError(f"{spec}: column {column!r} holds {dataset.features[column]}, not images; "
                          "name the image column with --image-column")
    return dataset.cast_column(column, datasets.Image(decode=False))


def _labels(spec: HFSpec, dataset, column: str, split: str) -> list[str | None]:
    """Each row's class name: a ClassLabel's name, a string, or a number as text; None for a row
    without one (a ClassLabel's -1, as hub test splits without labels have), which is left out."""
    feature = _column(spec, dataset, column, "--label-column", split)
    names = getattr(feature, "names", None)
    labels = [None if value is None or value == "" or (names and value < 0)
              else names[value] if names else str(value) for value in dataset[column]]
    missing = sum(label is None for label in labels)
    if missing:
        log.warning("%s: %d row(s) of the %s split have no label in %r; left out", spec, missing,
                    split, column)
    return labels
