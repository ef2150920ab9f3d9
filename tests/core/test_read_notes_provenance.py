"""What reading chose or found (a missing DICOM slice, one series of several) is in the result's
provenance even with ``--quiet`` (it used to be a warning only, hidden by --quiet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from napari_medseg.cli import main
from tests.conftest import data_path
from tests.helpers import save_tiny_model


def _small_series(src: Path, dest: Path, skip: int | None, uid: str, number: int, n: int) -> None:
    """The first ``n`` slices of a real CT series, cropped to 48x40 pixels, one maybe left out."""
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(src.iterdir())
    slices = sorted(
        (pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2])
    )[:n]
    for k, ds in enumerate(slices):
        if k == skip:
            continue
        arr = ds.pixel_array[200:248, 220:260].copy()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # stored uncompressed
        ds.PixelData = arr.tobytes()
        ds.Rows, ds.Columns = arr.shape
        ds.SeriesInstanceUID = uid
        ds.SeriesNumber = number
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(dest / f"s{number}_{k:03d}.dcm")


def test_quiet_segment_records_missing_slice_and_series_choice(tmp_path, capsys):
    src = data_path("ct/totalseg_small/dicom")
    folder = tmp_path / "study"
    _small_series(src, folder, skip=4, uid=generate_uid(), number=1, n=10)
    _small_series(src, folder, skip=None, uid=generate_uid(), number=7, n=6)
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "seg.nii.gz"
    rc = main(["segment", str(folder), "-m", str(model), "-o", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    prov_file = next(tmp_path.glob("seg*.provenance.json"))
    prov = json.loads(prov_file.read_text())
    notes = " ".join(prov["notes"])
    assert "holds 2 DICOM series; used" in notes
    assert "1 missing slice(s)" in notes and "k = 4" in notes
    assert prov["series_note"].startswith("2 series in the input")
    import nibabel as nib

    seg = nib.load(out)
    assert seg.shape == (40, 48, 10)  # the missing slice has its place: 10, not 9 slices
    spacing = np.sqrt((seg.affine[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(spacing[2], 2.0, atol=0.01)  # the true step, not the mean 2.22
