"""Engines: what runs a network on a batch of images, on a device.

Every engine takes the same call: a uint8 NCHW batch of resized, cropped images (on the CPU, as the
DataLoader gives them) and a resolved precision, and returns float32 outputs on the CPU. The images
go to the engine's device as uint8 (four times less to copy than floats) and are normalised there,
so decoding, batching and what comes after (softmax, top-k, caches) are shared by every engine and
device. `inference.backends.BACKENDS` names them for `load_model(backend=...)`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from ..data.transforms import Preprocessing, normalize
from ..devices import autocast, resolve_precision
from ..errors import BundleError, ConfigError


class Engine(Protocol):
    device: torch.device
    overlap_decoding: bool  # whether decoding in a thread beside it gains (batches.decoded_ahead)

    def __call__(self, images: torch.Tensor, precision: str = "32") -> Outputs:
        """uint8 NCHW images -> float32 outputs on the CPU: one tensor (logits, or a backbone's
        features), or a tuple (logits, penultimate features) for a network WithFeatures."""


Outputs = torch.Tensor | tuple[torch.Tensor, ...]

# On the CPU torch's inference runs a batch faster in pieces of this many images (the activations
# of a few images stay in the caches): EfficientNet-Lite0, 32 images at once against four pieces
# of 8, alternating rounds, 2-core AMD EPYC: bf16 113-128 against 175-189 images/s, fp32 44-55
# against 79-88; the outputs are the same. A training step gained nothing (17-20 either way).
CPU_PIECE = 8


class TorchEngine:
    """A torch module on `device` in eval mode, channels_last, without autograd, with autocast in the
    resolved precision. Copies to a CUDA device come from pinned memory without blocking."""

    # decoding in a thread beside torch's kernels costs them (batches.decoded_ahead)
    overlap_decoding = False

    def __init__(self, module: torch.nn.Module, pre: Preprocessing,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.pre = pre
        self.module = module.eval().to(self.device, memory_format=torch.channels_last)

    def __call__(self, images: torch.Tensor, precision: str = "32") -> Outputs:
        if self.device.type == "cpu" and len(images) > CPU_PIECE:
            return _joined([self(piece, precision) for piece in images.split(CPU_PIECE)])
        with torch.inference_mode():
            batch = normalize(images.to(self.device, non_blocking=True), self.pre)
            with autocast(self.device, precision):
                outputs = self.module(batch)
            if isinstance(outputs, tuple):
                return tuple(output.float().cpu() for output in outputs)
            return outputs.float().cpu()


def _joined(pieces: list[Outputs]) -> Outputs:
    if isinstance(pieces[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*pieces))
    return torch.cat(pieces)


class ExportedEngine:
    """What the engines that run an exported file share: its input and output names, the float32
    NCHW batch it takes (normalised on the CPU), and (logits, features) out when the file has both,
    like a torch network WithFeatures. An exported graph runs in the types it was exported with."""

    INPUT, OUTPUT, FEATURES = "images", "logits", "features"
    outputs: list[str]
    overlap_decoding = True  # the runtime releases the GIL (batches.decoded_ahead)

    @property
    def has_features(self) -> bool:
        return self.FEATURES in self.outputs

    def _outputs_in(self, names, path: str | Path, fix: str,
                    wanted: tuple[str, ...] | None = None) -> None:
        """Keep the outputs this file has, in (logits, features) order; a file without logits is
        refused with `fix`, what to run instead. `wanted`: exactly these outputs, in this order (a
        graph of a backbone, inference.graphs, has only features)."""
        if wanted is not None:
            missing = [name for name in wanted if name not in names]
            if missing:
                raise BundleError(f"{path}: the model has no {missing[0]!r} output; {fix}")
            self.outputs = list(wanted)
            return
        if self.OUTPUT not in names:
            raise BundleError(f"{path}: the model has no {self.OUTPUT!r} output; {fix}")
        self.outputs = [name for name in (self.OUTPUT, self.FEATURES) if name in names]

    def _batch(self, images: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(normalize(images, self.pre, channels_last=False).numpy())

    @staticmethod
    def _pack(arrays) -> Outputs:
        outputs = [torch.from_numpy(np.asarray(array)) for array in arrays]
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads in the calling thread set to `count` for the block (None: left as
    they are). A thread that makes its first torch call meanwhile starts with `count` too."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_only(device: torch.device | str, backend: str) -> torch.device:
    device = torch.device(device)
    if device.type != "cpu":
        raise ConfigError(f"backend={backend!r} runs on the CPU here, not {device.type}; use "
                          "--backend torch")
    return device


class OnnxEngine(ExportedEngine):
    """An exported model in onnxruntime: the CPU provider, or CUDA's for a CUDA device when the
    installed onnxruntime has it (onnxruntime-gpu). The graph runs in the types it was exported with,
    so the only precision it takes is 32 (`auto` resolves to it)."""

    def __init__(self, path: str | Path, pre: Preprocessing, device: torch.device | str = "cpu",
                 outputs: tuple[str, ...] | None = None):
        import onnxruntime

        self.device = torch.device(device)
        self.pre = pre
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise ConfigError("backend='onnx' on a CUDA device needs onnxruntime-gpu (this "
                                  "onnxruntime has only "
                                  f"{', '.join(onnxruntime.get_available_providers())}); pip "
                                  "install onnxruntime-gpu, or use --backend torch")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}),
                         "CPUExecutionProvider"]
        elif self.device.type != "cpu":
            raise ConfigError(f"backend='onnx' runs on cpu or cuda, not {self.device.type}; use "
                              "--backend torch")
        options = onnxruntime.SessionOptions()
        # Its threads wait for work by spinning, on the cores that torch's threads (softmax,
        # novelty, decoding) need between its batches: on 2 cores Lite0 ran at 78 against 118
        # images/s at batch 1 and 163 against 171 at 32 (benchmarks/bench_service.py's engine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise BundleError(f"{path}: onnxruntime cannot load it ({error}); export it again with "
                              "`transferlab export`") from None
        self._outputs_in({output.name for output in self.session.get_outputs()}, path,
                         "export it again with `transferlab export`", outputs)

    def __call__(self, images: torch.Tensor, precision: str = "32") -> Outputs:
        return self._pack(self.session.run(self.outputs, {self.INPUT: self._batch(images)}))


class OpenVinoEngine(ExportedEngine):
    """An OpenVINO IR (model.xml + model.bin) on the CPU, compiled to compute in `precision`: "f32"
    for an fp32 export (on a CPU with bf16 units OpenVINO would otherwise pick bf16 and stray from
    the checked export), "bf16" for a graph that inference.graphs checks against torch itself, None
    for OpenVINO's own choice."""

    PRECISION: str | None = "f32"

    def __init__(self, path: str | Path, pre: Preprocessing, device: torch.device | str = "cpu",
                 outputs: tuple[str, ...] | None = None, precision: str | None = None):
        try:
            import openvino
        except ImportError:
            raise ConfigError("backend='openvino' needs the openvino package: pip install "
                              "'transferlab[openvino]'") from None
        self.device = _cpu_only(device, "openvino")
        self.pre = pre
        precision = precision or self.PRECISION
        # Unpinned: OpenVINO pins each of its threads to a core by default, and our pipelines
        # decode (or serve HTTP) beside it on the same cores. A pinned thread that the decoding
        # preempts cannot move to the core that frees up first, and the other waits for it at the
        # next layer. Unpinned, `extract` on face-mask (2 cores) ran at a median 259 against 228
        # images/s, the network alone on random batches as fast as before (README, issue 14).
        hints = {"ENABLE_CPU_PINNING": False}
        if precision:
            hints["INFERENCE_PRECISION_HINT"] = precision
        try:
            core = openvino.Core()
            model = self._normalising(core.read_model(str(path)))
            self.compiled = core.compile_model(model, "CPU", hints)
        except Exception as error:  # noqa: BLE001 - OpenVINO raises its own untyped errors
            raise BundleError(f"{path}: OpenVINO cannot load it ({str(error)[:200]}); export it "
                              "again with `transferlab export --format openvino`") from None
        self._outputs_in({name for output in self.compiled.outputs for name in output.get_names()},
                         path, "export it again", outputs)

    def _normalising(self, model):
        """`model` taking the uint8 NCHW batch itself: (x - 255 mean) / (255 std) compiled into the
        graph, where OpenVINO fuses it into the first convolution, instead of a float copy of the
        batch made on the CPU first (0.4 ms an image at 224 px, a fifth of the network's time)."""
        from openvino import Layout, Type
        from openvino.preprocess import PrePostProcessor

        steps = PrePostProcessor(model)
        steps.input(self.INPUT).tensor().set_element_type(Type.u8).set_layout(Layout("NCHW"))
        steps.input(self.INPUT).model().set_layout(Layout("NCHW"))
        steps.input(self.INPUT).preprocess().convert_element_type(Type.f32).mean(
            [255 * m for m in self.pre.mean]).scale([255 * s for s in self.pre.std])
        return steps.build()

    def __call__(self, images: torch.Tensor, precision: str = "32") -> Outputs:
        result = self.compiled(np.ascontiguousarray(images.numpy()))
        return self._pack(result[self.compiled.output(name)] for name in self.outputs)


class OpenVinoInt8Engine(OpenVinoEngine):
    """An int8 OpenVINO IR (`export --format openvino --quantize int8`), compiled with OpenVINO's
    defaults: the export's numbers are measured with this engine and reported, not held to fp32's
    bound, so the layers NNCF left in float may run in bf16 on a CPU that has it."""

    PRECISION = None


class TfliteEngine(ExportedEngine):
    """A LiteRT (TensorFlow Lite) export in ai-edge-litert's interpreter on the CPU (its XNNPACK
    kernels), a thread per core. The file is converted for batch 1 (the converter has no dynamic
    batch) and the interpreter resizes its input to each batch: on EfficientNet-Lite0 that cost no
    time per image against a fixed batch, nor when batch sizes alternate. One batch at a time: an
    interpreter is not safe to call from two threads."""

    def __init__(self, path: str | Path, pre: Preprocessing, device: torch.device | str = "cpu"):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ConfigError("backend='tflite' needs the ai-edge-litert package: pip install "
                              "'transferlab[tflite]'") from None
        self.device = _cpu_only(device, "tflite")
        self.pre = pre
        try:
            self.runner = Interpreter(model_path=str(path),
                                      num_threads=os.cpu_count() or 1).get_signature_runner()
        except Exception as error:  # noqa: BLE001 - LiteRT raises ValueError, RuntimeError, ...
            raise BundleError(f"{path}: LiteRT cannot load it ({str(error)[:200]}); export it "
                              "again with `transferlab export --format tflite`") from None
        fix = "export it again with `transferlab export --format tflite`"
        if self.INPUT not in self.runner.get_input_details():
            raise BundleError(f"{path}: the model has no {self.INPUT!r} input; {fix}")
        self._outputs_in(set(self.runner.get_output_details()), path, fix)
        self.lock = threading.Lock()

    def __call__(self, images: torch.Tensor, precision: str = "32") -> Outputs:
        batch = self._batch(images)
        with self.lock:
            result = self.runner(**{self.INPUT: batch})
        return self._pack(result[name] for name in self.outputs)


def engine_precision(engine: Engine, precision: str) -> str:
    """`precision` resolved for the engine's device; an exported graph only runs as exported."""
    if isinstance(engine, ExportedEngine):
        if precision not in ("auto", "32", "32-true", "fp32"):
            raise ConfigError(f"precision={precision!r}: applies to the torch backend; an exported "
                              "model runs as it was exported, drop --precision")
        return "32"
    return resolve_precision(precision, engine.device)
