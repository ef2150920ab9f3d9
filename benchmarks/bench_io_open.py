"""Time to open a DICOM series and a NIfTI volume, as ratios against plain pydicom / nibabel.

Run: ``python benchmarks/bench_io_open.py`` (needs ../shared/data). Each reader runs ``REPEATS``
times in this process after a warm-up; the median is reported. The references are the minimal
loads a script would do: pydicom reading every file and stacking ``pixel_array`` with the
rescale applied (no sorting, no geometry), and ``nibabel.load(...).get_fdata()``-free
``np.asanyarray(img.dataobj)``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
REPEATS = 7


def _median_time(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def plain_pydicom(folder: Path) -> np.ndarray:
    import pydicom

    slices = []
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array.astype(np.float32)
        slices.append(arr * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(slices)


def plain_nibabel(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def main() -> int:
    from napari_medseg.io import read_image
    from napari_medseg.io.napari_io import read_layers

    dicom = DATA / "ct/totalseg_small/dicom"
    nifti = DATA / "mri/brain_t1_aseg/t1.nii.gz"
    if not dicom.exists() or not nifti.exists():
        print(f"data not found under {DATA}", file=sys.stderr)
        return 1
    rows = []
    for label, ours, ref in [
        ("DICOM series 20x512x512", lambda: read_image(dicom), lambda: plain_pydicom(dicom)),
        ("NIfTI 160x192x224 float64", lambda: read_image(nifti), lambda: plain_nibabel(nifti)),
        (
            "DICOM -> napari layer tuple",
            lambda: read_layers(str(dicom)),
            lambda: plain_pydicom(dicom),
        ),
        (
            "NIfTI -> napari layer tuple",
            lambda: read_layers(str(nifti)),
            lambda: plain_nibabel(nifti),
        ),
    ]:
        t_ours, t_ref = _median_time(ours), _median_time(ref)
        rows.append((label, t_ours, t_ref, t_ours / t_ref))
    print("| what | napari-medseg (s) | plain load (s) | ratio |")
    print("|---|---|---|---|")
    for label, a, b, r in rows:
        print(f"| {label} | {a:.3f} | {b:.3f} | {r:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
