"""Whole-volume augmentation (`effseg.pipeline.augment`): geometry against exact references, what comes
from outside the volume, intensity transforms, determinism, and bad input."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from effseg.pipeline.augment import (
    Augmentation,
    CaseTransform,
    check_mirror_axes,
    resample,
    rotation_matrix,
    voxel_matrix,
)
from effseg.pipeline.data import Reorientation, read_image, read_labels
from effseg.memory import peak_allocated

IGNORE = 255


def volumes(shape=(12, 10, 8), channels=1, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(channels, *shape, generator=g)
    label = torch.randint(0, classes, shape, generator=g, dtype=torch.uint8)
    return image, label


def aug(**kw):
    settings = dict(spacing=(1.0, 1.0, 1.0), fill=(-2.0,), ignore_index=IGNORE)
    return Augmentation(**{**settings, **kw})


def ball(shape, centre, radius_mm, spacing):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (np.linalg.norm((grid - centre) * np.asarray(spacing), axis=-1) <= radius_mm)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("slab", [1 << 22, 7], ids=["one-slab", "slabs"])
def test_a_quarter_turn_equals_rot90_for_image_and_labels(axis, slab):
    # A cube with isotropic voxels: a rotation by 90 degrees about `axis` moves every voxel onto
    # another voxel, so trilinear sampling is exact up to rounding and nearest is exact.
    image, label = volumes((9, 9, 9), channels=2, seed=axis)
    matrix = rotation_matrix([math.pi / 2 if a == axis else 0.0 for a in range(3)])
    a, b = [k for k in range(3) if k != axis]
    turned = resample(image, matrix, "bilinear", slab_voxels=slab)
    expected = torch.rot90(image, -1, (a + 1, b + 1))
    torch.testing.assert_close(turned, expected, atol=1e-5, rtol=0)
    moved = resample(label[None].float(), matrix, "nearest", slab_voxels=slab)[0]
    assert torch.equal(moved.to(torch.uint8), torch.rot90(label, -1, (a, b)))


def test_identity_keeps_the_volume():
    image, label = volumes((7, 6, 5))
    torch.testing.assert_close(resample(image, np.eye(3), "bilinear"), image, atol=1e-5, rtol=0)
    assert torch.equal(resample(label[None].float(), np.eye(3), "nearest")[0].to(torch.uint8),
                       label)


def test_rotations_are_in_millimetres_on_anisotropic_grids():
    # A ball of 12 mm on a (1, 1, 3) mm grid stays a ball of 12 mm when rotated about axis 0 by 90
    # degrees in millimetres; the same rotation in voxels would squash it into an ellipsoid.
    spacing = (1.0, 1.0, 3.0)
    shape = (41, 41, 13)
    centre = (np.asarray(shape) - 1) / 2
    inside = torch.from_numpy(ball(shape, centre, 12.0, spacing).astype(np.float32))[None]
    turn = rotation_matrix([math.pi / 2, 0.0, 0.0])
    mm = resample(inside, voxel_matrix(turn, 1.0, spacing), "nearest")[0]
    voxels = resample(inside, turn, "nearest")[0]
    # A ball is unchanged by a rotation about its centre (up to voxels on its surface).
    changed_mm = float((mm != inside[0]).sum()) / float(inside.sum())
    changed_voxels = float((voxels != inside[0]).sum()) / float(inside.sum())
    assert changed_mm < 0.15 and changed_voxels > 0.5, (changed_mm, changed_voxels)


def test_a_zoom_scales_about_the_centre():
    spacing = (2.0, 2.0, 2.0)
    shape = (33, 33, 33)
    centre = (np.asarray(shape) - 1) / 2
    inside = torch.from_numpy(ball(shape, centre, 12.0, spacing).astype(np.float32))[None]
    zoomed = resample(inside, voxel_matrix(np.eye(3), 1.5, spacing), "nearest")[0]
    # Radius 12 mm -> 18 mm: the volume grows by 1.5^3, and the ball stays centred.
    expected = ball(shape, centre, 18.0, spacing)
    assert np.mean(zoomed.numpy().astype(bool) != expected) < 0.01


def test_outside_the_volume_is_air_and_ignored():
    image, label = volumes((16, 16, 16), classes=3)
    a = aug(mode="all")
    shrink = CaseTransform(matrix=tuple(map(tuple, voxel_matrix(np.eye(3), 0.5, (1, 1, 1)))))
    out_image, out_label = a.apply(image, label, shrink)
    # Zoomed out by 2: the outer quarter on each side samples outside.
    assert torch.all(out_label[:3] == IGNORE) and torch.all(out_label[-3:] == IGNORE)
    assert torch.all(out_image[:, :3] == -2.0) and torch.all(out_image[:, :, -3:] == -2.0)
    centre = out_label[5:11, 5:11, 5:11]
    assert centre.max() < 3 and torch.equal(centre, label[2:14:2, 2:14:2, 2:14:2])
    # The inputs are left alone.
    assert torch.equal(label, volumes((16, 16, 16), classes=3)[1])


@pytest.mark.parametrize("dtype,ignore", [(torch.uint8, 255), (torch.int32, -1),
                                          (torch.int64, 255)])
def test_label_dtypes_and_ignore_values_survive_resampling(dtype, ignore):
    _, label = volumes((10, 10, 10), classes=5)
    label = label.to(dtype)
    label[0] = ignore  # padding of a batch, already ignored
    a = aug(ignore_index=ignore)
    t = CaseTransform(matrix=tuple(map(tuple, rotation_matrix([0.3, -0.2, 0.1]))))
    _, out = a.apply(torch.zeros(1, 10, 10, 10), label, t)
    assert out.dtype == dtype
    assert set(out.unique().tolist()) <= set(range(5)) | {ignore}
    assert (out == ignore).any() and (out != ignore).any()


def test_mirroring_flips_image_and_labels_together():
    image, label = volumes()
    a = aug(mode="off", mirror_axes=(0, 2))
    out_image, out_label = a.apply(image, label, CaseTransform(flips=(0, 2)))
    assert torch.equal(out_image, image.flip([1, 3]))
    assert torch.equal(out_label, label.flip([0, 2]))


def test_intensity_transforms():
    image, label = volumes(channels=2)
    a = aug(mode="intensity", fill=(0.0, 0.0))
    out, out_label = a.apply(image, label, CaseTransform(brightness=1.2))
    torch.testing.assert_close(out, image * 1.2)
    assert torch.equal(out_label, label)

    out, _ = a.apply(image, label, CaseTransform(contrast=1.5))
    lo, hi = image.amin((1, 2, 3), keepdim=True), image.amax((1, 2, 3), keepdim=True)
    mean = image.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, ((image - mean) * 1.5 + mean).clamp(lo, hi))

    out, _ = a.apply(image, label, CaseTransform(gamma=1.4))
    torch.testing.assert_close(out.mean((1, 2, 3)), image.mean((1, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((1, 2, 3)), image.std((1, 2, 3)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, image, atol=1e-3)
    # A monotone map: the order of the values is kept.
    assert torch.equal(out[0].flatten().argsort(), image[0].flatten().argsort())

    out, _ = a.apply(image, label, CaseTransform(noise_std=0.3, noise_seed=7))
    again, _ = a.apply(image, label, CaseTransform(noise_std=0.3, noise_seed=7))
    assert torch.equal(out, again)
    assert abs(float((out - image).std()) - 0.3) < 0.03


def test_draws_depend_on_seed_epoch_and_case_only():
    a = aug(mode="all", mirror_axes=(1,))
    assert a.draw(3, 4, 5) == a.draw(3, 4, 5)
    draws = {a.draw(3, epoch, case) for epoch in range(8) for case in range(8)}
    assert len(draws) > 50
    # Probabilities as documented, over many cases.
    many = [a.draw(0, 0, c) for c in range(4000)]
    spatial = np.mean([t.matrix is not None for t in many])
    assert abs(spatial - (1 - 0.8 * 0.8)) < 0.03
    assert abs(np.mean([t.gamma is not None for t in many]) - 0.3) < 0.03
    assert abs(np.mean([1 in t.flips for t in many]) - 0.5) < 0.03
    assert all(0.7 <= t.gamma <= 1.5 for t in many if t.gamma is not None)


def test_modes_choose_the_transforms():
    many = [aug(mode="intensity").draw(0, 0, c) for c in range(300)]
    assert all(t.matrix is None and not t.flips for t in many)
    assert any(t.gamma is not None for t in many)
    many = [aug(mode="off", mirror_axes=(2,)).draw(0, 0, c) for c in range(300)]
    assert all(t.matrix is None and t.gamma is None and t.noise_std is None for t in many)
    assert any(t.flips == (2,) for t in many)
    assert not aug(mode="off").active and aug(mode="off", mirror_axes=(0,)).active


def test_strongly_anisotropic_grids_rotate_in_plane_only():
    # Spacing (0.8, 0.8, 5): rotations about axis 2 only; axis 2 is kept.
    a = aug(spacing=(0.8, 0.8, 5.0), p_rotation=1.0, p_zoom=0.0)
    for case in range(20):
        m = np.array(a.draw(0, 0, case).matrix)
        np.testing.assert_allclose(m[2], [0, 0, 1], atol=1e-12)
        np.testing.assert_allclose(m[:, 2], [0, 0, 1], atol=1e-12)


def test_bad_settings_and_inputs_raise():
    with pytest.raises(ValueError, match="mode"):
        aug(mode="heavy")
    with pytest.raises(ValueError, match="mirror axes"):
        aug(mirror_axes=(3,))
    with pytest.raises(ValueError, match="mirror axes"):
        check_mirror_axes([1, 1])
    with pytest.raises(ValueError, match="spacing"):
        aug(spacing=(1.0, 0.0, 1.0))
    image, label = volumes()
    with pytest.raises(ValueError, match="label map"):
        aug().apply(image, label[:-1], CaseTransform())
    with pytest.raises(ValueError, match="fill"):
        aug(fill=(0.0, 0.0)).apply(image, label, CaseTransform())


def test_augmentation_memory_is_a_few_volumes_as_a_result():
    # Every transform at once on a 64^3 case: the tensors the augmentation creates peak at
    # under 8 float32 images (7.05 measured: the slab's sampling grid is 3 of them here; on
    # volumes above SLAB_VOXELS it is bounded by the slab instead). It runs before the
    # forward pass, so it stays below a training step's peak.
    image, label = volumes((64, 64, 64))
    t = CaseTransform(matrix=tuple(map(tuple, rotation_matrix([0.2, 0.1, -0.3]).tolist())),
                      flips=(1,), noise_std=0.1, noise_seed=1, brightness=1.1, contrast=0.9,
                      gamma=1.2)
    a = aug(mode="all", mirror_axes=(1,))
    peak = peak_allocated(lambda: a.apply(image, label, t))
    assert peak <= 8 * image.numel() * image.element_size(), peak


# ---------------------------------------------------------------- a real CT case

CT_ROOT = Path(os.environ.get("EFFSEG_CT_DATA",
                              Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"))


def test_a_rotation_keeps_the_organs_of_a_real_ct(tmp_path):
    # ts_example_ct (3 mm, RAS, 61 TotalSegmentator classes): a 20 degree rotation about the
    # inferior-superior axis keeps every organ that stays inside the field of view at its
    # volume, and rotating back returns the label map outside the organs' borders.
    folder = CT_ROOT / "ts_example_ct"
    if not (folder / "ct.nii.gz").is_file():
        pytest.skip(f"real CT case 'ts_example_ct' not found in {CT_ROOT}; set EFFSEG_CT_DATA "
                    "to the folder described by shared/data/ct/PROVENANCE.md")
    ct, seg = read_image(folder / "ct.nii.gz"), read_labels(folder / "seg_totalseg_fast.nii.gz")
    orient = Reorientation.of(ct.affine, ct.shape)
    image = torch.from_numpy(np.ascontiguousarray(orient.apply(ct.data)))[None]
    label = torch.from_numpy(np.ascontiguousarray(orient.apply(seg.data)).astype(np.uint8))
    a = aug(spacing=orient.canonical_spacing, fill=(-1024.0,))
    turn, back = (rotation_matrix([0.0, 0.0, math.radians(s * 20)]) for s in (1, -1))
    spacing = orient.canonical_spacing
    rotated_image, rotated = a.apply(image, label, CaseTransform(
        matrix=tuple(map(tuple, voxel_matrix(turn, 1.0, spacing).tolist()))))
    # HU stay within the source range; what came from outside is air (but for the half voxel
    # along the border, where trilinear blends the volume's edge with air).
    assert rotated_image.min() >= image.min() - 1e-3 and rotated_image.max() <= image.max() + 1e-3
    outside = rotated_image[0][rotated == IGNORE]
    assert outside.numel() > 0 and (outside == -1024).float().mean() > 0.9
    liver = 5  # TotalSegmentator "total": liver
    assert abs(int((rotated == liver).sum()) - int((label == liver).sum())) \
        <= 0.02 * int((label == liver).sum())
    _, restored = a.apply(rotated_image, rotated, CaseTransform(
        matrix=tuple(map(tuple, voxel_matrix(back, 1.0, spacing).tolist()))))
    seen = restored != IGNORE
    assert seen.float().mean() > 0.7
    assert (restored[seen] == label[seen]).float().mean() > 0.97
