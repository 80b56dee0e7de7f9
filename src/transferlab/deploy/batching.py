"""Micro-batching: single images from concurrent requests gathered into one model call."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any, Callable, Sequence


SHUTTING_DOWN = "the service is shutting down"


class MicroBatcher:
    """Calls `run_batch(items) -> results` (one result per item, in order) in a thread of its own
    (named `name`) on up to `max_batch` items submitted by concurrent callers on the event loop.

    One batch runs at a time; whatever is submitted meanwhile forms the next one, so batches grow
    with the load without delaying a lone request. `window_ms` > 0 also waits that long after the
    first item of a batch for others to join. If `run_batch` raises, every caller in that batch gets
    the exception, and the batcher carries on with the next batch.

    The thread takes the next batch as soon as one ends, and hands the results to the event loop
    without waiting for it. Started from the loop instead, each batch waited for the loop to get
    round to it: under 8 one-image clients on Lite0 the engine stood idle a median 2.5 ms between
    batches of 4 (batches of 16.7 ms), 11% of the time.

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
                 window_ms: float = 0.0, name: str = "network"):
        self.run_batch, self.name = run_batch, name
        self.max_batch = max_batch
        self.window_s = window_ms / 1000
        self._waiting: collections.deque = collections.deque()  # (item, future), oldest first
        self._wake = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()  # the running thread's: a restart gets a new one

    async def start(self) -> None:
        """Start the thread; call from the event loop that will submit (the app's lifespan)."""
        self._loop, self._stopped = asyncio.get_running_loop(), threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(self._stopped,), name=self.name,
                                        daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Fail what waits. A batch already running finishes, and its callers get their results
        while the event loop runs; what its thread carried over to the next batch is failed."""
        if self._thread is None:
            return
        with self._wake:
            self._stopped.set()
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._wake.notify_all()
        _fail(waiting, RuntimeError(SHUTTING_DOWN))
        self._thread = None

    async def submit(self, item: Any) -> Any:
        """The result of `item`, computed in some batch."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("MicroBatcher is not running: call start() first (the app's "
                               "lifespan does, e.g. `with TestClient(app)`)")
        future = self._loop.create_future()
        with self._wake:
            self._waiting.append((item, future))
            self._wake.notify()
        return await future

    def _serve(self, stopped: threading.Event) -> None:
        carried: list = []  # the items left over from the last batch, the first of the next
        while not stopped.is_set():
            batch, carried = self._next_batch(carried, stopped)
            if batch:
                try:
                    outcome: tuple = (self.run_batch([item for item, _ in batch]), None)
                except Exception as error:  # noqa: BLE001 - handed to the callers, who report it
                    outcome = (None, error)
                self._hand_back(batch, *outcome)
        self._hand_back(carried, None, RuntimeError(SHUTTING_DOWN))

    def _hand_back(self, batch: list, results: Sequence | None, error: BaseException | None) -> None:
        if batch:
            try:
                self._loop.call_soon_threadsafe(_deliver, batch, results, error)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass

    def _next_batch(self, carried: list, stopped: threading.Event) -> tuple[list, list]:
        """(the next batch, the items carried over to the one after); no batch once stopped."""
        with self._wake:
            while not (carried or self._waiting or stopped.is_set()):
                self._wake.wait()
            if stopped.is_set():
                return [], carried
        if self.window_s and not carried:
            time.sleep(self.window_s)
        with self._wake:
            pending = carried
            while len(pending) < self.max_batch and self._waiting:
                pending.append(self._waiting.popleft())
        pending = [(item, future) for item, future in pending if not future.done()]  # gone
        size = 1 << len(pending).bit_length() - 1 if pending else 0  # a power of two, see above
        return pending[:size], pending[size:]


def _deliver(batch: list, results: Sequence | None, error: BaseException | None) -> None:
    """On the event loop: each caller's result, or the batch's error."""
    if error is not None:
        _fail(batch, error)
        return
    for (_, future), result in zip(batch, results):
        if not future.done():
            future.set_result(result)


def _fail(pending: list, error: BaseException) -> None:
    for _, future in pending:
        if not future.done():
            future.set_exception(error)
