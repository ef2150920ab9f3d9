"""Where the tissue is on a slide: an Otsu threshold on the saturation of a low-resolution level.

:func:`tissue_mask`: Otsu threshold on the HSV saturation of a low-resolution pyramid level (the
smallest level whose longer side is at least :data:`MASK_MIN_SIDE` pixels), floored at
:data:`MIN_SATURATION` so a blank slide finds nothing (and used alone when Otsu's lower class is
itself saturated, i.e. not glass: a slide all tissue), then small objects and holes removed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from napari_medseg.errors import MedsegError

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord

__all__ = ["MASK_MIN_SIDE", "MIN_FRAGMENT", "MIN_SATURATION", "slide_levels", "tissue_mask"]

#: The tissue mask is computed on the smallest level with at least this many pixels per side.
MASK_MIN_SIDE = 1024
#: Saturation below this is never tissue (white glass, black corrupt tiles).
MIN_SATURATION = 0.05
#: Tissue fragments smaller than this many level-0 pixels per side may be dropped as specks.
MIN_FRAGMENT = 256


def slide_levels(record: ImageRecord) -> list:
    """A slide record's pyramid levels, full resolution first (``[data]`` without a pyramid)."""
    return list(record.multiscale) if record.multiscale else [record.data]


def tissue_mask(record: ImageRecord, level: int | None = None) -> tuple[np.ndarray, float]:
    """Where the tissue is, on a low-resolution level.

    Parameters
    ----------
    record : ImageRecord
        An RGB slide from :func:`napari_medseg.io.raster.read_slide` (levels ``(row, col, 3)``).
    level : int, optional
        Pyramid level to use; default the smallest level with a side >= :data:`MASK_MIN_SIDE`
        (the lowest level if none is that large).

    Returns
    -------
    mask : numpy.ndarray
        bool ``(rows, cols)`` of that level.
    downsample : float
        Level-0 pixels per mask pixel (rows).
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    levels = slide_levels(record)
    if level is None:
        level = 0
        for i, lv in enumerate(levels):
            if max(lv.shape[:2]) >= MASK_MIN_SIDE:
                level = i
    lv = levels[level]
    arr = np.asarray(lv.compute() if hasattr(lv, "compute") else lv)
    if arr.ndim == 2 or arr.shape[-1] < 3:
        raise MedsegError(
            f"tissue detection needs an RGB slide; {record.name!r} has shape {arr.shape}"
        )
    rgb = arr[..., :3].astype(np.float32)
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)
    thr = MIN_SATURATION
    if float(sat.max()) > MIN_SATURATION:
        try:
            thr = max(MIN_SATURATION, float(threshold_otsu(sat)))
        except ValueError:
            thr = MIN_SATURATION
        # Otsu always splits in two; when its lower class is not glass (a slide or region all
        # tissue), it would split the tissue into specks: keep the floor instead
        low = sat[sat <= thr]
        if low.size and float(low.mean()) > 2 * MIN_SATURATION:
            thr = MIN_SATURATION
    mask = sat > thr
    down = float(levels[0].shape[0]) / float(arr.shape[0])
    # specks below 1e-4 of the level, and never more than a 256 x 256 level-0 fragment
    min_size = max(4, int(min(mask.size * 1e-4, (MIN_FRAGMENT / down) ** 2)))
    mask = remove_small_objects(mask, max_size=min_size)
    mask = remove_small_holes(mask, max_size=min_size * 4)
    return mask, down
