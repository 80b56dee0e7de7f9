"""The same command with the same seed gives the same split and, for extract, the same metrics."""

import json

from conftest import TINY_BACKBONE
from messy import run_cli, run_main

# What legitimately differs between two identical runs: when and how fast they ran, and where.
VARYING = {"timing"}


def _train(run, data, out, seed, cache):
    result = run("train", data, "--backbone", TINY_BACKBONE, "--weights", "none", "--seed", seed,
                 "--out", out, "--cache-dir", cache, "--quiet")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    return (out / "split.json").read_bytes(), {k: v for k, v in metrics.items() if k not in VARYING}


def test_same_seed_same_split_and_identical_extract_metrics(image_folder, tmp_path, capsys):
    def in_this_process(*args):
        return run_main(capsys, *args)

    # The second run is a new process (another hash seed, fresh thread pools) with its own cache, so
    # it computes its embeddings again instead of reading the first's.
    split_a, metrics_a = _train(in_this_process, image_folder, tmp_path / "a", 3, tmp_path / "cache-a")
    split_b, metrics_b = _train(run_cli, image_folder, tmp_path / "b", 3, tmp_path / "cache-b")
    assert split_a == split_b
    assert metrics_a == metrics_b  # exactly: every probability, loss and interval
    predictions = [(tmp_path / name / "predictions.csv").read_bytes() for name in ("a", "b")]
    assert predictions[0] == predictions[1]

    split_c, _ = _train(in_this_process, image_folder, tmp_path / "c", 4, tmp_path / "cache-a")
    assert json.loads(split_c)["test"] != json.loads(split_a)["test"]  # the seed does decide
