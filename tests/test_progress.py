"""Progress a user can see when the output is not a terminal (CI, nohup, a log file): one plain line
per epoch and one every tenth of the embedding, where a progress bar would print nothing."""

import subprocess
import sys

from conftest import TINY_BACKBONE
from transferlab.inference.batches import PlainProgress


def test_plain_progress_logs_each_tenth_once(caplog):
    caplog.set_level("INFO")
    advance = PlainProgress("embedding", 95)
    for _ in range(19):
        advance(5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("embedding: 10/95 (10%")
    assert lines[-1].startswith("embedding: 95/95 (100%")


def train_log(tmp_path, data, *options) -> str:
    """What `transferlab train` writes when its output is a file, not a terminal."""
    command = [sys.executable, "-c", "from transferlab.cli import main; main()", "train", str(data),
               "--backbone", TINY_BACKBONE, "--weights", "none", "--no-cache", *options]
    with open(tmp_path / "log", "w") as log:
        assert subprocess.run(command, stderr=log, stdout=log, timeout=600).returncode == 0
    return (tmp_path / "log").read_text()


def test_a_redirected_extract_logs_the_embedding_every_tenth(image_folder, tmp_path):
    text = train_log(tmp_path, image_folder, "--out", str(tmp_path / "run"), "--no-audit")
    lines = [line for line in text.splitlines() if line.startswith("INFO: embedding: ")]
    assert len(lines) >= 2 and lines[-1].startswith("INFO: embedding: 40/40 (100%")


def test_a_redirected_train_logs_every_epoch(image_folder, tmp_path):
    text = train_log(tmp_path, image_folder, "--strategy", "head", "--epochs", "2", "--out",
                     str(tmp_path / "run"))
    epochs = [line for line in text.splitlines() if line.startswith("INFO: epoch ")]
    assert [line.split(":")[1].strip() for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "val loss" in epochs[0] and "s)" in epochs[0]
    assert "\x1b[" not in text  # no terminal control codes in a log file
