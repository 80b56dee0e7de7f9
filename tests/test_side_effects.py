"""Importing or calling the library changes nothing process-wide: not the umask, not the environment,
not PIL's own decompression-bomb limit (which another thread of the user's program relies on); and
malloc's settings, which a run changes while it runs, only as glibc would settle them itself."""

import io
import json
import os
import stat
import subprocess
import sys

import pytest
from PIL import Image

from transferlab import train
from transferlab.data.decode import open_rgb
from transferlab.rundir.atomic import temporary_folder_beside, write_text

from conftest import TINY_BACKBONE


def test_importing_everything_leaves_the_umask_alone():
    """Not even for a moment: reading the umask in Python means setting it, for every thread."""
    code = ("import importlib, os, pkgutil\n"
            "calls = []\n"
            "real = os.umask\n"
            "os.umask = lambda mask: calls.append(mask) or real(mask)\n"
            "import transferlab\n"
            "for m in pkgutil.walk_packages(transferlab.__path__, 'transferlab.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "print(calls)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_written_files_get_the_mode_open_would_give(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        folder = temporary_folder_beside(tmp_path / "bundle")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750


def test_a_run_leaves_the_environment_as_it_was(image_folder, tmp_path):
    before = dict(os.environ)
    train(image_folder, strategy="head", backbone=TINY_BACKBONE, weights="none", epochs=1,
          out=tmp_path / "run", cache_dir=None, show_progress=False)
    assert dict(os.environ) == before


def test_pil_keeps_its_own_limit_while_we_raise_ours(monkeypatch):
    """An image above PIL's limit, decoded with ours raised: PIL's limit is in force the whole time,
    also at the moment the header is read (when another thread could be opening its own file)."""
    limit = Image.MAX_IMAGE_PIXELS
    factory, accept = Image.OPEN["PNG"]
    seen = []

    def recording_factory(*args, **kwargs):
        seen.append(Image.MAX_IMAGE_PIXELS)
        return factory(*args, **kwargs)

    monkeypatch.setitem(Image.OPEN, "PNG", (recording_factory, accept))
    big = io.BytesIO()
    Image.new("L", (13000, 14000)).save(big, format="PNG")  # 182 MP: over PIL's error threshold
    assert open_rgb(big, max_pixels=200_000_000).size == (13000, 14000)
    assert seen and set(seen) == {limit} and Image.MAX_IMAGE_PIXELS == limit


REUSE_PROBE = """
import ctypes, json, resource
from transferlab.process import reused_memory

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def faults_touching(size=64 * 2**20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults

before = [faults_touching() for _ in range(3)]
with reused_memory() as reusing:
    with reused_memory():
        pass
    inside = [faults_touching() for _ in range(4)]
print(json.dumps({"reusing": reusing, "before": before, "inside": inside}))
"""


def test_reused_memory_keeps_large_blocks_for_the_next():
    """In a fresh process, every 64 MB block malloc gives is mapped afresh and faulted in page by
    page; inside the block (here after a nested one ended, which must not end it) a freed one comes
    back without faulting its pages in again. (With torch's tensors the first blocks can leave holes
    that the next, aligned, request does not fit, so the effect shows over steps: bench_train.py.)"""
    result = subprocess.run([sys.executable, "-c", REUSE_PROBE], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    probe, pages = json.loads(result.stdout), 64 * 2**20 // 4096
    if not probe["reusing"]:
        pytest.skip("the C library is not glibc: reused_memory changes nothing here")
    if min(probe["before"]) < pages // 2:
        pytest.skip(f"{probe['before']} faults for {pages} pages: the kernel maps large blocks in "
                    "huge pages here, so faults do not show reuse")
    assert max(probe["inside"][1:]) < pages // 10, probe


class RecordingLibc:
    """Stands in for glibc: records mallopt and malloc_trim calls."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_training_and_evaluating_reuse_memory_and_then_restore_it(image_folder, tmp_path,
                                                                   monkeypatch):
    from transferlab import evaluate, process

    libc = RecordingLibc()
    monkeypatch.setattr(process, "_glibc", lambda: libc)
    run = train(image_folder, strategy="head", backbone=TINY_BACKBONE, weights="none", epochs=1,
                out=tmp_path / "run", cache_dir=None, show_progress=False)
    evaluate(run.model_dir, image_folder, out=tmp_path / "evaluation", show_progress=False)
    # once for the run (its fit inside it), once for the evaluation
    keep = [("mallopt", process._M_MMAP_MAX, 0), ("mallopt", process._M_TRIM_THRESHOLD,
                                                   process._KEEP_EVERYTHING)]
    restore = [("mallopt", process._M_MMAP_MAX, process._DEFAULT_MMAP_MAX),
               ("mallopt", process._M_MMAP_THRESHOLD, process._SETTLED_MMAP_THRESHOLD),
               ("mallopt", process._M_TRIM_THRESHOLD, 2 * process._SETTLED_MMAP_THRESHOLD),
               ("malloc_trim", 0)]
    assert libc.calls == 2 * (keep + restore) and process._reuse_depth == 0
