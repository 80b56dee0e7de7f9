"""Engines for a torch network: torch itself, or the network compiled once into an ONNX Runtime or
OpenVINO graph (`--engine auto|torch|onnx|openvino`).

`--backend` says which model file runs (the bundle's network, or one of its exports); `--engine` says
what runs the torch network. A graph is built from the module by one ONNX export
(`export_onnx_graph`, which `transferlab export` uses too), converted for OpenVINO where that is
the engine, and cached under CACHE_DIR/engines/KEY/, KEY naming the layers, weights, preprocessing, engine, precision and
the engine library's version; the folder is written beside KEY and renamed onto it when complete,
so a killed run never leaves half a graph. Before a graph computes anything that is kept, it is run
beside torch in fp32 on the first real batch (`GraphEngine.check`); if it strays, or cannot be built
or loaded, torch runs instead, with one warning: an optimisation never fails a run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.transforms import Preprocessing
from ..devices import resolve_precision
from ..errors import BundleError, ConfigError, ExportError, error_summary
from ..models.backbones import weights_fingerprint
from ..rundir.atomic import replace_folder, temporary_folder_beside
from .engines import Engine, OnnxEngine, OpenVinoEngine, Outputs, TorchEngine

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnx", "openvino")  # the `engine` option's registry
GRAPH_FORMAT = 1
DEFAULT_OPSET = 18
INPUT, LOGITS, FEATURES = OnnxEngine.INPUT, OnnxEngine.OUTPUT, OnnxEngine.FEATURES
# What `auto` runs, in order of preference, per device type; the first one installed and able to run
# on the device wins. CPU: EfficientNet-Lite0's backbone-only images/s on a 2-core AMD EPYC with
# AVX-512 BF16 (benchmarks/bench_extract.py --part engines, a busy machine, 3 alternating rounds):
# batch 32 openvino-bf16 135, onnx-fp32 122, torch-bf16 84; batch 1: 57, 46, 42; end to end on
# face-mask 113, 99, 73. CUDA: ONNX Runtime only with onnxruntime-gpu's CUDA provider (OnnxEngine
# picks it), else torch; not measured here (no GPU).
AUTO_ORDER = {"cpu": ("openvino", "onnx", "torch"), "cuda": ("onnx", "torch"), "mps": ("torch",)}
# `auto` builds a graph that is not cached yet only for this many images or more: building
# EfficientNet-Lite0's OpenVINO graph (ONNX export, then conversion) takes about 11 s, and OpenVINO
# then saves about 5 ms an image end to end against torch (2-core AMD EPYC with AVX-512 BF16), so
# the build pays for itself from about 2,000 images; it is cached, so every later run gains too.
# Smaller runs (and the test suite's tiny models) never wait for an export.
AUTO_BUILD_IMAGES = 2_000
# A graph is used only if, on the first real batch, against torch in fp32: embeddings keep a mean
# cosine similarity of at least MIN_COSINE (bf16 gives about 0.999; a wrong graph far less), and
# a classifier's top-1 answers agree on at least MIN_TOP1_AGREEMENT of the images.
MIN_COSINE = 0.99
MIN_TOP1_AGREEMENT = 0.99


def engine_precision_for(name: str, precision: str) -> str:
    """The arithmetic `name` computes in, for a torch precision already resolved for the device:
    OpenVINO computes in bf16 where torch would (CPUs with native bf16), ONNX Runtime in fp32."""
    if name == "openvino":
        return "bf16" if precision == "bf16" else "f32"
    return "fp32" if name == "onnx" else precision


def available(name: str, device: torch.device) -> bool:
    """Whether engine `name` is installed and runs on `device`."""
    if name == "torch":
        return True
    if name == "openvino":
        return device.type == "cpu" and importlib.util.find_spec("openvino") is not None
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    if device.type == "cuda":
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return device.type == "cpu"


@dataclass(frozen=True)
class GraphSpec:
    """What a graph is built from and how it runs: the module, its preprocessing, the outputs it
    gives ((features,) for a backbone; (logits,) or (logits, features) for a classifier)."""

    module: torch.nn.Module
    pre: Preprocessing
    outputs: tuple[str, ...]

    def key(self, engine: str, precision: str) -> str:
        identity = {"format": GRAPH_FORMAT, "architecture": type(self.module).__name__,
                    "layers": hashlib.sha256(repr(self.module).encode()).hexdigest(),
                    "weights": weights_fingerprint(self.module), "preprocessing": self.pre.to_dict(),
                    "outputs": list(self.outputs), "engine": engine, "precision": precision,
                    "library": _library_version(engine), "torch": torch.__version__}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _library_version(engine: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    package = {"onnx": "onnxruntime", "openvino": "openvino"}[engine]
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def choose_engine(engine: str, device: torch.device, *, cached=lambda name: False,
                  images: float = 0) -> str:
    """The engine that runs: `engine` itself, or for auto the first in AUTO_ORDER for the device that
    is installed and either already `cached` (a function of the engine name) or worth building for
    `images` images (AUTO_BUILD_IMAGES). An engine asked for by name must be installed."""
    if engine != "auto":
        if not available(engine, device):
            package = {"onnx": "onnxruntime (onnxruntime-gpu on CUDA)", "openvino": "openvino"}
            raise ConfigError(f"engine={engine!r}: needs {package[engine]} installed and runs on "
                              f"{'the CPU' if engine == 'openvino' else 'a CPU or CUDA GPU'}, not "
                              f"{device.type}; use --engine auto or torch")
        return engine
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        if available(name, device) and (name == "torch" or cached(name)
                                         or images >= AUTO_BUILD_IMAGES):
            return name
    return "torch"


def export_onnx_graph(module: torch.nn.Module, input_size: tuple[int, ...], path: Path,
                      outputs: tuple[str, ...], opset: int = DEFAULT_OPSET) -> None:
    """torch.onnx.export with the torch.export-based ("dynamo") exporter: the TorchScript one works
    on these models too but is deprecated and warns that it will be removed. One file (no external
    data), so its sha256 covers everything; the batch axis is dynamic. Raises ExportError."""
    example = torch.zeros(2, *input_size)  # a size-1 axis would be fixed
    try:
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=[INPUT], output_names=list(outputs),
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                          verbose=False)
    except Exception as error:  # noqa: BLE001 - the exporter raises many types, all fatal here
        raise ExportError(f"torch.onnx.export failed ({error_summary(error)})") from None


class GraphCache:
    """The graphs of one GraphSpec under CACHE_DIR/engines/: built once, loaded after."""

    ONNX_FILE, OPENVINO_FILE = "model.onnx", "model.xml"

    def __init__(self, cache_dir: Path, spec: GraphSpec, device: torch.device):
        self.root, self.spec, self.device = Path(cache_dir) / "engines", spec, device

    def folder(self, engine: str, precision: str) -> Path:
        return self.root / self.spec.key(engine, precision)

    def file(self, engine: str, precision: str) -> Path:
        name = self.OPENVINO_FILE if engine == "openvino" else self.ONNX_FILE
        return self.folder(engine, precision) / name

    def has(self, engine: str, precision: str) -> bool:
        return self.file(engine, precision).is_file()

    def engine(self, engine: str, precision: str) -> Engine:
        """The engine running the cached graph, built first when absent; a cached graph that does
        not load (damaged) is built again once."""
        if self.has(engine, precision):
            try:
                return self._load(engine, precision)
            except BundleError as error:
                log.warning("rebuilding the damaged %s graph %s (%s)", engine,
                            self.folder(engine, precision), error)
        log.info("building the %s (%s) graph of this network, once: later runs load it from %s",
                 engine, precision, self.root)
        self._build(engine, precision)
        return self._load(engine, precision)

    def _load(self, engine: str, precision: str) -> Engine:
        path, spec = self.file(engine, precision), self.spec
        if engine == "openvino":
            return OpenVinoEngine(path, spec.pre, self.device, spec.outputs, precision)
        return OnnxEngine(path, spec.pre, self.device, spec.outputs)

    def _build(self, engine: str, precision: str) -> None:
        """Write the graph into a folder beside its final place, then rename it there."""
        target = self.folder(engine, precision)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = temporary_folder_beside(target)
        try:
            if engine == "openvino":
                self._build_openvino(staged / self.OPENVINO_FILE)
            else:
                export_onnx_graph(self.spec.module, self.spec.pre.input_size,
                                  staged / self.ONNX_FILE, self.spec.outputs)
            replace_folder(staged, target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _build_openvino(self, path: Path) -> None:
        """Convert the module's ONNX graph (cached too: ONNX Runtime runs the same one) to
        OpenVINO's IR, with fp32 weights (save_model would halve them; compiling decides the
        arithmetic)."""
        import openvino

        if not self.has("onnx", "fp32"):
            self._build("onnx", "fp32")
        model = openvino.convert_model(self.file("onnx", "fp32"))
        openvino.save_model(model, path, compress_to_fp16=False)


class GraphEngine:
    """A compiled graph that answers like the torch module it was built from: the same call as
    TorchEngine (a precision of 32 asked of a bf16 graph is torch's to answer). The first
    batch it is given (or `check`'s) is run beside torch in fp32 first; a graph that strays is set
    aside for torch, with a warning. `report()` is what metrics.json records."""

    def __init__(self, graph: Engine, reference: TorchEngine, name: str, precision: str,
                 classifier: bool):
        self.graph, self.reference = graph, reference
        self.name, self.precision, self.classifier = name, precision, classifier
        self.device = reference.device
        self.parity: dict | None = None
        self.fallback: str | None = None  # why torch runs instead, when it does
        self.check_outputs: tuple[np.ndarray, np.ndarray] | None = None  # torch fp32, graph
        self._lock = threading.Lock()

    def __call__(self, images: torch.Tensor, precision: str = "32") -> Outputs:
        if self.parity is None:
            self.check(images)
        if self.fallback or (precision == "32" and self.precision == "bf16"):
            return self.reference(images, precision)  # fp32 asked for: a bf16 graph cannot give it
        return self.graph(images)

    def check(self, images: torch.Tensor) -> dict:
        """Compare the graph with torch fp32 on `images` (once); fall back to torch if it strays."""
        with self._lock:
            if self.parity is None:
                expected, got = _first(self.reference(images, "32")), _first(self.graph(images))
                self.check_outputs = (expected.numpy(), got.numpy())
                self.parity = (classifier_parity if self.classifier else embedding_parity)(
                    *self.check_outputs)
                if not self.parity["passed"]:
                    self._fall_back(f"differs from torch fp32 on the first {len(images)} images "
                                    f"({_summary(self.parity)})")
        return self.parity

    def _fall_back(self, reason: str) -> None:
        log.warning("engine %s (%s): %s; torch runs instead", self.name, self.precision, reason)
        self.fallback = reason

    @property
    def overlap_decoding(self) -> bool:
        return not self.fallback and self.graph.overlap_decoding

    @property
    def running(self) -> str:
        return "torch" if self.fallback else self.name

    def report(self) -> dict:
        return {"name": self.running, "chosen": self.name, "precision": self.precision,
                "parity": self.parity, "fallback": self.fallback}


def _first(outputs: Outputs) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, tuple) else outputs


def _summary(parity: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in parity.items() if isinstance(v, float))


def embedding_parity(expected: np.ndarray, got: np.ndarray) -> dict:
    """Features against torch fp32's: the largest difference relative to the features' scale
    (their largest magnitude) and the mean cosine similarity of each image's vectors."""
    expected, got = expected.reshape(len(expected), -1), got.reshape(len(got), -1)
    scale = float(np.abs(expected).max()) or 1.0
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1)
    cosine = float(np.mean((expected * got).sum(1) / np.maximum(norms, 1e-12)))
    return {"images": len(expected), "max_abs_diff_relative": float(np.abs(expected - got).max()) / scale,
            "mean_cosine": cosine, "min_cosine": MIN_COSINE, "passed": cosine >= MIN_COSINE}


def classifier_parity(expected_logits: np.ndarray, got_logits: np.ndarray) -> dict:
    """Softmax probabilities against torch fp32's: top-1 agreement and the largest difference."""
    expected, got = (torch.softmax(torch.from_numpy(x).float(), 1).numpy()
                     for x in (expected_logits, got_logits))
    return probability_parity(expected, got)


def probability_parity(expected: np.ndarray, got: np.ndarray) -> dict:
    agreement = float((expected.argmax(1) == got.argmax(1)).mean())
    return {"images": len(expected), "top1_agreement": agreement,
            "max_abs_prob_diff": float(np.abs(expected - got).max()),
            "min_top1_agreement": MIN_TOP1_AGREEMENT, "passed": agreement >= MIN_TOP1_AGREEMENT}


def compile_engine(spec: GraphSpec, engine: str = "auto", *, device: torch.device | str = "cpu",
                   precision: str = "auto", cache_dir: Path | None = None,
                   images: float = 0) -> TorchEngine | GraphEngine:
    """What runs `spec.module` on `device`: a TorchEngine, or a GraphEngine with the graph of the
    engine chosen (choose_engine; `images`: how many the caller expects to run, for auto). Without
    a cache_dir a graph is built in a temporary folder for this process only. A graph that cannot
    be built or loaded costs a warning, and torch runs."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    reference = TorchEngine(spec.module, spec.pre, device)
    caches = GraphCache(cache_dir, spec, device) if cache_dir else None
    name = choose_engine(engine, device, images=images, cached=lambda candidate: bool(
        caches and caches.has(candidate, engine_precision_for(candidate, precision))))
    if name == "torch":
        return reference
    graph_precision = engine_precision_for(name, precision)
    try:
        if caches:
            graph = caches.engine(name, graph_precision)
        else:
            with tempfile.TemporaryDirectory(prefix="transferlab-graph-") as scratch:
                graph = GraphCache(Path(scratch), spec, device).engine(name, graph_precision)
    except Exception as error:  # noqa: BLE001 - exporters and runtimes raise many types
        log.warning("engine %s (%s) not used: its graph could not be built or loaded (%s); torch "
                    "runs instead", name, graph_precision, str(error)[:300])
        return reference
    return GraphEngine(graph, reference, name, graph_precision, classifier=LOGITS in spec.outputs)


def engine_label(engine: TorchEngine | GraphEngine, precision: str) -> str:
    """What computes the outputs, for cache keys: "torch" with its precision, or the graph's."""
    if isinstance(engine, GraphEngine) and not engine.fallback:
        return f"{engine.name}-{engine.precision}"
    return torch_label(precision)


def torch_label(precision: str) -> str:
    """The cache label of outputs computed by torch in `precision`."""
    return f"torch-{precision}"


def engine_report(engine: Engine) -> dict:
    """What runs a network, for a service's description: a graph's report, else its class."""
    if isinstance(engine, GraphEngine):
        return engine.report()
    return {"name": "torch" if isinstance(engine, TorchEngine) else type(engine).__name__}
