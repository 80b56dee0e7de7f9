"""Interruptions (issue 6): a `train` killed with SIGKILL at a random point during embedding or training,
then rerun with `--resume`, finishes with a valid run directory; no file in the run directory is ever
half-written; the embedding cache survives a kill mid-write and never reads back a corrupt entry.

"Never half-written" is checked by `check_run_dir`, which knows every file a run writes and how to tell
that it is whole. Every writer is atomic (a temporary `.NAME.XXXX.tmp` beside the file, fsynced and
renamed onto it) except TensorBoard's event files in logs/: they are an append-only record stream that
TensorBoard reads while it grows, so a kill can tear the last record of the killed process's file. We
accept that for logs/ only: TensorBoard's reader stops at a torn final record, and the resumed process
writes a new, whole event file. A kill inside an atomic write leaves its hidden temporary, which no
reader ever opens; the run that finishes the directory removes them.

Kill points are seeded (SEED) so a failure can be replayed; where a kill must land inside a particular
write, a forked child kills itself there.
"""

from __future__ import annotations

import csv
import io
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import transferlab.inference.bundle
import transferlab.inference.embeddings
from transferlab import load_model, train
from transferlab.rundir.atomic import atomic_path
from transferlab.models.backbones import create_backbone
from transferlab.inference.bundle import load_network, save_model
from transferlab.cli import main
from transferlab.data.folder import ImageFolderData
from transferlab.inference.embeddings import EmbeddingCache, embed_files
from transferlab.inference.engines import torch_threads
from transferlab.rundir.predictions import PredictionTable
from transferlab.rundir.layout import HISTORY_COLUMNS
from transferlab.data.synthetic import make_image_folder
from transferlab.data.transforms import Preprocessing

from conftest import TINY_BACKBONE

SEED = 6  # of the kill points; change it to try others
TINY = ["--backbone", TINY_BACKBONE, "--weights", "none", "--quiet"]


# --- processes ----------------------------------------------------------------------------------------

def start_train(*args, log: Path, shard_size: int | None = None) -> subprocess.Popen:
    """`transferlab train ARGS` in a new process (its stderr to `log`); `shard_size` makes the embedding
    cache save a shard every that many images, so a short run saves several and a kill loses few."""
    setup = f"import transferlab.inference.embeddings as e; e.SHARD_SIZE = {shard_size}; " if shard_size else ""
    code = setup + "from transferlab.cli import main; main()"
    # one torch thread: the child leaves a core to this process, which watches it for the kill point
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "a") as stderr:
        return subprocess.Popen([sys.executable, "-c", code, "train", *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def kill_when(process: subprocess.Popen, ready, delay: float, log: Path, timeout: float = 120) -> None:
    """SIGKILL `process` `delay` seconds after `ready()` first holds; fail if it ended by itself."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"exited {process.returncode} before the kill point:\n{log.read_text()}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.001)
    time.sleep(delay)
    process.kill()
    assert process.wait() == -signal.SIGKILL, f"the run ended before it could be killed:\n{log.read_text()}"


def resume(run_dir: Path, log: Path) -> None:
    process = start_train("--resume", run_dir, "--quiet", log=log)
    assert process.wait(timeout=300) == 0, log.read_text()


def killed_inside(target, *args) -> None:
    """Run `target(*args)` in a forked child, which is expected to SIGKILL itself partway."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL, f"the child was not killed (exit code {child.exitcode})"


def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


# --- is every file whole? -----------------------------------------------------------------------------

def check_run_dir(run_dir: Path, *, finished: bool) -> None:
    """Assert that every file in `run_dir` is whole; an unknown file fails (a new writer needs a check).

    A killed run (finished=False) may hold hidden temporaries of the write the kill interrupted; a
    finished one holds none. Event files in logs/ may end in a torn record, except the newest, which the
    process that finished the run wrote and closed."""
    paths = sorted(run_dir.rglob("*"))
    hidden = [p for p in paths if any(part.startswith(".") for part in p.relative_to(run_dir).parts)]
    assert not (finished and hidden), f"temporaries left in a finished run: {hidden}"
    files = [p for p in paths if p.is_file() and p not in hidden]
    events = sorted((p for p in files if p.name.startswith("events.out.tfevents.")),
                    key=lambda p: int(p.name.split(".")[3]))
    for path in files:
        name = path.relative_to(run_dir).as_posix()
        try:
            if name in ("split.json", "run.json", "metrics.json", "auto-plan.json"):
                json.loads(path.read_text(encoding="utf-8"))
            elif name == "history.csv":
                _check_history(path)
            elif name == "predictions.csv":
                _check_predictions(path, run_dir, finished)
            elif name in ("report.html", "audit/audit.html"):
                assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), "no </html>"
            elif name == "audit/audit.json":
                json.loads(path.read_text(encoding="utf-8"))
            elif name.startswith("audit/") and name.endswith(".csv"):
                _check_audit_table(path)
            elif name in ("model/config.json", "model/model.safetensors", "model/novelty.safetensors"):
                load_model(run_dir / "model")  # checks the weights' sha256 against config.json
            elif name in ("model/README.md", "model/labels.txt"):
                _check_card(run_dir / "model")
            elif name.startswith("checkpoints/") and name.endswith(".ckpt"):
                assert "state_dict" in torch.load(path, map_location="cpu", weights_only=True)
            elif name.startswith("logs/events.out.tfevents."):
                torn = _torn_event_file(path)
                assert not (torn and finished and path == events[-1]), "the final event file is torn"
            elif name == "logs/hparams.yaml":
                import yaml

                yaml.safe_load(path.read_text(encoding="utf-8"))
            else:
                raise AssertionError("unexpected file: no check knows it")
        except Exception as error:
            raise AssertionError(f"{name} is not whole: {type(error).__name__}: {error}") from error


def _check_card(model: Path) -> None:
    """The model card starts with front matter a YAML parser reads; labels.txt lists config.json's
    classes, one a line, ending in a newline."""
    import yaml

    classes = json.loads((model / "config.json").read_text(encoding="utf-8"))["classes"]
    labels = (model / "labels.txt").read_text(encoding="utf-8")
    assert labels.endswith("\n") and labels.splitlines() == classes, "labels.txt is not the classes"
    card = model / "README.md"
    if card.exists():  # written after the bundle: a run killed in between has none yet
        text = card.read_text(encoding="utf-8")
        assert text.startswith("---\n"), "no front matter"
        meta = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
        assert meta["library_name"] == "transferlab" and "## How to use" in text


def _check_audit_table(path: Path) -> None:
    """A whole audit CSV: its header, then rows of as many cells, ending in a newline."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "no final newline"
    rows = list(csv.reader(io.StringIO(text)))
    assert rows and all(len(row) == len(rows[0]) for row in rows), "ragged rows"


def _check_history(path: Path) -> None:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == HISTORY_COLUMNS
    assert [int(row["epoch"]) for row in rows] == list(range(len(rows)))
    for row in rows:
        assert None not in row and all(row[key] not in (None, "") for key in ("train_loss", "lr", "seconds"))


def _check_predictions(path: Path, run_dir: Path, finished: bool) -> None:
    table = PredictionTable.read(path)
    np.testing.assert_allclose(table.proba.sum(1), 1.0, atol=1e-4)
    if finished:
        split = json.loads((run_dir / "metrics.json").read_text())["split"]
        assert len(table.files) == split["val"] + split["test"], "rows missing"


def _torn_event_file(path: Path) -> bool:
    """Whether the file ends in a torn record; a bad checksum anywhere fails. TFRecord framing: length
    (u64), masked crc32c of the length, data, masked crc32c of the data."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data, offset = path.read_bytes(), 0
    while offset < len(data):
        header = data[offset:offset + 8]
        if offset + 12 > len(data):
            return True
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        assert masked_crc32c(header) == header_crc, f"bad length checksum at byte {offset}"
        end = offset + 12 + length + 4
        if end > len(data):
            return True
        (crc,) = struct.unpack("<I", data[end - 4:end])
        assert masked_crc32c(data[offset + 12:end - 4]) == crc, f"bad record checksum at byte {offset}"
        offset = end
    return False


def test_the_check_catches_every_half_written_file(tiny_head_run, tmp_path):
    """check_run_dir can fail: a finished run passes, and fails once any one of its files is cut in half
    or a temporary is left beside them."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_head_run.dir, run_dir)
    check_run_dir(run_dir, finished=True)
    names = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file())
    assert {"split.json", "run.json", "metrics.json", "history.csv", "predictions.csv", "report.html",
            "model/config.json", "model/model.safetensors", "checkpoints/last.ckpt",
            "logs/hparams.yaml"} <= {n.as_posix() for n in names}
    for name in names:
        original = (run_dir / name).read_bytes()
        (run_dir / name).write_bytes(original[:len(original) // 2])
        with pytest.raises(AssertionError, match="is not whole"):
            check_run_dir(run_dir, finished=True)
        (run_dir / name).write_bytes(original)
    # a temporary, even an empty staging folder, is fine in a killed run and fails a finished one
    for temporary, make in ((run_dir / "checkpoints" / ".last.ckpt.k2x9.tmp", Path.touch),
                            (run_dir / ".model.x7q1.tmp", Path.mkdir)):
        make(temporary)
        check_run_dir(run_dir, finished=False)
        with pytest.raises(AssertionError, match="temporaries left"):
            check_run_dir(run_dir, finished=True)
        (temporary.rmdir if temporary.is_dir() else temporary.unlink)()


# --- train killed and resumed -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_400(tmp_path_factory) -> Path:
    """Enough images that embedding them takes a while (about 0.7 s on one core)."""
    return make_image_folder(tmp_path_factory.mktemp("kill") / "shapes", per_class=200, size=48)


def _write_half_metrics(run_dir: Path) -> None:
    with atomic_path(run_dir / "metrics.json") as tmp:
        tmp.write_text('{"strategy": "extract", "val": {"accur')
        die()


def _save_bundle_until_hashing(net, config, folder: Path) -> None:
    transferlab.inference.bundle.sha256_of = die  # the weights are written into the staging folder by then
    save_model(net, folder, backbone=config.backbone, classes=config.classes, head=config.head,
               preprocessing=config.preprocessing)


def test_extract_killed_while_embedding_resumes_to_the_clean_result(shapes_400, tmp_path):
    rng = random.Random(SEED)
    run_dir, cache_dir, log = tmp_path / "run", tmp_path / "cache", tmp_path / "stderr.txt"

    def shards():
        return sorted(cache_dir.glob("embeddings/*/shard-*.safetensors"))

    kill_after, delay = rng.randint(1, 12), rng.uniform(0, 0.01)  # of about 50 shards of 8 images
    process = start_train(shapes_400, *TINY, "--batch-size", 2, "--out", run_dir, "--cache-dir",
                          cache_dir, log=log, shard_size=8)
    kill_when(process, lambda: len(shards()) >= kill_after, delay, log)

    assert (run_dir / "run.json").is_file() and not (run_dir / "metrics.json").exists()
    cached = EmbeddingCache(shards()[0].parent).load()
    assert 8 * kill_after <= len(cached) < 400, f"killed after {kill_after} shards, not while embedding"
    check_run_dir(run_dir, finished=False)
    # kills inside the two kinds of atomic write, which a random kill rarely hits: a file and a bundle
    killed_inside(_write_half_metrics, run_dir)
    with torch_threads(1):  # as in the subprocesses: fp32 sums depend on how threads split them
        clean = train(shapes_400, backbone=TINY_BACKBONE, weights="none", batch_size=2,
                      out=tmp_path / "clean", cache_dir=str(tmp_path / "clean-cache"), show_progress=False)
    net, config = load_network(clean.model_dir)
    killed_inside(_save_bundle_until_hashing, net, config, run_dir / "model")
    assert len([p for p in run_dir.iterdir() if p.name.startswith(".")]) == 2
    check_run_dir(run_dir, finished=False)

    resume(run_dir, log)
    check_run_dir(run_dir, finished=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["timing"]["cached"] == len(cached) and metrics["timing"]["embedded"] == 400 - len(cached)
    expected = json.loads((clean.dir / "metrics.json").read_text())
    assert metrics.keys() == expected.keys()
    for key in sorted(expected.keys() - {"timing"}):  # the same numbers, exactly
        assert metrics[key] == expected[key], key
    np.testing.assert_array_equal(
        PredictionTable.read(run_dir / "predictions.csv").proba,
        PredictionTable.read(clean.dir / "predictions.csv").proba)


def epochs_in(run_dir: Path) -> list[int]:
    if not (run_dir / "history.csv").is_file():
        return []
    with open(run_dir / "history.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_head_killed_twice_while_training_resumes_to_a_complete_run(image_folder, tmp_path):
    """Killed at a random moment of training, resumed, killed again while it writes a checkpoint (where a
    random kill rarely lands), resumed to the end."""
    rng = random.Random(SEED)
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    epochs = 30  # about 0.1 s each
    # a hidden layer's optimizer state makes each checkpoint big enough to be caught being written
    process = start_train(image_folder, "--strategy", "head", *TINY, "--epochs", epochs, "--batch-size", 8,
                          "--head-init", "random", "--head-dim", "256", "--out", run_dir, "--no-cache",
                          log=log)
    delay = rng.uniform(0, 0.8)
    kill_when(process, lambda: epochs_in(run_dir), delay, log)
    done = epochs_in(run_dir)
    assert 0 < len(done) < epochs and not (run_dir / "metrics.json").exists(), f"{delay=:.2f}"
    check_run_dir(run_dir, finished=False)

    process = start_train("--resume", run_dir, "--quiet", log=log)
    def writing_a_checkpoint():
        return len(epochs_in(run_dir)) > len(done) and any(run_dir.glob("checkpoints/.*.tmp"))

    kill_when(process, writing_a_checkpoint, 0, log)
    assert len(done) < len(epochs_in(run_dir)) < epochs and not (run_dir / "metrics.json").exists()
    check_run_dir(run_dir, finished=False)

    resume(run_dir, log)
    check_run_dir(run_dir, finished=True)
    assert epochs_in(run_dir) == list(range(epochs))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs and metrics["test"]["accuracy"] is not None
    assert len(list((run_dir / "logs").glob("events.out.tfevents.*"))) == 3  # one per process


def test_auto_killed_while_fine_tuning_resumes_to_a_complete_run(image_folder, tmp_path):
    """auto reruns extract (cheap) and keeps the plan it wrote before fine-tuning (backbone,
    epochs), and its fine-tuning goes on from the checkpoint; the run ends with auto's record of
    what it tried."""
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    process = start_train(image_folder, "--strategy", "auto", "--time-budget", "10m", *TINY,
                          "--batch-size", 8, "--out", run_dir, "--no-cache", log=log)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    kill_when(process, lambda: checkpoint.is_file() and epochs_in(run_dir), 0, log)
    done = epochs_in(run_dir)
    first_epoch = (run_dir / "history.csv").read_text().splitlines()[1]  # with its seconds
    plan = (run_dir / "auto-plan.json").read_text()
    assert done and not (run_dir / "metrics.json").exists()
    check_run_dir(run_dir, finished=False)

    resume(run_dir, log)
    check_run_dir(run_dir, finished=True)
    assert epochs_in(run_dir) == list(range(len(epochs_in(run_dir)))) and len(epochs_in(run_dir)) > len(done)
    assert (run_dir / "history.csv").read_text().splitlines()[1] == first_epoch  # not trained again
    metrics = json.loads((run_dir / "metrics.json").read_text())
    extract, tuned = metrics["auto"]["tried"]
    assert (run_dir / "auto-plan.json").read_text() == plan and metrics["auto"]["resumed"] is True
    assert extract["strategy"] == "extract"
    assert tuned["strategy"] == f"finetune ({json.loads(plan)['epochs']} epochs)"
    assert "skipped" not in tuned and metrics["test"]["accuracy"] is not None
    assert len(list((run_dir / "logs").glob("events.out.tfevents.*"))) == 2  # one per process


@pytest.mark.parametrize("state", ["no directory", "empty directory", "split.json only"])
def test_resume_before_run_json_is_one_clear_error(state, image_folder, tmp_path, monkeypatch, capsys):
    """A kill before run.json exists leaves nothing to resume: one line says so and what to do."""
    run_dir = tmp_path / "run"
    if state != "no directory":
        run_dir.mkdir()
        (run_dir / ".write-test.abc123.tmp").write_bytes(b"")  # check_writable's probe, if killed there
    if state == "split.json only":
        (run_dir / "split.json").write_text(json.dumps(ImageFolderData(image_folder).split_record()))
    monkeypatch.setattr(sys, "argv", ["transferlab", "train", "--resume", str(run_dir), "--quiet"])
    with pytest.raises(SystemExit) as exit:
        main()
    stderr = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert str(run_dir) in stderr and "run.json" in stderr and "--out" in stderr, stderr


def test_resume_with_run_json_but_no_split_json_is_one_clear_error(tiny_head_run, tmp_path, monkeypatch,
                                                                   capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_bytes((tiny_head_run.dir / "run.json").read_bytes())
    monkeypatch.setattr(sys, "argv", ["transferlab", "train", "--resume", str(run_dir), "--quiet"])
    with pytest.raises(SystemExit) as exit:
        main()
    stderr = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in stderr
    assert "not a resumable run directory" in stderr and "split.json" in stderr, stderr


# --- the embedding cache ------------------------------------------------------------------------------

DIM, PER_SHARD = 256, 128  # 128 kB shards


def _key(shard: int, index: int) -> str:
    return hashlib.sha256(f"{shard}:{index}".encode()).hexdigest()


def _vector(key: str) -> np.ndarray:
    """The one right value of each key."""
    return np.random.default_rng(int(key[:16], 16)).standard_normal(DIM, dtype=np.float32)


def _write_shards_forever(folder: Path, journal: Path, first: int) -> None:
    """Save shard after shard; `journal` lists each shard once its save has returned."""
    cache = EmbeddingCache(folder)
    for shard in itertools.count(first):
        cache.save({_key(shard, i): _vector(_key(shard, i)) for i in range(PER_SHARD)})
        with open(journal, "a") as handle:
            handle.write(f"{shard}\n")


def _half_write_a_shard(folder: Path) -> None:
    import safetensors.numpy

    def half(tensors, filename):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\"")
        die()

    safetensors.numpy.save_file = half
    EmbeddingCache(folder).save({_key(-1, 0): _vector(_key(-1, 0))})


def test_embedding_cache_survives_kills_mid_write(tmp_path, caplog):
    rng = random.Random(SEED)
    folder, journal = tmp_path / "cache", tmp_path / "journal.txt"
    journal.touch()
    for kill in range(6):
        saved = len(journal.read_text().split())
        child = multiprocessing.get_context("fork").Process(
            target=_write_shards_forever, args=(folder, journal, 1000 * kill))
        child.start()
        while len(journal.read_text().split()) == saved:  # writing
            assert child.is_alive()
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.05))
        child.kill()
        child.join()
        assert child.exitcode == -signal.SIGKILL
    killed_inside(_half_write_a_shard, folder)
    (folder / ".shard-0123.safetensors.4567.tmp").write_bytes(b"garbage")

    entries = EmbeddingCache(folder).load()
    assert "damaged" not in caplog.text  # a kill never leaves a broken shard under a final name
    for key, value in entries.items():
        np.testing.assert_array_equal(value, _vector(key))
    saved = [int(shard) for shard in journal.read_text().split()]
    assert {_key(shard, i) for shard in saved for i in range(PER_SHARD)} <= entries.keys()
    shards = len(list(folder.glob("shard-*.safetensors")))
    assert len(entries) == shards * PER_SHARD  # whole shards only
    EmbeddingCache(folder).save({_key(-2, 0): _vector(_key(-2, 0))})  # the stale temporaries are no obstacle
    assert len(EmbeddingCache(folder).load()) == len(entries) + 1


def test_damaged_shard_is_ignored_not_trusted(tmp_path, caplog):
    cache = EmbeddingCache(tmp_path)
    cache.save({"a" * 64: np.ones(4, dtype=np.float32)})
    good = next(tmp_path.glob("shard-*.safetensors"))
    (tmp_path / "shard-truncated.safetensors").write_bytes(good.read_bytes()[:-2])
    (tmp_path / "shard-garbage.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "shard-empty.safetensors").write_bytes(b"")
    assert cache.load().keys() == {"a" * 64}
    assert caplog.text.count("damaged cache shard") == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_embedding_saves_a_shard_at_least_every_shard_seconds(image_folder, tmp_path, monkeypatch):
    """A slow backbone loses at most SHARD_SECONDS of work to a kill, not SHARD_SIZE images."""
    monkeypatch.setattr(transferlab.inference.embeddings, "SHARD_SECONDS", 0.0)  # every batch is overdue
    backbone = create_backbone(TINY_BACKBONE, "none")
    images = ImageFolderData(image_folder).scan.images[:12]
    embed_files(backbone, [im.path for im in images], [im.sha256 for im in images],
                Preprocessing.from_model(backbone), cache_dir=tmp_path, batch_size=4, precision="32",
                show_progress=False)
    assert len(list(tmp_path.glob("embeddings/*/shard-*.safetensors"))) == 3
