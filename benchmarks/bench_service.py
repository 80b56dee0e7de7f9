"""The `service` section of bench_deploy.py: `transferlab serve` as a real Uvicorn process on a free
loopback port, under REQUESTS one-image uploads from CLIENTS concurrent clients, for each backend
with batching across requests on (the default) and off (--max-batch 1).

    python benchmarks/bench_service.py MODEL_DIR   # prints JSON on its own
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REQUESTS, CLIENTS = 200, 8


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, *options: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "transferlab.cli", "serve", str(model_dir),
                                "--port", str(port), *options],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"serve {model_dir} {' '.join(options)} did not start")


async def load(url: str, images: list[bytes], requests: int, clients: int) -> dict:
    """`clients` concurrent clients sending `requests` one-image uploads in all."""
    import httpx

    latencies, errors, next_request = [], 0, iter(range(requests))

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal errors
        for number in next_request:
            started = time.perf_counter()
            response = await session.post(f"{url}/predict", files={
                "file": (f"{number}.jpg", images[number % len(images)], "image/jpeg")})
            latencies.append(time.perf_counter() - started)
            errors += response.status_code != 200

    async with httpx.AsyncClient(timeout=60) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": requests, "clients": clients, "requests_per_s": round(requests / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": errors}


def service(model_dir: Path, requests: int = REQUESTS, clients: int = CLIENTS) -> dict:
    from transferlab.deploy.export import run_val_images

    images = [path.read_bytes() for path in run_val_images(model_dir)[0][:32]]
    results = {}
    for backend in ("torch", "onnx"):
        for batching, options in (("batching", ()), ("no_batching", ("--max-batch", "1"))):
            process, url = start_server(model_dir, "--backend", backend, *options)
            try:
                asyncio.run(load(url, images, 16, clients))  # warm-up
                results[f"{backend}_{batching}"] = asyncio.run(load(url, images, requests, clients))
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    return results


if __name__ == "__main__":
    print(json.dumps(service(Path(sys.argv[1])), indent=2))
