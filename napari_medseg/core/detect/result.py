"""Detection results: the table of objects, its column names, box IoU and filtering.

The table (:attr:`DetectionResult.table`, a :class:`pandas.DataFrame`), one row per object:

==================  ==========================================================================
column              meaning
==================  ==========================================================================
``id``              the object's value in :attr:`DetectionResult.instances` (0 = added by hand)
``class``           class name (majority of the segmentation's classes inside the object)
``score``           mean foreground probability inside the object, in [0, 1]
``y``, ``x``        2D: centre (centroid) in array indices, axis 0 = ``y``, axis 1 = ``x``
``z``, ``y``, ``x`` 3D: centre in array indices of the FILE's axis order as
                    ``napari-medseg info`` reports the shape: ``z`` = axis 0, ``y`` = axis 1,
                    ``x`` = axis 2 (for a NIfTI that is ``i, j, k``; the names are array
                    positions, not anatomy: anatomy is in the ``world_*`` columns)
``world_*``         2D: ``world_y``, ``world_x`` full-resolution pixels (the record's 3x3
                    affine applied to the centre); 3D: ``world_x``, ``world_y``, ``world_z``
                    scanner RAS millimetres (x = R, y = A, z = S; the record's 4x4 affine)
``<axis>_min/max``  bounding box in array indices, ``min`` inclusive, ``max`` exclusive
``area``            2D: pixels (square pixels of the file; x mpp^2 for um^2 where known)
``volume_mm3``      3D: mm^3 (voxel count x voxel volume from the affine)
==================  ==========================================================================

Filtering (:func:`filter_detections`: score threshold, minimum size, NMS-like de-duplication by
box IoU) works on the table alone, after the model, so a widget can re-filter live without
running the network again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "DEFAULT_COLOR",
    "DetectionResult",
    "axis_names",
    "box_iou",
    "boxes_of",
    "filter_detections",
    "voxel_volume",
    "world_names",
]

#: Default colour of a class without one in the model card (QuPath-like red).
DEFAULT_COLOR = "#e6194b"


def axis_names(ndim: int) -> list[str]:
    """Centre column names in array order: ``["y", "x"]`` (2D) or ``["z", "y", "x"]`` (3D)."""
    if ndim not in (2, 3):
        raise MedsegError(f"detection works on 2D images and 3D volumes, not {ndim}D data")
    return ["y", "x"] if ndim == 2 else ["z", "y", "x"]


def world_names(ndim: int) -> list[str]:
    """World columns: ``world_y, world_x`` (2D pixels) or ``world_x, world_y, world_z`` (RAS)."""
    return ["world_y", "world_x"] if ndim == 2 else ["world_x", "world_y", "world_z"]


@dataclass
class DetectionResult:
    """Detected objects of one image, before any score/size filtering.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per object (columns in the module docstring), sorted by ``id``.
    instances : numpy.ndarray or None
        int32 instance map on the source grid (file axis order); object ``id`` has value ``id``.
        None for box detectors (:mod:`napari_medseg.core.detect.boxes`), which have no masks: the
        table's boxes are the result (GeoJSON export then writes Points).
    affine : numpy.ndarray
        The source record's affine (voxel -> RAS mm 4x4, or pixel 3x3).
    space : str
        ``"RAS"`` or ``"pixel"``.
    class_colors : dict
        ``{class name: "#rrggbb"}``.
    provenance : dict
        Model, parameters, timings.
    """

    table: pd.DataFrame
    instances: np.ndarray | None
    affine: np.ndarray
    space: str
    class_colors: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        if self.instances is not None:
            return self.instances.ndim
        return int(np.asarray(self.affine).shape[0]) - 1

    def filtered(self, **kw: Any) -> pd.DataFrame:
        """:func:`filter_detections` on this result's table."""
        return filter_detections(self.table, **kw)


def voxel_volume(affine: np.ndarray) -> float:
    """Volume of one voxel (mm^3 for a RAS affine; pixel area for a 2D one): ``|det|`` of the
    affine's linear part."""
    lin = np.asarray(affine, dtype=float)[:-1, :-1]
    return float(abs(np.linalg.det(lin)))


# --------------------------------------------------------------------------- filtering


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of axis-aligned boxes ``(N, 2D)`` x ``(M, 2D)``: rows are ``mins..., maxs...``."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    nd = a.shape[1] // 2
    lo = np.maximum(a[:, None, :nd], b[None, :, :nd])
    hi = np.minimum(a[:, None, nd:], b[None, :, nd:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    va = np.prod(a[:, nd:] - a[:, :nd], axis=1)
    vb = np.prod(b[:, nd:] - b[:, :nd], axis=1)
    union = va[:, None] + vb[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def boxes_of(table: pd.DataFrame) -> np.ndarray:
    """``(N, 2*ndim)`` boxes (mins then maxs, array indices) of a detection table."""
    names = [a for a in ("z", "y", "x") if f"{a}_min" in table.columns]
    return table[[f"{a}_min" for a in names] + [f"{a}_max" for a in names]].to_numpy(float)


def filter_detections(
    table: pd.DataFrame,
    score_threshold: float = 0.0,
    min_size: float = 0.0,
    nms_iou: float | None = None,
) -> pd.DataFrame:
    """Keep objects by score and size and drop duplicates; works on the table only (fast).

    Parameters
    ----------
    table : pandas.DataFrame
        A detection table (module docstring).
    score_threshold : float
        Keep ``score >= score_threshold``.
    min_size : float
        Keep ``area >= min_size`` (2D, pixels) or ``volume_mm3 >= min_size`` (3D).
    nms_iou : float, optional
        Greedy non-maximum suppression: in decreasing score order, drop an object whose box
        overlaps a kept one with IoU above this value. Watershed instances never overlap, so
        this only matters for boxes merged from several sources (``None``: off).

    Returns
    -------
    pandas.DataFrame
        The kept rows, original order, index reset.
    """
    keep = table["score"].to_numpy(float) >= float(score_threshold)
    size_col = "area" if "area" in table.columns else "volume_mm3"
    if min_size and size_col in table.columns:
        keep &= table[size_col].to_numpy(float) >= float(min_size)
    out = table[keep]
    if nms_iou is not None and len(out) > 1 and nms_iou < 1.0:
        boxes = boxes_of(out)
        order = np.argsort(-out["score"].to_numpy(float), kind="stable")
        alive = np.ones(len(out), dtype=bool)
        for i in order:
            if not alive[i]:
                continue
            iou = box_iou(boxes[i : i + 1], boxes)[0]
            drop = (iou > nms_iou) & alive
            drop[i] = False
            alive &= ~drop
        out = out[alive]
    return out.reset_index(drop=True)
