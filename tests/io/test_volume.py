"""Round trips through the volume readers and writers on every real volume in ../shared/data."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_medseg.cli import main
from napari_medseg.errors import ImageWriteError
from napari_medseg.io import ImageRecord, read_image, write_image
from napari_medseg.io.geometry import affine_from_itk, itk_from_affine
from tests.conftest import data_path

VOLUMES = [
    "ct/spleen/image.nii.gz",
    "ct/spleen/label.nii.gz",
    "ct/totalseg_small/ct.nii.gz",
    "ct/totalseg_small/seg.nii.gz",
    "ct/totalseg_small/mr.nii.gz",
    "ct/totalseg_small/seg_mr.nii.gz",
    "ct/totalseg_small/seg_dicom.nii.gz",
    "mri/spinal_cord/t2.nii.gz",
    "mri/spinal_cord/t2_seg-manual.nii.gz",
    "mri/spinal_cord/t1w.nii.gz",
    "mri/spinal_cord/t2s.nii.gz",
    "mri/spinal_cord/t2s_gmseg_manual.nii.gz",
    "mri/brain_tumour_nrrd/brain1_image.nrrd",
    "mri/brain_tumour_nrrd/brain1_label.nrrd",
    "mri/brain_tumour_nrrd/breast1_image.nrrd",
    "mri/brain_t1_aseg/aseg.nii.gz",
    "registration/mt_pair/mt0.nii.gz",
    "registration/mt_pair/mt1_seg.nii.gz",
    "registration/lung_masks/CT_3D_lung_fixed_mask.mha",
    "registration/lung_masks/CT_3D_lung_moving_mask.mha",
    "denoising/fmri_30frames.nii.gz",
]


def _reference(path):
    """Voxels and voxel-to-RAS affine as nibabel (NIfTI) or SimpleITK (others) report them."""
    name = str(path)
    if name.endswith((".nii", ".nii.gz")):
        img = nib.load(name)
        return np.asanyarray(img.dataobj), img.affine
    img = sitk.ReadImage(name)
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    return arr, affine_from_itk(img.GetOrigin(), img.GetSpacing(), img.GetDirection())


@pytest.mark.parametrize("rel", VOLUMES)
def test_read_matches_reference_library(rel):
    path = data_path(rel)
    rec = read_image(path)[0]
    ref, ref_aff = _reference(path)
    assert rec.shape == ref.shape
    np.testing.assert_allclose(rec.affine, ref_aff, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(rec.data), ref.astype(rec.data.dtype))


@pytest.mark.parametrize("rel", VOLUMES)
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_every_volume(rel, ext, tmp_path):
    path = data_path(rel)
    rec = read_image(path)[0]
    if ext != ".nii.gz" and rec.data.ndim == 4:
        with pytest.raises(ImageWriteError, match="4D"):
            write_image(tmp_path / f"out{ext}", rec)
        return
    out = write_image(tmp_path / f"out{ext}", rec)
    ref, ref_aff = _reference(out)
    assert ref.shape == rec.shape
    np.testing.assert_allclose(ref_aff, rec.affine, atol=1e-4)
    np.testing.assert_array_equal(ref, np.asarray(rec.data).astype(ref.dtype))
    back = read_image(out)[0]
    assert back.orientation == rec.orientation


def test_labels_saved_as_integers_with_source_header(tmp_path):
    src = read_image(data_path("ct/spleen/image.nii.gz"))[0]
    lab = (np.asarray(src.data) > 100).astype(np.float32)  # a float mask, as tools produce
    rec = ImageRecord(data=lab, affine=src.affine, modality="label", metadata=src.metadata)
    out = write_image(tmp_path / "mask.nii.gz", rec)
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    assert img.header["sform_code"] == nib.load(src.path).header["sform_code"]
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), lab.astype(np.uint8))


def test_non_integer_labels_refused(tmp_path):
    rec = ImageRecord(data=np.full((4, 4, 4), 0.5, np.float32), affine=np.eye(4), modality="label")
    with pytest.raises(ImageWriteError, match="not integers"):
        write_image(tmp_path / "m.nii.gz", rec)
    assert not list(tmp_path.iterdir())  # nothing partial left behind


def test_write_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    src = read_image(data_path("registration/mt_pair/mt0.nii.gz"))[0]
    dest = tmp_path / "mask.nii.gz"
    write_image(dest, src)
    before = dest.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(ImageWriteError, match="disk full"):
        write_image(dest, src)
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def test_no_overwrite_when_asked(tmp_path):
    src = read_image(data_path("registration/mt_pair/mt0.nii.gz"))[0]
    write_image(tmp_path / "a.nrrd", src)
    with pytest.raises(ImageWriteError, match="--overwrite"):
        write_image(tmp_path / "a.nrrd", src, overwrite=False)


def test_itk_affine_helpers_invert():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    aff = np.eye(4)
    aff[:3, :3] = q * np.array([0.7, 1.2, 3.0])
    aff[:3, 3] = [10, -20, 30]
    o, s, d = itk_from_affine(aff)
    np.testing.assert_allclose(affine_from_itk(o, s, d), aff, atol=1e-12)


@pytest.mark.parametrize(
    "rel, orientation",
    [
        ("ct/spleen/image.nii.gz", "RAS"),
        ("ct/totalseg_small/mr.nii.gz", "LPS"),
        ("mri/spinal_cord/t2.nii.gz", "PSR"),
        ("mri/brain_tumour_nrrd/brain1_image.nrrd", "LAS"),
    ],
)
def test_info_cli_json(rel, orientation, capsys):
    path = data_path(rel)
    assert main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {"shape", "dtype", "spacing", "affine", "orientation", "modality"}
    ref, ref_aff = _reference(path)
    assert info["shape"] == list(ref.shape)
    np.testing.assert_allclose(np.array(info["affine"]), ref_aff, atol=1e-4)
    assert info["orientation"] == orientation
    np.testing.assert_allclose(info["spacing"], np.sqrt((ref_aff[:3, :3] ** 2).sum(0)), atol=1e-5)
