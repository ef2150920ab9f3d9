"""DICOM series reader: real CT series, pydicom's test files and small series written here."""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from napari_medseg.errors import ImageReadError  # noqa: E402
from napari_medseg.io.dicom import is_dicom_path, iter_read_dicom, read_dicom  # noqa: E402

DATA = Path(
    os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
SERIES = DATA / "ct" / "totalseg_small" / "dicom"
SEG = DATA / "ct" / "totalseg_small" / "seg_dicom.nii.gz"
needs_data = pytest.mark.skipif(not SERIES.is_dir(), reason=f"real DICOM series absent ({SERIES})")

LPS = np.diag([-1.0, -1.0, 1.0])


def _local(name: str) -> str:
    """A pydicom test file that ships in the wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


# --------------------------------------------------------------------------- real CT series


@pytest.fixture(scope="module")
def ct_series():
    return read_dicom(SERIES)


@needs_data
def test_totalseg_series_shape_spacing_hu(ct_series):
    assert len(ct_series) == 1
    rec = ct_series[0]
    assert rec.shape == (512, 512, 20)
    assert rec.space == "RAS"
    assert rec.modality == "CT"
    # in-plane from PixelSpacing; slice spacing from the positions (2 mm), not SliceThickness (3)
    np.testing.assert_allclose(rec.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-4)
    assert rec.metadata["SliceThickness"] == pytest.approx(3.0)
    assert rec.data.dtype == np.int16  # slope 1, intercept -1024: exact in int16
    assert rec.data.min() == -1024
    assert 1000 < rec.data.max() < 3100
    # air outside the body, soft tissue in the middle of the field of view
    assert rec.data[:10, :10, :].mean() < -900
    assert -200 < np.median(rec.data[200:300, 200:300, 10]) < 200
    meta = rec.metadata
    assert meta["n_files"] == 20 and meta["Modality"] == "CT"
    assert meta["RescaleIntercept"] == -1024.0
    import json

    json.dumps(meta)  # JSON-able


@needs_data
def test_totalseg_affine_matches_segmentation(ct_series):
    """The segmentation made on this series lies on exactly our grid (after its own y flip)."""
    nib = pytest.importorskip("nibabel")
    rec = ct_series[0]
    seg = nib.load(SEG)
    assert seg.shape == rec.shape
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(seg.affine), nib.orientations.io_orientation(rec.affine)
    )
    seg_on_ours = seg.as_reoriented(ornt)
    np.testing.assert_allclose(seg_on_ours.affine, rec.affine, atol=1e-3)
    # world positions of the 8 corner voxels agree, whatever the axis order
    corners = np.array([[i, j, k, 1] for i in (0, 511) for j in (0, 511) for k in (0, 19)]).T
    ours = {tuple(np.round(c, 3)) for c in (rec.affine @ corners)[:3].T}
    theirs = {tuple(np.round(c, 3)) for c in (seg.affine @ corners)[:3].T}
    assert ours == theirs
    # and the voxels overlay: labelled voxels are body tissue, not air
    lab = np.asarray(seg_on_ours.dataobj) > 0
    assert lab.sum() > 100_000
    assert (rec.data[lab] > -300).mean() > 0.95
    # a wrong row order would put a quarter of the labels in air
    assert (rec.data[:, ::-1][lab] > -300).mean() < 0.85


@needs_data
def test_first_slice_is_origin_and_slices_follow_normal(ct_series):
    rec = ct_series[0]
    positions = []
    for f in sorted(SERIES.iterdir()):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        positions.append([float(v) for v in ds.ImagePositionPatient])
    zs = sorted(p[2] for p in positions)
    for k in (0, 7, 19):
        ras = rec.affine @ [0, 0, k, 1]
        np.testing.assert_allclose(LPS @ ras[:3], [positions[0][0], positions[0][1], zs[k]])


@needs_data
def test_shuffled_renamed_files_give_the_same_volume(ct_series, tmp_path):
    files = sorted(SERIES.iterdir())
    names = [f"img{n:03d}" for n in range(len(files))]
    random.Random(3).shuffle(names)
    sub = tmp_path / "a" / "b"  # nested: the folder is searched recursively
    sub.mkdir(parents=True)
    for f, n in zip(files, names):
        shutil.copy(f, sub / n)
    (tmp_path / "notes.txt").write_text("not a dicom file\n")
    assert is_dicom_path(tmp_path)
    recs = read_dicom(tmp_path)
    assert len(recs) == 1
    np.testing.assert_array_equal(recs[0].data, ct_series[0].data)
    np.testing.assert_allclose(recs[0].affine, ct_series[0].affine)


@needs_data
def test_progress_generator_reports_and_can_stop():
    gen = iter_read_dicom(SERIES)
    first = next(gen)
    assert first.total == 20 and first.done >= 1
    gen.close()  # a driver cancels by closing between steps


@needs_data
def test_missing_decoder_names_the_package(tmp_path):
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder as dec

    if "pillow" not in dec.available_plugins or len(dec.available_plugins) != 1:
        pytest.skip("test assumes Pillow is the only JPEG 2000 decoder installed")
    dec.remove_plugin("pillow")
    try:
        with pytest.raises(ImageReadError, match="pylibjpeg-openjpeg"):
            read_dicom(_local("MR_small_jp2klossless.dcm"))
    finally:
        dec.add_plugin("pillow", ("pydicom.pixels.decoders.pillow", "_decode_frame"))
    assert read_dicom(_local("MR_small_jp2klossless.dcm"))[0].shape == (64, 64, 1)


# --------------------------------------------------------------------------- single files


def test_single_ct_file_is_a_one_slice_volume():
    path = _local("CT_small.dcm")
    ds = pydicom.dcmread(path)
    (rec,) = read_dicom(path)
    assert rec.shape == (128, 128, 1)
    assert rec.modality == "CT"
    np.testing.assert_allclose(rec.spacing, (0.661468, 0.661468, 5.0), atol=1e-5)
    # (i, j) = (column, row): data[i, j, 0] == rescaled pixel_array[j, i]
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(rec.data[:, :, 0], hu.T)
    np.testing.assert_allclose(
        LPS @ rec.affine[:3, 3], [float(v) for v in ds.ImagePositionPatient], atol=1e-5
    )
    assert is_dicom_path(path)


def test_single_mr_file_modality():
    (rec,) = read_dicom(_local("MR_small.dcm"))
    assert rec.modality == "MR"
    assert rec.shape == (64, 64, 1)
    np.testing.assert_allclose(rec.spacing[:2], (0.3125, 0.3125))


def test_multiframe_rt_dose_is_a_volume_in_gray():
    path = _local("rtdose.dcm")
    ds = pydicom.dcmread(path)
    (rec,) = read_dicom(path)
    assert rec.shape == (10, 10, 15)
    np.testing.assert_allclose(rec.spacing, (10, 10, 5))
    assert rec.data.dtype == np.float32
    expected = ds.pixel_array[3].T * float(ds.DoseGridScaling)
    np.testing.assert_allclose(rec.data[:, :, 3], expected, rtol=1e-6)


# --------------------------------------------------------------------------- errors


def test_folder_without_dicom_raises(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    np.save(tmp_path / "b.npy", np.zeros(3))
    assert not is_dicom_path(tmp_path)
    with pytest.raises(ImageReadError, match="No DICOM images"):
        read_dicom(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError):
        read_dicom(empty)


def test_text_file_named_dcm_raises(tmp_path):
    f = tmp_path / "fake.dcm"
    f.write_text("this is a text file, not DICOM\n" * 20)
    with pytest.raises(ImageReadError, match="not a DICOM file"):
        read_dicom(f)


def test_dicom_without_pixels_raises():
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_dicom(_local("reportsi.dcm"))


def test_truncated_pixels_raise():
    with pytest.raises(ImageReadError, match="truncated"):
        read_dicom(_local("MR_truncated.dcm"))


# --------------------------------------------------------------------------- series written here


def _write_series(
    folder: Path,
    n: int,
    *,
    uid: str | None = None,
    number: int = 1,
    row=(0.0, 1.0, 0.0),
    col=(0.0, 0.0, -1.0),
    pixel_spacing=(0.5, 0.8),
    step=3.0,
    origin=(10.0, -20.0, 30.0),
    positions=None,
    shape=(33, 34),
    offset=0,
    prefix="s",
):
    """Write ``n`` slices of a small uncompressed series; slice k has value ``k + offset``.

    Default orientation is sagittal (rows along A, columns towards inferior), with different
    row and column spacings so that swapped axes show.
    """
    base = pydicom.dcmread(_local("CT_small.dcm"))
    uid = uid or generate_uid()
    row, col = np.array(row), np.array(col)
    normal = np.cross(row, col)
    rows, cols = shape
    written = []
    for k in range(n):
        ds = base.copy()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = uid
        ds.SeriesNumber = number
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [*row.tolist(), *col.tolist()]
        pos = positions[k] if positions is not None else np.array(origin) + k * step * normal
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.PixelSpacing = list(pixel_spacing)
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        img = np.full((rows, cols), k + offset, dtype=np.int16)
        img[0, :] = -1  # first row marks j == 0
        img[:, 0] = -2  # first column marks i == 0
        ds.PixelData = img.tobytes()
        f = folder / f"{prefix}{k:03d}"  # no suffix
        ds.save_as(f, enforce_file_format=True)
        written.append(f)
    return written


def test_affine_maps_voxels_to_patient_positions(tmp_path):
    _write_series(tmp_path, 5)
    (rec,) = read_dicom(tmp_path)
    assert rec.shape == (34, 33, 5)  # (cols, rows, slices)
    np.testing.assert_allclose(rec.spacing, (0.8, 0.5, 3.0))
    assert (rec.data[0, 1:, :] == -2).all() and (rec.data[1:, 0, :] == -1).all()
    np.testing.assert_array_equal(rec.data[5, 5, :], np.arange(5))
    row, col = np.array([0.0, 1, 0]), np.array([0.0, 0, -1])
    for i, j, k in [(0, 0, 0), (33, 0, 0), (0, 32, 4), (7, 11, 2)]:
        lps = np.array([10.0, -20, 30]) + i * 0.8 * row + j * 0.5 * col
        lps = lps + k * 3.0 * np.cross(row, col)
        np.testing.assert_allclose(LPS @ (rec.affine @ [i, j, k, 1])[:3], lps, atol=1e-6)
    assert rec.orientation == "PIR"  # LPS +y = P, -z = I, normal row x col = -x = R


def test_mixed_series_are_never_mixed(tmp_path):
    _write_series(tmp_path, 6, number=2, offset=100, prefix="a")
    # same positions, another series: must not interleave with the first
    _write_series(tmp_path, 4, number=1, offset=500, prefix="b")
    # same series UID but another orientation: split, not stacked
    recs = read_dicom(tmp_path)
    assert [r.shape[2] for r in recs] == [4, 6]  # sorted by SeriesNumber
    assert recs[0].data[5, 5].tolist() == [500, 501, 502, 503]
    assert recs[1].data[5, 5].tolist() == [100, 101, 102, 103, 104, 105]
    assert recs[0].metadata["SeriesInstanceUID"] != recs[1].metadata["SeriesInstanceUID"]


def test_one_series_of_several_decodes_only_that_one(tmp_path, monkeypatch):
    from napari_medseg.io import dicom, read_image

    _write_series(tmp_path, 6, number=2, offset=100, prefix="a")
    _write_series(tmp_path, 4, number=1, offset=500, prefix="b")
    decoded = []
    real = dicom._read_pixels
    monkeypatch.setattr(dicom, "_read_pixels", lambda p, h: decoded.append(p) or real(p, h))
    (rec,) = read_image(tmp_path, series=0)
    assert rec.shape[2] == 4 and rec.data[5, 5].tolist() == [500, 501, 502, 503]
    assert sorted(Path(p).name for p in decoded) == [f"b{k:03d}" for k in range(4)]
    choice = rec.metadata["series_choice"]
    assert choice["n_series"] == 2 and choice["index"] == 0 and len(choice["others"]) == 1
    assert "holds 2 DICOM series; used" in rec.metadata["read_notes"][0]
    with pytest.raises(ImageReadError, match="series 3 does not exist"):
        read_image(tmp_path, series=2)


def test_same_uid_different_orientation_is_split(tmp_path):
    uid = generate_uid()
    _write_series(tmp_path, 3, uid=uid, prefix="a")
    _write_series(tmp_path, 2, uid=uid, row=(1, 0, 0), col=(0, 1, 0), prefix="b", offset=50)
    recs = read_dicom(tmp_path)
    assert sorted(r.shape[2] for r in recs) == [2, 3]
    assert len({r.name for r in recs}) == 2


def test_repeated_positions_split_by_echo(tmp_path):
    uid = generate_uid()
    for echo, off in ((1, 0), (2, 100)):
        files = _write_series(tmp_path, 3, uid=uid, offset=off, prefix=f"e{echo}_")
        for f in files:
            ds = pydicom.dcmread(f)
            ds.EchoNumbers = echo
            ds.save_as(f)
    recs = read_dicom(tmp_path)
    assert len(recs) == 2
    assert sorted(int(r.data[5, 5, 0]) for r in recs) == [0, 100]
    assert all("EchoNumbers" in r.name for r in recs)


def test_missing_slice_is_placed_at_true_positions_and_flagged(tmp_path):
    """A missing slice used to be read at the mean spacing (slices misplaced by up to 1.5 mm
    here); now every slice sits at its true position and the gap is a flagged blank slice."""
    z = [0.0, 2.0, 4.0, 8.0, 10.0]  # the slice at 6 mm is missing
    pos = [np.array([0.0, 0.0, v]) for v in z]
    _write_series(tmp_path, 5, row=(1, 0, 0), col=(0, 1, 0), positions=pos)
    with pytest.warns(UserWarning, match=r"1 missing slice\(s\).*k = 3"):
        (rec,) = read_dicom(tmp_path)
    assert rec.shape[2] == 6 and rec.spacing[2] == pytest.approx(2.0)
    for k, zk in zip([0, 1, 2, 4, 5], z):  # LPS z = RAS z: each slice at its own position
        np.testing.assert_allclose((rec.affine @ [0, 0, k, 1])[2], zk)
    np.testing.assert_array_equal(rec.data[5, 5, :], [0, 1, 2, -2, 3, 4])  # blank = lowest
    assert rec.metadata["missing_slices"] == [3]
    assert "missing slice" in rec.metadata["read_notes"][0]


def test_irregular_spacing_is_refused(tmp_path):
    z = [0.0, 2.0, 4.0, 7.0, 10.0]  # 3 mm is not a whole number of 2 mm steps
    pos = [np.array([0.0, 0.0, v]) for v in z]
    _write_series(tmp_path, 5, row=(1, 0, 0), col=(0, 1, 0), positions=pos)
    with pytest.raises(ImageReadError, match="irregular slice spacing") as info:
        read_dicom(tmp_path)
    assert "\n" not in str(info.value)


def test_gantry_tilt_keeps_every_slice_in_place(tmp_path):
    pos = [np.array([0.0, 0.5 * k, 2.0 * k]) for k in range(4)]
    _write_series(tmp_path, 4, row=(1, 0, 0), col=(0, 1, 0), positions=pos)
    with pytest.warns(UserWarning, match="tilted"):
        (rec,) = read_dicom(tmp_path)
    for k in range(4):
        np.testing.assert_allclose(LPS @ (rec.affine @ [0, 0, k, 1])[:3], pos[k], atol=1e-9)


def test_reverse_written_slices_are_sorted(tmp_path):
    # slices written from the last position to the first, instance numbers ascending
    pos = [np.array([0.0, 0.0, 12.0 - 3 * k]) for k in range(5)]
    _write_series(tmp_path, 5, row=(1, 0, 0), col=(0, 1, 0), positions=pos)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (rec,) = read_dicom(tmp_path)
    # k runs along +normal (= +z here): first slice is the one at z=0, written last (value 4)
    np.testing.assert_array_equal(rec.data[5, 5, :], [4, 3, 2, 1, 0])
    assert rec.affine[2, 3] == pytest.approx(0.0)
    assert rec.spacing[2] == pytest.approx(3.0)
