"""Outliers: images far from everything else of their class in the backbone's embedding space, and
duplicate groups whose copies carry different labels (label conflicts)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEIGHBOURS = 5  # k: fewer in a class of k images or fewer (all the others)
# Flagged above median + MAD_FACTOR x the scaled median absolute deviation of every image's score: a
# robust "3 sigma" that a few extreme outliers cannot raise for themselves.
MAD_FACTOR = 3.0
MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution times this is its standard deviation


@dataclass
class Outliers:
    scores: np.ndarray  # per image: mean cosine distance to its k nearest neighbours of its class
    flagged: list[int]  # indices above the threshold, most isolated first
    threshold: float
    neighbours: int


def find_outliers(embeddings: np.ndarray, labels: np.ndarray,
                  neighbours: int = NEIGHBOURS) -> Outliers:
    """Each image's mean cosine distance to the `neighbours` nearest images of its own class (NaN
    in a class of one image), flagged above median + 3 MAD of all scores."""
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels)
    scores = np.full(len(labels), np.nan)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        k = min(neighbours, len(members) - 1)
        if k < 1:
            continue
        index = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(embeddings[members])
        distances, found = index.kneighbors(embeddings[members])
        # drop each image itself from its neighbours (a byte-identical copy may come first)
        own = found == np.arange(len(members))[:, None]
        own[~own.any(1), -1] = True  # not among its k + 1 (many copies at distance 0): drop the last
        scores[members] = distances[~own].reshape(len(members), k).mean(1)
    known = scores[np.isfinite(scores)]
    if len(known) == 0:
        return Outliers(scores, [], float("inf"), neighbours)
    median = float(np.median(known))
    spread = MAD_TO_SIGMA * float(np.median(np.abs(known - median)))
    threshold = median + MAD_FACTOR * spread
    flagged = [int(i) for i in np.flatnonzero(np.nan_to_num(scores, nan=-1.0) > threshold)]
    flagged.sort(key=lambda i: (-scores[i], i))
    return Outliers(scores, flagged, threshold, neighbours)


def label_conflicts(groups: list[list[int]], labels: list[int] | np.ndarray) -> list[list[int]]:
    """The duplicate groups whose members carry more than one label."""
    return [group for group in groups if len({int(labels[i]) for i in group}) > 1]
