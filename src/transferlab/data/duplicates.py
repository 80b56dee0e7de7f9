"""Duplicate images: byte-identical files and perceptually near-identical ones, as groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .decode import ImageInfo

# Perceptual hashes (64 bits) this close are the same photo re-encoded, resized or lightly edited.
NEAR_DUPLICATE_BITS = 4


@dataclass
class Duplicates:
    """Groups of image indices: byte-identical files, and perceptually near-identical ones
    (the near groups include the byte-identical ones)."""

    exact: list[list[int]]
    near: list[list[int]]
    components: list[list[int]]  # every image in exactly one component: what a split keeps together


def find_duplicates(images: list[ImageInfo], max_bits: int = NEAR_DUPLICATE_BITS) -> Duplicates:
    """Connected components of "same bytes" and "perceptual hashes within `max_bits`"."""
    n = len(images)
    rows, cols = [], []
    first_with_hash: dict[str, int] = {}
    for i, image in enumerate(images):
        j = first_with_hash.setdefault(image.sha256, i)
        if j != i:
            rows.append(j)
            cols.append(i)
    exact = [group for group in _components(n, rows, cols) if len(group) > 1]

    if all(image.phash is not None for image in images):
        hashes = np.array([image.phash for image in images], dtype=np.uint64)
        for start in range(0, n, 1024):  # chunks keep the distance matrix small
            block = np.bitwise_count(hashes[start:start + 1024, None] ^ hashes[None, :])
            i, j = np.nonzero(block <= max_bits)
            keep = i + start < j
            rows.extend((i[keep] + start).tolist())
            cols.extend(j[keep].tolist())
    components = _components(n, rows, cols)
    near = [group for group in components if len(group) > 1]
    return Duplicates(exact=exact, near=near, components=components)


def _components(n: int, rows: list[int], cols: list[int]) -> list[list[int]]:
    """Connected components (singletons included) of the graph with edges rows[k]-cols[k]."""
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, membership = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for index, component in enumerate(membership):
        groups.setdefault(component, []).append(index)
    return list(groups.values())


