"""Whole-volume training (`effseg.pipeline.train`, `python -m effseg train`) on CPU.

Real CT comes from `EFFSEG_CT_DATA` (default `<repo>/../shared/data/ct`); the test that needs it
skips when the folder is absent. Datasets are built in temporary folders (symbolic links to the
real files, or phantoms), never inside the repository.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel", reason="training needs nibabel")

import effseg.pipeline.train as train_module  # noqa: E402
from effseg.pipeline.augment import Augmentation  # noqa: E402
from effseg.pipeline.data import make_phantom_dataset  # noqa: E402
from effseg.pipeline.predict import predict_paths  # noqa: E402
from effseg.pipeline.run_checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from effseg.pipeline.train import (  # noqa: E402
    RunError,
    TrainConfig,
    epoch_order,
    load_batch,
    split_cases,
    train,
)

REPO = Path(__file__).resolve().parents[1]
CT_ROOT = Path(os.environ.get("EFFSEG_CT_DATA", REPO.parent / "shared" / "data" / "ct"))
TS_SUBSET = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]
LUNGS_LIVER = ["liver", "lung_left", "lung_right"]


# Tiny volumes gain nothing from threads, and on a shared machine OpenMP threads that wait for
# each other cost seconds per step: these tests run torch on one thread.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "effseg", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or ONE_THREAD)


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("train") / "phantom", num_cases=3,
                                shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=21)


def tiny_config(out: Path, data: Path, **overrides) -> TrainConfig:
    settings = dict(out=str(out), data=str(data), labels=LUNGS_LIVER, model="tiny", epochs=2,
                    lr=1e-2, seed=3)
    return TrainConfig(**{**settings, **overrides})


# ---------------------------------------------------------------- real CT

def ts_dataset(root: Path) -> Path:
    folder = CT_ROOT / "ts_example_ct"
    if not (folder / "ct.nii.gz").is_file():
        pytest.skip(f"real CT case 'ts_example_ct' not found in {CT_ROOT}; set EFFSEG_CT_DATA "
                    "to the folder described by shared/data/ct/PROVENANCE.md")
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "ts_example_ct_0000.nii.gz").symlink_to(folder / "ct.nii.gz")
    (root / "labelsTr" / "ts_example_ct.nii.gz").symlink_to(folder / "seg_totalseg_fast.nii.gz")
    declared = {name: int(k) for k, name in json.loads((folder / "labels.json").read_text())
                .items()}
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, **declared},
         "numTraining": 1, "file_ending": ".nii.gz"}))
    return root


@pytest.mark.slow
def test_two_steps_on_the_whole_real_ct_then_predict_in_its_geometry(tmp_path):
    data = ts_dataset(tmp_path / "Dataset001_TS")
    declared = json.loads((data / "dataset.json").read_text())["labels"]
    assert all(name in declared for name in TS_SUBSET)
    result = train(TrainConfig(out=str(tmp_path / "run"), data=str(data), labels=TS_SUBSET,
                               model="tiny", epochs=2, lr=1e-3, device="cpu"))
    assert not result.interrupted and result.epochs_done == 2
    plans = json.loads((tmp_path / "run" / "plans.json").read_text())
    # The median spacing of one 3 mm case is 3 mm: the network sees the whole volume as is.
    assert plans["target_spacing"] == [3.0, 3.0, 3.0]
    assert plans["network_shapes"] == {"ts_example_ct": [122, 101, 112]}
    assert plans["classes"] == ["background", *TS_SUBSET]
    assert plans["label_ids"] == [0] + [declared[n] for n in TS_SUBSET]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["progress"]["global_step"] == 2
    assert [r["val_source"] for r in result.history] == ["train", "train"]

    source = CT_ROOT / "ts_example_ct" / "ct.nii.gz"
    written = predict_paths(tmp_path / "run" / "best.pt", source, tmp_path / "pred", "cpu")
    pred, ct = nib.load(written[0]), nib.load(source)
    assert written[0].name == "ct.nii.gz"
    assert pred.shape == ct.shape == (122, 101, 112)
    np.testing.assert_array_equal(pred.affine, ct.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, *(declared[n] for n in TS_SUBSET)}


# ---------------------------------------------------------------- resume

# Every augmentation at once, deep supervision, mirroring: the draws of this run (seed 3, two
# epochs of two training cases) include a rotation or zoom and intensity transforms (asserted).
AUGMENTED = dict(augment="all", mirror_axes=[1, 2], deep_supervision=True)


@pytest.fixture(scope="module", params=[{}, AUGMENTED], ids=["plain", "augmented"])
def uninterrupted(request, tiny_phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = train(tiny_config(out, tiny_phantom, **request.param))
    assert not result.interrupted
    return result, request.param


@pytest.mark.parametrize("stop_after", [1, 2], ids=["mid-epoch", "end-of-epoch-steps"])
def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(tiny_phantom, uninterrupted,
                                                              tmp_path, monkeypatch, stop_after):
    uninterrupted, recipe = uninterrupted

    steps = {"n": 0}
    real_step = train_module.train_step

    def step_then_ctrl_c(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        steps["n"] += 1
        if steps["n"] == stop_after:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler sees a real Ctrl-C
        return loss

    monkeypatch.setattr(train_module, "train_step", step_then_ctrl_c)
    stopped = train(tiny_config(tmp_path / "b", tiny_phantom, **recipe))
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert stopped.interrupted and stopped.epochs_done == 0
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert state["progress"]["step_in_epoch"] == stop_after
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    resumed = train(TrainConfig(out=str(tmp_path / "b")), resume=True)
    assert not resumed.interrupted and resumed.epochs_done == 2
    a = load_checkpoint(uninterrupted.run_dir / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    if recipe:
        # The resumed run took its settings from the checkpoint, and they did something.
        assert {k: b["config"][k] for k in recipe} == recipe
        assert any(k.startswith("ds_heads.") for k in b["model"])
        plans = b["plans"]
        assert plans["mirror_axes"] == [1, 2]
        augmentation = Augmentation(tuple(plans["target_spacing"]), (0.0,), 255, "all", (1, 2))
        draws = [augmentation.draw(3, epoch, case) for epoch in range(2)
                 for case in range(len(plans["train_cases"]))]
        assert any(d.matrix is not None for d in draws), draws
        assert any(d.flips for d in draws) and any(
            d.noise_std or d.brightness or d.contrast or d.gamma for d in draws), draws
    assert a["rng"]["torch"].equal(b["rng"]["torch"])
    assert [r["dice"] for r in uninterrupted.history] == [r["dice"] for r in resumed.history]
    assert [r["train_loss"] for r in uninterrupted.history] == \
        [r["train_loss"] for r in resumed.history]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_a_finished_run_is_not_restarted_and_resume_needs_a_checkpoint(tiny_phantom, tmp_path):
    with pytest.raises(RunError, match="nothing to resume"):
        train(TrainConfig(out=str(tmp_path / "none")), resume=True)
    train(tiny_config(tmp_path / "run", tiny_phantom, epochs=1))
    with pytest.raises(RunError, match="already holds a run"):
        train(tiny_config(tmp_path / "run", tiny_phantom, epochs=1))
    again = train(TrainConfig(out=str(tmp_path / "run")), resume=True)
    assert again.epochs_done == 1 and not again.interrupted
    # A checkpoint written before the augmentation settings existed resumes with them off.
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    for key in ("augment", "mirror_axes", "deep_supervision"):
        del state["config"][key]
    del state["plans"]["mirror_axes"], state["model_config"]["deep_supervision"]
    save_checkpoint(state, tmp_path / "run" / "last.pt")
    config, _, _ = train_module._open_run(TrainConfig(out=str(tmp_path / "run")), resume=True)
    assert (config.augment, config.mirror_axes, config.deep_supervision) == ("off", None, False)
    assert train(TrainConfig(out=str(tmp_path / "run")), resume=True).epochs_done == 1


# ---------------------------------------------------------------- checkpoints

class _Payload:
    """Unpickling this would call `_record_unpickling`."""

    def __reduce__(self):
        return (_record_unpickling, ())


UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return "ran"


def test_checkpoints_load_weights_only_and_refuse_pickled_objects(tmp_path):
    good = save_checkpoint({"model": {"w": torch.ones(3)}, "note": [1, "a", None, 2.5]},
                           tmp_path / "good.pt")
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file must be renamed away"
    assert torch.load(good, weights_only=True)["note"] == [1, "a", None, 2.5]
    assert load_checkpoint(good)["model"]["w"].equal(torch.ones(3))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "effseg-train-checkpoint", "version": 1, "x": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="a weights-only load refuses"):
        load_checkpoint(evil)
    assert not UNPICKLED
    proc = run_cli("predict", "--checkpoint", str(evil), "--input", str(good), "--out",
                   str(tmp_path / "out"))
    assert proc.returncode == 2 and "weights-only load refuses" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an effseg training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------- batches and splits

def test_a_batch_pads_volumes_to_the_largest_and_ignores_the_padding(tmp_path):
    np.save(tmp_path / "a_image.npy", np.full((1, 4, 5, 6), 2.0, np.float32))
    np.save(tmp_path / "a_label.npy", np.ones((4, 5, 6), np.uint8))
    np.save(tmp_path / "b_image.npy", np.full((1, 6, 3, 6), 3.0, np.float32))
    np.save(tmp_path / "b_label.npy", np.full((6, 3, 6), 2, np.uint8))
    image, label = load_batch(tmp_path, ["a", "b"], [-1.5], 255, np.dtype(np.uint8))
    assert image.shape == (2, 1, 6, 5, 6) and label.shape == (2, 6, 5, 6)
    assert (image[0, 0, :4, :5] == 2.0).all() and (image[0, 0, 4:] == -1.5).all()
    assert (label[0, :4, :5] == 1).all() and (label[0, 4:] == 255).all()
    assert (label[1, :6, :3] == 2).all() and (label[1, :, 3:] == 255).all()
    # The padding changes nothing: the loss only sees the voxels of the volumes.
    from effseg.losses import DiceCELoss

    loss = DiceCELoss(ignore_index=255, batch_dice=True)
    logits = torch.randn(2, 3, 6, 5, 6)
    whole = loss(logits, label)
    kept = label != 255
    flat = logits.movedim(1, -1)[kept].T.reshape(1, 3, -1).contiguous()
    assert whole.item() == pytest.approx(loss(flat, label[kept].reshape(1, -1)).item(), rel=1e-5)


def test_splits_and_epoch_orders_are_seeded():
    cases = [f"c{i}" for i in range(10)]
    train_a, val_a = split_cases(cases, 0.2, None, seed=1)
    assert len(val_a) == 2 and sorted(train_a + val_a) == cases
    assert split_cases(cases, 0.2, None, seed=1) == (train_a, val_a)
    assert split_cases(cases, 0.2, None, seed=2) != (train_a, val_a)
    assert split_cases(["only"], 0.2, None, seed=0) == (["only"], [])
    assert split_cases(["a", "b"], 0.01, None, seed=0)[1] != []
    assert split_cases(cases, 0.2, ["c3"], seed=0)[1] == ["c3"]
    with pytest.raises(RunError, match="c99"):
        split_cases(cases, 0.2, ["c99"], seed=0)
    with pytest.raises(RunError, match="no case is left"):
        split_cases(["a"], 0.0, ["a"], seed=0)
    assert epoch_order(cases, 4, 7) == epoch_order(cases, 4, 7)
    assert epoch_order(cases, 4, 7) != epoch_order(cases, 4, 8)


# ---------------------------------------------------------------- learning

@pytest.mark.slow
def test_short_cpu_training_on_phantoms_segments_liver_and_lungs(tmp_path):
    # 3 training cases on a 9 mm grid (32 x 32 x 24), 90 steps: ~75 s on one CPU thread. Over
    # 5 phantom/run seeds this recipe gave at least 0.855 on each class; this one ~0.9.
    data = make_phantom_dataset(tmp_path / "phantom", num_cases=4, shape=(32, 32, 24),
                                spacing=(9.0, 9.0, 9.0), seed=3)
    result = train(TrainConfig(out=str(tmp_path / "run"), data=str(data), labels=LUNGS_LIVER,
                               model="small", epochs=30, lr=3e-3, val_cases=["phantom_003"],
                               seed=2, device="cpu"))
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == result.best_epoch
    assert all(best["dice"][name] > 0.8 for name in LUNGS_LIVER), best["dice"]
    scores = (tmp_path / "run" / "validation" / "evaluation.csv").read_text().splitlines()
    liver = next(line for line in scores if line.startswith("mean,liver,"))
    assert float(liver.split(",")[3]) > 0.8, liver


# ---------------------------------------------------------------- command line

@pytest.mark.slow
def test_cli_train_predict_evaluate_on_the_default_phantom(tmp_path):
    env = dict(ONE_THREAD, EFFSEG_CACHE=str(tmp_path / "cache"))
    run = tmp_path / "run"
    proc = run_cli("train", "--out", str(run), "--preset", "tiny", "--epochs", "2", "--spacing",
                   "12", "--labels", *LUNGS_LIVER, "--lr", "1e-2", "--device", "cpu",
                   "--augment", "all", "--mirror-axes", "2", "1", "--deep-supervision", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    phantom = next((tmp_path / "cache").glob("phantom-*"))
    assert str(phantom) in proc.stdout
    assert "deep supervision" in proc.stdout and "augment all mirror [1, 2]" in proc.stdout
    # Which Dice is on which grid, and how long the run has taken and will take.
    assert "(validation cases, network grid)" in proc.stdout and "to go" in proc.stdout
    assert "scored in their source geometry" in proc.stdout
    assert json.loads((run / "plans.json").read_text())["mirror_axes"] == [1, 2]
    for name in ("plans.json", "last.pt", "best.pt", "metrics.jsonl", "metrics.csv",
                 "curves.png", "validation/evaluation.csv"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[0]["dice"]) == set(LUNGS_LIVER)
    assert records[0]["memory"] == "peak_rss" and records[0]["peak_memory_bytes"] > 0
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,lr,train_loss,mean_dice,dice_liver")
    assert len(csv_lines) == 3
    val_cases = json.loads((run / "plans.json").read_text())["val_cases"]
    assert val_cases and all((run / "validation" / f"{c}.nii.gz").is_file() for c in val_cases)

    pred = tmp_path / "pred"
    # A run folder is a checkpoint (its best.pt).
    proc = run_cli("predict", "--checkpoint", str(run), "--input",
                   str(phantom / "imagesTr"), "--out", str(pred), env=env)
    assert proc.returncode == 0, proc.stderr
    cases = sorted(p.name for p in (phantom / "labelsTr").iterdir())
    assert sorted(p.name for p in pred.iterdir()) == cases
    first = nib.load(pred / cases[0])
    assert first.shape == nib.load(phantom / "labelsTr" / cases[0]).shape == (96, 96, 64)
    # Test-time mirroring was on (the run mirrored); --no-tta gives a close, other answer.
    proc = run_cli("predict", "--checkpoint", str(run / "best.pt"), "--input",
                   str(phantom / "imagesTr" / f"{cases[0][:-7]}_0000.nii.gz"), "--out",
                   str(tmp_path / "plain"), "--no-tta", env=env)
    assert proc.returncode == 0, proc.stderr
    assert nib.load(tmp_path / "plain" / cases[0]).shape == first.shape

    proc = run_cli("evaluate", "--pred", str(pred), "--ref", str(phantom / "labelsTr"),
                   "--dataset", str(phantom), "--labels", *LUNGS_LIVER, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "lung_left" in proc.stdout and (pred / "evaluation.csv").is_file()

    again = run_cli("train", "--out", str(run), "--epochs", "3", env=env)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr
    flags = run_cli("train", "--out", str(run), "--resume", "--epochs", "3", env=env)
    assert flags.returncode == 2 and "--epochs" in flags.stderr
    done = run_cli("train", "--out", str(run), "--resume", env=env)
    assert done.returncode == 0 and "already" in done.stdout


def test_cli_ctrl_c_saves_last_pt_and_exits_with_a_message(tiny_phantom, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "effseg", "train", "--data", str(tiny_phantom), "--out", str(run),
         "--model", "tiny", "--epochs", "500", "--labels", *LUNGS_LIVER, "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/500"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "saved" in out and "--resume" in out and "Traceback" not in err
    state = load_checkpoint(run / "last.pt")
    assert 1 <= state["progress"]["epoch"] < 500


def test_cli_refuses_a_bad_dataset_before_training_starts(tiny_phantom, tmp_path):
    import shutil

    data = Path(shutil.copytree(tiny_phantom, tmp_path / "data"))
    bad = data / "labelsTr" / "phantom_002.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    proc = run_cli("train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1")
    assert proc.returncode == 2
    assert "phantom_002.nii.gz" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "run" / "preprocessed").exists()


@pytest.mark.parametrize("setting,words", [
    (dict(augment="heavy"), "--augment must be one of"),
    (dict(mirror_axes=[0, 3]), "--mirror-axes"),
    (dict(mirror_axes=[2, 2]), "--mirror-axes"),
])
def test_bad_augmentation_settings_are_refused_before_anything_runs(tmp_path, setting, words):
    with pytest.raises(RunError, match=words):
        train(TrainConfig(out=str(tmp_path / "run"), **setting))
    assert not (tmp_path / "run").exists()


def test_mirroring_left_right_with_sided_labels_warns(tiny_phantom, tmp_path, capsys):
    train(tiny_config(tmp_path / "run", tiny_phantom, epochs=1, mirror_axes=[0]))
    out = capsys.readouterr().out
    assert "warning: --mirror-axes includes 0" in out and "lung_left" in out


def test_training_applies_each_cases_draw_to_its_volume(tiny_phantom, tmp_path, monkeypatch):
    seen = []
    real_apply = Augmentation.apply

    def recording_apply(self, image, label, t):
        seen.append((t, tuple(image.shape), tuple(label.shape)))
        return real_apply(self, image, label, t)

    monkeypatch.setattr(Augmentation, "apply", recording_apply)
    result = train(tiny_config(tmp_path / "run", tiny_phantom, augment="all", batch_size=2))
    plans = load_checkpoint(tmp_path / "run" / "last.pt")["plans"]
    train_cases = plans["train_cases"]
    a = Augmentation(tuple(plans["target_spacing"]), (0.0,), 255, "all")
    expected = [a.draw(3, epoch, train_cases.index(name)) for epoch in range(2)
                for name in train_module.epoch_order(train_cases, 3, epoch)]
    assert result.epochs_done == 2 and [t for t, _, _ in seen] == expected
    assert all(shape[1:] == label for _, shape, label in seen)
    # Without --augment the transform is never applied.
    seen.clear()
    train(tiny_config(tmp_path / "plain", tiny_phantom, epochs=1))
    assert seen == []
