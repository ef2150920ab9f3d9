#!/usr/bin/env python
"""Build the nnU-Net-layout training datasets of the three built-in models.

Usage::

    python scripts/make_builtin_datasets.py OUTDIR [--data /path/to/shared/data]

Reads the real data under ``../shared/data`` (or ``$MEDSEG_DATA``) and writes, under OUTDIR
(never into the repository):

* ``Dataset001_SpleenCT``: 3D CT, label 1 = spleen. Case ``spleen_msd``: the MSD Task09 crop
  (MANUAL label). Case ``totalseg_small``: TotalSegmentator's small CT with its label 1
  (spleen, AUTO label) kept and all other organs set to background.
* ``Dataset002_SpinalCordMR``: 3D MRI of one subject, label 1 = spinal cord (MANUAL). Cases
  ``sc_t2`` and ``sc_t1w`` (two contrasts). ``t2s`` is skipped: only a grey-matter mask exists
  for it, not a cord mask.
* ``Dataset003_NucleiDSB``: 2D fluorescence microscopy, the 512x512 DSB 2018 image cut into 16
  tiles of 128x128 (uint16 TIFF), label 1 = nucleus (instance mask > 0, MANUAL).
* ``Dataset004_NucleiDSBDetection``: the same 16 tiles (same names, so the same held-out tiles
  under the same seed) with the MANUAL **instance** mask as label (each nucleus its own
  integer, uint16 TIFF): the training set of the built-in box detector ``fluo_nuclei_det_2d``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def _data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("MEDSEG_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write_nifti(path: Path, arr: np.ndarray, affine: np.ndarray, header=None) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine, header=header)
    if header is None:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _dataset_json(folder: Path, meta: dict) -> None:
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def make_spleen(data: Path, out: Path) -> Path:
    import nibabel as nib

    ds = out / "Dataset001_SpleenCT"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    img = nib.load(str(data / "ct/spleen/image.nii.gz"))
    lab = nib.load(str(data / "ct/spleen/label.nii.gz"))
    _write_nifti(
        ds / "imagesTr/spleen_msd_0000.nii.gz",
        np.asarray(img.dataobj).astype(np.float32),
        img.affine,
        img.header,
    )
    _write_nifti(
        ds / "labelsTr/spleen_msd.nii.gz",
        (np.asarray(lab.dataobj) == 1).astype(np.uint8),
        lab.affine,
    )
    ct = nib.load(str(data / "ct/totalseg_small/ct.nii.gz"))
    seg = nib.load(str(data / "ct/totalseg_small/seg.nii.gz"))
    _write_nifti(
        ds / "imagesTr/totalseg_small_0000.nii.gz",
        np.asarray(ct.dataobj).astype(np.int16),
        ct.affine,
        ct.header,
    )
    _write_nifti(
        ds / "labelsTr/totalseg_small.nii.gz",
        (np.asarray(seg.dataobj) == 1).astype(np.uint8),
        seg.affine,
    )
    _dataset_json(
        ds,
        {
            "name": "Dataset001_SpleenCT",
            "description": "Spleen in abdominal CT. spleen_msd: Medical Segmentation Decathlon "
            "Task09 spleen crop (via ivadomed data-testing), MANUAL label, CC-BY-SA 4.0. "
            "totalseg_small: TotalSegmentator test CT (3 mm), label 1 (spleen) of its AUTO "
            "segmentation, other organs set to background, Apache-2.0.",
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "spleen": 1},
            "numTraining": 2,
            "file_ending": ".nii.gz",
            "licence": "CC-BY-SA-4.0 (spleen_msd); Apache-2.0 (totalseg_small)",
        },
    )
    return ds


def make_spinal_cord(data: Path, out: Path) -> Path:
    import nibabel as nib

    ds = out / "Dataset002_SpinalCordMR"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    sc = data / "mri/spinal_cord"
    cases = []
    for contrast, seg in (("t2", "t2_seg-manual"), ("t1w", "t1w_seg-manual"), ("t2s", None)):
        if seg is None or not (sc / f"{seg}.nii.gz").exists():
            print(f"  skipping {contrast}: no spinal cord mask", file=sys.stderr)
            continue
        img = nib.load(str(sc / f"{contrast}.nii.gz"))
        lab = nib.load(str(sc / f"{seg}.nii.gz"))
        _write_nifti(
            ds / f"imagesTr/sc_{contrast}_0000.nii.gz",
            np.asarray(img.dataobj).astype(np.float32),
            img.affine,
        )
        _write_nifti(
            ds / f"labelsTr/sc_{contrast}.nii.gz",
            (np.asarray(lab.dataobj) > 0).astype(np.uint8),
            lab.affine,
        )
        cases.append(contrast)
    _dataset_json(
        ds,
        {
            "name": "Dataset002_SpinalCordMR",
            "description": "Spinal cord in cervical spine MRI: ONE subject, different contrasts "
            f"({', '.join(cases)}), MANUAL cord masks, from spinalcordtoolbox sct_testing_data "
            "(MIT). t2s is not included (only a grey-matter mask exists for it). t2 is stored "
            "PSR, t1w RAS.",
            "channel_names": {"0": "MR"},
            "labels": {"background": 0, "spinal_cord": 1},
            "numTraining": len(cases),
            "file_ending": ".nii.gz",
            "licence": "MIT",
        },
    )
    return ds


def make_nuclei(data: Path, out: Path, tile: int = 128) -> Path:
    import tifffile

    ds = out / "Dataset003_NucleiDSB"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    img = tifffile.imread(str(data / "microscopy/dsb2018_nuclei/image.tif"))
    mask = tifffile.imread(str(data / "microscopy/dsb2018_nuclei/mask.tif"))
    n = 0
    for r in range(0, img.shape[0] - tile + 1, tile):
        for c in range(0, img.shape[1] - tile + 1, tile):
            name = f"dsb_r{r:03d}_c{c:03d}"
            tifffile.imwrite(
                str(ds / f"imagesTr/{name}_0000.tif"),
                img[r : r + tile, c : c + tile].astype(np.uint16),
            )
            tifffile.imwrite(
                str(ds / f"labelsTr/{name}.tif"),
                (mask[r : r + tile, c : c + tile] > 0).astype(np.uint8),
            )
            n += 1
    _dataset_json(
        ds,
        {
            "name": "Dataset003_NucleiDSB",
            "description": f"Fluorescence nuclei, Data Science Bowl 2018 image (via the stardist "
            f"wheel, BSD-3) cut into {n} tiles of {tile}x{tile}; label 1 = nucleus (MANUAL "
            "instance mask > 0). All tiles come from one image.",
            "channel_names": {"0": "fluorescence"},
            "labels": {"background": 0, "nucleus": 1},
            "numTraining": n,
            "file_ending": ".tif",
            "licence": "BSD-3-Clause",
        },
    )
    return ds


def make_nuclei_detection(data: Path, out: Path, tile: int = 128) -> Path:
    """The DSB tiles of :func:`make_nuclei` with instance masks (for the box detector)."""
    import tifffile

    ds = out / "Dataset004_NucleiDSBDetection"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    img = tifffile.imread(str(data / "microscopy/dsb2018_nuclei/image.tif"))
    mask = tifffile.imread(str(data / "microscopy/dsb2018_nuclei/mask.tif"))
    n = 0
    for r in range(0, img.shape[0] - tile + 1, tile):
        for c in range(0, img.shape[1] - tile + 1, tile):
            name = f"dsb_r{r:03d}_c{c:03d}"
            tifffile.imwrite(
                str(ds / f"imagesTr/{name}_0000.tif"),
                img[r : r + tile, c : c + tile].astype(np.uint16),
            )
            tifffile.imwrite(
                str(ds / f"labelsTr/{name}.tif"),
                mask[r : r + tile, c : c + tile].astype(np.uint16),
            )
            n += 1
    _dataset_json(
        ds,
        {
            "name": "Dataset004_NucleiDSBDetection",
            "description": f"Fluorescence nuclei for detection: the Data Science Bowl 2018 image "
            f"(via the stardist wheel, BSD-3) cut into {n} tiles of {tile}x{tile}; label = the "
            "MANUAL instance mask (each nucleus its own integer; nuclei cut by a tile border are "
            "cut there too). All tiles come from one image.",
            "channel_names": {"0": "fluorescence"},
            "labels": {"background": 0, "nucleus": 1},
            "numTraining": n,
            "file_ending": ".tif",
            "licence": "BSD-3-Clause",
        },
    )
    return ds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", help="where to write the datasets (e.g. /tmp/medseg_datasets)")
    ap.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    args = ap.parse_args(argv)
    data = _data_dir(args.data)
    if not data.is_dir():
        print(f"error: data folder {data} not found (set MEDSEG_DATA)", file=sys.stderr)
        return 1
    out = Path(args.outdir)
    repo = Path(__file__).resolve().parents[1]
    if out.resolve() == repo or repo in out.resolve().parents:
        print("error: write the datasets outside the repository", file=sys.stderr)
        return 1
    for make in (make_spleen, make_spinal_cord, make_nuclei, make_nuclei_detection):
        ds = make(data, out)
        print(ds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
