"""The HTTP service: in-process (TestClient), as a real Uvicorn process on a loopback port, and
through its page in headless Chromium."""

import asyncio
import inspect
import io
import os
import shutil
import struct
import threading
import time
import zlib

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from transferlab import load_model
from transferlab.deploy.batching import MicroBatcher
from transferlab.errors import BundleError, ConfigError
from transferlab.deploy.export import export_onnx
from transferlab.deploy import serve
from transferlab.deploy.serve import create_app
from transferlab.inference.predictor import Predictor

from conftest import running_server

# Small limits, so that refusing an oversize upload or a bomb costs the tests nothing.
LIMITS = {"max_upload_bytes": 2**19, "max_pixels": 1_000_000, "max_files": 4}


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def red_jpeg() -> bytes:
    return encoded(Image.new("RGB", (64, 48), (200, 30, 30)))


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb's header without the data
    (decoding would fail on the missing pixels, so only a check of the header refuses it as a bomb)."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def files(*items):
    return [("file", item) for item in items]


# (what is wrong, httpx request arguments, status, error code, file named in the error)
BAD_REQUESTS = [
    ("empty body", {}, 400, "empty_body", None),
    ("empty file", {"files": files(("empty.jpg", b"", "image/jpeg"))}, 400, "empty_file", "empty.jpg"),
    ("no file field", {"files": [("image", ("a.jpg", red_jpeg(), "image/jpeg"))]}, 400, "no_file", None),
    ("too many files", {"files": files(*[(f"{i}.jpg", red_jpeg()) for i in range(5)])}, 400,
     "too_many_files", None),
    ("malformed multipart", {"content": b"--x\r\nnot a part", "headers": {
        "content-type": "multipart/form-data"}}, 400, "malformed_multipart", None),
    ("oversize upload", {"files": files(("big.jpg", os.urandom(2**19), "image/jpeg"))}, 413,
     "too_large", None),
    ("raw image, not multipart", {"content": red_jpeg(), "headers": {"content-type": "image/jpeg"}},
     415, "not_multipart", None),
    ("text file named .jpg", {"files": files(("notes.jpg", b"just some text\n" * 20, "image/jpeg"))},
     415, "not_an_image", "notes.jpg"),
    ("truncated jpeg", {"files": files(("cut.jpg", red_jpeg()[:300], "image/jpeg"))}, 415,
     "not_an_image", "cut.jpg"),
    ("bomb: real 9-megapixel png", {"files": files(("bomb.png", encoded(Image.new("L", (3000, 3000)),
                                                                         "PNG")))},
     422, "too_many_pixels", "bomb.png"),
    ("bomb: header claims 400 megapixels", {"files": files(("huge.png", png_claiming(20_000, 20_000)))},
     422, "too_many_pixels", "huge.png"),
    ("top_k of 0", {"params": {"top_k": 0}, "files": files(("a.jpg", red_jpeg()))}, 422,
     "invalid_request", None),
]


def check_refused(response: httpx.Response, status: int, code: str, file: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["code"], error["file"]) == (code, file)
    assert len(error["message"]) > 10


def check_prediction(answer: dict, classes: list[str], names: list[str], top_k: int) -> None:
    assert [p["file"] for p in answer["predictions"]] == names
    for prediction in answer["predictions"]:
        ranked = prediction["top_k"]
        assert len(ranked) == top_k and {r["label"] for r in ranked} <= set(classes)
        probabilities = [r["probability"] for r in ranked]
        assert probabilities == sorted(probabilities, reverse=True)
        if top_k == len(classes):
            assert sum(probabilities) == pytest.approx(1, abs=1e-4)


# ---------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(create_app(tiny_run.model_dir, **LIMITS)) as client:  # `with`: the lifespan runs
        yield client


@pytest.fixture(scope="module")
def classes(tiny_run):
    return load_model(tiny_run.model_dir).classes


def test_a_good_image_gets_its_top_classes(client, classes, tiny_run):
    answer = client.post("/predict", files=files(("red.jpg", red_jpeg(), "image/jpeg"))).json()
    check_prediction(answer, classes, ["red.jpg"], top_k=len(classes))  # default 3, capped at 2
    assert answer["model"]["backbone"] == "test_efficientnet" and answer["model"]["backend"] == "torch"


def test_the_service_predicts_what_the_library_predicts_from_a_file(client, classes, tiny_run,
                                                                     image_folder):
    path = sorted(image_folder.rglob("*.png"))[0]
    answer = client.post("/predict", files=files((path.name, path.read_bytes())),
                         params={"top_k": len(classes)}).json()
    served = {r["label"]: r["probability"] for r in answer["predictions"][0]["top_k"]}
    proba, errors = load_model(tiny_run.model_dir).predict_proba([path])
    assert errors == [""]
    assert [served[name] for name in classes] == pytest.approx(proba[0].tolist(), abs=1e-3)


def test_several_files_in_one_request_keep_their_order(client, classes, image_folder):
    paths = sorted(image_folder.rglob("*.*"))[:3]
    answer = client.post("/predict", files=files(*[(p.name, p.read_bytes()) for p in paths]),
                         params={"top_k": 1})
    assert answer.status_code == 200
    check_prediction(answer.json(), classes, [p.name for p in paths], top_k=1)


@pytest.mark.parametrize("what, request_args, status, code, file", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx(client, what, request_args, status, code, file):
    check_refused(client.post("/predict", **request_args), status, code, file)


def test_a_bad_file_among_good_ones_is_named(client):
    response = client.post("/predict", files=files(("good.jpg", red_jpeg()), ("bad.jpg", b"text")))
    check_refused(response, 415, "not_an_image", "bad.jpg")


def test_health_model_page_and_docs(client, classes):
    assert client.get("/health").json() == {"status": "ok"}
    model = client.get("/model").json()
    assert model["classes"] == classes and model["backbone"] == "test_efficientnet"
    assert model["input_size"] == model["preprocessing"]["input_size"]
    assert model["training"]["strategy"] == "extract" and "test_accuracy" in model["training"]
    assert {k: model["limits"][k] for k in LIMITS} == LIMITS
    assert client.app.state.classifier.predictor.classes == classes  # how benchmarks reach it
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="result"' in page.text and 'type="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text, "the page must be self-contained"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert client.get("/docs").status_code == 200
    predict = client.get("/openapi.json").json()["paths"]["/predict"]["post"]
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["file"]["items"]["format"] == "binary"
    assert {"200", "400", "413", "415", "422"} <= set(predict["responses"])


def test_every_route_of_ours_runs_on_the_event_loop(client):
    """A plain function would run in FastAPI's shared pool of threads (see deploy.threads)."""
    ours = [route for route in client.app.routes
            if getattr(route, "path", None) in ("/", "/health", "/model", "/predict")]
    assert len(ours) == 4
    assert all(inspect.iscoroutinefunction(route.endpoint) for route in ours)


def test_unknown_routes_answer_in_the_same_error_shape(client):
    check_refused(client.get("/nowhere"), 404, "not_found", None)
    check_refused(client.get("/predict"), 405, "method_not_allowed", None)


def test_the_onnx_backend_serves_what_torch_serves(tiny_run, classes, tmp_path):
    bundle = shutil.copytree(tiny_run.model_dir, tmp_path / "model")
    with pytest.raises(BundleError, match="transferlab export"):
        create_app(bundle, backend="onnx")
    export_onnx(bundle)
    upload = files(("red.jpg", red_jpeg()))
    answers = {}
    for backend in ("torch", "onnx"):
        with TestClient(create_app(bundle, backend=backend, max_batch=1)) as client:
            answers[backend] = client.post("/predict", files=upload, params={"top_k": 2}).json()
            assert client.get("/model").json()["backend"] == backend
    assert answers["onnx"]["model"]["backend"] == "onnx"
    torch_top, onnx_top = (answers[b]["predictions"][0]["top_k"] for b in ("torch", "onnx"))
    assert [r["label"] for r in onnx_top] == [r["label"] for r in torch_top]
    assert [r["probability"] for r in onnx_top] == pytest.approx(
        [r["probability"] for r in torch_top], abs=2e-2)  # torch ran in bf16 where the CPU has it


def test_a_bad_bundle_or_setting_fails_when_the_app_is_made(tiny_run, tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        create_app(tmp_path)
    for setting in ({"max_files": 0}, {"max_upload_bytes": -1}, {"top_k": 0}, {"max_batch": 0}):
        with pytest.raises(ConfigError, match=next(iter(setting))):
            create_app(tiny_run.model_dir, **setting)


# ---------------------------------------------------------------------------- micro-batching


def test_the_batcher_gathers_concurrent_items_and_survives_a_failing_batch():
    sizes = []

    def run_batch(items):
        sizes.append(len(items))
        if "boom" in items:
            raise ValueError("boom")
        return [item * 2 for item in items]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=4)
        await batcher.start()
        assert await asyncio.gather(*(batcher.submit(i) for i in range(11))) == [
            2 * i for i in range(11)]
        with pytest.raises(ValueError, match="boom"):
            await batcher.submit("boom")
        assert await batcher.submit(21) == 42  # the next batch runs as usual
        await batcher.stop()

    asyncio.run(scenario())
    assert sum(sizes[:-2]) == 11 and max(sizes) <= 4 and len(sizes) - 2 < 11  # batched, capped
    assert all(size & (size - 1) == 0 for size in sizes), sizes  # 1, 2, 4: few shapes, flat memory


def test_the_batcher_starts_each_batch_without_waiting_for_the_event_loop():
    """Batches follow one another in the batcher's thread while the loop is busy elsewhere (it
    parses and answers requests meanwhile); only the results wait for the loop."""
    started = []

    def run_batch(items):
        started.append(items)
        time.sleep(0.02)
        return items

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=1)
        await batcher.start()
        answers = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0)  # the three are submitted
        time.sleep(0.5)  # the event loop busy: no batch may wait for it
        assert started == [[0], [1], [2]]
        assert await asyncio.gather(*answers) == [0, 1, 2]
        await batcher.stop()
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(3)

    asyncio.run(scenario())


def test_a_stopped_batcher_fails_what_waits_and_starts_again_with_a_thread_of_its_own():
    gate, calls = threading.Semaphore(0), []

    def run_batch(items):
        calls.append(items)
        assert gate.acquire(timeout=5)
        return items

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=4)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.sleep(0.05)  # running, held at the gate
        a, b, c = (asyncio.ensure_future(batcher.submit(x)) for x in "abc")
        await asyncio.sleep(0.05)
        gate.release()
        assert await first == "first"
        await asyncio.sleep(0.05)  # [a, b] running (a power of two), c carried over
        await batcher.stop()
        await batcher.start()  # while the old thread still runs [a, b]
        d = asyncio.ensure_future(batcher.submit("d"))
        gate.release()
        gate.release()
        assert (await a, await b, await d) == ("a", "b", "d")
        with pytest.raises(RuntimeError, match="shutting down"):
            await c  # carried by the stopped thread: failed, not lost
        await batcher.stop()

    asyncio.run(scenario())
    assert calls == [["first"], ["a", "b"], ["d"]]


def colored_jpeg(index: int) -> bytes:
    return encoded(Image.new("RGB", (40 + index, 32), (15 * index % 256, 90, 255 - 20 * index % 256)))


@pytest.mark.parametrize("inline_parse_bytes", [serve.INLINE_PARSE_BYTES, 0])
def test_concurrent_requests_each_get_their_own_answer_and_their_own_errors(
        tiny_run, classes, monkeypatch, inline_parse_bytes):
    """Many one-image requests at once, batched across requests: each answer is the one its image
    gets alone, and a bad file fails its own request only (bodies parsed on the event loop, and
    all in the parsing thread)."""
    monkeypatch.setattr(serve, "INLINE_PARSE_BYTES", inline_parse_bytes)
    images = [colored_jpeg(i) for i in range(12)]
    bad = {3: b"just some text\n" * 20, 8: colored_jpeg(8)[:200]}
    batch_sizes = []
    score_batch = Predictor.score_batch

    def recorded(self, batch, *args, **kwargs):
        batch_sizes.append(len(batch))
        return score_batch(self, batch, *args, **kwargs)

    monkeypatch.setattr(Predictor, "score_batch", recorded)
    app = create_app(tiny_run.model_dir, top_k=len(classes))

    async def send_all():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
                return await asyncio.gather(*(client.post("/predict", files=files(
                    (f"{i}.jpg", bad.get(i, image), "image/jpeg"))) for i, image in enumerate(images)))

    responses = asyncio.run(send_all())
    served_sizes = list(batch_sizes)
    predictor = load_model(tiny_run.model_dir)
    alone = predictor.predict_batch(torch.stack([predictor.decode(io.BytesIO(image))
                                                 for image in images])).numpy()
    for i, response in enumerate(responses):
        if i in bad:
            check_refused(response, 415, "not_an_image", f"{i}.jpg")
            continue
        assert response.status_code == 200, response.text
        (answer,) = response.json()["predictions"]
        assert answer["file"] == f"{i}.jpg"
        served = {r["label"]: r["probability"] for r in answer["top_k"]}
        assert [served[name] for name in classes] == pytest.approx(alone[i].tolist(), abs=1e-4)
    assert sum(served_sizes) == len(images) - len(bad)  # every good image once, none of the bad


# ---------------------------------------------------------------------------- a real Uvicorn process


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """`transferlab serve` in its own process on a free loopback port, stopped with SIGTERM:
    (url, its log file)."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(tiny_run.model_dir, log, "--max-upload-mb", "0.5", "--max-pixels",
                        str(LIMITS["max_pixels"]), "--max-files", str(LIMITS["max_files"])) as (url, _):
        yield url, log


@pytest.fixture(scope="module")
def server(served):
    return served[0]


# Bad input, chunked bodies, clients that leave and concurrent requests on the real server, all at
# once: tests/robustness/test_service_load.py.


def test_the_real_server_answers_a_good_image(served, classes):
    url, log = served
    response = httpx.post(f"{url}/predict", files=files(("red.jpg", red_jpeg(), "image/jpeg")))
    assert response.status_code == 200
    check_prediction(response.json(), classes, ["red.jpg"], top_k=len(classes))
    text = log.read_text(errors="replace")
    assert "Uvicorn running on" in text  # startup is logged, requests are not (--access-log)
    assert "POST /predict" not in text


# ---------------------------------------------------------------------------- the page, in Chromium


@pytest.mark.browser
def test_a_person_uploads_an_image_through_the_page(browser, server, classes, image_folder,
                                                   tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(375, 812)  # a phone
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(f"{server}/")
    WebDriverWait(browser, 20).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "model"), "test_efficientnet"))
    image = sorted(image_folder.rglob("*.jpg"))[0]
    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image))
    WebDriverWait(browser, 30).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#result .label")))
    browser.save_screenshot(str(tmp_path / "serve-page.png"))  # for a person debugging, never the repo
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#result .label")]
    assert labels and labels[0] in classes and set(labels) <= set(classes)
    assert image.name in browser.find_element(By.ID, "result").text
    bars = browser.execute_script("return [...document.querySelectorAll('#result .fill')]"
                                  ".map(e => parseFloat(e.style.width))")
    assert len(bars) == len(labels) and bars == sorted(bars, reverse=True) and 0 < bars[0] <= 100
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], "the page must not scroll sideways on a phone"
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == []


@pytest.mark.browser
def test_the_page_takes_a_dropped_image_and_shows_errors(browser, server, classes, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    browser.execute_script("""  // what a drop of a picture from the desktop delivers
        const canvas = Object.assign(document.createElement("canvas"), {width: 40, height: 30});
        canvas.getContext("2d").fillRect(0, 0, 20, 30);
        canvas.toBlob(blob => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([blob], "dropped.png", {type: "image/png"}));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }, "image/png");""")
    WebDriverWait(browser, 30).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "result"), "dropped.png"))
    assert browser.find_element(By.CSS_SELECTOR, "#result .label").text in classes

    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(text))
    WebDriverWait(browser, 30).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "status"), "not an image"))
    assert "notes.jpg" in browser.find_element(By.ID, "status").text
    assert browser.find_elements(By.CSS_SELECTOR, "#result .label") == []
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")


@pytest.mark.browser
def test_the_api_docs_render_offline(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")
    browser.get(f"{server}/docs")
    WebDriverWait(browser, 30).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".opblock")))
    paths = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
    assert "/predict" in paths and "/health" in paths
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == []


def test_serve_builds_autos_graph_before_it_answers(tiny_run, tmp_path, monkeypatch):
    """`serve` with --engine auto runs the fastest engine from its first request: a graph not
    cached yet is built before the service listens, once (the next start loads it); --engine
    torch builds nothing."""
    import math

    from transferlab.inference.graphs import choose_engine

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    expected = choose_engine("auto", torch.device("cpu"), images=math.inf)
    for start in ("first", "second"):
        log = tmp_path / f"{start}.log"
        with running_server(tiny_run.model_dir, log, "--engine", "auto") as (url, _):
            engine = httpx.get(f"{url}/model").json()["engine"]
        assert engine.get("chosen", engine["name"]) == expected
        assert ("building the" in log.read_text()) == (start == "first" and expected != "torch")
    with running_server(tiny_run.model_dir, tmp_path / "torch.log", "--engine", "torch") as (url, _):
        assert httpx.get(f"{url}/model").json()["engine"]["name"] == "torch"
    assert "building the" not in (tmp_path / "torch.log").read_text()


def test_a_graph_that_cannot_be_built_leaves_the_service_on_torch(tiny_run, tmp_path, monkeypatch,
                                                                  caplog):
    """The build before listening may fail (an exporter that cannot convert a network, a full
    disk): the service still starts, on torch, with one warning saying why, and answers."""
    import math

    from transferlab.inference import graphs

    if graphs.choose_engine("auto", torch.device("cpu"), images=math.inf) == "torch":
        pytest.skip("no graph engine (onnxruntime, openvino) installed: auto builds nothing")

    def broken(self, engine, precision):
        raise OSError("No space left on device")

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(graphs.GraphCache, "_build", broken)
    with caplog.at_level("WARNING", logger="transferlab"):
        app = create_app(tiny_run.model_dir, engine="auto", build_engine=True)
    assert "could not be built or loaded (No space left on device); torch runs instead" in caplog.text
    with TestClient(app) as client:
        assert client.get("/model").json()["engine"]["name"] == "torch"
        answer = client.post("/predict", files={"file": ("a.jpg", red_jpeg(), "image/jpeg")})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
