"""The service against its own engine: `transferlab serve` as a real Uvicorn process on a free
loopback port under one-image uploads from CLIENTS concurrent clients, for each backend, beside that
backend's engine alone on a batch of 32 of the same images, preprocessed (Predictor.score_batch: the
network, the temperature and softmax), in alternating rounds in the same run (median ratio).
Target: service images/s >= 0.8 x the engine's batch-32 images/s with 8 clients.

The clients share the machine's cores with the server, so they are as light as a client can be: one
keep-alive connection each, speaking HTTP/1.1 over asyncio streams with request bodies encoded once
before the clock starts. Their CPU time and the server's are reported as shares of the machine's
cores over the measured interval, so what the client took from the server is in the open.

Where the ratio goes (`fixed_work`): the same server with the bundle's network replaced by a
stand-in that answers its outputs on real images, recorded at start, after as long as the engine
takes at batch 32 but without using a core, so that batches form as they do in the service. Under
the same clients that gives the CPU the service spends on each image around its engine (HTTP,
multipart, decoding, batching, temperature, novelty, JSON). With the engine's own CPU per image at
batch 32 and at the batches the clients make, that bounds the ratio: engine CPU at 32 / (engine CPU
at the clients' batch + that fixed work), reached only if the service kept the cores as busy as
the engine alone does and the two shared them without loss.

    python benchmarks/bench_service.py MODEL_DIR [--backends torch,onnx] [--requests 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REQUESTS, CLIENTS, ENGINE_BATCH, ROUNDS = 400, 8, 32, 3
BOUNDARY = b"transferlab-bench-boundary"
ENGINE_SECONDS = 4.0  # each engine measurement runs this long, after a warm-up


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, *options: str, without_network: bool = False
                 ) -> tuple[subprocess.Popen, int]:
    """`transferlab serve MODEL_DIR *options` on a free port, or (without_network) this script's
    serve_without_network with the same options (and --network-ms-per-image)."""
    import httpx

    port = free_port()
    command = ([sys.executable, __file__, str(model_dir), "--without-network", "--port", str(port)]
               if without_network else
               [sys.executable, "-m", "transferlab.cli", "serve", str(model_dir), "--port", str(port)])
    process = subprocess.Popen([*command, *options], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, port
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"serve {model_dir} {' '.join(options)} did not start")


def describe(port: int) -> dict:
    """The service's GET /model."""
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/model", timeout=10).json()


def upload_request(port: int, name: str, image: bytes) -> bytes:
    """A whole POST /predict with one image, as bytes on the wire."""
    body = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="'
            + name.encode() + b'"\r\nContent-Type: image/jpeg\r\n\r\n' + image
            + b"\r\n--" + BOUNDARY + b"--\r\n")
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={BOUNDARY.decode()}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: bytes) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection; (status, body) of its answer."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), await reader.readexactly(int(headers["content-length"]))


async def load(port: int, requests: list[bytes], count: int, clients: int) -> dict:
    """`clients` concurrent clients sending `count` of `requests` in all, in turn; each answer is
    checked to hold one prediction."""
    latencies, errors, turns = [], 0, iter(range(count))

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for number in turns:
                started = time.perf_counter()
                status, body = await exchange(reader, writer, requests[number % len(requests)])
                latencies.append(time.perf_counter() - started)
                errors += status != 200 or len(json.loads(body)["predictions"]) != 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": count, "clients": clients, "seconds": round(seconds, 2),
            "images_per_s": round(count / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": errors}


def measured_load(server: psutil.Process, port: int, requests: list[bytes], count: int,
                  clients: int) -> dict:
    """load(), with the CPU time the client (this process) and the server took meanwhile, as
    shares of every core over the interval, and the server's per request."""
    client_before, server_before = time.process_time(), sum(server.cpu_times()[:2])
    result = asyncio.run(load(port, requests, count, clients))
    server_seconds = sum(server.cpu_times()[:2]) - server_before
    cores = psutil.cpu_count() * result["seconds"]
    result["client_cpu_share"] = round((time.process_time() - client_before) / cores, 3)
    result["server_cpu_share"] = round(server_seconds / cores, 3)
    result["server_cpu_ms_per_request"] = round(server_seconds * 1000 / count, 3)
    return result


class EngineAlone:
    """The backend's engine alone on batches of the images, decoded and preprocessed as the service
    does, through Predictor.score_batch (network, temperature, softmax). The engine is the one
    `serve` runs: with backend torch, auto's graph, built here if it is not cached yet (serve builds
    it too; without it a fresh bundle's engine was torch, against the service's graph)."""

    def __init__(self, model_dir: Path, backend: str, images: list[bytes]):
        import io
        import math

        from transferlab import load_model

        self.predictor = load_model(model_dir, backend=backend,
                                    images=math.inf if backend == "torch" else 0)
        self.decoded = [self.predictor.decode(io.BytesIO(image)) for image in images]

    def images_per_s(self, batch: int, seconds: float = ENGINE_SECONDS) -> float:
        return self.measure(batch, seconds)[0]

    def measure(self, batch: int, seconds: float = ENGINE_SECONDS) -> tuple[float, float]:
        """(images/s, this process's CPU ms per image) on batches of `batch`."""
        import torch

        stacked = torch.stack([self.decoded[i % len(self.decoded)] for i in range(batch)])
        for _ in range(3):
            self.predictor.score_batch(stacked)
        calls, started, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            self.predictor.score_batch(stacked)
            calls += 1
        images = calls * batch
        return (round(images / (time.perf_counter() - started), 1),
                round((time.process_time() - cpu) * 1000 / images, 3))


def compare(model_dir: Path, backend: str, images: list[bytes], count: int, clients: int,
            rounds: int = ROUNDS, *options: str) -> dict:
    """The engine alone at batch 32 and the service under `clients` clients, in `rounds`
    alternating rounds (engine, service, engine, ..., engine) with the server up throughout: this
    machine's speed drifts by 10-15% within minutes, so each round's ratio is taken against the mean
    of the engine measurements either side of it, and the median round is the result. The engine at
    batch `clients` (the most a batch can gather from clients sending one image at a time) is
    measured once, for reference."""
    engine = EngineAlone(model_dir, backend, images)
    process, port = start_server(model_dir, "--backend", backend, *options)
    try:
        requests = [upload_request(port, f"{i}.jpg", image) for i, image in enumerate(images)]
        server = psutil.Process(process.pid)
        asyncio.run(load(port, requests, 4 * clients, clients))  # warm-up: every batch size
        small = engine.images_per_s(clients)
        alone, served = [engine.images_per_s(ENGINE_BATCH)], []
        for _ in range(rounds):
            served.append(measured_load(server, port, requests, count // rounds, clients))
            alone.append(engine.images_per_s(ENGINE_BATCH))
        running = describe(port)["engine"]["name"]
    finally:
        stop(process)
    ratios = [round(result["images_per_s"] / ((before + after) / 2), 3)
              for result, before, after in zip(served, alone, alone[1:])]
    return {"engine": {"running": running, f"batch_{ENGINE_BATCH}_images_per_s": alone,
                       f"batch_{clients}_images_per_s": small},
            "service_rounds": served, "round_ratios": ratios,
            "service_over_engine_batch_32": float(np.median(ratios)),
            "fixed_work": fixed_work(model_dir, backend, engine, images, count // rounds, clients,
                                     served)}


def fixed_work(model_dir: Path, backend: str, engine: EngineAlone, images: list[bytes], count: int,
               clients: int, served: list[dict]) -> dict:
    """The service's CPU per image around its engine (serve_without_network under the same
    clients), the engine's own CPU per image at batch 32 and at the batch the clients make, and the
    ratio these allow (see the module's docstring) beside the one measured. The clients' batch is
    taken as half of them: while one half's images are in the engine, the other half are being
    sent, parsed and decoded (an instrumented run of 8 clients found every batch held 4)."""
    batch = max(1, clients // 2)
    (large_ips, large_ms), (small_ips, small_ms) = engine.measure(ENGINE_BATCH), engine.measure(batch)
    process, port = start_server(model_dir, "--backend", backend, "--network-ms-per-image",
                                 str(1000 / large_ips), without_network=True)
    try:
        requests = [upload_request(port, f"{i}.jpg", image) for i, image in enumerate(images)]
        server = psutil.Process(process.pid)
        asyncio.run(load(port, requests, 4 * clients, clients))
        stubbed = measured_load(server, port, requests, count, clients)
    finally:
        stop(process)
    fixed_ms = stubbed["server_cpu_ms_per_request"]  # one image per request
    return {"without_network": stubbed, "fixed_cpu_ms_per_image": fixed_ms,
            "engine_cpu_ms_per_image": {f"batch_{ENGINE_BATCH}": large_ms, f"batch_{batch}": small_ms},
            "engine_images_per_s": {f"batch_{ENGINE_BATCH}": large_ips, f"batch_{batch}": small_ips},
            "service_cpu_ms_per_image": [r["server_cpu_ms_per_request"] for r in served],
            "ratio_bound": round(large_ms / (small_ms + fixed_ms), 3)}


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def serve_without_network(model_dir: Path, port: int, backend: str, ms_per_image: float) -> None:
    """`serve MODEL_DIR --port PORT --backend BACKEND`, its app and server settings, with the
    bundle's network replaced by its outputs on a batch of real images, recorded at start, answered
    after `ms_per_image` per image of a batch, asleep: every request then costs the CPU of what the
    service does around its engine, in batches like the service's."""
    import torch
    import uvicorn

    from transferlab.deploy.export import run_val_images
    from transferlab.deploy.guards import default_allowed_hosts
    from transferlab.deploy.serve import create_app, server_options
    from transferlab.inference.engines import engine_precision

    app = create_app(model_dir, backend, build_engine=True,
                     allowed_hosts=default_allowed_hosts("127.0.0.1"))
    predictor = app.state.classifier.predictor
    images = torch.stack([predictor.decode(path) for path in
                          run_val_images(model_dir, limit=ENGINE_BATCH)[0]])
    recorded = predictor.outputs(images, engine_precision(predictor.engine, "auto"))

    def outputs(images: torch.Tensor, precision: str) -> tuple:
        time.sleep(len(images) * ms_per_image / 1000)
        return tuple(None if output is None else output[:len(images)] for output in recorded)

    predictor.outputs = outputs
    uvicorn.run(app, **server_options("127.0.0.1", port))


def service(model_dir: Path, requests: int = REQUESTS, clients: int = CLIENTS,
            backends: tuple[str, ...] = ("torch", "onnx"), rounds: int = ROUNDS) -> dict:
    """Every backend's engine and service (the `service` section of bench_deploy.py); the ONNX
    backend needs `transferlab export MODEL_DIR` first."""
    from transferlab.deploy.export import run_val_images

    images = [path.read_bytes() for path in run_val_images(model_dir, limit=32)[0]]
    results = {"machine": {"cores": psutil.cpu_count(), "load_average": os.getloadavg()},
               "backbone": json.loads((Path(model_dir) / "config.json").read_text())["backbone"],
               "target": f"service images/s with {clients} clients x 1 image >= 0.8 x the "
                         f"engine's batch-{ENGINE_BATCH} images/s"}
    for backend in backends:
        results[backend] = compare(model_dir, backend, images, requests, clients, rounds)
    results["load_average_after"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a bundle inside a run directory")
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--without-network", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--network-ms-per-image", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.without_network:  # the server fixed_work starts
        serve_without_network(args.model, args.port, args.backend, args.network_ms_per_image)
        return
    print(json.dumps(service(args.model, args.requests, args.clients,
                             tuple(args.backends.split(",")), args.rounds), indent=2))


if __name__ == "__main__":
    main()
