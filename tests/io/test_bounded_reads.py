"""Lying headers, special files and header-only info: bounded memory, no hangs.

Each test here failed before the guards in :mod:`napari_medseg.io.limits` (a 70-byte .nii.gz
claiming 1000^3 voxels allocated 1.1 GB; ``info`` decoded whole TIFF stacks; a FIFO named like
an image blocked the reader; a DICOM folder decoded every series when one was used).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from napari_medseg.errors import ImageReadError
from napari_medseg.io import read_image
from napari_medseg.io.readers import read_info
from tests.conftest import data_path

MB = 1 << 20


def _peak(fn, *args):
    """(result or exception, peak traced bytes) of ``fn(*args)``."""
    tracemalloc.start()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - returned for the test to check
        out = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, peak


def _lying_nifti(path: Path, header, shape, compress: bool = True, payload: bytes = b"") -> Path:
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    raw = header.binaryblock + b"\0" * 4 + payload
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize(
    ("header", "shape"),
    [(nib.Nifti1Header(), (1000, 1000, 1000)), (nib.Nifti2Header(), (100000, 100000, 100000))],
)
@pytest.mark.parametrize("reader", [read_image, read_info])
def test_tiny_gz_claiming_huge_volume_allocates_nothing(tmp_path, header, shape, reader):
    f = _lying_nifti(tmp_path / "liar.nii.gz", header, shape)
    assert f.stat().st_size < 100
    err, peak = _peak(reader, f)
    assert isinstance(err, ImageReadError), err
    assert "truncated or corrupt" in str(err) and "\n" not in str(err)
    assert peak < 5 * MB, f"{peak / MB:.0f} MB allocated before refusing"


def test_uncompressed_nifti_shorter_than_its_header(tmp_path):
    f = _lying_nifti(tmp_path / "liar.nii", nib.Nifti1Header(), (512, 512, 400), compress=False)
    err, peak = _peak(read_image, f)
    assert isinstance(err, ImageReadError) and "holds 352 bytes" in str(err)
    assert peak < 5 * MB


def test_gz_within_deflate_ratio_is_streamed_and_stops(tmp_path):
    """100 KB of incompressible voxels claiming 16 MB: decompressed and counted, never kept."""
    payload = np.random.default_rng(0).integers(0, 255, 100_000, dtype=np.uint8).tobytes()
    f = _lying_nifti(tmp_path / "short.nii.gz", nib.Nifti1Header(), (256, 256, 256), True, payload)
    err, peak = _peak(read_image, f)
    assert isinstance(err, ImageReadError) and "once decompressed" in str(err)
    assert peak < 8 * MB, f"{peak / MB:.0f} MB"


def test_highly_compressible_labels_still_read(tmp_path):
    """A real, mostly empty label map (ratio far above 20:1) passes the streamed check."""
    lab = np.zeros((160, 160, 120), np.uint8)
    lab[60:70, 50:80, 40:45] = 3
    nib.save(nib.Nifti1Image(lab, np.diag([0.8, 0.8, 2.5, 1])), tmp_path / "seg.nii.gz")
    assert lab.nbytes > 100 * (tmp_path / "seg.nii.gz").stat().st_size
    (rec,) = read_image(tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(rec.data, lab)


def test_nrrd_and_mha_claiming_more_than_they_hold(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((8, 9, 10), np.int16))
    for ext, compress in ((".nrrd", False), (".mha", False), (".nrrd", True), (".mha", True)):
        f = tmp_path / f"vol{int(compress)}{ext}"
        sitk.WriteImage(img, str(f), compress)
        text = f.read_bytes()
        if ext == ".nrrd":
            text = text.replace(b"sizes: 10 9 8", b"sizes: 1000 1000 1000", 1)
        else:
            text = text.replace(b"DimSize = 10 9 8", b"DimSize = 1000 1000 1000", 1)
        f.write_bytes(text)
        err, peak = _peak(read_image, f)
        assert isinstance(err, ImageReadError), (f.name, err)
        assert "truncated or corrupt" in str(err), str(err)
        assert peak < 5 * MB, (f.name, peak)


_READ_IN_CHILD = """
import sys
from napari_medseg.errors import MedsegError
from napari_medseg.io import read_image
from napari_medseg.io.readers import read_info
for fn in (read_image, read_info):
    try:
        fn(sys.argv[1])
        print("READ")
    except MedsegError as e:
        print("REFUSED:", e)
"""


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nrrd", "scan.mha", "slide.tif", "x.dcm"])
def test_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-c", _READ_IN_CHILD, str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("REFUSED:") for line in lines), proc
    assert "named pipe" in lines[0] or "not a file" in lines[0]


def test_fifo_inside_a_dicom_folder_is_skipped(tmp_path):
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm")
    if src is None:
        pytest.skip("pydicom test file CT_small.dcm not available")
    (tmp_path / "a.dcm").write_bytes(Path(src).read_bytes())
    os.mkfifo(tmp_path / "b.dcm")
    proc = subprocess.run(
        [sys.executable, "-c", _READ_IN_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.splitlines() == ["READ", "READ"], proc


def test_info_of_a_zlib_tiff_stack_reads_tags_only(tmp_path):
    """A zlib TIFF stack of 512 MB decoded costs its tags, not its voxels."""
    crop = tifffile.imread(data_path("microscopy/dsb2018_nuclei/image.tif"))[:64, :64]
    page = np.zeros((2048, 2048), np.uint16)
    page[:64, :64] = crop
    f = tmp_path / "stack.tif"
    tifffile.imwrite(
        f, (page for _ in range(64)), shape=(64, 2048, 2048), dtype=np.uint16,
        compression="zlib", metadata={"axes": "ZYX"},
    )  # fmt: skip
    assert f.stat().st_size < 8 * MB
    (info,), peak = _peak(read_info, f)
    assert info["shape"] == [64, 2048, 2048] and info["dtype"] == "uint16"
    assert info["space"] == "RAS"
    assert peak < 40 * MB, f"{peak / MB:.0f} MB for a header"


def test_info_matches_read_image(tmp_path):
    """Header-only info says what a full read gives (shape, dtype, affine, modality)."""
    ct = data_path("ct/spleen/image.nii.gz")
    lab = data_path("ct/spleen/label.nii.gz")
    mha = data_path("registration/lung_masks/CT_3D_lung_fixed_mask.mha")
    tif = data_path("microscopy/dsb2018_nuclei/image.tif")
    for f in (ct, lab, mha, tif):
        (full,) = read_image(f)
        (info,) = read_info(f)
        assert info["shape"] == list(full.shape), f
        assert info["dtype"] == str(full.data.dtype), f
        np.testing.assert_allclose(info["affine"], full.affine, atol=1e-6)
        assert info["modality"] == full.modality, f


def test_info_of_a_volume_holds_one_slice(tmp_path):
    """info checks a .nii.gz to its end (a truncated file is still found) in bounded memory."""
    img = nib.load(data_path("ct/spleen/image.nii.gz"))
    vol = np.tile(np.asarray(img.dataobj).astype(np.int16), (2, 2, 8))  # 328x332x208 real HU
    f = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(vol, img.affine), f)
    (info,), peak = _peak(read_info, f)
    assert info["shape"] == list(vol.shape) and info["modality"] == "CT"
    assert peak < vol.nbytes / 8, f"{peak / MB:.1f} MB for a {vol.nbytes / MB:.0f} MB volume"
    raw = f.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) * 3 // 4])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_info(tmp_path / "cut.nii.gz")


def test_info_of_dicom_folder_decodes_no_pixels(monkeypatch):
    from napari_medseg.io import dicom

    folder = data_path("ct/totalseg_small/dicom")
    (full,) = read_image(folder)

    def no_pixels(*a, **k):
        raise AssertionError("info decoded DICOM pixel data")

    monkeypatch.setattr(dicom, "_read_pixels", no_pixels)
    (info,) = read_info(folder)
    assert info["shape"] == list(full.shape) and info["modality"] == "CT"
    np.testing.assert_allclose(info["affine"], full.affine, atol=1e-6)
