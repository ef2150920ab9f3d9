"""nnU-Net v2 building blocks against nnunetv2's own functions, on real data (fast: no network).

Window placement, the Gaussian, cropping to nonzero, image resampling (order 3, separate z) and
logit resampling (order 1) must equal nnunetv2's; the whole pipeline is compared with
``nnUNetPredictor`` in test_nnunet_fidelity.py.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.core.engine.windows import plan_windows
from napari_medseg.core.segment import nnunet as N
from napari_medseg.core.segment.channels import stack_channels
from napari_medseg.errors import MedsegError
from napari_medseg.io.record import ImageRecord
from tests.conftest import data_path
from tests.models.nnunet_helpers import need_nnunetv2


@pytest.mark.parametrize(
    ("size", "roi"), [(110, 64), (64, 64), (200, 48), (33, 16), (129, 128), (301, 80), (7, 3)]
)
def test_window_layout_is_nnunets(size: int, roi: int) -> None:
    need_nnunetv2()
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    ours = [w[0].start for w in plan_windows([size], [roi], 0.5, layout="nnunet")]
    assert ours == compute_steps_for_sliding_window((size,), (roi,), 0.5)[0]


@pytest.mark.parametrize("patch", [(20, 80, 96), (33, 34, 35), (112, 128), (5, 64, 64)])
def test_gaussian_is_nnunets(patch: tuple) -> None:
    need_nnunetv2()
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    ref = compute_gaussian(
        patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu")
    )
    assert ref.dtype == torch.float16
    np.testing.assert_array_equal(N.nnunet_gaussian(patch), ref.float().numpy())


def _ct_crop() -> tuple[np.ndarray, list[float]]:
    """Real CT (spleen, 0.8 x 0.8 x 5 mm) as nnU-Net reads it: (1, z, y, x), float32."""
    img = nib.load(str(data_path("ct/spleen/image.nii.gz")))
    arr = np.asarray(img.dataobj, dtype=np.float32)[40:120, 30:110, :]
    return arr.transpose(2, 1, 0)[None].copy(), [float(z) for z in img.header.get_zooms()[::-1]]


@pytest.mark.parametrize(
    ("new_spacing", "force"),
    [([3.0, 3.0, 3.0], None), ([5.0, 1.5, 1.5], None), ([4.0, 1.1, 0.9], False)],
)
def test_image_resampling_is_nnunets(new_spacing: list, force: bool | None) -> None:
    """Spline order 3 in plane, nearest along z when anisotropic (ratio > 3), or all 3D."""
    need_nnunetv2()
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )

    data, spacing = _ct_crop()
    data = (data - data.mean()) / data.std()
    shape = compute_new_shape(data.shape[1:], spacing, new_spacing)
    assert list(shape) == N.compute_new_shape(data.shape[1:], spacing, new_spacing)
    ref = resample_data_or_seg_to_shape(
        data, shape, spacing, new_spacing, is_seg=False, order=3, order_z=0,
        force_separate_z=force,
    )  # fmt: skip
    ours = N.resample_to_shape(data, shape, spacing, new_spacing, 3, 0, force)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("separate", [True, False])
def test_logit_resampling_is_nnunets(separate: bool) -> None:
    """Order 1 (and nearest along z) on float16 logits, stored as float16, as nnU-Net exports."""
    need_nnunetv2()
    import torch
    from nnunetv2.preprocessing.resampling.default_resampling import (
        resample_data_or_seg_to_shape,
    )

    data, _ = _ct_crop()
    rng = np.random.default_rng(0)
    small = np.stack([data[0, ::2, ::3, ::3], rng.normal(size=data[0, ::2, ::3, ::3].shape)])
    logits = (small / np.abs(small).max(axis=(1, 2, 3), keepdims=True) * 8).astype(np.float16)
    cur, new = ([5.0, 2.4, 2.4], [2.5, 0.8, 0.8]) if separate else ([1.6, 1.6, 1.6], [1, 1, 1.2])
    dst = [13, 80, 80] if separate else [20, 40, 33]
    kw = {"order": 1, "order_z": 0, "force_separate_z": None}
    ref = resample_data_or_seg_to_shape(logits, dst, cur, new, is_seg=False, **kw)
    fn = N.logits_resampler(logits.shape[1:], dst, cur, new, kw, "cpu")
    ours = torch.stack([fn(torch.from_numpy(logits[k])) for k in range(2)]).numpy()
    assert ref.dtype == ours.dtype == np.float16
    assert N.separate_z_axis(cur, new) == (0 if separate else None)
    np.testing.assert_allclose(ours.astype(np.float32), ref.astype(np.float32), atol=1e-2)
    assert (ours.argmax(0) == ref.argmax(0)).mean() > 0.9999


def test_crop_to_nonzero_is_nnunets() -> None:
    """Skull-stripped T1 (zeros around the brain, holes inside the mask filled)."""
    need_nnunetv2()
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    t1 = np.asarray(nib.load(str(data_path("mri/brain_t1_aseg/t1.nii.gz"))).dataobj)
    data = t1[::2, ::2, ::2].astype(np.float32).transpose(2, 1, 0)[None].copy()
    data[0, 40:44, 40:44, 40:44] = 0  # a hole inside the brain: filled, as nnU-Net fills it
    ref_data, ref_seg, ref_bbox = crop_to_nonzero(data.copy())
    ours, mask, bbox = N.crop_to_nonzero(data)
    assert bbox == [list(b) for b in ref_bbox]
    np.testing.assert_array_equal(ours, ref_data)
    np.testing.assert_array_equal(mask, ref_seg[0] >= 0)
    assert mask[40:44, 40:44, 40:44].all()


def test_axes_follow_simpleitk_and_nibabel_reorient() -> None:
    """The file's (i, j, k) become nnU-Net's (z, y, x) (SimpleITK's order), and back."""
    need_nnunetv2()
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    del determine_reader_writer_from_file_ending
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    path = data_path("ct/totalseg_small/mr.nii.gz")  # LPS
    img = nib.load(str(path))
    rec = ImageRecord(np.asarray(img.dataobj), img.affine)
    for reader, io in (("SimpleITKIO", SimpleITKIO()), ("NibabelIOWithReorient",
                                                        NibabelIOWithReorient())):  # fmt: skip
        ref, props = io.read_images([str(path)])
        ours, spacing = N.to_nnunet_axes(rec, reader)
        np.testing.assert_array_equal(ours, ref.astype(np.float32))
        np.testing.assert_allclose(spacing, props["spacing"], rtol=1e-5)
        back = N.from_nnunet_axes(ours[0], rec, reader)
        np.testing.assert_array_equal(back, rec.data.astype(np.float32))


def test_stack_channels_needs_one_grid() -> None:
    img = nib.load(str(data_path("ct/totalseg_small/mr.nii.gz")))
    a = ImageRecord(np.asarray(img.dataobj), img.affine, name="c0")
    b = ImageRecord(np.asarray(img.dataobj) * 2, img.affine, name="c1")
    both = stack_channels([a, b])
    assert both.shape == (*a.shape, 2)
    np.testing.assert_array_equal(both.data[..., 1], b.data)
    moved = img.affine.copy()
    moved[0, 3] += 5.0
    with pytest.raises(MedsegError, match="one voxel grid"):
        stack_channels([a, ImageRecord(np.asarray(img.dataobj), moved, name="c1")])
