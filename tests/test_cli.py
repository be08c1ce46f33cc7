import json
import subprocess
import sys

import pytest

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


@pytest.mark.slow
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


def test_version_and_plain_text_help():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"effseg {effseg.__version__}"
    proc = run("--help")
    assert proc.returncode == 0 and "`" not in proc.stdout and "predict" in proc.stdout


def test_closed_pipe_ends_quietly():
    """`effseg info --json | head -1`: no traceback when the reader goes away."""
    proc = subprocess.run(f"'{sys.executable}' -m effseg info --json | head -c 1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout == "{"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_train_refuses_a_missing_data_folder_in_one_line(tmp_path):
    proc = run("train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"effseg train: error: --data {tmp_path / 'nowhere'}: "
                                   "dataset folder not found")
    assert not (tmp_path / "run").exists()


def test_failed_train_removes_the_run_folder_it_created(tmp_path):
    data = tmp_path / "data"
    data.mkdir()  # no dataset.json: the run fails after creating its folder
    proc = run("train", "--out", str(tmp_path / "run"), "--data", str(data))
    assert proc.returncode == 2 and "dataset.json" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
    kept = tmp_path / "mine"
    kept.mkdir()  # a folder the user made is left where it was
    proc = run("train", "--out", str(kept), "--data", str(data))
    assert proc.returncode == 2 and kept.is_dir()


def test_old_preset_flag_and_name_still_work_with_a_note(tmp_path):
    from effseg.pipeline.model_config import model_config
    assert model_config("default")["channels"] == model_config("large")["channels"] == [
        16, 32, 64, 128, 160]
    proc = run("train", "--out", str(tmp_path / "run"), "--model", "default", "--data",
               str(tmp_path / "nowhere"))
    assert "--model is deprecated" in proc.stderr and "--preset large" in proc.stderr
    proc = run("train", "--help")
    assert "--preset {tiny,small,large}" in proc.stdout and "--model" not in proc.stdout
