"""The device path, tested on the CPU: which device and precision each --device / --precision
resolves to (GPUs simulated by patching torch's queries; none is lent to this project), how
Lightning is told, and what runs where."""

import subprocess
import sys

import pytest
import torch

from transferlab import devices
from transferlab.devices import lightning_precision, resolve_device, resolve_precision
from transferlab.errors import ConfigError
from transferlab.inference import batches
from transferlab.training.trainer import Distribution


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, the first supporting bf16, as torch would report it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


def test_auto_is_the_gpu_when_there_is_one(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="has 2 CUDA device.*cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_auto_is_the_cpu_without_one(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"device='{name}': no CUDA GPU is available"):
            resolve_device(name)
    with pytest.raises(ConfigError, match="device='mps': Apple's MPS is not available"):
        resolve_device("mps")
    with pytest.raises(ConfigError, match="device='gpu0': use auto, cpu, cuda"):
        resolve_device("gpu0")


def test_precision_per_device(monkeypatch, two_gpus):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "32"  # AVX2-only CPUs: bf16 would be emulated, slow
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_precision("auto", "cuda:1") == "16"  # older GPUs: fp16
    assert resolve_precision("auto", "mps") == "16"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16" and resolve_precision("32-true") == "32"
    with pytest.raises(ConfigError, match="fp16 autocast is for GPUs"):
        resolve_precision("16", "cpu")
    assert [lightning_precision(p) for p in ("bf16", "16", "32")] == ["bf16-mixed", "16-mixed",
                                                                      "32-true"]


def test_lightning_is_told_the_device(two_gpus):
    assert Distribution.resolve(torch.device("cuda", 1)) == Distribution("gpu", [1], 1, "auto")
    assert Distribution.resolve(torch.device("cuda"), devices=4, strategy="ddp") == Distribution(
        "gpu", 4, 1, "ddp")
    assert Distribution.resolve(torch.device("cpu"), "auto", 2, 1, "ddp") == Distribution(
        "cpu", 2, 1, "ddp")
    with pytest.raises(ConfigError, match="accelerator='gpu' and device='cpu' disagree"):
        Distribution.resolve(torch.device("cpu"), "gpu")
    with pytest.raises(ConfigError, match="name one GPU with --device cuda:N"):
        Distribution.resolve(torch.device("cuda", 1), devices=2)


class _FakeEngine:
    """An engine that reports a CUDA device but computes on the CPU."""

    device = torch.device("cuda")

    def __call__(self, images, precision):
        assert images.dtype == torch.uint8  # the copy to the device is of uint8 images
        return torch.zeros(len(images), 2)


def test_batches_for_a_cuda_engine_come_from_pinned_memory(image_folder, monkeypatch):
    from transferlab.data.transforms import Preprocessing

    made = []
    real = batches.make_loader
    monkeypatch.setattr(batches, "make_loader", lambda *a, **kw: made.append(kw) or real(
        *a, **{**kw, "pin_memory": False}))
    engine = _FakeEngine()
    paths = sorted(image_folder.rglob("*.png"))[:3]
    outputs = list(batches.run_batches(engine, paths, Preprocessing(input_size=(3, 32, 32)),
                                       precision="32", pin_memory=engine.device.type == "cuda"))
    assert made[0]["pin_memory"] is True and outputs[0][1].shape == (3, 2)


def test_the_engine_runs_where_it_is_told(tiny_run):
    from transferlab import load_model

    predictor = load_model(tiny_run.model_dir, device="cpu")
    assert predictor.device == torch.device("cpu")
    assert {p.device for p in predictor.engine.module.parameters()} == {torch.device("cpu")}


def test_predict_on_the_cpu_and_cuda_on_a_machine_without_one(tiny_run, image_folder):
    image = str(next(image_folder.rglob("*.png")))
    command = [sys.executable, "-c", "from transferlab.cli import main; main()", "predict",
               str(tiny_run.model_dir), image, "--format", "json"]
    on_cpu = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert on_cpu.returncode == 0 and '"top_k"' in on_cpu.stdout, on_cpu.stderr
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the refusal cannot be shown here")
    on_cuda = subprocess.run([*command, "--device", "cuda"], capture_output=True, text=True,
                             timeout=300)
    assert on_cuda.returncode == 2 and on_cuda.stderr.count("\n") == 1, on_cuda.stderr
    assert "no CUDA GPU is available" in on_cuda.stderr and "Traceback" not in on_cuda.stderr
