"""extract's embedding spread over processes and machines: Lightning's predict loop under DDP.

Each rank embeds its share of the files missing from the embedding cache (Lightning gives the
predict loop an unrepeated distributed sampler: no padding duplicates) with the engine the
one-process path would use (inference.embeddings.embedding_runner: with auto on the CPU, the
OpenVINO graph, which the main process builds before it starts the others, and they load), and
stores the vectors in the shared cache (shards are written atomically under unique names, so
concurrent writers are safe). All ranks then wait for each other; the main process reads every
vector back from the cache. The cache is therefore required, and with several machines it must be
on a file system they share.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import Dataset

from ..data.loaders import ImageDataset, make_loader
from ..data.transforms import Preprocessing
from ..devices import resolve_precision
from ..inference.batches import progress_bar
from ..inference.embeddings import EmbeddingCache, EmbeddingStats, ShardWriter, embedding_runner
from ..inference.engines import Engine, TorchEngine
from ..inference.graphs import FEATURES, GraphEngine, GraphSpec, compile_engine, engine_label
from ..process import scoped_environment
from .trainer import Distribution, _quiet_lightning, is_main_process

log = logging.getLogger(__name__)


class PositionedImages(Dataset):
    """(position in the file list, uint8 CHW image, error) per file: the position says which file a
    vector belongs to whichever rank's share of the list it came in."""

    def __init__(self, images: ImageDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, str]:
        image, _, error = self.images[position]
        return position, image, error


class CacheFiller(L.LightningModule):
    """A predict loop's module that runs an engine (made for the device Lightning gives this rank)
    on each batch and stores the vectors in the embedding cache; nothing is returned to Lightning,
    so no rank holds the embeddings of its whole share."""

    def __init__(self, make_engine: Callable[[torch.device], Engine], precision: str,
                 cache: EmbeddingCache, label: str, paths: Sequence[Path], hashes: Sequence[str],
                 show_progress: bool):
        super().__init__()
        self.make_engine, self.precision = make_engine, precision
        self.cache, self.label = cache, label  # label: engine_label of what the cache holds
        self.paths, self.hashes = list(paths), list(hashes)
        self.show_progress = show_progress
        self.engine: Engine | None = None
        self.writer: ShardWriter | None = None
        self.progress = contextlib.ExitStack()
        self.advance = None

    def on_predict_start(self) -> None:
        self.engine = self.make_engine(self.device)
        self.writer = ShardWriter(self.cache, keep=False)
        if self.trainer.is_global_zero:  # one bar (or log line per tenth) for the main rank's share
            share = len(range(self.trainer.global_rank, len(self.paths), self.trainer.world_size))
            self.advance = self.progress.enter_context(progress_bar(
                f"embedding (1 of {self.trainer.world_size} processes)", share, self.show_progress))

    def predict_step(self, batch, batch_idx: int) -> int:
        """Cache the batch's vectors; the count returned is dropped (return_predictions=False)."""
        positions, images, errors = batch
        if self.engine is not None:
            outputs = self.engine(images, self.precision)
            if engine_label(self.engine, self.precision) != self.label:
                log.warning("process %d: its %s graph differs from torch, so it stores nothing; "
                            "the main process embeds its share after the others",
                            self.global_rank, self.label)
                self.engine = None
        if self.advance:
            self.advance(len(images))
        if self.engine is None:  # torch answered for the graph: not vectors for this cache
            return 0
        readable = [i for i, error in enumerate(errors) if not error]
        for i, error in enumerate(errors):
            if error:  # left out of the cache: the main process meets it again and names it
                log.warning("%s: unreadable (%s)", self.paths[int(positions[i])], error)
        self.writer.add([int(positions[i]) for i in readable], outputs[readable],
                        ["" for _ in readable], self.paths, self.hashes)
        return len(images)

    def teardown(self, stage: str) -> None:
        """Also runs when this rank's share is empty (the loop then skips its hooks): every rank
        saves what it has, then all wait until the cache holds every rank's vectors."""
        if self.writer:
            self.writer.close()
        self.progress.close()
        self.trainer.strategy.barrier("embeddings cached")


def embed_into_cache(module: torch.nn.Module, paths: Sequence[Path], hashes: Sequence[str],
                     pre: Preprocessing, *, cache_dir: Path, distribution: Distribution,
                     batch_size: int = 32, workers: int | None = None,
                     device: torch.device | str = "cpu", precision: str = "auto",
                     engine: str = "auto", show_progress: bool = True) -> EmbeddingStats | None:
    """Embed the files whose hash is not in the cache under `cache_dir` of `module` run by `engine`
    (as embed_files chooses and checks it), spread over the processes of `distribution`; then the
    cache holds them all. Returns what was embedded in the main process, None in the others.

    Run the same way (same files, same settings) by every process: Lightning's "ddp" launcher
    starts the other processes of this machine by running the same command again; on other
    machines the same command is started with their NODE_RANK (Lightning's multi-node set-up)."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    spec = GraphSpec(module, pre, (FEATURES,))
    # Every process chooses (and checks) the same way before the predict loop joins them; the main
    # process of each machine does it before it starts the others, which then find its graph cached.
    runner, _, todo, stats = embedding_runner(spec, engine, paths, hashes, device=device,
                                              precision=precision, cache_dir=cache_dir,
                                              stream=True, check_images=batch_size)
    # Only the main process of a one-machine run may skip: it has not started the others yet.
    if not todo and is_main_process() and distribution.num_nodes == 1:
        return stats
    started = time.perf_counter()
    dataset = PositionedImages(ImageDataset([paths[i] for i in todo], pre, on_error="report"))
    make_engine = functools.partial(_rank_engine, runner, spec, precision, cache_dir)
    filler = CacheFiller(make_engine, precision, stats.cache, engine_label(runner, precision),
                         [paths[i] for i in todo], [hashes[i] for i in todo], show_progress)
    # The launcher sets torch's threads (cores // processes per machine) and OMP_NUM_THREADS in
    # this process too: put both back for what runs after the embedding.
    threads = torch.get_num_threads()
    with scoped_environment(), _quiet_lightning():
        trainer = L.Trainer(accelerator=distribution.accelerator, devices=distribution.devices,
                            num_nodes=distribution.num_nodes, strategy=distribution.strategy,
                            precision="32-true",  # the engine applies `precision` itself
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        loader = make_loader(dataset, batch_size=batch_size, workers=workers,
                             pin_memory=device.type == "cuda")
        trainer.predict(filler, dataloaders=loader, return_predictions=False)
    torch.set_num_threads(threads)
    if not (trainer.is_global_zero and is_main_process()):
        return None
    stats.embedded, stats.seconds = len(todo), time.perf_counter() - started
    return stats


def _rank_engine(runner: TorchEngine | GraphEngine, spec: GraphSpec, precision: str,
                 cache_dir: Path, device: torch.device) -> Engine:
    """The engine of a rank on `device`: the checked `runner` where it runs there (the CPU), else
    the same engine made for that device (a GPU rank's own), checked on its first batch."""
    if device == runner.device:
        return runner
    return compile_engine(spec, runner.running if isinstance(runner, GraphEngine) else "torch",
                          device=device, precision=precision, cache_dir=cache_dir)
