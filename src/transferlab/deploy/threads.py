"""A fixed set of named threads for the service's blocking work, instead of the shared pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable


class Threads:
    """`count` threads that run one kind of blocking work (parsing bodies, decoding images, the
    network) off the event loop.

    Fixed threads, not the framework's shared worker pool of up to 40: glibc gives each thread that
    allocates its own heap arena, and memory freed in one arena is not reused by another. Parsing on
    the shared pool made the load test's peak RSS grow 43-71 MB in 500 requests after the warm-up;
    with parsing on one thread but the network still on the pool, a CI run grew 37 MB. The bound is
    32 (tests/robustness/test_service_load.py)."""

    def __init__(self, name: str, count: int = 1):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=count,
                                                          thread_name_prefix=name)

    async def run(self, function: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
