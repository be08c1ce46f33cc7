"""Inference (`effseg.pipeline.predict`) and evaluation (`effseg.pipeline.metrics`, `effseg.pipeline.evaluate`).

Metrics are checked against values worked out by hand on anisotropic grids and against a brute
force oracle (every pair of surface voxels); predictions are checked for the source geometry
(shape, affine, header, orientation) and for the dataset's own label ids.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel", reason="predict and evaluate need nibabel")

from nibabel import orientations  # noqa: E402
from scipy import ndimage  # noqa: E402

from effseg.pipeline.data import DataError, make_phantom_dataset, phantom_case  # noqa: E402
from effseg.pipeline.evaluate import (  # noqa: E402
    dataset_labels,
    evaluate_files,
    find_pairs,
    format_table,
    label_means,
    matched_labels,
    write_csv,
)
from effseg.pipeline.data import Reorientation  # noqa: E402
from effseg.pipeline.metrics import class_dice, dice, hd95, surface  # noqa: E402
from effseg.pipeline.predict import Predictor, find_cases, predict_paths  # noqa: E402
from effseg.pipeline.preprocess import normalize, to_network_grid  # noqa: E402
from effseg.pipeline.run_checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from effseg.pipeline.train import TrainConfig, train  # noqa: E402

SPACING = (0.8, 1.2, 3.0)
CLASSES = ["liver", "lung_left", "lung_right"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "effseg", *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return path


# ---------------------------------------------------------------- metrics by hand

def slab(shape, axis, indices) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    index = [slice(None)] * 3
    index[axis] = list(indices)
    mask[tuple(index)] = True
    return mask


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slabs_shifted_by_one_voxel_give_dice_half_and_hd95_one_spacing(axis):
    shape = (6, 5, 8)
    ref, pred = slab(shape, axis, [2, 3]), slab(shape, axis, [3, 4])
    assert dice(pred, ref) == pytest.approx(0.5)
    # Every voxel of a two-voxel slab is surface; half of each surface lies on the other, half
    # one voxel away along `axis`: the 95th percentile is one spacing along that axis.
    assert hd95(pred, ref, SPACING) == pytest.approx(SPACING[axis])


def test_single_voxels_are_apart_by_their_world_distance():
    shape = (5, 4, 4)
    pred, ref = np.zeros(shape, bool), np.zeros(shape, bool)
    pred[0, 0, 0] = True
    ref[2, 1, 1] = True
    assert dice(pred, ref) == 0.0
    assert hd95(pred, ref, SPACING) == pytest.approx(math.sqrt(1.6**2 + 1.2**2 + 3.0**2))
    assert hd95(pred, pred, SPACING) == 0.0 and dice(pred, pred) == 1.0


def test_hd95_takes_the_95th_percentile_not_the_maximum():
    # A 10x10x1 plate and the same plate with one stray voxel 4 slices away: of the 101
    # directed distances from the prediction 100 are 0, so the 95th percentile ignores the
    # stray voxel, which the plain Hausdorff distance would report.
    shape = (10, 10, 6)
    ref = np.zeros(shape, bool)
    ref[:, :, 0] = True
    pred = ref.copy()
    pred[5, 5, 4] = True
    assert hd95(pred, ref, SPACING) == 0.0
    distances = ndimage.distance_transform_edt(~ref, sampling=SPACING)[pred]
    assert distances.max() == pytest.approx(4 * SPACING[2])


def brute_force_hd95(pred, ref, spacing) -> float:
    """Surface voxels by explicit face-neighbour tests, distances over every pair."""
    def faces_surface(mask):
        padded = np.pad(mask, 1)
        inside = np.ones(mask.shape, bool)
        for axis in range(3):
            for shift in (-1, 1):
                inside &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
        return mask & ~inside

    a = np.argwhere(faces_surface(pred)) * np.asarray(spacing)
    b = np.argwhere(faces_surface(ref)) * np.asarray(spacing)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_a_brute_force_oracle_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    shape = (14, 12, 9)
    blobs = [ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) for _ in range(2)]
    pred, ref = blobs[0] > 0.15, blobs[1] > 0.15
    assert pred.any() and ref.any() and not np.array_equal(pred, ref)
    assert hd95(pred, ref, SPACING) == pytest.approx(brute_force_hd95(pred, ref, SPACING),
                                                     rel=1e-9)
    assert dice(pred, ref) == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))


def test_surface_counts_voxels_on_the_volume_border():
    full = np.ones((4, 4, 4), bool)
    assert surface(full).sum() == 4**3 - 2**3


def test_nan_rules_for_empty_masks():
    empty, some = np.zeros((6, 6, 6), bool), np.zeros((6, 6, 6), bool)
    some[2:4, 2:4, 2:4] = True
    assert math.isnan(dice(empty, empty)) and math.isnan(hd95(empty, empty, SPACING))
    assert dice(some, empty) == 0.0 and dice(empty, some) == 0.0
    assert hd95(some, empty, SPACING) == math.inf and hd95(empty, some, SPACING) == math.inf


def test_class_dice_from_label_maps():
    ref = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 0, 0])
    scores = class_dice(pred, ref, 4)
    assert scores[1].item() == pytest.approx(2 * 2 / (3 + 3))
    assert scores[2].item() == pytest.approx(2 * 1 / (1 + 2))
    assert scores[0].item() == pytest.approx(2 * 2 / (3 + 4))
    assert math.isnan(scores[3].item())  # in neither map


# ---------------------------------------------------------------- evaluate on files

@pytest.fixture
def scored_folders(tmp_path):
    """Two cases on an anisotropic grid with hand-known scores; label 3 is declared, absent."""
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 30.0)
    shape = (6, 5, 8)
    box = np.zeros(shape, bool)
    box[1:3, 1:3, 5:7] = True
    ref_a, pred_a = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    ref_a[slab(shape, 2, [2, 3])] = 1
    pred_a[slab(shape, 2, [3, 4])] = 1
    ref_a[box] = 2  # missed in case a
    ref_b = np.zeros(shape, np.uint8)
    ref_b[slab(shape, 0, [0, 1])] = 1
    ref_b[box] = 2
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    for name, ref, pred in (("a", ref_a, pred_a), ("b", ref_b, ref_b)):
        save_nifti(ref, affine, tmp_path / "ref" / f"{name}.nii.gz")
        save_nifti(pred, affine, tmp_path / "pred" / f"{name}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "organ": 1, "box": 2, "absent": 3}}))
    return tmp_path


def test_evaluate_files_gives_hand_computed_scores(scored_folders):
    labels = dataset_labels(scored_folders)
    assert labels == {"organ": 1, "box": 2, "absent": 3}
    rows = evaluate_files(find_pairs(scored_folders / "pred", scored_folders / "ref"), labels)
    by = {(r["case"], r["label"]): r for r in rows}
    assert len(rows) == 6
    assert by["a", "organ"]["dice"] == pytest.approx(0.5)
    assert by["a", "organ"]["hd95_mm"] == pytest.approx(3.0)
    assert by["a", "box"]["dice"] == 0.0 and by["a", "box"]["hd95_mm"] == math.inf
    assert by["b", "organ"]["dice"] == 1.0 and by["b", "organ"]["hd95_mm"] == 0.0
    assert math.isnan(by["a", "absent"]["dice"]) and math.isnan(by["b", "absent"]["hd95_mm"])
    assert by["a", "organ"]["ref_voxels"] == 60 and by["a", "box"]["pred_voxels"] == 0
    means = {m["label"]: m for m in label_means(rows)}
    assert means["organ"]["dice"] == pytest.approx(0.75)
    assert means["organ"]["hd95_mm"] == pytest.approx(1.5)
    assert means["box"]["hd95_mm"] == math.inf
    assert means["absent"]["cases"] == 0 and math.isnan(means["absent"]["dice"])
    # Without names, only the ids found are scored.
    found = evaluate_files(find_pairs(scored_folders / "pred", scored_folders / "ref"))
    assert sorted({r["label"] for r in found}) == ["label_1", "label_2"]
    table = format_table(rows)
    assert "organ" in table and "0.7500" in table and "inf" in table


def test_evaluate_cli_writes_csv_and_prints_table(scored_folders):
    csv_path = scored_folders / "scores.csv"
    proc = run_cli("evaluate", "--pred", str(scored_folders / "pred"), "--ref",
                   str(scored_folders / "ref"), "--dataset", str(scored_folders / "dataset.json"),
                   "--labels", "organ", "box", "--csv", str(csv_path))
    assert proc.returncode == 0, proc.stderr
    assert "organ" in proc.stdout and "absent" not in proc.stdout
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "case,label,label_id,pred_label_id,dice,hd95_mm,ref_voxels,pred_voxels"
    assert "a,organ,1,1,0.5,3,60,60" in lines
    assert "mean,box,2,2,0.5,inf,16,8" in lines
    # the median of Dice 0 and 1, and of HD95 inf and 0
    assert "median,box,2,2,0.5,inf,16,8" in lines and "median,organ,1,1,0.75,1.5,136,136" in lines
    assert "median" in proc.stdout


def test_evaluate_scores_only_predicted_cases_and_names_the_others(scored_folders):
    (scored_folders / "pred" / "b.nii.gz").unlink()
    proc = run_cli("evaluate", "--pred", str(scored_folders / "pred"), "--ref",
                   str(scored_folders / "ref"))
    assert proc.returncode == 0, proc.stderr
    assert "1 reference(s) without a prediction left out: b" in proc.stderr
    cases = {line.split(",")[0] for line in
             (scored_folders / "pred" / "evaluation.csv").read_text().splitlines()[1:]}
    assert cases == {"a", "mean", "median"}
    (scored_folders / "pred" / "a.nii.gz").rename(scored_folders / "pred" / "zz.nii.gz")
    proc = run_cli("evaluate", "--pred", str(scored_folders / "pred"), "--ref",
                   str(scored_folders / "ref"))
    assert proc.returncode == 2 and "no prediction matches a reference" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_matches_cases_by_id_and_labels_by_name(scored_folders, tmp_path):
    """Predictions named like nnU-Net images and stored as .nii, with liver = 1 where the
    reference has it as 5 (TotalSegmentator's id): matched by case id and label name."""
    ref_dir, pred_dir = tmp_path / "ref5", tmp_path / "pred_ids"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for name in ("a", "b"):
        ref = nib.load(scored_folders / "ref" / f"{name}.nii.gz")
        data = np.asarray(ref.dataobj).copy()
        data[data == 1] = 5
        save_nifti(data, ref.affine, ref_dir / f"{name}.nii.gz")
        pred = nib.load(scored_folders / "pred" / f"{name}.nii.gz")
        save_nifti(np.asarray(pred.dataobj), pred.affine, pred_dir / f"{name}_0000.nii")
    (pred_dir / "labels.json").write_text(json.dumps(
        {"labels": {"background": 0, "liver": 1, "box": 2, "spleen": 4}}))
    (tmp_path / "ref5.json").write_text(json.dumps(
        {"labels": {"background": 0, "box": 2, "kidney": 3, "liver": 5}}))
    proc = run_cli("evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--ref-labels",
                   str(tmp_path / "ref5.json"))
    assert proc.returncode == 0, proc.stderr
    lines = (pred_dir / "evaluation.csv").read_text().splitlines()
    assert "a,liver,5,1,0.5,3,60,60" in lines and "b,liver,5,1,1,0,76,76" in lines
    assert "mean,box,2,2,0.5,inf,16,8" in lines
    assert "spleen" in proc.stderr and "kidney" in proc.stderr  # one side only: not scored
    assert "1->5" in proc.stdout
    assert matched_labels(pred_dir / "labels.json", tmp_path / "ref5.json", ["liver"]) == {
        "liver": (1, 5)}


def test_evaluate_refuses_predictions_on_another_grid(scored_folders):
    pred = scored_folders / "pred" / "a.nii.gz"
    img = nib.load(pred)
    shifted = img.affine.copy()
    shifted[0, 3] += 0.5
    save_nifti(np.asarray(img.dataobj), shifted, pred)
    with pytest.raises(DataError, match="a.nii.gz"):
        evaluate_files(find_pairs(scored_folders / "pred", scored_folders / "ref"))


def test_write_csv_keeps_nan_and_inf_readable(scored_folders, tmp_path):
    rows = evaluate_files(find_pairs(scored_folders / "pred", scored_folders / "ref"),
                          dataset_labels(scored_folders))
    text = write_csv(rows, tmp_path / "out.csv").read_text()
    assert "a,absent,3,3,nan,nan,0,0" in text and "a,box,2,2,0,inf,8,0" in text


# ---------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """best.pt of a one-epoch tiny run on a 6 mm phantom (classes liver and both lungs)."""
    root = tmp_path_factory.mktemp("predict")
    data = make_phantom_dataset(root / "phantom", num_cases=3, shape=(32, 32, 24),
                                spacing=(6.0, 6.0, 6.0), seed=11)
    train(TrainConfig(out=str(root / "run"), data=str(data), labels=CLASSES, model="tiny",
                      epochs=1, lr=1e-2, seed=0))
    return root / "run" / "best.pt"


def reoriented_copy(data: np.ndarray, affine: np.ndarray):
    """The same voxels on a grid with permuted and flipped axes (same world positions)."""
    ornt = np.array([[2, -1], [0, 1], [1, -1]])
    moved = orientations.apply_orientation(data, ornt)
    return moved, affine @ orientations.inv_ornt_aff(ornt, data.shape), ornt


def test_predict_returns_the_source_grid_and_undoes_the_orientation(trained, tmp_path):
    # 3 mm source, 6 mm network grid: the prediction is resampled back and reoriented.
    image, _, affine = phantom_case((40, 36, 28), (3.0, 3.0, 3.0), seed=5)
    moved, moved_affine, ornt = reoriented_copy(image, affine)
    assert nib.aff2axcodes(moved_affine) != ("R", "A", "S")
    centre = np.array([7, 11, 13, 1.0])
    index_in_moved = np.linalg.solve(moved_affine, affine @ centre)
    assert moved[tuple(np.rint(index_in_moved[:3]).astype(int))] == image[7, 11, 13]
    src = save_nifti(image, affine, tmp_path / "ras.nii.gz")
    other = save_nifti(moved, moved_affine, tmp_path / "other.nii.gz")
    predictor = Predictor.from_checkpoint(trained, "cpu")
    out_src = predictor.predict_case([src], tmp_path / "out" / "ras.nii.gz")
    out_other = predictor.predict_case([other], tmp_path / "out" / "other.nii.gz")
    for out, source in ((out_src, src), (out_other, other)):
        pred, ref = nib.load(out), nib.load(source)
        assert pred.shape == ref.shape
        np.testing.assert_array_equal(pred.affine, ref.affine)
        assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(ref.affine)
        assert int(pred.header["sform_code"]) == 1 and int(pred.header["qform_code"]) == 1
    a = np.asarray(nib.load(out_src).dataobj)
    b = np.asarray(nib.load(out_other).dataobj)
    assert len(np.unique(a)) > 1, "a constant prediction would make the comparison vacuous"
    np.testing.assert_array_equal(orientations.apply_orientation(a, ornt), b)
    # Dataset label ids, not training class ids (lungs are 5 and 6 in the phantom).
    assert set(np.unique(a)) <= {0, 1, 5, 6}


def test_predict_probabilities_agree_with_the_label_map(trained, tmp_path):
    image, _, affine = phantom_case((36, 36, 24), (4.0, 4.0, 5.0), seed=6)
    src = save_nifti(image, affine, tmp_path / "case_0000.nii.gz")
    written = predict_paths(trained, src, tmp_path / "out", device="cpu", probabilities=True)
    assert written == [tmp_path / "out" / "case.nii.gz"]
    probs = nib.load(tmp_path / "out" / "case_probabilities.nii.gz")
    assert probs.shape == (36, 36, 24, 4) and probs.get_data_dtype() == np.float32
    p = np.asarray(probs.dataobj)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    ids = np.array([c["label_id"] for c in classes])
    assert [c["name"] for c in classes] == ["background", *CLASSES]
    label = np.asarray(nib.load(written[0]).dataobj)
    np.testing.assert_array_equal(label, ids[p.argmax(-1)])


def test_predict_folder_in_nnunet_naming(trained, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in (1, 2):
        image, _, affine = phantom_case((24, 24, 20), (6.0, 6.0, 6.0), seed=seed)
        save_nifti(image, affine, folder / f"c{seed}_0000.nii.gz")
    assert [c[0] for c in find_cases(folder)] == ["c1", "c2"]
    # label maps lying beside the images are left out, each with a note
    _, label, affine = phantom_case((24, 24, 20), (6.0, 6.0, 6.0), seed=1)
    save_nifti(label.astype(np.uint8), affine, folder / "c1.nii.gz")
    proc = run_cli("predict", "--checkpoint", str(trained), "--input", str(folder), "--out",
                   str(tmp_path / "out"), "--device", "cpu", "--labels-json")
    assert proc.returncode == 0, proc.stderr
    assert "skipped c1.nii.gz: no channel suffix (_0000)" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "c1.nii.gz", "c2.nii.gz", "labels.json"]
    plans = load_checkpoint(trained)["plans"]  # the dataset's own ids (lungs: 5 and 6)
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {
        "labels": dict(zip(["background", *CLASSES], plans["label_ids"]))}


def test_predict_plain_folder_skips_label_maps(trained, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    image, label, affine = phantom_case((24, 24, 20), (6.0, 6.0, 6.0), seed=2)
    save_nifti(image, affine, folder / "ct.nii.gz")
    save_nifti(label.astype(np.uint8), affine, folder / "ct_seg.nii.gz")
    save_nifti(label.astype(np.float32), affine, folder / "ct_seg_float.nii.gz")
    notes = []
    assert [c[0] for c in find_cases(folder, notes.append)] == ["ct"]
    assert len(notes) == 2 and all("look like a label map" in n for n in notes)
    # An MR-like image (non-negative, many values) is an image.
    save_nifti((image - image.min()).astype(np.float32), affine, folder / "mr.nii.gz")
    assert [c[0] for c in find_cases(folder)] == ["ct", "mr"]


def test_predict_warns_about_an_all_background_prediction(trained, tmp_path, monkeypatch):
    image, _, affine = phantom_case((24, 24, 20), (6.0, 6.0, 6.0), seed=5)
    src = save_nifti(image, affine, tmp_path / "ct.nii.gz")
    real = Predictor.network_probabilities

    def background_only(self, image, reorientation):
        p = real(self, image, reorientation)
        p[0] = 2.0  # background wins everywhere
        return p

    monkeypatch.setattr(Predictor, "network_probabilities", background_only)
    notes = []
    (written,) = predict_paths(trained, src, tmp_path / "out", device="cpu", note=notes.append)
    assert not np.asarray(nib.load(written).dataobj).any()
    assert len(notes) == 1 and "holds only background" in notes[0] and "liver" in notes[0]


@pytest.mark.slow
def test_checkpoint_argument_takes_a_run_folder_and_refuses_other_files(trained, tmp_path):
    assert resolve_checkpoint(trained.parent) == trained
    (tmp_path / "empty_run").mkdir()
    image, _, affine = phantom_case((24, 24, 20), (6.0, 6.0, 6.0), seed=5)
    nifti = save_nifti(image, affine, tmp_path / "ct.nii.gz")
    raw = save_nifti(image, affine, tmp_path / "ct.nii")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for bad, words in ((tmp_path / "empty_run", "folder without best.pt or last.pt"),
                       (nifti, "a gzip file"), (raw, "a NIfTI image"),
                       (tmp_path / "notes.txt", "a text file"),
                       (tmp_path / "missing.pt", "checkpoint not found")):
        proc = run_cli("predict", "--checkpoint", str(bad), "--input", str(nifti), "--out",
                       str(tmp_path / "out"))
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "weights_only" not in proc.stderr
    # the old spelling works, with a note
    proc = run_cli("predict", "--model", str(trained), "--input", str(nifti), "--out",
                   str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "--model is deprecated" in proc.stderr and "--checkpoint" in proc.stderr


def test_predict_refuses_to_overwrite_its_input_and_missing_channels(trained, tmp_path):
    image, _, affine = phantom_case((24, 24, 20), (6.0, 6.0, 6.0), seed=3)
    src = save_nifti(image, affine, tmp_path / "ct.nii.gz")
    with pytest.raises(DataError, match="overwrite"):
        predict_paths(trained, src, tmp_path, device="cpu")
    folder = tmp_path / "multi"
    folder.mkdir()
    for channel in (0, 2):
        save_nifti(image, affine, folder / f"x_{channel:04d}.nii.gz")
    with pytest.raises(DataError, match="x_0001.nii.gz"):
        find_cases(folder)


def test_test_time_mirroring_averages_the_mirrored_predictions(trained, tmp_path):
    image, _, affine = phantom_case((24, 28, 20), (6.0, 6.0, 6.0), seed=4)
    plain = Predictor.from_checkpoint(trained, "cpu")
    assert plain.mirror_axes == ()
    with pytest.raises(CheckpointError, match="mirror-axes"):
        Predictor.from_checkpoint(trained, "cpu", tta=True)
    # A run trained with --mirror-axes 1 2 mirrors along them at test time by default.
    state = load_checkpoint(trained)
    state["plans"]["mirror_axes"] = [1, 2]
    mirrored_ckpt = save_checkpoint(state, tmp_path / "mirrored.pt")
    tta = Predictor.from_checkpoint(mirrored_ckpt, "cpu")
    assert tta.mirror_axes == (1, 2)
    assert Predictor.from_checkpoint(mirrored_ckpt, "cpu", tta=False).mirror_axes == ()

    reorientation = Reorientation.of(affine, image.shape)
    got = tta.network_probabilities(image[None], reorientation)
    x = torch.from_numpy(normalize(to_network_grid(image[None], reorientation,
                                                   tta.plans["target_spacing"]),
                                   tta.stats))[None]
    expected = 0
    with torch.no_grad():
        for dims in ([], [3], [4], [3, 4]):
            expected = expected + torch.softmax(
                plain.model(x.flip(dims)), 1).flip(dims)[0] / 4
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, plain.network_probabilities(image[None], reorientation))
