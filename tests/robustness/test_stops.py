"""How a run ends when it is stopped: Ctrl-C and SIGTERM (systemd, Kubernetes, `timeout`) during
training exited 0 or 1 without a word; now 130 and 143, one line, and the run can be resumed."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_BACKBONE


def _train(data, out, log):
    command = [sys.executable, "-c", "from transferlab.cli import main; main()", "train", str(data),
               "--strategy", "head", "--backbone", TINY_BACKBONE, "--weights", "none", "--epochs",
               "200", "--batch-size", "4", "--out", str(out), "--no-cache", "-q"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated"),
                                                  (signal.SIGINT, 130, "interrupted")])
def test_a_stopped_training_says_so_and_can_be_resumed(image_folder, tmp_path, signum, status, word):
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    process = _train(image_folder, run_dir, log)
    deadline = time.monotonic() + 240
    while not (run_dir / "history.csv").is_file():  # stopped in the middle of training
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    process.send_signal(signum)
    assert process.wait(timeout=120) == status, log.read_text()
    stderr = log.read_text()
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == f"{word}"
    assert f"--resume {run_dir}" in stderr
    resumed = subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main()", "train",
                              "--resume", str(run_dir), "--epochs", "2", "-q"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
