"""The small image record every compute module works on.

An :class:`ImageRecord` is an array plus its geometry. The array keeps the *file's own* axis
order (for NIfTI that is ``(i, j, k[, t])``, exactly what nibabel returns), and ``affine`` maps
those voxel indices to world coordinates:

* ``space == "RAS"``: volumes (and single DICOM slices, stored as one-slice volumes). ``affine``
  is 4x4 and maps ``(i, j, k, 1)`` to scanner RAS millimetres, the matrix nibabel reports for a
  NIfTI file.
* ``space == "pixel"``: plain 2D images and slides. ``affine`` is 3x3 and maps
  ``(row, col, 1)`` to ``(y, x)`` in full-resolution pixels (QuPath's convention); the physical
  pixel size, when the file states it, is in ``metadata["mpp"]`` (micrometres per pixel).

Axes that are not spatial (time, channels, RGB) follow the spatial axes.

:func:`layer_to_record` builds a record back from a napari layer's data and state (the affine
maths lives in :mod:`napari_medseg.io.geometry`, which does not know this class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_medseg.io.geometry import layer_to_record_parts, orientation_codes, spacing_from_affine


@dataclass
class ImageRecord:
    """An image array with its geometry, modality and source metadata.

    Attributes
    ----------
    data : array-like
        Voxel data in the file's own axis order; spatial axes first, then time/channel/RGB.
        May be a numpy array or a lazy (dask) array.
    affine : numpy.ndarray
        ``(n+1, n+1)`` matrix mapping the ``n`` spatial voxel indices to world coordinates
        (RAS mm for ``space="RAS"``, pixels for ``space="pixel"``).
    space : str
        ``"RAS"`` or ``"pixel"``.
    modality : str
        ``"CT"``, ``"MR"``, ``"PT"``, ``"US"``, ``"microscopy"``, ``"pathology"``, ``"label"``
        or ``"unknown"``. DICOM files give it; for other files it is a documented guess
        (:func:`napari_medseg.io.modality.guess_modality`).
    name : str
        Short display name (file name without extension).
    path : str or None
        Where the image came from.
    rgb : bool
        True when the last axis holds RGB(A) colour.
    multiscale : list or None
        For pyramidal slides: the levels, full resolution first (``data`` is level 0).
    metadata : dict
        Source header fields worth keeping (format, NIfTI header, DICOM tags, ...). JSON-able.
    """

    data: Any
    affine: np.ndarray
    space: str = "RAS"
    modality: str = "unknown"
    name: str = "image"
    path: str | None = None
    rgb: bool = False
    multiscale: list | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        n = self.affine.shape[0] - 1
        if self.affine.shape != (n + 1, n + 1):
            raise ValueError(f"affine must be square, got shape {self.affine.shape}")
        if self.space not in ("RAS", "pixel"):
            raise ValueError(f"space must be 'RAS' or 'pixel', got {self.space!r}")

    @property
    def spatial_ndim(self) -> int:
        """Number of spatial axes (3 for volumes, 2 for plain images)."""
        return self.affine.shape[0] - 1

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``data`` in the file's own axis order."""
        return tuple(int(s) for s in self.data.shape)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes only."""
        return self.shape[: self.spatial_ndim]

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size along each spatial file axis (mm for RAS, pixels for ``pixel``)."""
        return spacing_from_affine(self.affine)

    @property
    def orientation(self) -> str:
        """Orientation codes of the file axes, e.g. ``"RAS"`` or ``"LPS"`` ('' for 2D images)."""
        if self.space != "RAS":
            return ""
        return orientation_codes(self.affine)

    def describe(self) -> dict:
        """The input as a result's provenance records it: name, path, shape, spacing (mm,
        file axis order), orientation code and modality."""
        return {
            "name": self.name,
            "path": self.path,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "orientation": self.orientation,
            "modality": self.modality,
        }


def layer_to_record(data: Any, attrs: dict, name: str | None = None) -> ImageRecord:
    """Build an :class:`ImageRecord` (file axis order, source affine) from a layer's data/state.

    Parameters
    ----------
    data : array-like
        Layer data (layer axis order).
    attrs : dict
        Layer state: ``affine``, ``scale``, ``translate``, ``rotate``, ``shear``, ``metadata``,
        ``rgb``, ``name``.
    name : str, optional
        Display name of the record (default: ``attrs["name"]``).

    Returns
    -------
    ImageRecord
        Data in the source file's axis order with its voxel-to-world affine; the source
        header fields the layer carried in ``metadata`` come back as ``metadata``.
    """
    arr, affine, space, meta = layer_to_record_parts(data, attrs)
    src = meta.get("source", {}) if meta else {}
    return ImageRecord(
        data=arr,
        affine=affine,
        space=space,
        modality=(meta or {}).get("modality", "unknown"),
        name=name or attrs.get("name", "image"),
        path=(meta or {}).get("path"),
        rgb=bool(attrs.get("rgb", False)) and space == "pixel",
        metadata=src,
    )
