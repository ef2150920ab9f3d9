"""Layer geometry: every file maps voxels to RAS mm, so scans in any orientation overlay."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.io import read_image
from napari_medseg.io.geometry import (
    compose_layer_transform,
    layer_to_record_parts,
    record_to_layer_data,
)
from napari_medseg.io.record import ImageRecord
from tests.conftest import data_path

FILES = [
    ("ct/spleen/image.nii.gz", "RAS"),
    ("ct/totalseg_small/mr.nii.gz", "LPS"),
    ("mri/brain_tumour_nrrd/brain1_image.nrrd", "LAS"),
    ("mri/spinal_cord/t2.nii.gz", "PSR"),
    ("registration/lung_masks/CT_3D_lung_moving_mask.mha", "LPS"),
]


def _world(kwargs, layer_idx):
    a = np.asarray(kwargs["affine"])
    return (a @ np.r_[layer_idx, 1.0])[:-1]


@pytest.mark.parametrize("rel, codes", FILES)
def test_layer_maps_voxels_to_ras_in_SAR_world_order(rel, codes):
    rec = read_image(data_path(rel))[0]
    assert rec.orientation == codes
    data, kwargs, _ = record_to_layer_data(rec)
    perm = kwargs["metadata"]["medseg"]["layer_axes"]
    rng = np.random.default_rng(1)
    for _ in range(5):
        ijk = np.array([rng.integers(0, s) for s in rec.shape[:3]])
        lidx = ijk[perm]
        assert data[tuple(lidx)] == np.asarray(rec.data)[tuple(ijk)]
        ras = (rec.affine @ np.r_[ijk, 1.0])[:3]
        np.testing.assert_allclose(_world(kwargs, lidx), ras[::-1], atol=1e-4)
    # layer axes follow world (S, A, R): the linear part is diagonal-dominant, no axis swap
    lin = np.abs(np.asarray(kwargs["affine"])[:3, :3])
    assert np.all(np.argmax(lin, axis=1) == [0, 1, 2])


@pytest.mark.parametrize("target", ["LPS", "PSR", "LAS", "SRA"])
def test_same_scan_in_other_orientations_overlays(target):
    """Re-store one scan in another orientation: every voxel lands on the same world point."""
    src = read_image(data_path("mri/spinal_cord/t2s.nii.gz"))[0]
    img = nib.Nifti1Image(np.asarray(src.data), src.affine)
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(src.affine), nib.orientations.axcodes2ornt(target)
    )
    other = img.as_reoriented(ornt)
    rec2 = ImageRecord(data=np.asanyarray(other.dataobj), affine=other.affine)
    assert rec2.orientation == target
    d1, k1, _ = record_to_layer_data(src)
    d2, k2, _ = record_to_layer_data(rec2)
    assert d1.shape == d2.shape
    # same world point -> same value, checked on the whole grid
    a1, a2 = np.asarray(k1["affine"]), np.asarray(k2["affine"])
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in d1.shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ a1[:3, :3].T + a1[:3, 3]
    idx2 = np.rint((world - a2[:3, 3]) @ np.linalg.inv(a2[:3, :3]).T).astype(int)
    np.testing.assert_array_equal(np.asarray(d1)[tuple(idx.T)], np.asarray(d2)[tuple(idx2.T)])


@pytest.mark.parametrize("rel, _codes", FILES)
def test_layer_back_to_file_order_is_exact(rel, _codes):
    rec = read_image(data_path(rel))[0]
    data, kwargs, _ = record_to_layer_data(rec)
    arr, aff, space, meta = layer_to_record_parts(data, kwargs)
    assert space == "RAS" and meta
    np.testing.assert_array_equal(arr, np.asarray(rec.data))
    np.testing.assert_allclose(aff, rec.affine)


def test_hand_made_layer_without_metadata_keeps_world_geometry():
    """A Labels layer made in napari (scale/translate only) saves with its world transform."""
    data = np.zeros((5, 6, 7), np.uint8)  # (S, A, R) layer axes
    attrs = {"scale": [3.0, 2.0, 1.5], "translate": [-10.0, 20.0, 5.0], "metadata": {}}
    arr, aff, space, meta = layer_to_record_parts(data, attrs)
    assert space == "RAS" and not meta and arr.shape == (7, 6, 5)
    world = compose_layer_transform(attrs)
    for lidx in ([0, 0, 0], [4, 5, 6], [1, 2, 3]):
        ras = aff @ np.r_[lidx[::-1], 1.0]
        np.testing.assert_allclose(ras[:3][::-1], (world @ np.r_[lidx, 1.0])[:3])


def test_four_d_layer_time_first_and_mask_on_its_grid():
    rec = read_image(data_path("denoising/fmri_30frames.nii.gz"))[0]
    data, kwargs, _ = record_to_layer_data(rec)
    assert data.shape[0] == 30 and np.asarray(kwargs["affine"]).shape == (5, 5)
    mask = np.zeros(data.shape[1:], np.uint8)
    arr, aff, _, _ = layer_to_record_parts(mask, kwargs)
    assert arr.shape == rec.shape[:3]
    np.testing.assert_allclose(aff, rec.affine)
