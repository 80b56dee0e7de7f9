"""Embeddings of image files by a frozen backbone, cached on disk by content.

A cache entry is keyed by (the module's layers and weights, preprocessing, device type, the engine
that computed it and its precision; see inference.graphs) and by each file's sha256,
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

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
from .graphs import (AUTO_BUILD_IMAGES, FEATURES, GraphEngine, GraphSpec, compile_engine,
                     engine_label)

log = logging.getLogger(__name__)
# 2: keyed by the module's layers and the device type too; 3: and the engine; 4: images resized
# by torch (data.transforms.ResizeCenterCrop), within 2 of 255 of timm's PIL resize
CACHE_FORMAT = 4
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
                  device: torch.device, engine: str) -> "EmbeddingCache":
        """The cache of `module`'s outputs: its repr names every layer and its settings (a cut
        backbone and how it is pooled), the fingerprint its weights; `engine` what computes them
        (graphs.engine_label: "torch-bf16", "openvino-bf16", ...), so engines never mix."""
        identity = {"format": CACHE_FORMAT, "architecture": type(module).__name__,
                    "layers": hashlib.sha256(repr(module).encode()).hexdigest(),
                    "weights": weights_fingerprint(module), "preprocessing": pre.to_dict(),
                    "device": torch.device(device).type, "engine": engine}
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

    def index(self) -> dict[str, Path]:
        """The shard of every cached content hash, from the shards' headers: no vector is read."""
        from safetensors import safe_open

        shards: dict[str, Path] = {}
        for shard in sorted(self.folder.glob("shard-*.safetensors")) if self.folder.is_dir() else []:
            try:
                with safe_open(str(shard), framework="np") as opened:
                    shards.update(dict.fromkeys(opened.keys(), shard))
            except Exception as error:  # as load(): a damaged shard costs a re-embedding
                log.warning("ignoring damaged cache shard %s (%s)", shard, error)
        return shards

    def chunks(self, hashes: Sequence[str], shape: tuple, chunk_size: int = 8192
               ) -> Iterator[np.ndarray]:
        """The cached vectors of `hashes`, in that order, as float32 arrays of up to `chunk_size`
        rows: only one chunk is in memory at a time, whatever the number of images."""
        from safetensors import safe_open

        index = self.index()
        for start in range(0, len(hashes), chunk_size):
            wanted = hashes[start:start + chunk_size]
            chunk = np.empty((len(wanted), *shape), dtype=np.float32)
            by_shard: dict[Path, list[int]] = {}
            for row, key in enumerate(wanted):
                if key not in index:
                    raise DataError(f"{self.folder}: the embedding of {key[:12]}... is not in this "
                                    "cache (was it written? see the warnings above); give a "
                                    "writable --cache-dir and rerun")
                by_shard.setdefault(index[key], []).append(row)
            for shard, rows in by_shard.items():
                with safe_open(str(shard), framework="np") as opened:
                    for row in rows:
                        chunk[row] = _checked(opened.get_tensor(wanted[row]), shape, shard)
            yield chunk

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


def _checked(vector: np.ndarray, shape: tuple, shard: Path) -> np.ndarray:
    if vector.shape != shape or not np.isfinite(vector).all():
        raise DataError(f"{shard}: a cached embedding of the wrong shape or with non-finite values; "
                        "delete that file and rerun")
    return vector


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
    cache: EmbeddingCache | None = None  # where the vectors are kept (read back after stream=True)
    engine: dict = field(default_factory=dict)  # graphs.GraphEngine.report(), or torch's
    # the parity check's images embedded by torch in fp32 and by the engine (None: no check ran)
    check_embeddings: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.embedded / self.seconds if self.embedded and self.seconds else None


def embed_files(module: torch.nn.Module, paths: Sequence[Path], hashes: Sequence[str],
                pre: Preprocessing, *, cache_dir: Path | None = None, batch_size: int = 32,
                workers: int | None = None, device: torch.device | str = "cpu",
                precision: str = "auto", engine: str = "auto", show_progress: bool = True,
                stream: bool = False) -> tuple[np.ndarray | None, EmbeddingStats]:
    """(len(paths), num_features) float32 outputs of `module` (a frozen backbone, pooled), run on
    `device` by `engine` (graphs.compile_engine: torch, or its ONNX Runtime or OpenVINO graph,
    checked against torch fp32 on the first batch); files already in the cache are not decoded.

    `stream` (with `cache_dir`): the vectors are left in the cache, to be read back chunk by chunk
    (EmbeddingCache.chunks), and None is returned: memory stays flat at any number of images."""
    if stream and not cache_dir:
        raise ValueError("embed_files(stream=True) needs a cache_dir to leave the vectors in")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    runner, known, todo, stats = embedding_runner(GraphSpec(module, pre, (FEATURES,)), engine,
                                                  paths, hashes, device=device, precision=precision,
                                                  cache_dir=cache_dir, stream=stream,
                                                  check_images=batch_size)
    vectors: dict[str, np.ndarray] = {} if stream else known
    if todo:
        writer = ShardWriter(stats.cache, keep=not stream)
        start = time.perf_counter()
        with progress_bar("embedding", len(todo), show_progress) as advance:
            batches = run_batches(runner, [paths[i] for i in todo], pre,
                                  precision=precision, pin_memory=device.type == "cuda",
                                  batch_size=batch_size, workers=workers, progress=advance,
                                  decode_ahead=runner.overlap_decoding)
            for positions, outputs, errors in batches:
                writer.add([todo[p] for p in positions], outputs, errors, paths, hashes)
        vectors.update(writer.close())
        stats.seconds = time.perf_counter() - start
        stats.embedded = len(todo)
    return (None if stream else np.stack([vectors[h] for h in hashes])), stats


def embedding_runner(spec: GraphSpec, engine: str, paths: Sequence[Path], hashes: Sequence[str], *,
                     device: torch.device, precision: str, cache_dir: Path | None, stream: bool,
                     check_images: int) -> tuple[TorchEngine | GraphEngine, dict, list[int],
                                                 EmbeddingStats]:
    """What embeds the files (see _runner), checked against torch fp32 on the first `check_images`
    files it has to embed: (runner, the cached vectors by hash (with `stream`, only which are
    there), the positions still to embed, stats so far: cache, cached count, engine, parity)."""
    runner, cache, known, todo = _runner(spec, engine, device, precision, cache_dir, hashes, stream)
    stats = EmbeddingStats(engine=runner.report() if isinstance(runner, GraphEngine)
                           else {"name": "torch", "precision": precision})
    if todo and isinstance(runner, GraphEngine):
        runner.check(_decoded([paths[i] for i in todo[:check_images]], spec.pre))
        stats.engine, stats.check_embeddings = runner.report(), runner.check_outputs
        if runner.fallback:  # torch computes them now: its cache, not the graph's
            cache, known, todo = _still_to_embed(runner, spec, device, precision, cache_dir, hashes,
                                                 stream)
    stats.cached, stats.cache = len(hashes) - len(todo), cache
    return runner, known, todo, stats


def _runner(spec: GraphSpec, engine: str, device: torch.device, precision: str,
            cache_dir: Path | None, hashes: Sequence[str], stream: bool):
    """What embeds (graphs.compile_engine), with _still_to_embed's cache, vectors and positions.
    `auto` takes a graph already built, or else torch, and builds one only for the images torch has
    not cached yet: switching engines would embed them all again (the cache is per engine), and
    building pays only over graphs.AUTO_BUILD_IMAGES images."""
    runner = compile_engine(spec, engine, device=device, precision=precision, cache_dir=cache_dir)
    cache, known, todo = _still_to_embed(runner, spec, device, precision, cache_dir, hashes, stream)
    if engine == "auto" and not isinstance(runner, GraphEngine) and len(todo) >= AUTO_BUILD_IMAGES:
        runner = compile_engine(spec, engine, device=device, precision=precision,
                                cache_dir=cache_dir, images=len(todo))
        if isinstance(runner, GraphEngine):
            cache, known, todo = _still_to_embed(runner, spec, device, precision, cache_dir, hashes,
                                                 stream)
    return runner, cache, known, todo


def _still_to_embed(runner, spec: GraphSpec, device: torch.device, precision: str,
                    cache_dir: Path | None, hashes: Sequence[str], stream: bool):
    """The cache of what `runner` computes (engine_label), the usable vectors of `hashes` in it by
    hash (with `stream`, only which are there, from the shards' headers; checked when read back),
    and the positions in `hashes` it has still to embed."""
    if not cache_dir:
        return None, {}, list(range(len(hashes)))
    cache = EmbeddingCache.for_model(cache_dir, spec.module, spec.pre, device,
                                     engine_label(runner, precision))
    known = cache.index() if stream else cached_vectors(cache, spec.module, spec.pre, hashes)
    return cache, known, missing(known, hashes)


def cached_vectors(cache: EmbeddingCache | None, module: torch.nn.Module, pre: Preprocessing,
                   hashes: Sequence[str]) -> dict[str, np.ndarray]:
    """The usable cached vectors of `hashes` by hash (none without a cache)."""
    if cache is None:
        return {}
    loaded = cache.load()  # every image ever embedded by this model: keep those asked for
    return _usable({h: loaded[h] for h in hashes if h in loaded}, feature_shape(module, pre))


def missing(known, hashes: Sequence[str]) -> list[int]:
    """The positions in `hashes` that have no vector yet: the files to embed."""
    return [i for i, h in enumerate(hashes) if h not in known]


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


def _decoded(paths: Sequence[Path], pre: Preprocessing) -> torch.Tensor:
    """The readable ones of `paths` as one uint8 batch, decoded as every batch is (the parity
    check's images)."""
    images = [image for _, batch, errors in run_batches(lambda batch, _: batch, list(paths), pre,
                                                         precision="32", batch_size=len(paths),
                                                         workers=0)
              for image, error in zip(batch, errors) if not error]
    return torch.stack(images) if images else torch.zeros(1, *pre.input_size, dtype=torch.uint8)
