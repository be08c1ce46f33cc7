"""What effseg does when its compiled extension does not fit the running torch: the build record
(effseg/_build_config.py, written by setup.py) is compared with torch before effseg._C is loaded,
a load failure (undefined symbol) becomes a message with the fix, and either way the ops fall
back to the pure-PyTorch reference with one warning. The mismatches are faked in a fresh
interpreter by putting another build record in place of the real one."""
import json
import shutil
import subprocess

import pytest
import torch
from conftest import run_python

import effseg
from effseg.ops._library import BUILD, build_mismatch

RUNNING = {
    "VERSION": "0.1.0+test",
    "TORCH_VERSION": torch.__version__,
    "CUDA_VERSION": torch.version.cuda,
    "TORCH_CUDA_VERSION": torch.version.cuda,
    "WITH_CUDA": torch.version.cuda is not None,
    "CUDA_ARCHS": "9.0" if torch.version.cuda else None,
}

# In a fresh interpreter: the build record CONFIG replaces effseg/_build_config.py, an optional
# FINDER serves effseg._C, then an InPlaceABN step runs, and what happened is printed as JSON.
PROBE = """
import contextlib, io, json, sys, types, warnings
import torch
config = types.ModuleType("effseg._build_config")
config.__dict__.update({config!r})
sys.modules["effseg._build_config"] = config
{finder}
import effseg
from effseg.pipeline.cli import main
x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
layer = effseg.nn.InPlaceABN(3, activation="leaky_relu", activation_param=0.1).double()
stock = torch.nn.BatchNorm3d(3).double()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = layer(x * 1.0)
    inp = x.clone().requires_grad_(True)
    layer(inp * 1.0).sum().backward()
expected = torch.nn.functional.leaky_relu(stock(x), 0.1)
text, report = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(text):
    rc_text = main(["info"])
with contextlib.redirect_stdout(report):
    rc_json = main(["info", "--json"])
print(json.dumps({{
    "have_extension": effseg.HAVE_EXTENSION,
    "error": effseg.ops.load_error(),
    "c_loaded": "effseg._C" in sys.modules,
    "warnings": [str(w.message) for w in caught if "effseg" in str(w.message)],
    "matches_stock": torch.allclose(y, expected),
    "grad_finite": bool(torch.isfinite(inp.grad).all()),
    "info_text": text.getvalue(), "info": json.loads(report.getvalue()),
    "rc": [rc_text, rc_json],
}}))
"""


def probe(config: dict, finder: str = "") -> dict:
    proc = run_python(PROBE.format(config=config, finder=finder))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def other_minor(version: str) -> str:
    major, minor = version.split("+")[0].split(".")[:2]
    return f"{major}.{int(minor) + 1}.0"


def test_build_mismatch_rules():
    fix = "rebuild effseg against the running torch"
    assert build_mismatch("2.14.1+cu130", "13.0", "2.14.0+cu130", "13.0") is None
    assert build_mismatch("2.13.0+cpu", None, "2.13.0", None) is None
    minor = build_mismatch("2.13.0+cpu", None, "2.14.1+cpu", None)
    assert "torch 2.13.0+cpu" in minor and "2.14.1+cpu" in minor and fix in minor
    assert "+cputorch2.14" in minor
    cuda_under_cpu = build_mismatch("2.14.1+cu130", "13.0", "2.14.1+cpu", None)
    assert "CUDA 13.0 build" in cuda_under_cpu and "CPU-only build" in cuda_under_cpu
    assert "+cputorch2.14" in cuda_under_cpu
    cpu_under_cuda = build_mismatch("2.14.1+cpu", None, "2.14.1+cu130", "13.0")
    assert "CPU-only build of torch (2.14.1+cpu)" in cpu_under_cuda
    assert "+cu130torch2.14" in cpu_under_cuda
    other_cuda = build_mismatch("2.14.1+cu128", "12.8", "2.14.1+cu130", "13.0")
    assert "CUDA 12.8" in other_cuda and "CUDA 13.0" in other_cuda and fix in other_cuda


def _fake(name: str) -> dict:
    running = torch.version.cuda
    if name == "other_torch_minor":
        return dict(RUNNING, TORCH_VERSION=other_minor(torch.__version__))
    if name == "other_cuda":
        cuda = "12.8" if running != "12.8" else "13.0"
        return dict(RUNNING, CUDA_VERSION=cuda, TORCH_CUDA_VERSION=cuda, WITH_CUDA=True,
                    CUDA_ARCHS="8.0;9.0+PTX")
    # the other flavour of torch: a CUDA build under a CPU torch, a CPU-torch build under CUDA
    cuda = None if running else "13.0"
    return dict(RUNNING, CUDA_VERSION=cuda, TORCH_CUDA_VERSION=cuda, WITH_CUDA=cuda is not None,
                CUDA_ARCHS=cuda and "9.0")


@pytest.mark.parametrize("name", ["other_torch_minor", "other_cuda", "other_torch_flavour"])
def test_mismatched_build_is_refused_before_loading(name):
    config = _fake(name)
    result = probe(config)
    assert not result["have_extension"]
    assert not result["c_loaded"], "a mismatched effseg._C must not even be loaded"
    error = result["error"]
    assert error == build_mismatch(config["TORCH_VERSION"], config["TORCH_CUDA_VERSION"],
                                   torch.__version__, torch.version.cuda)
    assert "rebuild effseg" in error
    # one warning for every op of the step, and the reference gives the stock result
    assert len(result["warnings"]) == 1 and error in result["warnings"][0]
    assert "reference" in result["warnings"][0]
    assert result["matches_stock"] and result["grad_finite"]
    info = result["info"]
    assert result["rc"] == [0, 0]
    assert info["extension_loaded"] is False and info["extension_error"] == error
    assert info["built_with_torch"] == config["TORCH_VERSION"]
    assert info["built_with_cuda"] == config["CUDA_VERSION"]
    assert info["cpu_only"] is (not config["WITH_CUDA"])
    assert not any(k["cpu"] or k["cuda"] for k in info["ops"].values())
    assert config["TORCH_VERSION"] in result["info_text"] and error in result["info_text"]


UNDEFINED = """
extern void *effseg_test_missing_symbol(void);
void *PyInit__C(void) { return effseg_test_missing_symbol(); }
"""

FINDER = """
import importlib.util
class _ServeBrokenC:
    def find_spec(self, name, path=None, target=None):
        if name == "effseg._C":
            return importlib.util.spec_from_file_location(name, {so!r})
sys.meta_path.insert(0, _ServeBrokenC())
"""


def test_undefined_symbol_becomes_a_message_with_the_fix(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to make a library with an undefined symbol")
    source = tmp_path / "broken.c"
    source.write_text(UNDEFINED)
    so = tmp_path / "_C.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(so), str(source)], check=True)
    result = probe(RUNNING, FINDER.format(so=str(so)))
    assert not result["have_extension"]
    error = result["error"]
    assert "undefined symbol: effseg_test_missing_symbol" in error
    assert f"does not fit the running torch {torch.__version__}" in error
    assert "rebuild effseg against the running torch" in error
    assert len(result["warnings"]) == 1 and error in result["warnings"][0]
    assert result["matches_stock"] and result["grad_finite"]
    assert result["rc"] == [0, 0] and result["info"]["extension_error"] == error


@pytest.mark.skipif(not effseg.HAVE_EXTENSION, reason="effseg._C is not loaded here")
def test_loaded_build_records_what_it_was_built_against():
    assert build_mismatch(BUILD.TORCH_VERSION, BUILD.TORCH_CUDA_VERSION, torch.__version__,
                          torch.version.cuda) is None
    torch_mm = ".".join(torch.__version__.split(".")[:2])
    torch_cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else None
    if BUILD.WITH_CUDA:
        local = f"{torch_cuda}torch{torch_mm}"
    else:
        local = f"cputorch{torch_mm}" + (f".{torch_cuda}" if torch_cuda else "")
    assert effseg.__version__ == BUILD.VERSION
    assert BUILD.VERSION.split("+")[1] == local
    assert (BUILD.CUDA_ARCHS is not None) == BUILD.WITH_CUDA
