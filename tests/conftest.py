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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
