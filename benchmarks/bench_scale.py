"""Scale: near-duplicate grouping of a million perceptual hashes, and scanning and extracting a large
folder (benchmarks/make_large_folder.py); prints one JSON object.

Run: python benchmarks/bench_scale.py [--hashes 1000000] [--check 20000]
     [--folder /work/large [--compare 3000] [--extract [--extract-images 50000]]]

Each part runs in a child process of its own, so that its peak RSS (from wait4) is its own:
- hashes: synthetic 64-bit hashes (random, plus near copies with 0-4 flipped bits and exact repeats,
  as re-encoded and resized photos give): the time and peak RSS of data.duplicates' grouping
  (multi-index hashing, then connected components), and on the first --check hashes the same groups
  as the all-pairs search it replaced, with both times. Target (issue 14): 1,000,000 under 60 s.
- scan_cold, scan_warm (with --folder): scan_folder with an empty scan cache, then again with the
  cache it wrote, with where a warm rescan spends its time; then the near-duplicate grouping and the
  split of the real hashes. Target: a warm rescan of 200,000 files under 30 s.
- read_modes (with --folder): the first --compare files read (no cache) serially, in threads and in
  processes, the choice scan.py makes by the number of files.
- extract (with --extract): `transferlab train FOLDER --strategy extract --no-audit` (the audit is
  not part of extract), with the scan cache above, an empty embedding cache, and --extract-images
  (a class-stratified subset, given as --labels) or every image. Target: peak RSS under 3 GB at
  200,000 images. --stream-above-mb lowers extract's threshold for streaming the classifier's
  fit (512 MB of embeddings, about 100,000 Lite0 images) so that a subset measures that path.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def part_hashes(args) -> dict:
    hashes = synthetic_hashes(args.hashes)
    found, seconds = groups(hashes)
    small = hashes[:args.check]
    fast, fast_s = groups(small)
    slow, slow_s = all_pairs(small)
    same = sorted(map(sorted, fast)) == sorted(map(sorted, slow))
    return {
        "hashes": args.hashes, "grouping_s": round(seconds, 2), "target_s": 60,
        "groups_of_two_or_more": sum(len(g) > 1 for g in found),
        "check": {"hashes": args.check, "same_groups_as_all_pairs": same,
                  "multi_index_s": round(fast_s, 3), "all_pairs_s": round(slow_s, 2),
                  "all_pairs_projected_s_at_full_size": round(slow_s * (args.hashes / args.check) ** 2)},
    }


def part_scan_cold(args) -> dict:
    from transferlab.data.cache import ScanCache
    from transferlab.data.scan import scan_folder

    ScanCache(args.cache, args.folder).path.unlink(missing_ok=True)
    started = time.perf_counter()
    scan = scan_folder(args.folder, cache_dir=args.cache)
    seconds = time.perf_counter() - started
    return {"files": len(scan.images) + len(scan.unreadable), "images": len(scan.images),
            "unreadable": len(scan.unreadable), "seconds": round(seconds, 1),
            "images_per_s": round(len(scan.images) / seconds), "workers": os.cpu_count()}


def part_scan_warm(args) -> dict:
    """The warm rescan as a whole, then its steps one by one, then what ImageFolderData does next."""
    from transferlab import ImageFolderData
    from transferlab.data import scan as scanning
    from transferlab.data.cache import ScanCache

    started = time.perf_counter()
    scan = scanning.scan_folder(args.folder, cache_dir=args.cache)
    seconds = time.perf_counter() - started
    steps, clock = {}, time.perf_counter()
    candidates, _, _ = scanning._candidates(args.folder, scanning._layout(args.folder))
    steps["list_files_s"], clock = time.perf_counter() - clock, time.perf_counter()
    found = ScanCache(args.cache, args.folder).lookup_all([path for path, _, _ in candidates], True,
                                                         10**12)
    steps["read_cache_and_stat_s"] = time.perf_counter() - clock
    data = ImageFolderData(args.folder, cache_dir=args.cache)
    clock = time.perf_counter()
    data.scan
    steps["scan_again_s"], clock = time.perf_counter() - clock, time.perf_counter()
    duplicates = data.duplicates
    steps["duplicates_s"], clock = time.perf_counter() - clock, time.perf_counter()
    data.split
    steps["split_s"] = time.perf_counter() - clock
    return {"images": len(scan.images), "seconds": round(seconds, 2), "target_s": 30,
            "all_from_cache": all(f is not None for f in found),
            "steps": {k: round(v, 2) for k, v in steps.items()},
            "exact_duplicate_groups": len(duplicates.exact),
            "near_duplicate_groups": len(duplicates.near),
            "split": {name: len(indices) for name, indices in data.split.items()}}


def part_read_modes(args) -> dict:
    from transferlab.data import scan as scanning

    candidates, _, _ = scanning._candidates(args.folder, scanning._layout(args.folder))
    step = max(1, len(candidates) // args.compare)  # every class, not the first folder's files
    paths = [path for path, _, _ in candidates[::step]][:args.compare]
    result = {"files": len(paths)}
    for name, workers, threshold in (("serial", 1, 10**12), ("threads", None, 10**12),
                                     ("processes", None, 1)):
        scanning.PROCESS_MIN_FILES = threshold
        started = time.perf_counter()
        scanning._read_all(paths, None, True, 10**12, workers)
        result[f"{name}_images_per_s"] = round(len(paths) / (time.perf_counter() - started))
    return result


def part_extract(args) -> dict:
    from transferlab.data.scan import _candidates, _layout

    out = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    # transferlab's command line, with extract's streaming threshold at --stream-above-mb if given
    launcher = ("import sys; from transferlab.training.strategies import extract; "
                "extract.STREAM_ABOVE_BYTES = int(float(sys.argv.pop(1)) * 2**20); "
                "from transferlab.cli import main; sys.argv[0] = 'transferlab'; main()")
    threshold = (args.stream_above_mb if args.stream_above_mb is not None
                 else _stream_above_bytes() / 2**20)
    command = [sys.executable, "-c", launcher, str(threshold), "train", str(args.folder),
               "--strategy", "extract", "--no-audit", "--out", str(out / "run"),
               "--cache-dir", str(args.cache)]
    candidates, _, _ = _candidates(args.folder, _layout(args.folder))
    if args.extract_images and args.extract_images < len(candidates):
        chosen = sorted(np.random.default_rng(0).choice(len(candidates), args.extract_images,
                                                         replace=False))
        with open(out / "subset.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label"])
            writer.writerows((candidates[i][0].relative_to(args.folder), candidates[i][1])
                             for i in chosen)
        command += ["--labels", str(out / "subset.csv")]
    env = {**os.environ, "TRANSFERLAB_CACHE": str(args.cache)}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    metrics = json.loads((out / "run" / "metrics.json").read_text()) if status == 0 else {}
    return {"command": " ".join(command[3:]), "stream_above_mb": threshold,
            "exit_status": status, "seconds": round(seconds),
            "images": args.extract_images or len(candidates),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "target_peak_rss_mb": 3072,
            "test_accuracy": metrics.get("test", {}).get("accuracy"),
            "timing": metrics.get("timing"), "run": str(out / "run")}


def _stream_above_bytes() -> int:
    from transferlab.training.strategies.extract import STREAM_ABOVE_BYTES

    return STREAM_ABOVE_BYTES


PARTS = {"hashes": part_hashes, "scan_cold": part_scan_cold, "scan_warm": part_scan_warm,
         "read_modes": part_read_modes, "extract": part_extract}


def run_part(name: str, argv: list[str]) -> dict:
    """`name` in a child process: its JSON, with the child's peak RSS (and its workers')."""
    process = subprocess.Popen([sys.executable, __file__, *argv, "--part", name],
                               stdout=subprocess.PIPE)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    result = json.loads(output) if status == 0 else {"exit_status": status}
    if name != "extract":  # extract measures its own subprocess
        result["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--check", type=int, default=20_000)
    parser.add_argument("--folder", type=Path, help="a folder from make_large_folder.py")
    parser.add_argument("--compare", type=int, default=3000, help="files read in each read mode")
    parser.add_argument("--extract", action="store_true", help="also train extract on the folder")
    parser.add_argument("--extract-images", type=int, help="a subset of this many images")
    parser.add_argument("--stream-above-mb", type=float,
                        help="extract's streaming threshold (to stream a subset below the default)")
    parser.add_argument("--cache", type=Path, help="scan and embedding cache folder, kept (default: a "
                        "temporary one); scan_cold empties its scan cache first")
    parser.add_argument("--parts", help="comma-separated parts to run (default: all that apply)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return
    names = ["hashes"] + (["read_modes", "scan_cold", "scan_warm"] if args.folder else []) + (
        ["extract"] if args.folder and args.extract else [])
    names = args.parts.split(",") if args.parts else names
    with tempfile.TemporaryDirectory(prefix="bench-scale-cache-") as temporary:
        argv = [a for a in sys.argv[1:] if a != "--cache" and a != str(args.cache)]
        cache = str(args.cache or temporary)
        results = {name: run_part(name, [*argv, "--cache", cache]) for name in names}
    results["load_average"] = os.getloadavg()
    results["cpus"] = os.cpu_count()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
