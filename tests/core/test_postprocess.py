"""Label clean-up on 2D and 3D maps, including the real spleen mask."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from napari_medseg.core.engine.postprocess import (
    apply_postprocessing,
    argmax,
    fill_holes,
    keep_largest_component,
    remove_small,
)

DATA = Path(
    os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)


def _two_blobs(shape=(33, 34, 35)):
    lab = np.zeros(shape, np.uint8)
    lab[2:12, 2:12, 2:12] = 1  # 1000 voxels
    lab[20:23, 20:23, 20:23] = 1  # 27 voxels
    lab[25:30, 2:7, 25:30] = 2  # 125 voxels
    return lab


def test_argmax_dtype_and_values():
    p = np.random.default_rng(0).random((3, 5, 6)).astype(np.float32)
    out = argmax(p)
    assert out.dtype == np.uint8 and out.shape == (5, 6)
    np.testing.assert_array_equal(out, p.argmax(0))
    assert argmax(np.zeros((300, 2, 2))).dtype == np.uint16


def test_keep_largest_per_class_3d():
    lab = _two_blobs()
    out = keep_largest_component(lab)
    assert (out == 1).sum() == 1000
    assert (out == 2).sum() == 125  # other class untouched
    assert (lab == 1).sum() == 1027  # input not modified
    out1 = keep_largest_component(lab, classes=[2])
    np.testing.assert_array_equal(out1, lab)


def test_fill_holes_keeps_other_classes():
    lab = np.zeros((20, 20), np.uint8)
    lab[2:12, 2:12] = 1
    lab[5:7, 5:7] = 0  # a hole
    lab[8, 8] = 3  # another class inside: kept
    out = fill_holes(lab)
    assert (out[5:7, 5:7] == 1).all()
    assert out[8, 8] == 3
    assert (out == 1).sum() == 100 - 1


def test_remove_small_voxels_and_mm3():
    lab = _two_blobs()
    out = remove_small(lab, min_size_voxels=100)
    assert (out == 1).sum() == 1000 and (out == 2).sum() == 125
    # 2 x 2 x 2 mm voxels: 27 voxels = 216 mm3, 125 voxels = 1000 mm3
    out = remove_small(lab, min_size_mm3=500, spacing=(2, 2, 2))
    assert (out == 1).sum() == 1000 and (out == 2).sum() == 125
    out = remove_small(lab, min_size_mm3=1001, spacing=(2, 2, 2))
    assert (out == 2).sum() == 0 and (out == 1).sum() == 1000
    with pytest.raises(ValueError):
        remove_small(lab, min_size_mm3=10)


def test_apply_postprocessing_config():
    lab = _two_blobs()
    lab[5, 5, 5] = 0
    out = apply_postprocessing(
        lab, {"remove_small": {"min_size_voxels": 30}, "fill_holes": [1]}, spacing=(1, 1, 1)
    )
    assert (out == 1).sum() == 1000
    assert apply_postprocessing(lab, {}) is lab


@pytest.mark.skipif(not (DATA / "ct/spleen/label.nii.gz").is_file(), reason="no real data")
def test_real_spleen_mask_is_one_component():
    nib = pytest.importorskip("nibabel")
    lab = np.asarray(nib.load(str(DATA / "ct/spleen/label.nii.gz")).dataobj).astype(np.uint8)
    noisy = lab.copy()
    noisy[0:3, 0:3, 0:3] = 1  # a stray false positive far away
    out = keep_largest_component(noisy)
    np.testing.assert_array_equal(out, lab)


def test_channel_argmax_equals_argmax_numpy_and_torch():
    torch = pytest.importorskip("torch")
    from napari_medseg.core.engine.postprocess import channel_argmax

    rng = np.random.default_rng(3)
    p = rng.integers(0, 4, size=(5, 9, 10, 11)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(channel_argmax(p), p.argmax(0))
    np.testing.assert_array_equal(channel_argmax(torch.from_numpy(p)).numpy(), p.argmax(0))
    np.testing.assert_array_equal(argmax(torch.from_numpy(p)), p.argmax(0))
    np.testing.assert_array_equal(argmax(np.moveaxis(p, 0, -1), axis=-1), p.argmax(0))
