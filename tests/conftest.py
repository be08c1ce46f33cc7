import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import effseg

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none visible)")
needs_extension = pytest.mark.skipif(
    not effseg.HAVE_EXTENSION, reason=f"compiled ops not loaded: {effseg.ops.load_error()}"
)


def device_params():
    return [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in DEVICES]


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: tiny volumes gain nothing from threads, and on
    a shared machine OpenMP threads that wait for each other cost seconds per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def child_env(**extra: str) -> dict:
    """Environment for a child process that imports the very effseg this process imported (an
    in-place build in a checkout that is not installed included), on one thread."""
    root = str(Path(effseg.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path, **extra)


def run_python(code: str, env: dict | None = None, timeout: int = 120):
    """Runs `code` in a fresh interpreter: a crash fails the calling test instead of killing
    pytest, and environment variables (EFFSEG_NO_EXTENSION) act from the start."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="session")
def monai_nets():
    """monai.networks.nets, or a skip of the one test that needs it (not of its whole module)."""
    return pytest.importorskip("monai.networks.nets", reason="MONAI is not installed")


@pytest.fixture(scope="session")
def onnx_export():
    """onnx, after checking that torch.onnx's dynamo exporter (onnxscript) is there too."""
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's dynamo exporter) is missing")
    return onnx
