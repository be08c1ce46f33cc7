"""effseg.pipeline.data on real CT cases and on the synthetic phantom.

Real cases come from `EFFSEG_CT_DATA` (default `<repo>/../shared/data/ct`, see PROVENANCE.md
there); tests that need them skip when the folder is absent. Datasets are assembled from them in
temporary folders, by symbolic links, never inside the repository.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="the data layer needs nibabel (pip install nibabel)")

from effseg.pipeline.data import (
    PHANTOM_LABELS,
    CTNormalization,
    DataError,
    NiftiDataset,
    Reorientation,
    fit_ct_normalization,
    load_plans,
    make_phantom_dataset,
    normalization_from_plans,
    normalization_to_plans,
    pad_to_multiple,
    phantom_case,
    read_image,
    resample,
    resample_to_spacing,
    resampled_affine,
    save_plans,
    target_shape,
    voxel_spacing,
    write_like,
)

REPO = Path(__file__).resolve().parents[1]
CT_ROOT = Path(os.environ.get("EFFSEG_CT_DATA", REPO.parent / "shared" / "data" / "ct"))

# case folder -> (label file, label json)
REAL = {
    "ts_example_ct": ("seg_totalseg_fast.nii.gz", "labels.json"),
    "ts_dicom_upper_abdomen": ("seg_totalseg_fast.nii.gz", "labels.json"),
    "pyradiomics_lung1": ("seg_lesion.nii.gz", "labels.json"),
}


def real_case(name: str) -> Path:
    folder = CT_ROOT / name
    if not (folder / "ct.nii.gz").is_file():
        pytest.skip(f"real CT case {name!r} not found in {CT_ROOT}; set EFFSEG_CT_DATA to the "
                    "folder described by shared/data/ct/PROVENANCE.md")
    return folder


def stored_labels(name: str) -> dict[int, str]:
    seg, labels = REAL[name]
    return {int(k): v for k, v in json.loads((real_case(name) / labels).read_text()).items()}


def ts_classes() -> tuple[str, ...]:
    """Training classes of the ts fixture: the union of both cases' labels in id order."""
    declared = stored_labels("ts_example_ct") | stored_labels("ts_dicom_upper_abdomen")
    return ("background", *(declared[k] for k in sorted(declared)))


def build_real_dataset(root: Path, names: list[str], msd: bool = False) -> Path:
    """An nnU-Net v2 (or Decathlon) dataset of symbolic links to real cases."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    declared = {0: "background"}
    training = []
    for name in names:
        folder = real_case(name)
        declared.update(stored_labels(name))
        image = f"imagesTr/{name}.nii.gz" if msd else f"imagesTr/{name}_0000.nii.gz"
        (root / image).symlink_to(folder / "ct.nii.gz")
        (root / "labelsTr" / f"{name}.nii.gz").symlink_to(folder / REAL[name][0])
        training.append({"image": f"./{image}", "label": f"./labelsTr/{name}.nii.gz"})
    if msd:
        meta = {"modality": {"0": "CT"}, "numTraining": len(names), "training": training,
                "labels": {str(k): v for k, v in sorted(declared.items())}}
    else:
        meta = {"channel_names": {"0": "CT"}, "numTraining": len(names), "file_ending": ".nii.gz",
                "labels": {v: k for k, v in sorted(declared.items())}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def ts_dataset(tmp_path_factory) -> NiftiDataset:
    root = tmp_path_factory.mktemp("ts") / "Dataset001_TS"
    return NiftiDataset(build_real_dataset(root, ["ts_example_ct", "ts_dicom_upper_abdomen"]))


@pytest.fixture(scope="module")
def ts_case(ts_dataset):
    return ts_dataset.load_case("ts_example_ct")


@pytest.fixture(scope="module")
def lung_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("lung") / "Dataset002_Lung"
    dataset = NiftiDataset(build_real_dataset(root, ["pyradiomics_lung1"]))
    return dataset.load_case("pyradiomics_lung1")


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("ph") / "phantom", num_cases=2,
                                shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=7)


@pytest.fixture
def phantom_copy(small_phantom, tmp_path) -> Path:
    return Path(shutil.copytree(small_phantom, tmp_path / "phantom"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ---------------------------------------------------------------- reading datasets

def test_real_dataset_loads_cases_with_their_grid(ts_dataset, ts_case):
    assert ts_dataset.cases == ("ts_dicom_upper_abdomen", "ts_example_ct")
    assert len(stored_labels("ts_example_ct")) == 61
    assert ts_dataset.classes == ts_classes() and len(ts_classes()) == 66

    assert ts_case.image.shape == (1, 122, 101, 112)
    assert ts_case.image.dtype == np.float32
    assert ts_case.spacing == pytest.approx((3.0, 3.0, 3.0))
    raw = nib.load(real_case("ts_example_ct") / "ct.nii.gz")
    np.testing.assert_array_equal(ts_case.affine, raw.affine)
    np.testing.assert_array_equal(ts_case.image[0], raw.get_fdata(dtype=np.float32))

    # Training ids are consecutive; mapping them back gives the file's sparse ids exactly.
    stored = np.asanyarray(nib.load(real_case("ts_example_ct") / REAL["ts_example_ct"][0]).dataobj)
    own = {ts_classes().index(n) for n in stored_labels("ts_example_ct").values()}
    assert set(np.unique(ts_case.label)) == own | {0} and len(own) == 61
    np.testing.assert_array_equal(ts_dataset.labels.to_source(ts_case.label), stored)
    assert set(np.unique(stored)) == set(stored_labels("ts_example_ct")) | {0}


def test_decathlon_layout_reads_like_nnunet(tmp_path, ts_case):
    msd = NiftiDataset(build_real_dataset(tmp_path / "Task01", ["ts_example_ct"], msd=True),
                       classes=["liver", "aorta"])
    assert msd.layout == "msd"
    case = msd.load_case("ts_example_ct")
    np.testing.assert_array_equal(case.image, ts_case.image)
    assert msd.classes == ("background", "liver", "aorta")
    np.testing.assert_array_equal(case.label == 1, ts_case.label == ts_classes().index("liver"))
    np.testing.assert_array_equal(case.label == 2, ts_case.label == ts_classes().index("aorta"))


def test_label_subset_remapped_by_name(tmp_path):
    root = build_real_dataset(tmp_path / "ds", ["ts_example_ct"])
    names = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]
    ds = NiftiDataset(root, classes=names)
    assert ds.classes == ("background", *names)
    label = ds.load_case("ts_example_ct").label
    stored = np.asanyarray(nib.load(ds.label_path("ts_example_ct")).dataobj)
    ids = {v: k for k, v in stored_labels("ts_example_ct").items()}
    assert set(np.unique(label)) == set(range(len(names) + 1))
    for training_id, name in enumerate(names, start=1):
        np.testing.assert_array_equal(label == training_id, stored == ids[name])
    # Every other structure (vertebrae, ribs, muscles, ...) became background.
    assert (label > 0).sum() == sum((stored == ids[n]).sum() for n in names)
    assert (stored > 0).sum() > 2 * (label > 0).sum()
    np.testing.assert_array_equal(np.unique(ds.labels.to_source(label)),
                                  sorted([0] + [ids[n] for n in names]))


@pytest.mark.parametrize("classes, expect", [
    (["liver", "pancreas_tail"], "pancreas_tail"),
    (["liver", "liver"], "more than once"),
    (["background", "liver"], "background"),
    ("liver", "sequence"),
])
def test_label_subset_refuses_bad_names(tmp_path, classes, expect):
    root = build_real_dataset(tmp_path / "ds", ["ts_example_ct"])
    with pytest.raises(DataError, match=expect) as err:
        NiftiDataset(root, classes=classes)
    assert err.value.path == str(root / "dataset.json")


def test_phantom_dataset_with_test_split(phantom_copy):
    (phantom_copy / "imagesTs").mkdir()
    shutil.copy(phantom_copy / "imagesTr" / "phantom_000_0000.nii.gz",
                phantom_copy / "imagesTs" / "extra_0000.nii.gz")
    ds = NiftiDataset(phantom_copy)
    ds.validate()
    assert ds.test_cases == ("extra",)
    test = ds.load_test_case("extra")
    assert test.label is None
    np.testing.assert_array_equal(test.image, ds[0].image)
    with pytest.raises(KeyError):
        ds.load_case("extra")


# ---------------------------------------------------------------- geometry

def permuted_copy(tmp_path: Path) -> Path:
    """ts_example_ct stored as (z, x, y) with y reversed: a grid that needs a permutation."""
    img = nib.load(real_case("ts_example_ct") / "ct.nii.gz")
    data = np.asanyarray(img.dataobj).transpose(2, 0, 1)[:, :, ::-1]
    n_y = img.shape[1]
    flip_y = nib.affines.from_matvec(np.diag([1.0, -1.0, 1.0]), [0.0, n_y - 1.0, 0.0])
    perm = np.eye(4)[[2, 0, 1, 3]].T  # new index (k, i, j') -> old (i, j', k)
    affine = img.affine @ flip_y @ perm
    path = tmp_path / "permuted.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    return path


@pytest.mark.parametrize("source", ["ts_example_ct", "pyradiomics_lung1", "permuted"])
def test_reorientation_round_trip_is_exact(tmp_path, source):
    path = permuted_copy(tmp_path) if source == "permuted" else real_case(source) / "ct.nii.gz"
    volume = read_image(path)
    img = nib.load(path)
    orient = Reorientation.of(volume.affine, volume.shape)

    canonical = orient.apply(volume.data)
    reference = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(orient.canonical_affine) == ("R", "A", "S")
    assert canonical.shape == orient.canonical_shape == reference.shape
    np.testing.assert_allclose(orient.canonical_affine, reference.affine, atol=1e-9)
    np.testing.assert_array_equal(canonical, reference.get_fdata(dtype=np.float32))
    assert sorted(orient.canonical_spacing) == pytest.approx(sorted(volume.spacing))
    if source == "permuted":
        assert canonical.shape == (122, 101, 112)

    # A "prediction" on the canonical grid goes back to the source grid voxel for voxel, and is
    # written with the source affine and header.
    prediction = (canonical > 100).astype(np.uint8)
    back = orient.undo(prediction)
    np.testing.assert_array_equal(back, (volume.data > 100).astype(np.uint8))
    channels = orient.undo(np.stack([canonical, -canonical]))
    np.testing.assert_array_equal(channels[0], volume.data)
    out = write_like(back, orient.source_affine, volume.header, tmp_path / "pred.nii.gz")
    written = nib.load(out)
    np.testing.assert_array_equal(written.affine, img.affine)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), back)
    assert written.get_data_dtype() == np.uint8
    for field in ("qform_code", "sform_code", "pixdim", "xyzt_units", "quatern_b", "srow_x"):
        np.testing.assert_array_equal(written.header[field], img.header[field])


def test_reorientation_refuses_wrong_shape(ts_case):
    orient = Reorientation.of(ts_case.affine, ts_case.shape)
    with pytest.raises(ValueError, match="source shape"):
        orient.apply(np.zeros((10, 10, 10)))


def test_resample_isotropic_case_and_back(ts_case):
    image, label, affine = ts_case.image, ts_case.label, ts_case.affine
    liver = ts_classes().index("liver")

    shape = target_shape(image.shape, ts_case.spacing, 2.0)
    assert shape == (183, 152, 168)
    fine, fine_affine = resample_to_spacing(image, affine, 2.0)
    fine_label, label_affine = resample_to_spacing(label, affine, 2.0, labels=True)
    assert fine.shape == (1, *shape) and fine.dtype == np.float32
    assert fine_label.shape == shape and fine_label.dtype == label.dtype
    np.testing.assert_array_equal(fine_affine, label_affine)
    assert voxel_spacing(fine_affine) == pytest.approx((2.0, 101 * 3 / 152, 2.0))
    # Same field of view: the volume's centre and outer corner stay where they were.
    for old, new in (((np.array(image.shape[1:]) - 1) / 2, (np.array(shape) - 1) / 2),
                     (np.array(image.shape[1:]) - 0.5, np.array(shape) - 0.5)):
        np.testing.assert_allclose(nib.affines.apply_affine(fine_affine, new),
                                   nib.affines.apply_affine(affine, old), atol=1e-6)

    # Nearest keeps the label set and, up to the border, each structure's volume in mm^3.
    assert set(np.unique(fine_label)) == set(np.unique(label))
    # ... and each structure where it was: voxel centres are aligned, not corners, so a border
    # moves by at most half a new voxel.
    centroid = nib.affines.apply_affine(affine, np.argwhere(label == liver).mean(0))
    fine_centroid = nib.affines.apply_affine(fine_affine, np.argwhere(fine_label == liver).mean(0))
    np.testing.assert_allclose(fine_centroid, centroid, atol=1.0)  # half a new voxel
    old_ml = (label == liver).sum() * 27.0
    new_ml = (fine_label == liver).sum() * np.prod(voxel_spacing(fine_affine))
    assert new_ml == pytest.approx(old_ml, rel=0.02)
    # Trilinear: no new extremes, and the liver's HU is kept.
    assert fine.min() >= image.min() and fine.max() <= image.max()
    assert np.median(fine[0][fine_label == liver]) == pytest.approx(
        np.median(image[0][label == liver]), abs=3)

    back = resample(fine_label, label.shape, labels=True)
    assert back.shape == label.shape
    assert dice(back == liver, label == liver) > 0.97
    image_back = resample(fine, image.shape[1:])
    assert image_back.shape == image.shape
    assert np.abs(image_back - image)[0][label == liver].mean() < 10.0


def test_resample_anisotropic_lps_case(lung_case):
    orient = Reorientation.of(lung_case.affine, lung_case.shape)
    assert lung_case.spacing == pytest.approx((0.5703125, 0.5703125, 5.0))
    assert nib.aff2axcodes(lung_case.affine) == ("L", "P", "S")
    image, label = orient.apply(lung_case.image), orient.apply(lung_case.label)

    iso, iso_affine = resample_to_spacing(image, orient.canonical_affine, 1.5)
    iso_label, _ = resample_to_spacing(label, orient.canonical_affine, 1.5, labels=True)
    assert iso.shape == (1, 85, 85, 160) and iso_label.shape == (85, 85, 160)
    assert voxel_spacing(iso_affine) == pytest.approx((1.5, 1.5, 1.5), abs=0.01)
    lesion_mm3 = label.sum() * np.prod(lung_case.spacing)
    iso_mm3 = iso_label.sum() * np.prod(voxel_spacing(iso_affine))
    assert iso_mm3 == pytest.approx(lesion_mm3, rel=0.1)
    assert image.min() <= iso.min() and iso.max() <= image.max()

    back = orient.undo(resample(iso_label, orient.canonical_shape, labels=True))
    assert back.shape == lung_case.label.shape
    assert dice(back == 1, lung_case.label == 1) > 0.8


def test_resample_is_exact_for_integer_factors_and_identity(ts_case):
    label = ts_case.label
    up = resample(label, [2 * n for n in label.shape], labels=True)
    np.testing.assert_array_equal(up[::2, ::2, ::2], label)
    np.testing.assert_array_equal(resample(up, label.shape, labels=True), label)
    np.testing.assert_array_equal(resample(ts_case.image, ts_case.shape), ts_case.image)
    wide = label.astype(np.int32) * 300  # ids beyond uint8 take the float path
    np.testing.assert_array_equal(resample(resample(wide, up.shape, labels=True), label.shape,
                                           labels=True), wide)
    with pytest.raises(ValueError, match="integer"):
        resample(ts_case.image[0], (10, 10, 10), labels=True)
    np.testing.assert_allclose(resampled_affine(ts_case.affine, label.shape, label.shape),
                               ts_case.affine)


def test_padding_to_stride_and_crop_back(ts_case):
    padded, padding = pad_to_multiple(ts_case.image, 32, value=-1024)
    assert padded.shape == (1, 128, 128, 128)
    assert padding.before == (3, 13, 8) and padding.after == (3, 14, 8)
    assert padded[0, 0, 0, 0] == -1024
    np.testing.assert_array_equal(padding.crop(padded), ts_case.image)
    # The padded grid's affine keeps every source voxel at its world position.
    shifted = padding.shift_affine(ts_case.affine)
    np.testing.assert_allclose(nib.affines.apply_affine(shifted, padding.before),
                               ts_case.affine[:3, 3])
    labels, lpad = pad_to_multiple(ts_case.label, (16, 1, 8))
    assert labels.shape == (128, 101, 112) and lpad.after == (3, 0, 0)
    np.testing.assert_array_equal(lpad.crop(labels), ts_case.label)
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(ts_case.label, 0)


# ---------------------------------------------------------------- normalization

def test_ct_normalization_fitted_saved_and_loaded(tmp_path, ts_dataset):
    organs = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]
    ds = NiftiDataset(ts_dataset.root, classes=organs)
    exact = fit_ct_normalization(ds, samples_per_case=None)
    assert len(exact) == 1
    pooled = np.concatenate([c.image[0][c.label > 0] for c in ds]).astype(np.float64)
    lo, hi = np.percentile(pooled, [0.5, 99.5])
    assert exact[0] == CTNormalization(lo, hi, pooled.mean(), pooled.std())
    assert -100 < exact[0].lower < exact[0].mean < exact[0].upper < 400
    assert 20 < exact[0].mean < 150 and exact[0].std > 10  # contrast-free and contrast organs

    # Sampling draws the same number of voxels from each case (as nnU-Net does), so the cases
    # weigh equally instead of by their foreground size.
    sampled = fit_ct_normalization(ds, samples_per_case=10_000, seed=3)
    assert sampled == fit_ct_normalization(ds, samples_per_case=10_000, seed=3)
    assert sampled != fit_ct_normalization(ds, samples_per_case=10_000, seed=4)
    per_case = [c.image[0][c.label > 0] for c in ds]
    assert all(v.size > 10_000 for v in per_case)
    assert sampled[0].mean == pytest.approx(np.mean([v.mean() for v in per_case]), abs=3)
    assert abs(sampled[0].mean - exact[0].mean) > 10  # the two cases' sizes differ a lot

    plans = normalization_to_plans({"spacing": [3.0, 3.0, 3.0]}, exact)
    path = save_plans(plans, tmp_path / "plans.json")
    loaded = load_plans(path)
    assert loaded["spacing"] == [3.0, 3.0, 3.0]
    assert normalization_from_plans(loaded, path) == exact

    norm = exact[0]
    case = ds.load_case("ts_example_ct")
    out = norm(case.image[0])
    assert out.dtype == np.float32
    assert out.min() == pytest.approx((norm.lower - norm.mean) / norm.std, rel=1e-5)
    assert out.max() == pytest.approx((norm.upper - norm.mean) / norm.std, rel=1e-5)
    # Over the pooled foreground the result is z-scored, but for the 1 % of heavy tails that the
    # clipping pulled in.
    foreground = np.concatenate([norm(c.image[0])[c.label > 0] for c in ds])
    clipped = np.clip(pooled, lo, hi)
    assert foreground.mean() == pytest.approx((clipped.mean() - norm.mean) / norm.std, abs=1e-4)
    assert foreground.std() == pytest.approx(clipped.std() / norm.std, rel=1e-4)
    assert abs(foreground.mean()) < 0.05 and 0.5 < foreground.std() < 1.0


def test_plans_errors_name_the_file(tmp_path, phantom_copy):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON") as err:
        load_plans(bad)
    assert err.value.path == str(bad)
    entry = CTNormalization(-100.0, 200.0, 50.0, 40.0).to_dict()
    del entry["std"]
    with pytest.raises(DataError, match="'std'") as err:
        normalization_from_plans({"normalization": [entry]}, bad)
    assert str(bad) in str(err.value)
    with pytest.raises(DataError, match="no 'normalization'"):
        normalization_from_plans({}, bad)

    meta = json.loads((phantom_copy / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T2"}
    (phantom_copy / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="T2.*not CT") as err:
        fit_ct_normalization(NiftiDataset(phantom_copy))
    assert err.value.path == str(phantom_copy / "dataset.json")


# ---------------------------------------------------------------- bad files

def corrupt(path: Path, how: str, rng: np.random.Generator) -> None:
    path.unlink()
    if how == "truncated":
        whole = (real_case("ts_example_ct") / "ct.nii.gz").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif how == "random_bytes":
        path.write_bytes(rng.bytes(4000))
    elif how == "gzip_of_random_bytes":
        path.write_bytes(gzip.compress(rng.bytes(4000), mtime=0))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "random_bytes", "gzip_of_random_bytes", "empty"])
@pytest.mark.parametrize("which", ["image", "label"])
def test_corrupt_nifti_raises_naming_the_file(phantom_copy, how, which):
    ds = NiftiDataset(phantom_copy)
    path = ds.image_paths("phantom_001")[0] if which == "image" else ds.label_path("phantom_001")
    corrupt(path, how, np.random.default_rng(0))
    with pytest.raises(DataError) as err:
        ds.load_case("phantom_001")
    assert err.value.path == str(path) and str(path) in str(err.value)
    ds.load_case("phantom_000")
    with pytest.raises(DataError) as err:
        ds.validate()
    assert [p.path for p in err.value.problems] == [str(path)]
    assert str(path) in str(err.value)


def rewrite_label(path: Path, data=None, affine=None) -> None:
    img = nib.load(path)
    new = nib.Nifti1Image(np.asanyarray(img.dataobj) if data is None else data,
                          img.affine if affine is None else affine)
    path.unlink()
    nib.save(new, path)


def test_label_grid_shape_mismatch(phantom_copy):
    ds = NiftiDataset(phantom_copy)
    path = ds.label_path("phantom_000")
    rewrite_label(path, data=np.asanyarray(nib.load(path).dataobj)[:, :, :-1].copy())
    with pytest.raises(DataError, match=r"grid shape \(32, 32, 23\) differs") as err:
        ds.load_case("phantom_000")
    assert err.value.path == str(path)
    assert str(ds.image_paths("phantom_000")[0]) in str(err.value)


def test_label_grid_affine_mismatch(phantom_copy):
    ds = NiftiDataset(phantom_copy)
    path = ds.label_path("phantom_001")
    affine = nib.load(path).affine.copy()
    affine[2, 3] += 6.0  # one slice off
    rewrite_label(path, affine=affine)
    with pytest.raises(DataError, match="affine differs") as err:
        ds.load_case("phantom_001")
    assert err.value.path == str(path)
    # Differences below GRID_ATOL_MM (float32 rounding between writers) are accepted.
    affine[2, 3] -= 6.0 - 1e-4
    rewrite_label(path, affine=affine)
    ds.load_case("phantom_001")


def test_undeclared_label_value(phantom_copy):
    ds = NiftiDataset(phantom_copy)
    path = ds.label_path("phantom_000")
    data = np.asanyarray(nib.load(path).dataobj).copy()
    data[0, 0, :3] = 42
    rewrite_label(path, data=data)
    with pytest.raises(DataError, match=r"label values \{42\} are not declared") as err:
        ds.validate()
    assert [p.path for p in err.value.problems] == [str(path)]
    # Declared but unselected labels are not an error: they become background.
    assert NiftiDataset(phantom_copy, classes=["aorta"]).load_case("phantom_001").label.max() == 1
    # An undeclared id between declared ones (sparse ids) is caught too.
    meta = json.loads((phantom_copy / "dataset.json").read_text())
    del meta["labels"]["spleen"]
    (phantom_copy / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"label values \{2\} are not declared") as err:
        NiftiDataset(phantom_copy).load_case("phantom_001")
    assert err.value.path == str(phantom_copy / "labelsTr" / "phantom_001.nii.gz")


@pytest.mark.parametrize("field", ["channel_names", "labels", "numTraining", "file_ending"])
def test_missing_dataset_json_field(phantom_copy, field):
    meta = json.loads((phantom_copy / "dataset.json").read_text())
    del meta[field]
    (phantom_copy / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=f"missing field.*{field}") as err:
        NiftiDataset(phantom_copy)
    assert err.value.path == str(phantom_copy / "dataset.json")


@pytest.mark.parametrize("damage, expect, culprit", [
    ("no_json", "dataset.json not found", "dataset.json"),
    ("bad_json", "not valid JSON", "dataset.json"),
    ("num_training", "numTraining is 3 but 2", "dataset.json"),
    ("region_labels", "region-based", "dataset.json"),
    ("no_background", "no background", "dataset.json"),
    ("missing_label", "label file of case 'phantom_001' not found", "labelsTr/phantom_001.nii.gz"),
    ("bad_name", "does not follow", "imagesTr/phantom_001.nii.gz"),
    ("orphan_label", "has no image", "labelsTr/phantom_009.nii.gz"),
    ("nrrd", "file_ending '.nrrd' is not supported", "dataset.json"),
])
def test_dataset_structure_errors(phantom_copy, damage, expect, culprit):
    meta_path = phantom_copy / "dataset.json"
    meta = json.loads(meta_path.read_text())
    images, labels = phantom_copy / "imagesTr", phantom_copy / "labelsTr"
    if damage == "no_json":
        meta_path.unlink()
    elif damage == "bad_json":
        meta_path.write_text('{"labels": ')
    elif damage == "missing_label":
        (labels / "phantom_001.nii.gz").unlink()
    elif damage == "bad_name":
        (images / "phantom_001_0000.nii.gz").rename(images / "phantom_001.nii.gz")
    elif damage == "orphan_label":
        shutil.copy(labels / "phantom_001.nii.gz", labels / "phantom_009.nii.gz")
    else:
        edits = {"num_training": {"numTraining": 3},
                 "region_labels": {"labels": {"background": 0, "organ": [1, 2]}},
                 "no_background": {"labels": {"liver": 1, "spleen": 2}},
                 "nrrd": {"file_ending": ".nrrd"}}
        meta.update(edits[damage])
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=expect) as err:
        NiftiDataset(phantom_copy)
    assert err.value.path == str(phantom_copy / culprit)


def test_validate_reports_every_bad_file_at_once(phantom_copy):
    ds = NiftiDataset(phantom_copy)
    corrupt(ds.image_paths("phantom_000")[0], "truncated", np.random.default_rng(1))
    label = ds.label_path("phantom_001")
    rewrite_label(label, data=np.full((32, 32, 24), 200, dtype=np.uint8))
    with pytest.raises(DataError, match="2 case") as err:
        ds.validate()
    image = ds.image_paths("phantom_000")[0]
    assert [p.path for p in err.value.problems] == [str(image), str(label)]


def test_non_finite_intensities_are_refused(phantom_copy):
    ds = NiftiDataset(phantom_copy)
    path = ds.image_paths("phantom_000")[0]
    img = nib.load(path)
    data = img.get_fdata(dtype=np.float32)
    data[3, 3, 3] = np.nan
    path.unlink()
    nib.save(nib.Nifti1Image(data, img.affine), path)
    with pytest.raises(DataError, match="1 NaN or infinite") as err:
        ds.load_case("phantom_000")
    assert err.value.path == str(path)


# ---------------------------------------------------------------- phantom

PLAUSIBLE_HU = {"liver": (40, 80), "spleen": (30, 70), "kidney_left": (10, 50),
                "kidney_right": (10, 50), "lung_left": (-900, -750), "lung_right": (-900, -750),
                "aorta": (100, 250), "spine": (250, 800)}


def test_phantom_is_deterministic(tmp_path, small_phantom):
    image, label, affine = phantom_case(seed=(0, 0))
    again = phantom_case(seed=(0, 0))
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(label, again[1])
    other = phantom_case(seed=(0, 1))
    assert not np.array_equal(label, other[1]) and not np.array_equal(image, other[0])
    assert image.dtype == np.int16 and label.dtype == np.uint8 and image.shape == (96, 96, 64)

    twin = make_phantom_dataset(tmp_path / "twin", num_cases=2, shape=(32, 32, 24),
                                spacing=(6.0, 6.0, 6.0), seed=7)
    files = sorted(p.relative_to(small_phantom) for p in small_phantom.rglob("*") if p.is_file())
    assert len(files) == 5
    for rel in files:
        assert (twin / rel).read_bytes() == (small_phantom / rel).read_bytes(), rel
    with pytest.raises(FileExistsError):
        make_phantom_dataset(twin)
    with pytest.raises(ValueError, match="at least 16"):
        phantom_case(shape=(8, 96, 64))


def test_phantom_dataset_has_every_label_with_plausible_hu(tmp_path):
    root = make_phantom_dataset(tmp_path / "ph", num_cases=2, seed=11)
    ds = NiftiDataset(root)
    ds.validate()
    assert ds.classes == tuple(PHANTOM_LABELS)
    img = nib.load(ds.image_paths("phantom_000")[0])
    assert img.get_data_dtype() == np.int16
    assert nib.load(ds.label_path("phantom_000")).get_data_dtype() == np.uint8
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.header.get_zooms() == (3.0, 3.0, 3.0)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    for case in ds:
        hu = case.image[0]
        assert np.median(hu[case.label == 0]) < -900  # mostly air around the body
        for name, (lo, hi) in PLAUSIBLE_HU.items():
            mask = case.label == PHANTOM_LABELS[name]
            assert mask.sum() > 200, (case.name, name)
            assert lo < np.median(hu[mask]) < hi, (case.name, name, np.median(hu[mask]))
        # Anatomical sides as in an RAS file: +x is the patient's right.
        centre = {n: nib.affines.apply_affine(case.affine, np.argwhere(case.label == i).mean(0))
                  for n, i in PHANTOM_LABELS.items() if i}
        assert centre["liver"][0] > centre["spine"][0] > centre["spleen"][0]
        assert centre["kidney_right"][0] > 0 > centre["kidney_left"][0]
        assert centre["lung_right"][0] > 0 > centre["lung_left"][0]
        assert centre["lung_left"][2] > centre["liver"][2] > centre["kidney_left"][2]
        assert centre["aorta"][1] > centre["spine"][1]  # anterior to the spine


def test_phantom_sides_match_a_real_ras_case(ts_case):
    names = ts_classes()
    centre = {n: nib.affines.apply_affine(ts_case.affine,
                                          np.argwhere(ts_case.label == names.index(n)).mean(0))
              for n in ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae_L1")}
    assert centre["liver"][0] > centre["vertebrae_L1"][0] > centre["spleen"][0]
    assert centre["kidney_right"][0] > centre["kidney_left"][0]
    assert centre["aorta"][1] > centre["vertebrae_L1"][1]
