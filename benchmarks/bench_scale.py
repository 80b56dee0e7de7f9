"""Scale: near-duplicate grouping of a million perceptual hashes; prints one JSON object.

Run: python benchmarks/bench_scale.py [--hashes 1000000] [--check 20000]

Synthetic 64-bit hashes (random, plus near copies with 0-4 flipped bits and exact repeats, as
re-encoded and resized photos give): the time and peak RSS of data.duplicates' grouping
(multi-index hashing, then connected components), and on the first --check hashes the same groups
as the all-pairs search it replaced, with both times. Target (issue 14): 1,000,000 hashes under 60 s.
The scan, embedding and 200,000-image folder parts of issue 14's scale benchmark are not here yet.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from transferlab.data.duplicates import NEAR_DUPLICATE_BITS, _components, near_pairs
from transferlab.data.synthetic import synthetic_hashes


def groups(hashes: np.ndarray) -> tuple[list[list[int]], float]:
    started = time.perf_counter()
    rows, cols = near_pairs(hashes)
    found = _components(len(hashes), rows.tolist(), cols.tolist())
    return found, time.perf_counter() - started


def all_pairs(hashes: np.ndarray) -> tuple[list[list[int]], float]:
    """The quadratic search duplicates.py used before, in 1,024-row blocks."""
    started = time.perf_counter()
    rows, cols = [], []
    for start in range(0, len(hashes), 1024):
        block = np.bitwise_count(hashes[start:start + 1024, None] ^ hashes[None, :])
        i, j = np.nonzero(block <= NEAR_DUPLICATE_BITS)
        keep = i + start < j
        rows += (i[keep] + start).tolist()
        cols += j[keep].tolist()
    return _components(len(hashes), rows, cols), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--check", type=int, default=20_000)
    args = parser.parse_args()
    hashes = synthetic_hashes(args.hashes)
    found, seconds = groups(hashes)
    small = hashes[:args.check]
    fast, fast_s = groups(small)
    slow, slow_s = all_pairs(small)
    same = sorted(map(sorted, fast)) == sorted(map(sorted, slow))
    print(json.dumps({
        "hashes": args.hashes, "grouping_s": round(seconds, 2), "target_s": 60,
        "groups_of_two_or_more": sum(len(g) > 1 for g in found),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "check": {"hashes": args.check, "same_groups_as_all_pairs": same,
                  "multi_index_s": round(fast_s, 3), "all_pairs_s": round(slow_s, 2),
                  "all_pairs_projected_s_at_full_size": round(slow_s * (args.hashes / args.check) ** 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
