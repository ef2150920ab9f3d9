"""Bad input ends in one clear sentence (an ImageReadError, or exit code 1 + one stderr line)."""

from __future__ import annotations

import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.io import ImageReadError, read_image
from tests.conftest import data_path


def _one_sentence(msg: str) -> None:
    assert msg and "\n" not in msg and "Traceback" not in msg
    assert len(msg) < 400


def _expect_error(path, match: str) -> str:
    with pytest.raises(ImageReadError, match=match) as info:
        read_image(path)
    _one_sentence(str(info.value))
    return str(info.value)


def test_truncated_nifti_gz(tmp_path):
    src = data_path("ct/spleen/image.nii.gz").read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(src[: len(src) // 2])
    _expect_error(bad, "truncated or corrupt")


def test_corrupt_gzip_stream(tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(2000))
    _expect_error(bad, "corrupt|not a valid NIfTI")


def test_text_file_renamed_nii(tmp_path):
    bad = tmp_path / "notes.nii"
    bad.write_text("this is a radiology report, not an image\n" * 20)
    _expect_error(bad, "not a valid NIfTI")


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.nii.gz"
    bad.write_bytes(b"")
    _expect_error(bad, "empty")


def test_zero_sized_dimension(tmp_path):
    img = nib.Nifti1Image(np.zeros((10, 0, 5), np.int16), np.eye(4))
    nib.save(img, tmp_path / "zero.nii.gz")
    _expect_error(tmp_path / "zero.nii.gz", "zero-sized")


def test_five_dimensional(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4, 2, 3), np.int16), np.eye(4))
    nib.save(img, tmp_path / "five.nii.gz")
    _expect_error(tmp_path / "five.nii.gz", "5 dimensions")


def test_nan_and_inf_open_with_warning(tmp_path):
    arr = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    arr[4, 5, 6] = np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.warns(UserWarning, match="2 NaN or infinite"):
        rec = read_image(tmp_path / "nan.nii.gz")[0]
    assert rec.shape == (8, 9, 10)


def test_unreadable_permissions(tmp_path, monkeypatch):
    src = tmp_path / "scan.nii.gz"
    shutil.copy(data_path("registration/mt_pair/mt0.nii.gz"), src)
    # root reads any file whatever its mode, so simulate what a normal user sees
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    _expect_error(src, "permission denied")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.nii.gz", "does not exist")


def test_unsupported_extension(tmp_path):
    bad = tmp_path / "scan.xyz"
    bad.write_text("x")
    _expect_error(bad, "unsupported file type")


def test_truncated_nrrd(tmp_path):
    src = data_path("mri/brain_tumour_nrrd/breast1_image.nrrd").read_bytes()
    bad = tmp_path / "trunc.nrrd"
    bad.write_bytes(src[: len(src) // 3])
    _expect_error(bad, "could not be read")


def test_truncated_mha(tmp_path):
    src = data_path("registration/lung_masks/CT_3D_lung_fixed_mask.mha").read_bytes()
    bad = tmp_path / "trunc.mha"
    bad.write_bytes(src[: len(src) // 2])
    _expect_error(bad, "could not be read")


def test_gzip_of_text_named_nii_gz(tmp_path):
    bad = tmp_path / "report.nii.gz"
    bad.write_bytes(gzip.compress(b"not an image at all " * 100))
    _expect_error(bad, "not a valid NIfTI|truncated or corrupt")


def test_cli_reports_one_line_and_nonzero_exit(tmp_path, capsys):
    bad = tmp_path / "notes.nii"
    bad.write_text("hello")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("napari-medseg: error:")
