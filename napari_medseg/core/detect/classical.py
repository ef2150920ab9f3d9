"""The classical baseline detector: Gaussian smoothing, an Otsu threshold (on brightness, or on
the haematoxylin optical density of an H&E image) and the distance watershed of
:mod:`napari_medseg.core.detect.instances`; no network.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np

from napari_medseg.core.detect.instances import (
    check_record,
    instances_from_mask,
    measure_instances,
    stage,
)
from napari_medseg.core.detect.result import DEFAULT_COLOR, DetectionResult
from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord

__all__ = ["detect_classical"]


def _stain_density(record: ImageRecord, stain: str) -> tuple[np.ndarray, np.ndarray]:
    """Optical density of ``stain`` in an RGB bright-field image, and its tissue mask."""
    if stain != "hematoxylin":
        raise MedsegError(f"unknown stain {stain!r}; the classical detector knows 'hematoxylin'")
    data = np.asarray(record.data)
    if not (record.rgb and data.ndim == 3 and data.shape[-1] in (3, 4)):
        raise MedsegError(
            f"the hematoxylin channel needs a 2D RGB bright-field image; {record.name!r} has "
            f"shape {record.shape}"
        )
    from skimage.color import rgb2hed

    rgb = data[..., :3]
    if rgb.dtype != np.uint8:
        hi = 255.0 if float(np.max(rgb)) > 1.0 else 1.0
        rgb = np.clip(rgb.astype(np.float32) * (255.0 / hi), 0, 255).astype(np.uint8)
    dens = rgb2hed(rgb)[..., 0].astype(np.float32)
    mx = rgb.max(axis=-1).astype(np.float32)
    sat = (mx - rgb.min(axis=-1)) / np.maximum(mx, 1.0)
    tissue = ~((rgb.min(axis=-1) > 215) | (sat < 0.07))
    return dens, tissue


def _intensity(record: ImageRecord) -> np.ndarray:
    """One grey channel of the record (RGB averaged), float32, file axis order."""
    data = np.asarray(record.data, dtype=np.float32)
    nsp = record.spatial_ndim
    if data.ndim > nsp:
        if data.ndim > nsp + 1 or (data.shape[-1] > 4 and not record.rgb):
            raise MedsegError(
                f"the classical detector needs one grey channel; {record.name!r} has shape "
                f"{record.shape}"
            )
        data = data[..., :3].mean(axis=-1)
    return data


def detect_classical(
    record: ImageRecord,
    *,
    sigma: float = 1.0,
    min_distance: float | None = None,
    min_pixels: int = 10,
    dark_objects: bool = False,
    stain: str | None = None,
) -> Generator[Progress, None, DetectionResult]:
    """Baseline detector: Gaussian smoothing, Otsu threshold, distance watershed.

    Parameters
    ----------
    record : ImageRecord
        2D image or 3D volume (grey; RGB is averaged).
    sigma : float
        Gaussian smoothing (voxels) before the threshold.
    min_distance : float, optional
        Watershed seed distance (pixels in 2D, mm in 3D; default as :func:`detect`).
    min_pixels : int
        Connected pieces smaller than this are dropped before the watershed.
    dark_objects : bool
        Objects darker than the background (grey bright-field images).
    stain : {None, "hematoxylin"}
        ``"hematoxylin"`` (RGB bright-field H&E/IHC): nuclei from the haematoxylin optical
        density of a colour deconvolution (:func:`skimage.color.rgb2hed`, Ruifrok & Johnston),
        thresholded (Otsu) over the tissue only, glass excluded (pixels with every channel
        above 215 or saturation below 0.07). On a tile that mixes glass and tissue, a plain
        Otsu on brightness separates tissue from glass instead of nuclei from tissue.

    Returns
    -------
    DetectionResult
        ``score`` = mean over the object of ``0.5 + 0.5 * clip((smoothed - otsu) /
        (p99.5 - otsu), 0, 1)``: 0.5 at the Otsu threshold, 1 at the image's 99.5th
        percentile, so the default threshold 0.5 keeps every Otsu object, as it keeps every
        object of a model's argmax.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    t0 = time.perf_counter()
    check_record(record)
    yield Progress(0, 0, "smoothing and Otsu threshold")
    region = None  # where the threshold is computed (None: everywhere)
    if stain is not None:
        img, region = _stain_density(record, stain)
    else:
        img = _intensity(record)
    if not np.isfinite(img).all():
        img = np.nan_to_num(img, nan=float(np.nanmin(img)) if np.isfinite(img).any() else 0.0)
    if dark_objects and stain is None:
        img = -img
    sm = ndi.gaussian_filter(img, sigma) if sigma > 0 else img
    vals = sm if region is None else sm[region]
    if vals.size < 2 or float(vals.max()) == float(vals.min()):
        mask = np.zeros(sm.shape, dtype=bool)
        t = float(sm.max())
    else:
        t = float(threshold_otsu(vals))
        mask = sm > t
        if region is not None:
            mask &= region
        mask = ndi.binary_fill_holes(mask) if mask.ndim == 2 else mask
        mask = remove_small_objects(mask, max_size=max(0, int(min_pixels) - 1))
    spacing = record.spacing
    md = float(min_distance) if min_distance is not None else 4.0 * min(spacing)
    inst = yield from stage(
        instances_from_mask(mask, spacing=spacing, min_distance=md), "splitting objects"
    )
    hi = float(np.percentile(vals, 99.5)) if vals.size else t
    # 0.5 at the Otsu threshold (the classical "decision line", like p = 0.5 for a model),
    # 1.0 at the image's 99.5th percentile
    contrast = 0.5 + 0.5 * np.clip((sm - t) / max(hi - t, 1e-6), 0.0, 1.0)
    table = yield from stage(
        measure_instances(inst, record.affine, record.space, contrast, None, {1: "object"}),
        "measuring",
    )
    prov = {
        "task": "detection",
        "method": "classical: Gaussian + Otsu + distance watershed",
        "model": {"name": "classical"},
        "parameters": {"sigma": sigma, "min_distance": md, "otsu_threshold": t},
        "n_objects": len(table),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    return DetectionResult(
        table, inst, np.asarray(record.affine), record.space, {"object": DEFAULT_COLOR}, prov
    )
