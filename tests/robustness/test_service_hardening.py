"""The service against hostile clients, round two: a script in a class name, a body of 200,000 tiny
parts, trickling bodies, connections that never send their headers, and a Host header from
somewhere else (DNS rebinding)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from transferlab.deploy import guards, serve, uploads
from transferlab.deploy.uploads import UploadError, read_body
from transferlab.errors import ConfigError

from conftest import running_server

SCRIPT = "<img src=x onerror=alert(document.domain)>"
BOUNDARY = "hardening"


def _form(parts: list[tuple[str, bytes]]) -> bytes:
    body = b"".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="a.png"'
                    f"\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture(scope="module")
def scripted_bundle(tiny_run, tmp_path_factory):
    """The tiny bundle with a class named like a script (config.json names the classes)."""
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path_factory.mktemp("xss") / "model")
    config = json.loads((bundle / "config.json").read_text())
    config["classes"] = [SCRIPT, "squares"]
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_class_names_never_reach_the_api_docs_and_every_page_has_a_policy(scripted_bundle):
    app = serve.create_app(scripted_bundle, max_batch=1)
    with TestClient(app) as client:
        assert client.get("/redoc").status_code == 404  # it ran the script: gone
        schema = client.get("/openapi.json").text
        assert "onerror" not in schema and "<img" not in schema
        for path in ("/", "/docs"):
            page = client.get(path)
            policy = page.headers["content-security-policy"]
            assert page.status_code == 200 and "default-src 'none'" in policy, path
            assert "unsafe-eval" not in policy and "http:" not in policy
        assert client.get("/model").json()["classes"][0] == SCRIPT  # as data, for the page to escape


def test_a_form_of_many_tiny_parts_is_refused_before_it_is_parsed(tiny_run, monkeypatch):
    threads = []
    real = uploads.parse_uploads

    def recording(*args):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(serve, "parse_uploads", recording)
    app = serve.create_app(tiny_run.model_dir, max_batch=1)
    part = len(_form([("x", b"")] * 2)) - len(_form([("x", b"")]))
    body = _form([("x", b"")] * ((10 * 2**20 - 100) // part))  # 10 MB of parts: 2.8 s of the loop
    assert len(body) <= 10 * 2**20
    with TestClient(app) as client:
        refused = client.post("/predict", content=body, headers=HEADERS)
        good = client.post("/predict", content=_form([("file", _png())]), headers=HEADERS)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_parts"
    assert good.status_code == 200
    assert threads == [False, False]  # parsed in a worker thread, never on the event loop


async def _trickle(data: bytes, every: float):
    for index in range(len(data)):
        await asyncio.sleep(every)
        yield data[index:index + 1]


def test_a_trickling_body_is_cut_off_by_the_rate_floor():
    async def scenario():
        quick = await read_body(_trickle(b"x" * 20, 0.001), 10**6, timeout=30, min_rate=1000,
                                grace=0.5)
        with pytest.raises(UploadError) as slow:
            await read_body(_trickle(b"y" * 1000, 0.05), 10**6, timeout=30, min_rate=1000, grace=0.2)
        return quick, slow.value

    quick, slow = asyncio.run(scenario())
    assert quick == b"x" * 20
    assert slow.status == 408 and slow.code == "body_timeout" and "bytes/s" in slow.message


def test_a_body_is_cut_off_at_its_deadline_however_fast_it_came_before():
    """The deadline holds across chunks: 20 quick bytes, then nothing, is refused once the
    overall timeout passes, naming it, with what had come; a body within its time is whole."""
    async def scenario():
        whole = await read_body(_trickle(b"z" * 5, 0.001), 10**6, timeout=5)
        started = time.monotonic()
        with pytest.raises(UploadError) as stalled:
            await read_body(_stalls_after(b"x" * 20), 10**6, timeout=0.3)
        return whole, stalled.value, time.monotonic() - started

    whole, stalled, seconds = asyncio.run(scenario())
    assert whole == b"z" * 5
    assert stalled.status == 408 and stalled.code == "body_timeout"
    assert "after 0.3 s (20 bytes came)" in stalled.message
    assert 0.3 <= seconds < 2


async def _stalls_after(data: bytes):
    yield data
    await asyncio.sleep(60)
    yield b"never"


def test_connections_that_never_send_headers_are_closed(tiny_run, tmp_path):
    with running_server(tiny_run.model_dir, tmp_path / "server.log", "--max-batch", "1") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never ends them
        garbled = socket.create_connection(("127.0.0.1", port))
        garbled.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn's own answer was plain text
        garbled.settimeout(10)
        answer = b""
        while chunk := garbled.recv(4096):  # the server closes the connection after answering
            answer += chunk
        answer = answer.decode("latin-1")
        assert answer.startswith("HTTP/1.1 400") and "application/json" in answer
        assert json.loads(answer.split("\r\n\r\n", 1)[1])["error"]["code"] == "malformed_request"
        time.sleep(guards.HEADER_TIMEOUT_S + 2)
        for sock in [*idle, partial]:
            sock.settimeout(5)
            assert sock.recv(1024) == b""  # closed by the server
            sock.close()
        assert httpx.get(f"{url}/health").status_code == 200


def test_only_the_configured_host_names_are_answered(tiny_run):
    app = serve.create_app(tiny_run.model_dir, max_batch=1,
                           allowed_hosts=guards.default_allowed_hosts("127.0.0.1"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"host": "localhost:8000"}).status_code == 200
        assert client.get("/health", headers={"host": "[::1]:8000"}).status_code == 200
        rebound = client.get("/model", headers={"host": "attacker.example"})
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    assert guards.default_allowed_hosts("0.0.0.0") is None  # every interface: name them yourself
    assert guards.default_allowed_hosts("192.168.1.5") == ["192.168.1.5"]


@pytest.mark.parametrize("window", [float("inf"), float("nan"), 5000.0])
def test_a_batch_window_that_would_hang_every_request_is_refused(tiny_run, window):
    with pytest.raises(ConfigError, match="batch_window_ms"):
        serve.create_app(tiny_run.model_dir, batch_window_ms=window)
