"""Registration engine on real crops: known transforms recovered, ITK files agree with SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.engine.metrics import dice
from napari_medseg.core.register.optimise import RegistrationOptions, register
from napari_medseg.core.register.transform import RegistrationError, RegistrationTransform
from napari_medseg.core.register.transform_io import (
    load_transform,
    read_itk_landmarks,
    save_transform,
)
from napari_medseg.core.register.warp import warp
from napari_medseg.io import read_image
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import run_sync
from tests.conftest import data_path

LPS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The test machine's 2 cores are shared: one torch thread avoids OpenMP contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _brain_crop() -> ImageRecord:
    """A real T1 crop with awkward size 33x34x35 and a non-trivial (LPS-like) affine."""
    rec = read_image(data_path("mri/brain_t1_aseg/t1.nii.gz"))[0]
    arr = np.asarray(rec.data)[60:93, 80:114, 90:125].astype(np.float32)
    aff = np.diag([-1.0, -1.2, 1.1, 1.0])
    aff[:3, 3] = [40.0, 20.0, -30.0]
    return ImageRecord(data=arr, affine=aff, modality="MR", name="t1crop")


def _rigid(deg: tuple, shift: tuple, center: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", deg, degrees=True).as_matrix()
    m[:3, 3] = np.asarray(shift) + center - m[:3, :3] @ center
    return m


def _center(rec: ImageRecord) -> np.ndarray:
    c = (np.array(rec.shape[:3]) - 1) / 2
    return rec.affine[:3, :3] @ c + rec.affine[:3, 3]


def _fov_points(rec: ImageRecord, n: int = 200, margin: float = 0.25) -> np.ndarray:
    rng = np.random.default_rng(1)
    shp = np.array(rec.shape[:3]) - 1
    idx = rng.uniform(margin, 1 - margin, size=(n, 3)) * shp
    return idx @ rec.affine[:3, :3].T + rec.affine[:3, 3]


def test_recovers_a_known_rigid_motion_between_different_headers():
    fixed = _brain_crop()
    truth = _rigid((4.0, -3.0, 5.0), (3.0, -2.0, 2.5), _center(fixed))
    # same voxels, moving header moved by ``truth``: T(x) = truth @ x is the exact answer
    moving = ImageRecord(data=fixed.data, affine=truth @ fixed.affine, modality="MR")
    opts = RegistrationOptions(mode="rigid", iterations=60, levels=2)
    seen = []
    result = run_sync(register(fixed, moving, opts), seen.append)
    pts = _fov_points(fixed)
    err = np.linalg.norm(
        result.transform.map_points(pts) - pts @ truth[:3, :3].T - truth[:3, 3], axis=1
    )
    before = np.linalg.norm(pts - (pts @ truth[:3, :3].T + truth[:3, 3]), axis=1)
    assert before.mean() > 3.0
    assert err.mean() < 0.5, (err.mean(), before.mean())
    assert result.similarity == "lncc"
    assert result.similarity_after > result.similarity_before + 0.1
    assert any("loss" in p.info for p in seen)
    # the warped image lies on the fixed grid and matches the fixed image inside
    assert result.warped.shape == fixed.shape
    inner = (slice(6, -6),) * 3
    corr = np.corrcoef(result.warped[inner].ravel(), np.asarray(fixed.data)[inner].ravel())[0, 1]
    assert corr > 0.97


def test_itk_files_agree_with_simpleitk(tmp_path):
    """.tfm and displacement NIfTI: SimpleITK maps LPS points exactly as map_points maps RAS."""
    import SimpleITK as sitk

    fixed = read_image(data_path("registration/lung_masks/CT_3D_lung_fixed_mask.mha"))[0]
    rng = np.random.default_rng(0)
    m = _rigid((3.0, -2.0, 5.0), (4.0, -7.0, 10.0), _center(fixed))
    m[:3, :3] *= 1.05
    g = (9, 11, 10)
    tr = RegistrationTransform(
        matrix=m,
        fixed_affine=fixed.affine,
        fixed_shape=fixed.shape,
        displacement=rng.normal(0, 2, size=(*g, 3)),
        grid_shape=g,
    )
    files = save_transform(tr, tmp_path / "T.json")
    assert {f.name for f in files} == {"T.json", "T.tfm", "T_displacement.nii.gz"}
    pts = _fov_points(fixed, 50, margin=0.0)
    ours = tr.map_points(pts)
    affine_only = RegistrationTransform(m, fixed.affine, fixed.shape).map_points(pts)
    tfm = sitk.ReadTransform(str(tmp_path / "T.tfm"))
    itk_aff = np.array([tfm.TransformPoint(tuple(p * LPS)) for p in pts]) * LPS
    np.testing.assert_allclose(itk_aff, affine_only, atol=1e-6)
    field = sitk.ReadImage(str(tmp_path / "T_displacement.nii.gz"))
    dft = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    itk_def = np.array([dft.TransformPoint(tuple(p * LPS)) for p in pts]) * LPS
    np.testing.assert_allclose(itk_def, ours, atol=1e-3)
    # reload, and the inverse mapping
    back = load_transform(tmp_path / "T.json")
    np.testing.assert_allclose(back.map_points(pts), ours, atol=1e-3)
    np.testing.assert_allclose(tr.map_points_inverse(ours), pts, atol=1e-3)


def test_affine_resampling_matches_simpleitk_resample(tmp_path):
    """Warping with our transform equals sitk.Resample(moving, fixed, our .tfm) (LPS check)."""
    import SimpleITK as sitk

    from napari_medseg.io.geometry import itk_from_affine

    fixed = _brain_crop()
    moving = read_image(data_path("mri/brain_t1_aseg/t1.nii.gz"))[0]
    moving = ImageRecord(
        data=np.asarray(moving.data)[50:100, 70:120, 80:135].astype(np.float32),
        affine=np.diag([1.0, 1.0, 1.0, 1.0]),
    )
    m = _rigid((5.0, 2.0, -4.0), (0.0, 25.0, 28.0), _center(fixed))
    tr = RegistrationTransform(m, fixed.affine, fixed.shape)
    save_transform(tr, tmp_path / "A")
    ours = warp(tr, moving, "linear")

    def to_sitk(rec: ImageRecord) -> sitk.Image:
        img = sitk.GetImageFromArray(np.asarray(rec.data, np.float32).transpose(2, 1, 0))
        o, s, d = itk_from_affine(rec.affine)
        img.SetOrigin(o), img.SetSpacing(s), img.SetDirection(d)
        return img

    tfm = sitk.ReadTransform(str(tmp_path / "A.tfm"))
    ref = sitk.Resample(to_sitk(moving), to_sitk(fixed), tfm, sitk.sitkLinear, 0.0)
    ref = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)
    inside = ours != 0
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-3)


def test_deformable_improves_the_mt_pair_without_folding():
    d = "registration/mt_pair/"
    fixed, moving = (read_image(data_path(d + f))[0] for f in ("mt0.nii.gz", "mt1.nii.gz"))
    fseg, mseg = (read_image(data_path(d + f))[0] for f in ("mt0_seg.nii.gz", "mt1_seg.nii.gz"))
    before = dice(np.asarray(fseg.data), np.asarray(mseg.data))
    assert before == pytest.approx(0.843, abs=0.01)
    res = run_sync(
        register(
            fixed, moving, RegistrationOptions(mode="deformable", iterations=60), moving_labels=mseg
        )
    )
    after = dice(np.asarray(fseg.data), res.warped_labels)
    assert res.warped_labels.dtype == np.asarray(mseg.data).dtype
    assert set(np.unique(res.warped_labels)) <= {0, 1}
    assert after > before + 0.02, (before, after)
    assert res.folding_fraction < 0.01
    assert res.jacobian.shape == fixed.shape and res.magnitude.shape == fixed.shape
    assert res.similarity_after > res.similarity_before


def test_lung_landmarks_move_towards_their_partners():
    """ITK landmark files are LPS; affine registration of the masks cuts the mean TRE."""
    d = "registration/lung_masks/CT_3D_lung_"
    fixed = read_image(data_path(d + "fixed_mask.mha"))[0]
    moving = read_image(data_path(d + "moving_mask.mha"))[0]
    fp = read_itk_landmarks(data_path(d + "fixed_point_set_corrected.txt"))
    mp = read_itk_landmarks(data_path(d + "moving_point_set_corrected.txt"))
    before = np.linalg.norm(fp - mp, axis=1).mean()
    assert before == pytest.approx(35.3, abs=0.1)
    opts = RegistrationOptions(mode="affine", iterations=30, levels=2, max_voxels=40_000)
    res = run_sync(register(fixed, moving, opts, points=fp))
    tre = np.linalg.norm(res.points - mp, axis=1).mean()
    assert res.similarity == "mse"
    assert tre < 10.0, tre


def test_bad_inputs_say_what_is_wrong():
    fixed = _brain_crop()
    flat = ImageRecord(data=np.zeros((20, 30), np.float32), affine=np.eye(3), space="pixel")
    with pytest.raises(RegistrationError, match="same dimensionality"):
        run_sync(register(fixed, flat))
    nan = np.asarray(fixed.data).copy()
    nan[3, 4, 5] = np.nan
    with pytest.raises(RegistrationError, match="NaN"):
        run_sync(register(fixed, ImageRecord(data=nan, affine=fixed.affine)))
    far = fixed.affine.copy()
    far[:3, 3] += 500.0
    moved = ImageRecord(data=fixed.data, affine=far, modality="MR")
    with pytest.raises(RegistrationError, match=r"do not overlap.*centres of mass"):
        run_sync(register(fixed, moved))
    # the offered fix works: centre-of-mass initialisation finds the 500 mm shift
    res = run_sync(
        register(fixed, moved, RegistrationOptions(mode="rigid", init="com", iterations=10))
    )
    pts = _fov_points(fixed, 20)
    err = np.linalg.norm(res.transform.map_points(pts) - (pts + 500.0), axis=1)
    assert err.mean() < 2.0


def test_2d_registration_and_cancel():
    rec = read_image(data_path("mri/brain_t1_aseg/t1.nii.gz"))[0]
    sl = np.asarray(rec.data)[20:141, 30:170, 112].astype(np.float32)  # 121x140
    fixed = ImageRecord(data=sl, affine=np.eye(3), space="pixel")
    shifted = np.eye(3)
    shifted[:2, 2] = [4.0, -3.0]
    moving = ImageRecord(data=sl, affine=shifted, space="pixel")
    res = run_sync(register(fixed, moving, RegistrationOptions(mode="deformable", iterations=40)))
    pts = np.array([[60.0, 70.0], [40.0, 50.0]])
    np.testing.assert_allclose(res.transform.map_points(pts), pts + np.array([4.0, -3.0]), atol=1.0)
    assert res.folding_fraction < 0.01
    gen = register(fixed, moving, RegistrationOptions(iterations=10_000))
    for i, _ in enumerate(gen):
        if i == 5:
            break
    gen.close()  # a driver cancels by closing between yields
