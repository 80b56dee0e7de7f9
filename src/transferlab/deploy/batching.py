"""Micro-batching: single images from concurrent requests gathered into one model call."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Sequence

from starlette.concurrency import run_in_threadpool


class MicroBatcher:
    """Calls `run_batch(items) -> results` (one result per item, in order) through `run_in_thread`
    (the shared worker pool unless given) on up to `max_batch` items submitted by concurrent
    callers.

    One batch runs at a time; whatever is submitted meanwhile forms the next one, so batches grow
    with the load without delaying a lone request. `window_ms` > 0 also waits that long after the
    first item of a batch for others to join. If `run_batch` raises, every caller in that batch gets
    the exception, and the batcher carries on with the next batch.

    Batches hold 1, 2, 4, 8, ... items: of 13 waiting, 8 run and 5 start the next batch, which
    newcomers join. A network on the CPU keeps memory for each batch shape it has seen (oneDNN's
    kernels, and a heap fragmented by activations of every size). With every size from 1 to 32, the
    server of tests/robustness/test_service_load.py grew by 72-81 MB in 500 requests after a
    200-request warm-up and was still growing after 3,000; one serving EfficientNet-Lite0 grew by
    350-550 MB in 2,400 requests, still growing. With six sizes both level off within about 1,000
    requests, 100 MB and 300-700 MB lower. Splitting each batch into power-of-two parts instead
    (13 = 8 + 4 + 1) cost a quarter of the requests/s of 8 one-image clients on Lite0; carrying the
    rest over does not.
    """

    def __init__(self, run_batch: Callable[[list], Sequence], max_batch: int = 32,
                 window_ms: float = 0.0, run_in_thread: Callable[..., Awaitable] = run_in_threadpool):
        self.run_batch, self.run_in_thread = run_batch, run_in_thread
        self.max_batch = max_batch
        self.window_s = window_ms / 1000
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start collecting; call from the event loop that will submit (the app's lifespan)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        queued = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        _fail(queued, RuntimeError("the service is shutting down"))
        self._task = None

    async def submit(self, item: Any) -> Any:
        """The result of `item`, computed in some batch."""
        if self._task is None or self._task.done():
            raise RuntimeError("MicroBatcher is not running: call start() first (the app's "
                               "lifespan does, e.g. `with TestClient(app)`)")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _loop(self) -> None:
        carried: list = []  # the items left over from the last batch, the first of the next
        while True:
            pending = carried or [await self._queue.get()]
            if self.window_s and not carried:
                await asyncio.sleep(self.window_s)
            while len(pending) < self.max_batch and not self._queue.empty():
                pending.append(self._queue.get_nowait())
            pending = [(item, future) for item, future in pending if not future.done()]  # gone
            size = 1 << len(pending).bit_length() - 1 if pending else 0  # a power of two, see above
            pending, carried = pending[:size], pending[size:]
            if not pending:
                continue
            try:
                results = await self.run_in_thread(self.run_batch, [item for item, _ in pending])
            except asyncio.CancelledError:
                _fail(pending + carried, RuntimeError("the service is shutting down"))
                raise
            except Exception as error:  # noqa: BLE001 - handed to the callers, who report it
                _fail(pending, error)
                continue
            for (_, future), result in zip(pending, results):
                if not future.done():
                    future.set_result(result)


def _fail(pending: list, error: BaseException) -> None:
    for _, future in pending:
        if not future.done():
            future.set_exception(error)
