"""A cache costs speed, never the run: a read-only cache, TRANSFERLAB_CACHE pointing at a file, a
damaged or wrong-shaped embedding entry, a scan cache holding something else (each ended in a
traceback after the work) now give a warning, and the run goes on and gets the same result."""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from transferlab import train
from transferlab.data.cache import ScanCache, stat_key
from transferlab.data.folder import ImageFolderData
from transferlab.data.scan import scan_folder
from transferlab.data.synthetic import make_image_folder
from transferlab.inference.embeddings import EmbeddingCache

from conftest import TINY_BACKBONE
from messy import full_disk_prefix, read_only_prefix, run_cli

FAST = dict(backbone=TINY_BACKBONE, weights="none", show_progress=False)


@pytest.fixture(scope="module")
def clean(image_folder, tmp_path_factory):
    return train(image_folder, out=tmp_path_factory.mktemp("clean") / "run", cache_dir=None, **FAST)


def _same_result(run, clean):
    assert run.metrics["test"]["accuracy"] == clean.metrics["test"]["accuracy"]
    assert run.metrics["val"]["loss"] == pytest.approx(clean.metrics["val"]["loss"], abs=1e-6)


def test_a_read_only_cache(image_folder, clean, tmp_path):
    cache = tmp_path / "cache"
    prefix = read_only_prefix(cache)  # read-only even for root: a private read-only bind mount
    result = run_cli("train", image_folder, "--backbone", TINY_BACKBONE, "--weights", "none",
                     "--cache-dir", cache, "--out", tmp_path / "run", "-q", prefix=prefix)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "could not write" in result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == clean.metrics["test"]["accuracy"]


def test_a_cache_path_that_is_a_file(image_folder, clean, tmp_path, caplog):
    cache = tmp_path / "not-a-folder"
    cache.write_text("x")
    run = train(image_folder, out=tmp_path / "run", cache_dir=str(cache), **FAST)
    _same_result(run, clean)
    assert "could not write" in caplog.text


def test_damaged_and_wrong_shaped_embeddings_are_recomputed(image_folder, clean, tmp_path, caplog):
    cache = tmp_path / "cache"
    # without the audit: its backbone, randomly initialised again (weights none), has other weights
    # and so a cache of its own; this way the one folder is extract's
    first = train(image_folder, out=tmp_path / "first", cache_dir=str(cache), audit=False, **FAST)
    assert len(list(cache.glob("embeddings/*"))) == 1
    shards = sorted(cache.glob("embeddings/*/shard-*.safetensors"))
    entries = EmbeddingCache(shards[0].parent).load()
    keys = sorted(entries)
    wrong = {keys[0]: np.zeros(7, np.float32), keys[1]: np.full_like(entries[keys[1]], np.nan)}
    for shard in shards:
        shard.unlink()
    EmbeddingCache(shards[0].parent).save({**entries, **wrong})
    (shards[0].parent / "shard-damaged.safetensors").write_bytes(b"\x00" * 100)
    again = train(image_folder, out=tmp_path / "again", cache_dir=str(cache), audit=False, **FAST)
    assert again.metrics["timing"]["embedded"] == 2 and again.metrics["timing"]["cached"] == 38
    assert again.metrics["test"] == first.metrics["test"]
    assert "wrong shape or with non-finite values" in caplog.text and "damaged cache shard" in caplog.text


@pytest.mark.parametrize("content", [b"not a database" * 100, (1, None), (2, "no table"),
                                     (2, '{"surprise": 1}'), (2, "[1]"), (2, "{" * 100_000)])
def test_a_scan_cache_holding_something_else(image_folder, tmp_path, content):
    """A scan cache that is not SQLite, of another format, without its table, or with an entry of
    another shape (for a file that is unchanged) is read as empty or that entry as absent; the
    scan reads every file and the cache is written again whole."""
    cache = tmp_path / "cache"
    path = ScanCache(cache, image_folder).path
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        version, entry = content
        first_file = next(image_folder.rglob("*.png"))
        with contextlib.closing(sqlite3.connect(path)) as database, database:
            if entry != "no table":
                database.execute("CREATE TABLE files (path BLOB PRIMARY KEY, stat TEXT, entry TEXT)")
                database.execute("INSERT INTO files VALUES (?, ?, ?)",
                                 (os.fsencode(first_file), stat_key(first_file), entry or "{}"))
            database.execute(f"PRAGMA user_version = {version}")
    old_format = path.with_suffix(".json")  # the JSON file of format 1
    old_format.write_text('{"format": 1, "files": {}}')
    data = ImageFolderData(image_folder, cache_dir=cache)
    assert len(data.scan.images) == 40
    assert not old_format.exists()  # replaced, so removed
    with contextlib.closing(sqlite3.connect(path)) as database:  # rewritten whole
        assert database.execute("PRAGMA user_version").fetchone()[0] == 2
        assert database.execute("SELECT count(*) FROM files").fetchone()[0] == 40


def test_a_scan_cache_save_killed_halfway_leaves_the_old_one(tmp_path):
    """Killed while it writes the new rows (SIGKILL, so nothing is cleaned up), a save leaves the
    file as it was: the next scan reads every old entry back."""
    root = make_image_folder(tmp_path / "d", per_class=4, size=32)
    cache = tmp_path / "cache"
    first = scan_folder(root, cache_dir=cache)
    (root / "circles" / "circles_000.jpg").unlink()  # so that the next scan saves
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
from transferlab.data import cache, scan

def rows(infos):
    for number, row in enumerate(original(infos)):
        if number == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        yield row

original, cache._rows = cache._rows, rows
scan.scan_folder({str(root)!r}, cache_dir={str(cache)!r})
"""], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = ScanCache(cache, root)
    found = again.lookup_all([image.path for image in first.images], True, 10**8)
    assert again.loaded == len(first.images) == 8
    assert found == [None if image.path.name == "circles_000.jpg" else image
                     for image in first.images]


def test_a_file_name_that_is_not_utf8_is_cached_too(tmp_path, monkeypatch):
    import transferlab.data.scan

    root = make_image_folder(tmp_path / "d", per_class=4, size=32)
    odd = root / "circles" / os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: no UTF-8 name
    (root / "circles" / "circles_000.jpg").rename(odd)
    first = scan_folder(root, cache_dir=tmp_path / "cache")
    assert odd in [image.path for image in first.images]
    read = []
    monkeypatch.setattr(transferlab.data.scan, "read_info", lambda path, **kw: read.append(path))
    again = scan_folder(root, cache_dir=tmp_path / "cache")
    assert read == [] and again.images == first.images  # every file, the odd one too, from the cache


def test_a_full_disk_is_one_line(image_folder, tmp_path):
    """(The small file system lives only as long as the command, so what it left cannot be read
    afterwards; that every file is written whole or not at all is test_interruptions' subject.)"""
    disk = tmp_path / "disk"
    prefix = full_disk_prefix(disk)  # the run's files fit, its 0.5 MB of weights do not
    result = run_cli("train", image_folder, "--backbone", TINY_BACKBONE, "--weights", "none",
                     "--no-cache", "-q", "--out", disk / "run", prefix=prefix)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "No space left on device" in result.stderr
