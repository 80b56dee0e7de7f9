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
        near_rows, near_cols = near_pairs(np.array([image.phash for image in images],
                                                   dtype=np.uint64), max_bits)
        rows.extend(near_rows.tolist())
        cols.extend(near_cols.tolist())
    components = _components(n, rows, cols)
    near = [group for group in components if len(group) > 1]
    return Duplicates(exact=exact, near=near, components=components)


def near_pairs(hashes: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS
               ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) of 64-bit hashes within `max_bits` of each other, enough of them to connect every
    such pair (a hash repeated k times gives k - 1 pairs, not all k(k-1)/2).

    Multi-index hashing (Norouzi et al., CVPR 2012), not all n^2 pairs: cut the 64 bits into
    max_bits + 1 blocks; two hashes that differ in at most max_bits bits agree exactly on at least
    one block, so only hashes sharing a block's value are compared. Within each block the hashes are
    sorted by that block's value, and the k-th neighbours in that order are compared for k = 1, 2,
    ... until no neighbour shares the value: every step is one vectorised pass. Exact, like the
    all-pairs search it replaces; 1,000,000 random hashes take seconds (benchmarks/bench_scale.py).
    """
    unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    repeated = np.flatnonzero(first[inverse] != np.arange(len(hashes)))
    rows, cols = [first[inverse[repeated]]], [repeated]
    blocks = max_bits + 1
    edges = np.linspace(0, 64, blocks + 1).round().astype(int)
    for low, high in zip(edges[:-1], edges[1:]):
        key = (unique >> np.uint64(low)) & np.uint64((1 << (high - low)) - 1)
        order = np.argsort(key, kind="stable")
        key = key[order]
        for step in range(1, len(unique)):
            same = np.flatnonzero(key[step:] == key[:-step])
            if not len(same):
                break
            i, j = order[same], order[same + step]
            close = np.bitwise_count(unique[i] ^ unique[j]) <= max_bits
            rows.append(first[i[close]])
            cols.append(first[j[close]])
    return np.concatenate(rows), np.concatenate(cols)


def _components(n: int, rows: list[int], cols: list[int]) -> list[list[int]]:
    """Connected components (singletons included) of the graph with edges rows[k]-cols[k]."""
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, membership = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for index, component in enumerate(membership):
        groups.setdefault(component, []).append(index)
    return list(groups.values())


