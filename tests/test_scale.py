"""Issue 14's scale work: the scan in worker processes, the scan cache's warm path, and the
streaming classifier fit of large extract runs."""

from __future__ import annotations

import contextlib
import sqlite3

import numpy as np
import pytest
import torch

import transferlab.data.scan
from transferlab.data.cache import ScanCache
from transferlab.data.scan import scan_folder
from transferlab.data.synthetic import make_image_folder
from transferlab.inference.rows import RowFile
from transferlab.training.streamed import fit_streamed


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Shapes plus an unreadable file and an exact copy: every kind of scan result."""
    root = make_image_folder(tmp_path_factory.mktemp("scan") / "d", per_class=12, size=48)
    (root / "circles" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "squares" / "copy.png").write_bytes((root / "squares" / "squares_001.png").read_bytes())
    return root


def test_scan_in_processes_equals_scan_in_threads(mixed_folder, monkeypatch):
    """One test, so the suite starts worker processes once: threads below PROCESS_MIN_FILES files,
    processes from it, and the same results either way."""
    started = []

    class Recorded(transferlab.data.scan.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            started.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(transferlab.data.scan, "ProcessPoolExecutor", Recorded)
    threads = scan_folder(mixed_folder, workers=2)  # 26 files, below PROCESS_MIN_FILES
    assert started == []
    monkeypatch.setattr(transferlab.data.scan, "PROCESS_MIN_FILES", 10)
    processes = scan_folder(mixed_folder, workers=2)
    assert len(started) == 1
    assert processes.images == threads.images and processes.labels == threads.labels
    assert processes.unreadable == threads.unreadable and len(processes.unreadable) == 1
    assert all(image.phash is not None for image in processes.images)


def test_warm_rescan_reads_nothing_and_does_not_rewrite_the_cache(mixed_folder, tmp_path, monkeypatch):
    cold = scan_folder(mixed_folder, cache_dir=tmp_path)
    cache_file = ScanCache(tmp_path, mixed_folder).path
    written = cache_file.stat().st_mtime_ns
    assert _cached_files(cache_file) == len(cold.images)
    read, original = [], transferlab.data.scan.read_info
    monkeypatch.setattr(transferlab.data.scan, "read_info",
                        lambda path, **kw: read.append(path.name) or original(path, **kw))
    warm = scan_folder(mixed_folder, cache_dir=tmp_path, workers=1)
    assert read == ["broken.jpg"]  # unreadable files are not cached: only it is read again
    assert warm.images == cold.images
    assert cache_file.stat().st_mtime_ns == written  # nothing new: not rewritten


def test_rescan_after_a_file_vanished_rewrites_the_cache(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4, size=32)
    scan_folder(root, cache_dir=tmp_path / "cache")
    (root / "circles" / "circles_000.jpg").unlink()
    rescan = scan_folder(root, cache_dir=tmp_path / "cache")
    assert _cached_files(ScanCache(tmp_path / "cache", root).path) == len(rescan.images) == 7


def _cached_files(path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as database:
        return database.execute("SELECT count(*) FROM files").fetchone()[0]


def _blobs(classes: int, rows: int = 3000, width: int = 24, seed: int = 0):
    """Overlapping Gaussian classes: a problem where the regularised fit matters."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    centres = rng.normal(0, 1.0, (classes, width))
    features = (centres[labels] + rng.normal(0, 2.0, (rows, width))) * rng.uniform(0.1, 10, width)
    return features.astype(np.float32), labels


@pytest.mark.parametrize("classes", [2, 4])
def test_streamed_logistic_regression_matches_lbfgs(classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = _blobs(classes)
    train, test = slice(0, 2000), slice(2000, None)
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    reference.fit(features[train], labels[train])
    with RowFile(np.array_split(features[train], 7)) as rows:  # chunks of uneven sizes
        assert rows.rows == 2000 and sum(len(c) for c in rows.chunks(300)) == 2000
        reused = [chunk.copy() for chunk in rows.chunks(300, reuse=True)]
        assert np.array_equal(np.concatenate(reused), features[train])  # the same rows, in order
        scaler, model = fit_streamed(rows, labels[train])
    streamed = model.predict_proba(scaler.transform(features[test]))
    expected = reference.predict_proba(features[test])
    accuracy = (streamed.argmax(1) == labels[test]).mean()
    assert abs(accuracy - (expected.argmax(1) == labels[test]).mean()) <= 0.01
    assert accuracy > 1.5 / classes  # it learnt something
    assert np.abs(streamed - expected).max() < 0.02  # the same objective, so the same model
    assert model.coef_.shape == reference[-1].coef_.shape


def test_extract_above_the_threshold_fits_streaming(image_folder, tmp_path, monkeypatch):
    """Forced low, the threshold sends extract through the streamed fit: its head is transplanted
    like lbfgs's, predicts what lbfgs's predicts, and the run completes with its metrics."""
    from transferlab import ImageFolderData, train
    from transferlab.training.strategies import configure, extract
    from transferlab.training.strategies.extract import fit_probe

    from conftest import TINY_BACKBONE

    _, config = configure("extract", {"backbone": TINY_BACKBONE, "weights": "none",
                                      "precision": "32", "cache_dir": str(tmp_path / "cache")})
    strategy, _ = configure("extract", {})
    data = ImageFolderData(image_folder, cache_dir=None)
    torch.manual_seed(0)  # a random-weight backbone: the same features, so the same near ties, every run
    net, _, pre, _ = strategy.network(config, len(data.classes))
    in_memory = fit_probe(data, config, net.backbone, pre, show_progress=False)
    monkeypatch.setattr(extract, "STREAM_ABOVE_BYTES", 0)
    streamed = fit_probe(data, config, net.backbone, pre, show_progress=False)
    assert set(streamed.outputs) == {"val", "test"}  # train's are not kept
    assert streamed.transplant_error < extract.TRANSPLANT_TOLERANCE
    assert streamed.embedding.cached == len(data.scan.images)  # the in-memory fit cached them all
    for name in ("val", "test"):
        ours, theirs = streamed.outputs[name], in_memory.outputs[name]
        assert isinstance(ours.features, RowFile)  # left on disk, read back in chunks
        assert np.array_equal(np.concatenate(list(ours.features.chunks(rows=3))), theirs.features)
        assert (ours.logits.argmax(1) == theirs.logits.argmax(1)).mean() >= 0.9
    assert streamed.train_fit["accuracy"] == pytest.approx(in_memory.train_fit["accuracy"], abs=0.1)
    run = train(image_folder, strategy="extract", backbone=TINY_BACKBONE, weights="none",
                out=tmp_path / "run", cache_dir=None, show_progress=False)  # a temporary cache
    assert 0 <= run.metrics["test"]["accuracy"] <= 1
    assert 0 <= run.metrics["test"]["unknown_rate"] <= 1  # novelty scored on the RowFile

def test_embedding_cache_reads_vectors_back_in_chunks_in_the_order_asked(tmp_path):
    from transferlab.errors import DataError
    from transferlab.inference.embeddings import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache")
    vectors = {f"{i:064x}": np.full(4, i, dtype=np.float32) for i in range(10)}
    keys = list(vectors)
    cache.save({k: vectors[k] for k in keys[:6]})  # two shards
    cache.save({k: vectors[k] for k in keys[6:]})
    assert set(cache.index()) == set(keys)
    wanted = keys[::-1] + keys[:2]  # across both shards, a repeat included
    chunks = list(cache.chunks(wanted, (4,), chunk_size=3))
    assert [len(c) for c in chunks] == [3, 3, 3, 3]
    assert np.array_equal(np.concatenate(chunks), np.stack([vectors[k] for k in wanted]))
    with pytest.raises(DataError, match="is not in this cache"):
        list(cache.chunks(["f" * 64], (4,)))
    with pytest.raises(DataError, match="wrong shape"):
        list(cache.chunks(keys[:1], (5,)))
