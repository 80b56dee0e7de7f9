"""Embeddings of image files by a frozen backbone, cached on disk by content.

A cache entry is keyed by (the module's layers and weights, preprocessing, device type, precision) and
by each file's sha256,
so renaming or moving files keeps the cache warm and editing an image invalidates only that image.
Entries are written in safetensors shards, each shard atomically, so a killed run leaves every
finished shard usable and never a half-written one (at worst a hidden temporary, which load skips).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.transforms import Preprocessing
from ..devices import resolve_precision
from ..errors import DataError
from ..models.backbones import weights_fingerprint
from ..models.network import feature_shape
from ..rundir.atomic import atomic_path
from .batches import progress_bar, run_batches
from .engines import TorchEngine

log = logging.getLogger(__name__)
CACHE_FORMAT = 2  # 2: keyed by the module's layers and the device type too
# A shard is saved every SHARD_SIZE images or SHARD_SECONDS, whichever comes first: a kill loses at
# most that much work, also with a backbone that takes minutes for 1024 images.
SHARD_SIZE = 1024
SHARD_SECONDS = 60.0


class EmbeddingCache:
    """A folder of safetensors shards mapping content hashes to embedding vectors."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def for_model(cls, cache_dir: Path, module: torch.nn.Module, pre: Preprocessing,
                  device: torch.device, precision: str) -> "EmbeddingCache":
        """The cache of `module`'s outputs: its repr names every layer and its settings (a cut
        backbone and how it is pooled), the fingerprint its weights."""
        identity = {"format": CACHE_FORMAT, "architecture": type(module).__name__,
                    "layers": hashlib.sha256(repr(module).encode()).hexdigest(),
                    "weights": weights_fingerprint(module), "preprocessing": pre.to_dict(),
                    "device": torch.device(device).type, "precision": precision}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        return cls(Path(cache_dir) / "embeddings" / key)

    def load(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        entries: dict[str, np.ndarray] = {}
        try:
            shards = sorted(self.folder.glob("shard-*.safetensors"))
        except OSError as error:
            log.warning("ignoring unreadable embedding cache %s (%s)", self.folder, error)
            return entries
        for shard in shards:
            try:
                entries.update(load_file(str(shard)))
            except Exception as error:  # a damaged shard costs a re-embedding, never wrong data
                log.warning("ignoring damaged cache shard %s (%s)", shard, error)
        return entries

    def keys(self) -> set[str]:
        """The hashes the cache holds, read from the shards' headers only (no vectors loaded)."""
        from safetensors import safe_open

        keys: set[str] = set()
        for shard in sorted(self.folder.glob("shard-*.safetensors")) if self.folder.is_dir() else ():
            try:
                with safe_open(str(shard), framework="numpy") as handle:
                    keys.update(handle.keys())
            except Exception as error:  # a damaged shard: its images count as missing
                log.warning("ignoring damaged cache shard %s (%s)", shard, error)
        return keys

    def save(self, entries: dict[str, np.ndarray]) -> None:
        """Write a shard; a cache that cannot be written (read-only, a file in its place, a full
        disk) costs speed, never the run: a warning, and the run goes on."""
        from safetensors.numpy import save_file

        if not entries:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / f"shard-{uuid.uuid4().hex}.safetensors") as tmp:
                save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in entries.items()},
                          str(tmp))
        except OSError as error:
            log.warning("could not write the embedding cache %s (%s); going on without it",
                        self.folder, error)


def _usable(entries: dict[str, np.ndarray], shape: tuple) -> dict[str, np.ndarray]:
    """The cached vectors of the right shape with finite values; the others (a damaged or altered
    cache) are dropped with a warning and embedded again."""
    usable = {key: value for key, value in entries.items()
              if value.shape == shape and np.isfinite(value).all()}
    if len(usable) < len(entries):
        log.warning("ignoring %d cached embeddings of the wrong shape or with non-finite values; "
                    "they are computed again", len(entries) - len(usable))
    return usable


@dataclass
class EmbeddingStats:
    embedded: int = 0
    cached: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float | None:
        return self.embedded / self.seconds if self.embedded and self.seconds else None


def embed_files(module: torch.nn.Module, paths: Sequence[Path], hashes: Sequence[str],
                pre: Preprocessing, *, cache_dir: Path | None = None, batch_size: int = 32,
                workers: int | None = None, device: torch.device | str = "cpu",
                precision: str = "auto", show_progress: bool = True,
                ) -> tuple[np.ndarray, EmbeddingStats]:
    """(len(paths), num_features) float32 outputs of `module` (a frozen backbone, pooled), run on
    `device`; files already in the cache are not decoded."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    cache = (EmbeddingCache.for_model(cache_dir, module, pre, device, precision) if cache_dir
             else None)
    vectors = cached_vectors(cache, module, pre, hashes)
    stats = EmbeddingStats(cached=sum(h in vectors for h in hashes))
    todo = missing(vectors, hashes)
    if todo:
        writer = ShardWriter(cache)
        start = time.perf_counter()
        with progress_bar("embedding", len(todo), show_progress) as advance:
            batches = run_batches(TorchEngine(module, pre, device), [paths[i] for i in todo], pre,
                                  precision=precision, pin_memory=device.type == "cuda",
                                  batch_size=batch_size, workers=workers, progress=advance)
            for positions, outputs, errors in batches:
                writer.add([todo[p] for p in positions], outputs, errors, paths, hashes)
        vectors.update(writer.close())
        stats.seconds = time.perf_counter() - start
        stats.embedded = len(todo)
    return np.stack([vectors[h] for h in hashes]), stats


def cached_vectors(cache: EmbeddingCache | None, module: torch.nn.Module, pre: Preprocessing,
                   hashes: Sequence[str]) -> dict[str, np.ndarray]:
    """The usable cached vectors of `hashes` by hash (none without a cache)."""
    if cache is None:
        return {}
    loaded = cache.load()  # every image ever embedded by this model: keep those asked for
    return _usable({h: loaded[h] for h in hashes if h in loaded}, feature_shape(module, pre))


def missing(vectors: dict[str, np.ndarray], hashes: Sequence[str]) -> list[int]:
    """The positions in `hashes` that have no vector yet: the files to embed."""
    return [i for i, h in enumerate(hashes) if h not in vectors]


class ShardWriter:
    """Collects embedded vectors and saves them to `cache` (if any) in shards of SHARD_SIZE images
    or SHARD_SECONDS, so a killed run keeps what it had finished; `close()` saves the rest and
    returns every vector added, by hash (none unless `keep`: a writer that only fills the cache
    holds no more than a shard)."""

    def __init__(self, cache: EmbeddingCache | None, keep: bool = True):
        self.cache, self.keep = cache, keep
        self.vectors: dict[str, np.ndarray] = {}
        self.pending: dict[str, np.ndarray] = {}
        self.saved = time.perf_counter()

    def add(self, indices: Sequence[int], outputs: torch.Tensor, errors: Sequence[str],
            paths: Sequence[Path], hashes: Sequence[str]) -> None:
        """The outputs of the files at `indices` of `paths`/`hashes`; a file that became unreadable
        since it was scanned stops the run, naming it."""
        for index, vector, error in zip(indices, outputs.numpy(), errors):
            if error:
                raise DataError(f"{paths[index]}: became unreadable ({error}); rerun")
            self.pending[hashes[index]] = vector
        if self.cache and (len(self.pending) >= SHARD_SIZE
                           or time.perf_counter() - self.saved >= SHARD_SECONDS):
            self._save()

    def close(self) -> dict[str, np.ndarray]:
        self._save()
        return self.vectors

    def _save(self) -> None:
        if self.cache:
            self.cache.save(self.pending)
        if self.keep:
            self.vectors.update(self.pending)
        self.pending, self.saved = {}, time.perf_counter()
