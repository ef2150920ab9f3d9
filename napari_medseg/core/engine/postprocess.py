"""Label-map clean-up: argmax, largest component, hole filling, small-object removal.

All functions take a label map (2D or 3D integer array, any axis order) and work per class
with :mod:`scipy.ndimage`, each class inside its own bounding box. Removed voxels become
background (0); holes are filled only where the label map is background, so a class inside
another (a lesion in an organ) is never overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "apply_postprocessing",
    "argmax",
    "channel_argmax",
    "fill_holes",
    "keep_largest_component",
    "label_dtype",
    "remove_small",
]


def label_dtype(n_classes: int) -> np.dtype:
    """Smallest unsigned dtype that holds class ids ``0 .. n_classes - 1``."""
    return np.dtype(np.uint8) if n_classes <= 256 else np.dtype(np.uint16)


def channel_argmax(probabilities: Any, dtype: Any = None) -> Any:
    """Argmax over the first axis by a running maximum, one channel at a time.

    ``torch.argmax(dim=0)`` on the CPU reduces over a strided axis and is very slow on big
    volumes (6.6 s for ``(2, 273, 273, 375)`` on 2 cores); ``K`` element-wise passes take a
    fraction of that. Ties go to the lower channel, like ``argmax``.

    Parameters
    ----------
    probabilities : numpy.ndarray or torch.Tensor
        ``(K, *spatial)``.
    dtype : dtype, optional
        Result dtype (default: :func:`label_dtype` of ``K``).

    Returns
    -------
    Same kind as the input (numpy array or tensor on the same device), shape ``spatial``.
    """
    k = int(probabilities.shape[0])
    dt = np.dtype(dtype) if dtype is not None else label_dtype(k)
    if isinstance(probabilities, np.ndarray):
        best = probabilities[0].copy()
        arg = np.zeros(best.shape, dt)
        for c in range(1, k):
            better = probabilities[c] > best
            np.copyto(best, probabilities[c], where=better)
            arg[better] = c
        return arg
    import torch

    tdt = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.int32}.get(dt, torch.int64)
    p = probabilities
    best = p[0].clone()
    arg = torch.zeros(best.shape, dtype=tdt, device=p.device)
    for c in range(1, k):
        better = p[c] > best
        best = torch.where(better, p[c], best)
        arg.masked_fill_(better, c)
    return arg


def argmax(probabilities: Any, axis: int = 0) -> np.ndarray:
    """Class index of the largest channel.

    Parameters
    ----------
    probabilities : numpy.ndarray or torch.Tensor
        ``(K, *spatial)`` probabilities or logits (channels on ``axis``).

    Returns
    -------
    numpy.ndarray
        ``spatial`` shape, uint8 (uint16 above 256 classes).
    """
    k = int(probabilities.shape[axis])
    dt = label_dtype(k)
    if not isinstance(probabilities, np.ndarray) and hasattr(probabilities, "movedim"):
        out = channel_argmax(probabilities.movedim(axis, 0), dt)
        return out.cpu().numpy().astype(dt, copy=False)
    p = np.moveaxis(np.asarray(probabilities), axis, 0)
    return channel_argmax(p, dt)


def _classes(labels: np.ndarray, classes: Iterable[int] | bool | None) -> list[int]:
    if classes is None or classes is True:
        return [int(c) for c in np.unique(labels) if c != 0]
    if classes is False:
        return []
    return [int(c) for c in classes if int(c) != 0]


def keep_largest_component(
    labels: np.ndarray,
    classes: Iterable[int] | bool | None = None,
    connectivity: int = 1,
) -> np.ndarray:
    """Keep only the largest connected component of each class (others become 0).

    One implementation with the correction tool
    (:func:`napari_medseg.core.correct.edits.keep_largest_component`), applied class by class.

    Parameters
    ----------
    labels : numpy.ndarray
        2D or 3D integer label map.
    classes : iterable of int, optional
        Classes to clean (default: every non-zero class present).
    connectivity : int
        1 = faces, ``ndim`` = faces, edges and corners.

    Returns
    -------
    numpy.ndarray
        A new label map (same shape and dtype).
    """
    from napari_medseg.core.correct import edits

    out = np.array(labels, copy=True)
    for c in _classes(out, classes):
        edits.keep_largest_component(out, c, connectivity).apply(out, inplace=True)
    return out


def fill_holes(labels: np.ndarray, classes: Iterable[int] | bool | None = None) -> np.ndarray:
    """Fill enclosed background holes of each class (in 2D or 3D; other classes are kept).

    One implementation with the correction tool
    (:func:`napari_medseg.core.correct.edits.fill_holes`, ``mode="3d"``), class by class.

    Returns
    -------
    numpy.ndarray
        A new label map (same shape and dtype).
    """
    from napari_medseg.core.correct import edits

    out = np.array(labels, copy=True)
    for c in _classes(out, classes):
        edits.fill_holes(out, c, mode="3d").apply(out, inplace=True)
    return out


def remove_small(
    labels: np.ndarray,
    min_size_voxels: int | None = None,
    min_size_mm3: float | None = None,
    spacing: Sequence[float] | None = None,
    classes: Iterable[int] | bool | None = None,
    connectivity: int = 1,
) -> np.ndarray:
    """Remove connected components smaller than a size, per class.

    One implementation with the correction tool
    (:func:`napari_medseg.core.correct.edits.remove_islands`), class by class.

    Parameters
    ----------
    labels : numpy.ndarray
        2D or 3D integer label map.
    min_size_voxels : int, optional
        Components with fewer voxels are removed.
    min_size_mm3 : float, optional
        Same in physical volume (mm^3, or mm^2 / pixel area in 2D); needs ``spacing``
        (voxel size along each axis of ``labels``).
    spacing : sequence of float, optional
    classes : iterable of int, optional
        Default: every non-zero class present.

    Returns
    -------
    numpy.ndarray
        A new label map (same shape and dtype).
    """
    from napari_medseg.core.correct import edits

    if min_size_mm3 is not None:
        if spacing is None:
            raise ValueError("remove_small: min_size_mm3 needs the voxel spacing")
        vox = float(np.prod(np.asarray(spacing, dtype=float)[: labels.ndim]))
        min_vox = int(np.ceil(float(min_size_mm3) / vox))
    elif min_size_voxels is not None:
        min_vox = int(min_size_voxels)
    else:
        raise ValueError("remove_small: give min_size_voxels or min_size_mm3")
    out = np.array(labels, copy=True)
    if min_vox <= 1:
        return out
    for c in _classes(out, classes):
        edit = edits.remove_islands(out, c, min_voxels=min_vox, connectivity=connectivity)
        edit.apply(out, inplace=True)
    return out


def apply_postprocessing(
    labels: np.ndarray, config: dict | None, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Apply the steps a model card (or a user) asks for, in a fixed order.

    ``config`` keys (all optional)::

        {"remove_small": {"min_size_voxels": 10} | {"min_size_mm3": 50, "classes": [1]},
         "keep_largest_component": true | [1, 3],
         "fill_holes": true | [1]}

    Order: remove small, keep largest, fill holes. ``None``/``{}`` returns ``labels``.
    """
    if not config:
        return labels
    out = labels
    rs = config.get("remove_small")
    if rs:
        rs = dict(rs) if isinstance(rs, dict) else {"min_size_voxels": int(rs)}
        out = remove_small(
            out,
            min_size_voxels=rs.get("min_size_voxels"),
            min_size_mm3=rs.get("min_size_mm3"),
            spacing=spacing,
            classes=rs.get("classes"),
        )
    kl = config.get("keep_largest_component")
    if kl:
        out = keep_largest_component(out, None if kl is True else kl)
    fh = config.get("fill_holes")
    if fh:
        out = fill_holes(out, None if fh is True else fh)
    unknown = set(config) - {"remove_small", "keep_largest_component", "fill_holes"}
    if unknown:
        import warnings

        warnings.warn(
            f"napari-medseg: unknown postprocessing steps ignored: {sorted(unknown)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return out
