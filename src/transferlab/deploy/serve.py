"""The HTTP service of `transferlab serve`: a FastAPI app over one model bundle.

POST /predict takes images as multipart/form-data fields named `file` (README) and answers their
top classes; GET /health, GET /model, GET / (a page to try the model) and the OpenAPI docs at /docs.
Bad input always gets a 4xx JSON answer, {"error": {"code", "message", "file"}}, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
from dataclasses import asdict, dataclass
from http import HTTPStatus
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..data.decode import SUPPORTED_FORMATS
from ..inference.backends import load_model
from ..inference.graphs import engine_report
from ..inference.predictor import Scores
from ..options import check
from ..process import scoped_environment
from .batching import MicroBatcher
from .guards import (BUSY_WAIT_S, PAGE_POLICY, RETRY_AFTER_S, Guard, HeaderDeadlineProtocol,
                     ServiceBusy, Turns, default_allowed_hosts)
from .threads import Threads
from .uploads import FIELD, Upload, UploadError, decode_upload, parse_uploads, read_body

DEFAULT_TOP_K = 3
# Batching across requests, measured on the 2-core test machine (EfficientNet-Lite0, one worker,
# 8 concurrent clients x 100 one-image requests, two rounds): the torch backend served 69-70
# images/s at 115 ms median latency without it, 96-103 images/s at 75-81 ms with max_batch 32 and
# no window; waiting 2 or 5 ms for more images gave 88-97. The ONNX backend served 131-138 images/s
# either way, and a lone client saw no difference (25-29 ms a request). So: on, without a window.
DEFAULT_MAX_BATCH = 32
DEFAULT_WINDOW_MS = 0.0
# A request holds its turn while its body arrives, so the body has this long: a few stalled or
# trickling clients cannot keep every turn. 10 MB at 2 Mbit/s takes 40 s.
BODY_TIMEOUT_S = 60.0
# ... and after its first 5 s, at least this many bytes/s on average: 16 trickling uploads held
# every turn for the whole minute, so everyone else got 503. 16 KiB/s is a slow phone connection.
MIN_BODY_RATE = 16 * 1024
# A body this small is parsed on the event loop: handing it to the parsing thread and back cost
# more than parsing it (a one-image upload of a phone-camera thumbnail or a face crop).
INLINE_PARSE_BYTES = 256 * 1024
SETTINGS_ENV = "TRANSFERLAB_SERVE_SETTINGS"  # create_app's arguments for uvicorn's worker processes


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may send, each refused with a 4xx JSON error naming the limit, and how many
    requests may hold their uploads in memory at once (the others wait, see BUSY_WAIT_S)."""

    max_upload_bytes: int = 10 * 2**20  # the whole request body, counted while it is read
    max_pixels: int = 50_000_000  # per image, from its header, before decoding (a 50 MP photo)
    max_files: int = 16  # `file` fields per request
    # /predict requests being read, decoded or predicted at once. Each holds up to about twice
    # max_upload_bytes while its body is parsed: 16 x 10 MB x 2 = 320 MB at most. 64 clients each
    # holding an 8 MB upload unfinished took the server from 753 to 1,315 MB without a cap (and more
    # clients take more), to 906 MB with 16. Batching's gain was measured with 8 clients.
    max_concurrent: int = 16

    def __post_init__(self):
        check(asdict(self))


class TopClass(BaseModel):
    label: str
    probability: float


class FilePrediction(BaseModel):
    file: str
    label: str  # the top class, or "unknown" when the service rejects unknown inputs
    top_k: list[TopClass]
    novelty: float | None = None  # higher: less like the training images (bundles that have a bank)
    unknown: bool | None = None  # novelty over the bundle's threshold


class PredictResponse(BaseModel):
    predictions: list[FilePrediction]
    model: dict


class ErrorDetail(BaseModel):
    code: str
    message: str
    file: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Classifier:
    """The model behind the service: uploads in, top classes out. Decoding runs in threads of its
    own, one per core (each image may hold up to max_pixels in memory while it decodes); the
    network runs in one thread of its own, on single images gathered across requests by a
    MicroBatcher (max_batch > 1), or on each request's images on their own (max_batch == 1)."""

    def __init__(self, model_dir: str | Path, backend: str, limits: ServiceLimits,
                 max_batch: int, window_ms: float, device: str = "auto",
                 reject_unknown: bool = False, engine: str = "auto", build_engine: bool = False):
        check({"max_batch": max_batch, "batch_window_ms": window_ms})
        # auto runs the fastest engine whose graph is cached, and builds one only if asked
        # (build_engine; `serve` asks): EfficientNet-Lite0's takes about 10 s, once
        self.predictor = load_model(model_dir, backend=backend, device=device, engine=engine,
                                    images=math.inf if build_engine else 0)
        self.backend, self.limits, self.reject_unknown = backend, limits, reject_unknown
        self.decoders = Threads("decode", os.cpu_count() or 1)
        # the network's one thread: the batcher's own, or (max_batch 1) a Threads of one
        self.batcher = (MicroBatcher(self.run_batch, max_batch, window_ms, name="network")
                        if max_batch > 1 else None)
        self.network = None if self.batcher else Threads("network")

    def close(self) -> None:
        self.decoders.close()
        if self.network:
            self.network.close()

    def run_batch(self, images: list[torch.Tensor]) -> list[Scores]:
        """Scores for uint8 CHW images, one each (called in the network's thread)."""
        scores = self.predictor.score_batch(torch.stack(images))
        return [scores.row(i) for i in range(len(images))]

    async def predict(self, uploads: list[Upload], top_k: int) -> list[dict]:
        images = await asyncio.gather(*(self._decode(upload) for upload in uploads),
                                      return_exceptions=True)
        for result in images:  # the first bad file, in the order sent
            if isinstance(result, BaseException):
                raise result
        if self.batcher:
            rows = await asyncio.gather(*(self.batcher.submit(image) for image in images))
        else:
            rows = await self.network.run(self.run_batch, images)
        return [self.predictor.prediction(upload.name, row, 0, top_k, self.reject_unknown).to_dict()
                for upload, row in zip(uploads, rows)]

    async def _decode(self, upload: Upload) -> torch.Tensor:
        decode = functools.partial(self.predictor.decode, max_pixels=self.limits.max_pixels)
        return await self.decoders.run(decode_upload, upload, decode)

    def summary(self) -> dict:
        """The short description every prediction carries."""
        config = self.predictor.config
        return {"backbone": config.backbone, "backend": self.backend,
                "weights_sha256": config.weights_sha256}

    def describe(self) -> dict:
        """GET /model: what the model is, how it was trained and what the service accepts."""
        config, pre = self.predictor.config, self.predictor.preprocessing
        training = config.training
        novelty = self.predictor.trust.novelty
        return {**self.summary(), "engine": engine_report(self.predictor.engine),
                "classes": self.predictor.classes,
                "trust": {"temperature": self.predictor.trust.temperature,
                          "novelty_threshold": novelty.threshold if novelty else None,
                          "reject_unknown": self.reject_unknown},
                "input_size": list(pre.input_size), "preprocessing": pre.to_dict(),
                "transferlab_version": config.transferlab_version,
                "training": {"strategy": training.get("strategy"), "weights": training.get("weights"),
                             "val_accuracy": training.get("val", {}).get("accuracy"),
                             "test_accuracy": training.get("test", {}).get("accuracy")},
                "limits": {**asdict(self.limits), "formats": sorted(SUPPORTED_FORMATS - {"MPO"})},
                "batching": {"max_batch": self.batcher.max_batch if self.batcher else 1,
                             "window_ms": self.batcher.window_s * 1000 if self.batcher else 0.0}}


# /predict reads its body itself (to count bytes and keep uploads in memory), so its form is
# described here for the docs rather than declared as parameters.
_PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "One image per field; repeat the field for several."}}}}}}}
_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "empty body, no `file` field, an empty file, too many files or malformed multipart",
    408: f"the body took longer than {BODY_TIMEOUT_S:g} s to arrive, or came slower than "
         f"{MIN_BODY_RATE // 1024} KiB/s after its first 5 s",
    413: "request body larger than max_upload_bytes",
    415: "not multipart/form-data, or a file that is not an image this service reads",
    422: "an image with more pixels than max_pixels (refused before decoding), or a bad parameter",
    503: f"max_concurrent requests were being served for the {BUSY_WAIT_S:g} s this one waited: "
         "retry after the seconds in the Retry-After header",
}.items()}


def create_app(model_dir: str | Path, backend: str = "torch", *,
               max_upload_bytes: int = ServiceLimits.max_upload_bytes,
               max_pixels: int = ServiceLimits.max_pixels, max_files: int = ServiceLimits.max_files,
               max_concurrent: int = ServiceLimits.max_concurrent, top_k: int = DEFAULT_TOP_K,
               max_batch: int = DEFAULT_MAX_BATCH, batch_window_ms: float = DEFAULT_WINDOW_MS,
               device: str = "auto", allowed_hosts: list[str] | None = None,
               reject_unknown: bool = False, engine: str = "auto",
               build_engine: bool = False) -> FastAPI:
    """The service for the bundle in `model_dir` (loaded now, so a bad bundle fails here), on
    `device` (auto: a GPU when there is one).

    max_concurrent: /predict requests holding their uploads in memory at once; more wait;
    max_batch: images per model call across concurrent requests (1: no batching across requests);
    batch_window_ms: how long a batch waits for more images after its first;
    allowed_hosts: the Host headers answered (None: any; `serve` defaults to loopback names when
    it listens on a loopback address);
    reject_unknown: answer "unknown" instead of a class for an input over the novelty threshold;
    build_engine: with engine auto, build the fastest engine's graph now if it is not cached
    (once: later starts load it), instead of running torch.
    """
    limits = ServiceLimits(max_upload_bytes, max_pixels, max_files, max_concurrent)
    check({"top_k": top_k})
    classifier = Classifier(model_dir, backend, limits, max_batch, batch_window_ms, device,
                            reject_unknown, engine, build_engine)

    parser = Threads("multipart")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if classifier.batcher:
            await classifier.batcher.start()
        yield
        if classifier.batcher:
            await classifier.batcher.stop()
        parser.close()
        classifier.close()

    # FastAPIOffline serves Swagger UI's own files: FastAPI's default /docs fetches them from a
    # CDN, and shows a blank page on a closed network. No /redoc: it ran a script from a class name
    # put in the description; class names are at GET /model, as data, not in the API's text.
    app = FastAPIOffline(title="transferlab", version=__version__, lifespan=lifespan, redoc_url=None,
                         description=f"Image classifier over {len(classifier.predictor.classes)} "
                                     "classes; GET /model describes it.")
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)
    app.state.classifier = classifier  # the model behind the routes, for tests and benchmarks
    _add_routes(app, classifier, Turns(limits.max_concurrent), parser, top_k)
    _add_error_handlers(app)
    return app


def _add_routes(app: FastAPI, classifier: Classifier, turns: Turns, parser: Threads,
                default_k: int) -> None:
    page = (resources.files("transferlab.reporting") / "templates" / "serve.html").read_text(
        encoding="utf-8")
    limits = classifier.limits

    # Coroutines, though nothing here awaits: FastAPI runs a plain function in its shared pool of
    # threads, two thread switches a call (and the pool's heap arenas, see Threads)
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> dict:
        return classifier.describe()

    @app.post("/predict", response_model=PredictResponse, responses=_ERRORS,
              openapi_extra=_PREDICT_BODY)
    async def predict(request: Request, top_k: int = Query(default_k, ge=1, description=(
            "Classes per image, most probable first (at most the number of classes)."))) -> dict:
        """Top classes of each image sent as a multipart field named `file`."""
        async with turns.take():
            body = await read_body(request.stream(), limits.max_upload_bytes,
                                   request.headers.get("content-length"), BODY_TIMEOUT_S,
                                   MIN_BODY_RATE)
            content_type = request.headers.get("content-type")
            if len(body) <= INLINE_PARSE_BYTES:
                uploads = parse_uploads(body, content_type, limits.max_files)
            else:  # off the event loop, always in the same one thread (see Threads)
                uploads = await parser.run(parse_uploads, body, content_type, limits.max_files)
            del body  # the uploads are copies: one copy of each file in memory while it is decoded
            predictions = await classifier.predict(uploads, top_k)
        # Answered as built: FastAPI would validate these dicts against PredictResponse (which only
        # documents them here) on the event loop, between the engine's batches.
        return JSONResponse({"predictions": predictions, "model": classifier.summary()})



def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, in the same shape: {"error": {code, message, file}}."""

    def answer(status: int, code: str, message: str, file: str | None = None,
               headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message, "file": file}}, status,
                            headers)

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, error: UploadError) -> JSONResponse:
        return answer(error.status, error.code, error.message, error.file)

    @app.exception_handler(ServiceBusy)
    async def busy(request: Request, error: ServiceBusy) -> JSONResponse:
        return answer(503, "busy", str(error), headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return answer(422, "invalid_request", problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
        return answer(error.status_code, code, f"{error.detail}: {request.method} {request.url.path}"
                      "; the API is described at /docs")

    @app.exception_handler(ClientDisconnect)  # nobody reads this answer; it keeps the log quiet
    async def client_gone(request: Request, error: ClientDisconnect) -> JSONResponse:
        return answer(400, "client_disconnected", "the client left before sending the whole body")

    @app.exception_handler(Exception)  # a bug, not bad input; Starlette still logs the traceback
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return answer(500, "internal_error", f"the server failed ({type(error).__name__}); see its log")


def app_from_env() -> FastAPI:
    """Uvicorn's app factory for --workers > 1, which starts each worker from an import string:
    create_app's arguments come as JSON in $TRANSFERLAB_SERVE_SETTINGS, set by `serve`."""
    return create_app(**json.loads(os.environ[SETTINGS_ENV]))


def server_options(host: str, port: int, access_log: bool = False) -> dict:
    """uvicorn.run's options for the service (see serve)."""
    return {"host": host, "port": port, "http": HeaderDeadlineProtocol, "access_log": access_log}


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          access_log: bool = False, **settings) -> None:
    """Run the service with Uvicorn until interrupted; `settings` are create_app's options.

    The event loop is uvloop's where it is installed (uvicorn's "auto"), requests are parsed by
    httptools (guards.HeaderDeadlineProtocol), and no line is logged per request unless
    `access_log`: on the 2-core test machine, 8 one-image clients of EfficientNet-Lite0 (OpenVINO)
    got 0.63-0.64 of the engine's batch-32 images/s with asyncio, h11 and the access log, and
    0.67-0.78 without (benchmarks/bench_service.py, README). Startup lines and errors are logged
    either way."""
    import uvicorn

    check({"host": host, "port": port, "serve_workers": workers})
    settings["model_dir"] = str(Path(model_dir).resolve())
    settings.setdefault("allowed_hosts", default_allowed_hosts(host))
    # Loads the model, so a bad bundle or option fails here, once, and builds --engine auto's graph
    # if it is not cached yet, before the service answers (it would run torch, at half the speed,
    # until a restart); worker processes then find it cached.
    app = create_app(**settings, build_engine=True)
    server = server_options(host, port, access_log)
    if workers == 1:
        uvicorn.run(app, **server)
        return
    del app
    # Each worker is its own process with its own model, started from an import string; its
    # settings and a share of the cores (so that torch's threads do not fight over them) reach it
    # through the environment it inherits, for the duration of this call only.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // workers))
    with scoped_environment({SETTINGS_ENV: json.dumps(settings), "OMP_NUM_THREADS": threads}):
        uvicorn.run(f"{__name__}:app_from_env", factory=True, workers=workers, **server)

