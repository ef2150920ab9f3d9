"""Real nnU-Net v2 model folders for the tests, made by nnunetv2's own code, and its predictor.

:func:`model_folders` runs ``scripts/make_nnunet_model.py`` once per machine (cached in the temp
folder under a key of the script's text, its arguments and the nnunetv2 version) and returns
``{configuration: folder}``. :func:`reference_labels` runs ``nnUNetPredictor`` in this process
on the same folder and files. Both skip the test when nnunetv2 (a test-only dependency,
``scripts/install.sh``) or the data are missing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA, REPO

SCRIPT = REPO / "scripts" / "make_nnunet_model.py"
#: kind -> arguments of scripts/make_nnunet_model.py (small patches: CPU-sized)
BUILDS = {
    "ct": ["--kind", "ct", "--configs", "3d_fullres", "2d", "--folds", "0", "1",
           "--gpu-memory-target", "0.1"],
    "mr": ["--kind", "mr", "--configs", "3d_fullres", "--folds", "0",
           "--gpu-memory-target", "0.1", "--target-spacing", "2", "2", "2"],
}  # fmt: skip


def need_nnunetv2() -> None:
    """Skip unless the reference implementation is installed."""
    if importlib.util.find_spec("nnunetv2") is None:
        pytest.skip("nnunetv2 (the reference, installed by scripts/install.sh) is not installed")
    if not DATA.exists():
        pytest.skip(f"real test data folder {DATA} not found (set MEDSEG_DATA)")


def model_folders(kind: str) -> dict[str, Path]:
    """``{configuration: nnU-Net model folder}`` built by nnunetv2 (cached)."""
    need_nnunetv2()
    args = BUILDS[kind]
    key = hashlib.sha256(
        SCRIPT.read_bytes()
        + " ".join(args).encode()
        + importlib.metadata.version("nnunetv2").encode()
        + str(DATA).encode()
    ).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"napari-medseg-nnunet-{kind}-{key}"
    done = root / "folders.json"
    if not done.is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".nnunet-{kind}-", dir=tempfile.gettempdir()))
        env = dict(os.environ, MEDSEG_DATA=str(DATA), PYTHONHASHSEED="0")
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *args, "-o", str(tmp)],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"building the nnU-Net {kind} model failed:\n{proc.stderr[-3000:]}")
        made = json.loads(proc.stdout.strip().splitlines()[-1])
        rel = {c: str(Path(f).relative_to(tmp)) for c, f in made.items() if c != "seconds"}
        (tmp / "folders.json").write_text(json.dumps(rel))
        try:
            tmp.rename(root)
        except OSError:  # another session built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    rel = json.loads(done.read_text())
    return {c: root / r for c, r in rel.items()}


def reference_labels(
    folder: Path, images: Sequence[Path], folds: Sequence[int], mirror: bool
) -> np.ndarray:
    """``nnUNetPredictor`` (step 0.5, Gaussian, CPU) on one case; labels in file axis order."""
    need_nnunetv2()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(var, tempfile.gettempdir())
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirror,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    pred.initialize_from_trained_model_folder(
        str(folder), use_folds=tuple(folds), checkpoint_name="checkpoint_final.pth"
    )
    data, props = SimpleITKIO().read_images([str(p) for p in images])
    seg = pred.predict_single_npy_array(data, props, None, None, False)
    return np.asarray(seg).transpose(2, 1, 0)  # SimpleITK (z, y, x) -> file (i, j, k)


def agreement(reference: np.ndarray, ours: np.ndarray, min_voxels: int = 1000) -> dict:
    """Dice per class the reference predicts with at least ``min_voxels`` voxels."""
    out = {}
    for c in np.unique(reference):
        ref = reference == c
        if ref.sum() < min_voxels:
            continue
        mine = ours == c
        out[int(c)] = 2.0 * float((ref & mine).sum()) / float(ref.sum() + mine.sum())
    return out


def mr_channels(folder: Path) -> list[Path]:
    """The MR case as nnU-Net files in ``folder``: CASE_0000 the abdominal MR, CASE_0001 its
    smoothed copy (as the "mr" model's training data were made)."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    from tests.conftest import data_path

    img = nib.load(str(data_path("ct/totalseg_small/mr.nii.gz")))
    arr = np.asarray(img.dataobj).astype(np.float32)
    hdr = img.header.copy()
    hdr.set_data_dtype(np.float32)
    paths = [folder / "case_0000.nii.gz", folder / "case_0001.nii.gz"]
    nib.save(nib.Nifti1Image(arr, img.affine, hdr), str(paths[0]))
    nib.save(nib.Nifti1Image(gaussian_filter(arr, 1.0), img.affine, hdr), str(paths[1]))
    return paths
