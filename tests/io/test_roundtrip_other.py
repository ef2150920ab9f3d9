"""Round trips for the non-volume files in ../shared/data: DICOM series, 2D images, TIFF; and the
detached-header formats (.nhdr, .mhd)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medseg.io import read_image, write_image
from tests.conftest import data_path


def test_dicom_series_to_nifti_and_back(tmp_path):
    rec = read_image(data_path("ct/totalseg_small/dicom"))[0]
    out = write_image(tmp_path / "ct.nii.gz", rec)
    back = read_image(out)[0]
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(rec.data))
    np.testing.assert_allclose(back.affine, rec.affine, atol=1e-4)
    assert back.orientation == rec.orientation


@pytest.mark.parametrize(
    "rel, ext",
    [
        ("pathology/he_tile_tcia.jpg", ".tif"),
        ("pathology/ihc_tile.png", ".png"),
        ("microscopy/dsb2018_nuclei/image.tif", ".tif"),
        ("microscopy/dsb2018_nuclei/mask.tif", ".png"),
    ],
)
def test_2d_images_round_trip(rel, ext, tmp_path):
    rec = read_image(data_path(rel))[0]
    assert rec.space == "pixel"
    out = write_image(tmp_path / f"out{ext}", rec)
    back = read_image(out)[0]
    assert back.rgb == rec.rgb
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(rec.data))


@pytest.mark.parametrize("ext", [".nhdr", ".mhd"])
def test_detached_header_formats(ext, tmp_path):
    src = data_path("mri/brain_tumour_nrrd/breast1_image.nrrd")
    img = sitk.ReadImage(str(src))
    sitk.WriteImage(img, str(tmp_path / f"scan{ext}"))
    a = read_image(src)[0]
    b = read_image(tmp_path / f"scan{ext}")[0]
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
