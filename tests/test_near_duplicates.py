"""The near-duplicate search (multi-index hashing) finds the groups the all-pairs search finds."""

import numpy as np
import pytest

from transferlab.data.duplicates import _components, near_pairs
from transferlab.data.synthetic import synthetic_hashes


def every_pair(hashes: np.ndarray) -> list[list[int]]:
    """The groups by comparing all n^2 pairs at once (small n only)."""
    i, j = np.nonzero(np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= 4)
    return sorted(sorted(group) for group in _components(len(hashes), i.tolist(), j.tolist()))


def grouped(hashes: np.ndarray) -> list[list[int]]:
    rows, cols = near_pairs(hashes)
    return sorted(sorted(group) for group in _components(len(hashes), rows.tolist(), cols.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_same_groups_as_comparing_every_pair(seed):
    hashes = synthetic_hashes(6000, seed=seed)
    expected = every_pair(hashes)
    assert grouped(hashes) == expected
    assert sum(len(group) > 1 for group in expected) > 100  # the planted copies are there


def test_exactly_four_bits_apart_is_near_and_five_is_not():
    base = np.uint64(0x0123456789ABCDEF)
    four = base ^ np.uint64(0b1111 << 30)  # four bits in one block: the other blocks agree
    spread = base ^ np.uint64((1 << 3) | (1 << 16) | (1 << 29) | (1 << 42))  # one bit per block
    five = base ^ np.uint64((1 << 4) | (1 << 17) | (1 << 30) | (1 << 43) | (1 << 61))  # every block
    groups = grouped(np.array([base, four, spread, five], dtype=np.uint64))
    assert groups == [[0, 1, 2], [3]]


def test_repeated_and_crowded_hashes():
    same = np.full(500, 7, dtype=np.uint64)  # one photo 500 times: 499 pairs, one group
    rows, _ = near_pairs(same)
    assert len(rows) == 499 and grouped(same) == [list(range(500))]
    crowded = np.arange(300, dtype=np.uint64) << np.uint64(40)  # one shared low block
    assert grouped(crowded) == every_pair(crowded)
