import json
import subprocess
import sys

import effseg
from effseg.ops import OP_NAMES


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "effseg", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_info_reports_build_and_kernels():
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["extension_loaded"] == effseg.HAVE_EXTENSION
    assert set(report["ops"]) == set(OP_NAMES)
    if effseg.HAVE_EXTENSION:
        assert all(k["cpu"] for k in report["ops"].values())
        assert report["built_with_torch"] is not None
        # a CUDA build registers CUDA kernels for every op, a CPU-only build none
        cuda = {k["cuda"] for k in report["ops"].values()}
        assert cuda == {report["built_with_cuda"] is not None}
    text = run("info")
    assert text.returncode == 0 and "norm_act_forward_" in text.stdout


def test_info_without_extension_says_why():
    import os
    proc = run("info", env=dict(os.environ, EFFSEG_NO_EXTENSION="1"))
    assert proc.returncode == 0, proc.stderr
    assert "EFFSEG_NO_EXTENSION" in proc.stdout and "reference" in proc.stdout


def test_plan_command_reports_options_and_largest_volume():
    proc = run("plan", "--budget", "64GB", "--shape", "96", "96", "80", "--spacing", "1", "1",
               "2", "--target-spacing", "2", "2", "2", "--channels", "4", "8", "--strides", "1",
               "2", "--cap", "28", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["shape"] == [48, 48, 80]
    assert [sum(o["recompute"]) for o in report["options"]] == [0, 1, 2]
    assert report["chosen"] == [False, False]  # 64 GB is plenty: no recompute needed
    assert all(len(o["calibration"]) >= 2 for o in report["options"])
