"""What happens to a folder that already holds results: a new run into it (it reused the old
checkpoint and claimed the new settings), an evaluation into a training run (it replaced its
metrics), two processes at once (they mixed their files), a --resume that quietly ignored what was
given, images whose content changed under the same names, and an --out inside the data folder."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from transferlab import train
from transferlab.errors import ConfigError, DataError
from transferlab.rundir.layout import locked
from transferlab.workflows.evaluate import evaluate

from conftest import TINY_BACKBONE
from messy import run_main

FAST = dict(backbone=TINY_BACKBONE, weights="none", cache_dir=None, show_progress=False, batch_size=8)


def _weights(run_dir):
    return (run_dir / "model" / "model.safetensors").read_bytes()


def test_a_new_run_into_a_run_folder_is_refused_unless_overwritten(image_folder, tmp_path, capsys):
    # a random head: one epoch from the probe may keep the probe, the same weights in both runs
    first = train(image_folder, strategy="head", epochs=1, out=tmp_path / "h1", head_init="random",
                  **FAST)
    before = _weights(first.dir)
    with pytest.raises(ConfigError, match="already holds results.*--resume.*--overwrite"):
        train(image_folder, strategy="head", epochs=1, lr=0.01, out=tmp_path / "h1", **FAST)
    assert _weights(first.dir) == before  # nothing was touched
    cli = run_main(capsys, "train", image_folder, "--strategy", "finetune", "--backbone", TINY_BACKBONE,
                   "--weights", "none", "--epochs", "1", "--out", tmp_path / "h1", "--no-cache", "-q")
    assert cli.returncode == 2 and "already holds results" in cli.stderr
    again = train(image_folder, strategy="head", epochs=1, lr=0.01, out=tmp_path / "h1",
                  overwrite=True, head_init="random", **FAST)
    recorded = json.loads((again.dir / "run.json").read_text())["config"]
    assert recorded["lr"] == 0.01 and _weights(again.dir) != before
    assert [row.split(",")[0] for row in (again.dir / "history.csv").read_text().splitlines()[1:]] == ["0"]


def test_evaluate_never_replaces_a_training_run(tiny_run, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    run = train(image_folder, out=run_dir, **FAST)
    metrics = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds results"):
        evaluate(run.model_dir, image_folder, out=run_dir, show_progress=False)
    assert (run_dir / "metrics.json").read_bytes() == metrics
    resumed = train(resume=run_dir, show_progress=False)  # still a resumable run
    assert resumed.metrics["test"] == run.metrics["test"]


def test_one_folder_one_writer(image_folder, tmp_path):
    """A second process writing the same folder is refused while the first holds it."""
    folder = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from transferlab.rundir.layout import locked\n"
        f"with locked({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another transferlab process is writing this folder"):
            train(image_folder, out=folder, **FAST)
    finally:
        holder.kill()
        holder.wait()
    with locked(folder):  # free once the holder is gone, however it ended
        pass
    assert sorted(os.listdir(folder)) == []  # the lock is on the folder itself: no file added


def test_resume_refuses_what_differs_from_the_run(image_folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(image_folder, strategy="head", epochs=1, out=run_dir, **FAST)
    other = tmp_path / "other"
    other.mkdir()
    for args, named in [(["--strategy", "finetune"], "strategy"), ([other], "data root"),
                        ([image_folder, "--val", "0.3"], "data val"),
                        (["--out", tmp_path / "elsewhere"], "--out")]:
        result = run_main(capsys, "train", "--resume", run_dir, "-q", *args)
        assert result.returncode == 2 and named in result.stderr and "cannot change" in result.stderr, (
            args, result.stderr)
    assert run_main(capsys, "train", image_folder, "--resume", run_dir, "-q", "--epochs", "2").returncode == 0


def test_resume_refuses_images_whose_content_changed(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for index in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / name / f"{index}.png")
    run_dir = tmp_path / "run"
    train(data, strategy="head", epochs=1, out=run_dir, **FAST)
    split = json.loads((run_dir / "split.json").read_text())
    assert all(len(item["sha256"]) == 64 for item in split["train"])
    victim = data / split["train"][0]["file"]
    stat = victim.stat()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(victim)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(DataError, match="changed content since"):
        train(resume=run_dir, show_progress=False)


def test_an_output_folder_inside_the_data_folder_is_refused(image_folder, tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="inside the data folder"):
        train(image_folder, out=image_folder / "runs" / "x", **FAST)
    with pytest.raises(ConfigError, match="inside the data folder"):
        evaluate(tiny_run.model_dir, image_folder, out=image_folder / "eval", show_progress=False)
    assert not (image_folder / "runs").exists() and not (image_folder / "eval").exists()


def test_compare_lists_each_combination_once(image_folder, tmp_path):
    from transferlab.workflows.compare import compare

    with pytest.raises(ConfigError, match="each combination once"):
        compare(image_folder, ["extract", "extract"], [TINY_BACKBONE], weights="none",
                out=tmp_path / "cmp", cache_dir=None, show_progress=False)
    assert not (tmp_path / "cmp").exists()


def test_a_diverging_run_stops_with_one_line_and_compare_records_it(image_folder, tmp_path, capsys):
    started = time.monotonic()
    cli = run_main(capsys, "train", image_folder, "--strategy", "head", "--backbone", TINY_BACKBONE,
                   "--weights", "none", "--epochs", "5", "--lr", "1e30", "--head-init", "random",
                   "--head-dim", "256", "--out", tmp_path / "nan",
                   "--no-cache", "-q")
    assert cli.returncode == 2 and "training diverged" in cli.stderr and "lower --lr" in cli.stderr
    assert "Traceback" not in cli.stderr and time.monotonic() - started < 120
    from transferlab.workflows.compare import compare

    comparison = compare(image_folder, ["extract", "head"], [TINY_BACKBONE], weights="none", lr=1e30,
                         head_init="random", head_dim=256, out=tmp_path / "cmp", cache_dir=None, show_progress=False, report=False)
    rows = {row["strategy"]: row for row in comparison.rows}
    assert rows["extract"]["test_accuracy"] is not None  # the other runs go on
    assert "training diverged" in rows["head"]["error"]
    assert (tmp_path / "cmp" / "comparison.csv").is_file()
