"""Real processes: a 2-process DDP run on CPU (gloo). Trains killed with SIGKILL and resumed are in
robustness/test_interruptions.py."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from transferlab import ImageFolderData, load_model

from conftest import TINY_BACKBONE


def cli(*args, cwd=None) -> list[str]:
    return [sys.executable, "-m", "transferlab.cli", *map(str, args)]


@pytest.fixture(scope="module")
def bright_and_dark(tmp_path_factory):
    """Two classes any model separates within an epoch or two: noisy dark and noisy bright images."""
    root = tmp_path_factory.mktemp("light") / "data"
    rng = np.random.default_rng(0)
    for name, (low, high) in {"dark": (0, 90), "bright": (165, 256)}.items():
        (root / name).mkdir(parents=True)
        for index in range(24):
            pixels = rng.integers(low, high, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def epochs_in(run_dir) -> list[int]:
    with open(run_dir / "history.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_two_process_ddp_predicts_like_a_single_process(bright_and_dark, tmp_path):
    common = ["train", bright_and_dark, "--strategy", "head", "--backbone", TINY_BACKBONE, "--weights",
              "none", "--epochs", 4, "--lr", 3e-3, "--batch-size", 8, "--no-cache", "--quiet",
              "--precision", "32", "--accelerator", "cpu"]
    single = subprocess.run(cli(*common, "--out", tmp_path / "single"), capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(cli(*common, "--out", tmp_path / "ddp", "--devices", 2, "--distributed", "ddp"),
                         capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("single", "ddp"))
    assert one["classes"] == two["classes"] == ["bright", "dark"]
    assert one["test"]["accuracy"] >= 0.9 and abs(one["test"]["accuracy"] - two["test"]["accuracy"]) <= 0.1
    files = ImageFolderData(bright_and_dark, cache_dir=None).files("test")
    labels = [[p.top_k[0][0] for p in load_model(tmp_path / name / "model").predict(files)]
              for name in ("single", "ddp")]
    assert np.mean([a == b for a, b in zip(*labels)]) >= 0.9
    assert epochs_in(tmp_path / "ddp") == [0, 1, 2, 3]  # written once, by the main process
