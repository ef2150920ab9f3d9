"""Modality: from the file when it says so (DICOM ``Modality``), else a documented guess.

The guess, in order:

1. A name containing ``seg``, ``label``, ``mask`` or ``aseg`` with integer voxels -> ``"label"``.
2. RGB(A) 2D images -> ``"pathology"``; single-channel 2D images -> ``"microscopy"``.
3. Volumes whose voxels reach below -500 and above +300 (Hounsfield units: air and bone)
   -> ``"CT"``.
4. Any other volume -> ``"MR"``.

Preprocessing profiles (CT window, MR z-score, RGB normalisation) read the modality, and a user
can override it in the layer metadata or on the command line.
"""

from __future__ import annotations

import re

import numpy as np

_LABEL_NAME = re.compile(r"(seg|label|mask|aseg|annot)", re.IGNORECASE)


def looks_like_labels(name: str, data: np.ndarray) -> bool:
    """True when a file name and integer dtype say the image is a label map."""
    return bool(_LABEL_NAME.search(name or "")) and np.issubdtype(
        np.asarray(data).dtype, np.integer
    )


def guess_modality(name: str, data: np.ndarray, space: str, rgb: bool = False) -> str:
    """Guess the modality of an image that does not state it (see module docstring)."""
    arr = np.asarray(data)
    if looks_like_labels(name, arr) or (
        _LABEL_NAME.search(name or "") and arr.size and _is_integral(arr)
    ):
        return "label"
    if space == "pixel":
        return "pathology" if rgb else "microscopy"
    if arr.size == 0:
        return "unknown"
    sample = arr.ravel()[:: max(1, arr.size // 200_000)]
    finite = sample[np.isfinite(sample)] if np.issubdtype(sample.dtype, np.floating) else sample
    if finite.size and float(finite.min()) < -500 and float(finite.max()) > 300:
        return "CT"
    return "MR"


def _is_integral(arr: np.ndarray) -> bool:
    if np.issubdtype(arr.dtype, np.integer):
        return True
    sample = arr.ravel()[:: max(1, arr.size // 100_000)]
    return bool(np.all(np.isfinite(sample)) and np.all(sample == np.round(sample)))
