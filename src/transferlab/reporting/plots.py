"""The report's pictures, each returned as a data URI so the HTML needs no other file and no network.

matplotlib's object API (Figure, not pyplot's global state) so that plotting inside a user's
notebook or server leaves their backend and open figures alone; scikit-learn's display classes
draw the confusion matrix, ROC curve and reliability diagram.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

DPI = 144  # sharp on phone screens; the page scales every image to its column's width
SPLIT_COLOURS = {"train": "#4c78a8", "val": "#f58518", "test": "#54a24b"}
THUMBNAIL_PX = 160


def plain(text: str) -> str:
    """`text` as matplotlib shows it literally: a "$" would start mathtext ("$100-$200" became a
    formula, "a$_$b" an error)."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no tool URL inside the file
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def class_counts(classes: list[str], counts: dict[str, list[int]]) -> str:
    """Horizontal bars per class, stacked by split: readable with many classes and long names."""
    fig = _figure(6.4, 0.9 + 0.32 * len(classes))
    ax = fig.add_subplot()
    left = np.zeros(len(classes))
    positions = np.arange(len(classes))
    for split, values in counts.items():
        ax.barh(positions, values, left=left, label=split, color=SPLIT_COLOURS.get(split, "#888888"))
        left += np.asarray(values)
    ax.set_yticks(positions, [plain(name) for name in classes])
    ax.invert_yaxis()
    ax.set_xlabel("images")
    fig.legend(loc="outside upper center", ncols=len(counts), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_uri(fig)


def learning_curve(history: list[dict], metric: str, best_epoch: int | None) -> str:
    """`metric` (loss or acc) per epoch, train vs val; the kept (best) epoch marked. One figure per
    metric, so that a phone stacks them instead of shrinking both."""
    fig = _figure(4.8, 3.2)
    ax = fig.add_subplot()
    epochs = [row["epoch"] + 1 for row in history]  # shown 1-based, as people count epochs
    for split, style in (("train", "-o"), ("val", "-s")):
        values = [row[f"{split}_{metric}"] for row in history]
        ax.plot(epochs, [np.nan if v is None else v for v in values], style, markersize=4,
                label=split, color=SPLIT_COLOURS[split])
    if best_epoch is not None:
        ax.axvline(best_epoch + 1, color="#999999", linestyle=":", label="kept")
    ax.set_title("accuracy" if metric == "acc" else metric)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False)
    return figure_uri(fig)


def confusion(matrix: list[list[int]], classes: list[str]) -> str:
    from sklearn.metrics import ConfusionMatrixDisplay

    size = min(9.0, 2.6 + 0.45 * len(classes))
    fig = _figure(size, size * 0.9)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=[plain(c) for c in classes]).plot(
        ax=ax, cmap="Blues", colorbar=False, include_values=len(classes) <= 20, values_format="d",
        xticks_rotation="vertical" if len(classes) > 4 else "horizontal")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return figure_uri(fig)


def roc(labels: np.ndarray, positive_scores: np.ndarray, positive: str) -> str:
    from sklearn.metrics import RocCurveDisplay

    fig = _figure(3.6, 3.4)
    ax = fig.add_subplot()
    RocCurveDisplay.from_predictions(labels, positive_scores, ax=ax, name=plain(positive),
                                     plot_chance_level=True)
    ax.set_title(f"ROC, positive class {plain(positive)}")
    return figure_uri(fig)


def reliability(correct: np.ndarray, confidence: np.ndarray,
                uncalibrated: np.ndarray | None = None) -> str:
    """Top-label reliability diagram: accuracy against confidence, the picture behind the ECE; with
    `uncalibrated` (the confidences before the temperature), both curves."""
    from sklearn.calibration import CalibrationDisplay

    fig = _figure(3.6, 3.4)
    ax = fig.add_subplot()
    if uncalibrated is not None:
        CalibrationDisplay.from_predictions(correct.astype(int), uncalibrated, n_bins=10, ax=ax,
                                            name="before calibration", strategy="uniform",
                                            color="#9ca3af")
    CalibrationDisplay.from_predictions(correct.astype(int), confidence, n_bins=10, ax=ax,
                                        name="calibrated" if uncalibrated is not None else "model",
                                        strategy="uniform")
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("fraction correct")
    ax.set_title("calibration")
    return figure_uri(fig)


def accuracy_bars(names: list[str], accuracy: list[float], low: list[float | None],
                  high: list[float | None], std: list[float | None]) -> str:
    """Test accuracy per compared run: the 95% bootstrap interval (or ± one std over seeds)."""
    fig = _figure(6.4, 0.9 + 0.42 * len(names))
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    acc = np.asarray(accuracy, dtype=float)
    below = [a - lo if s is None and lo is not None else (s or 0.0) for a, lo, s in zip(acc, low, std)]
    above = [h - a if s is None and h is not None else (s or 0.0) for a, h, s in zip(acc, high, std)]
    ax.barh(positions, acc, xerr=[below, above], color="#4c78a8", ecolor="#1d232b", capsize=3)
    finite = acc[np.isfinite(acc)]
    start = max(0.0, (finite.min() if len(finite) else 0.0) - 0.1)
    for y, value in zip(positions, acc):  # inside the bar's start, clear of the error bars
        ax.text(start + 0.005, y, f"{value:.2%}", va="center", ha="left", fontsize=8, color="white")
    ax.set_yticks(positions, [plain(name) for name in names])
    ax.invert_yaxis()
    ax.set_xlim(start, 1.01)
    ax.set_xlabel("test accuracy")
    ax.spines[["top", "right"]].set_visible(False)
    return figure_uri(fig)


def accuracy_vs_time(names: list[str], seconds: list[float], accuracy: list[float]) -> str:
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    ax.scatter(seconds, accuracy, color="#f58518")
    for name, x, y in zip(names, seconds, accuracy):
        ax.annotate(plain(name), (x, y), textcoords="offset points", xytext=(0, 6), fontsize=8,
                    ha="center")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())  # 100 rather than 10^2; minor ticks unlabelled
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.25, y=0.12)  # room for the labels of the outermost points
    ax.set_xlabel("wall time (s, log scale)")
    ax.set_ylabel("test accuracy")
    ax.spines[["top", "right"]].set_visible(False)
    return figure_uri(fig)


def thumbnail(path: str | Path | None) -> str | None:
    """A small JPEG of an image file as a data URI, or None if there is none, or it cannot be read
    any more."""
    from ..data.decode import UnreadableImage, open_rgb

    if path is None:
        return None
    try:
        image = open_rgb(path, draft_size=THUMBNAIL_PX)
    except UnreadableImage:  # moved or deleted since the run: the report goes on without it
        return None
    return picture_uri(image)


def picture_uri(image) -> str:
    """A PIL image shrunk to a thumbnail, as a JPEG data URI."""
    image = image.copy()
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
