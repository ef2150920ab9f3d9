"""Geometry in one place: file affines, ITK/DICOM (LPS) geometry and napari layer transforms.

Conventions
-----------
* An :class:`~napari_medseg.io.record.ImageRecord` keeps the file's own axis order and an affine
  from those voxel indices to RAS millimetres (nibabel's convention).
* ITK, SimpleITK, NRRD, MetaImage and DICOM describe geometry in LPS: ``origin``, ``spacing`` and
  a ``direction`` matrix. ``RAS = diag(-1, -1, 1) @ LPS``.
* napari world coordinates for volumes are RAS millimetres with the world axes ordered
  ``(S, A, R)``: axis 0 is the slider (axial slices by default), rows run along A and columns
  along R. Layer data is the file array *transposed* (a view, no copy, no flip) so that each
  layer axis lies closest to its world axis; flips and obliquity live in the layer's ``affine``.
  Because every layer uses the same world frame, scans stored in RAS, LPS, LAS or PSR overlay.
  :data:`RADIOLOGICAL_ORIENTATION2D` is the camera setting that shows axial slices in the
  radiological convention (anterior up, patient's right on the screen's left).
* Non-spatial axes (time, channels) go first in a layer, RGB stays last.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: World axis names of volume layers, in napari's axis order.
WORLD_AXES = ("S", "A", "R")
#: napari ``camera.orientation2d`` for the radiological convention with :data:`WORLD_AXES`.
RADIOLOGICAL_ORIENTATION2D = ("up", "left")

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
META_KEY = "medseg"


def orientation_codes(affine: np.ndarray) -> str:
    """Return the axis codes (e.g. ``"RAS"``, ``"LPS"``, ``"PSR"``) of a voxel-to-RAS affine.

    Parameters
    ----------
    affine : (4, 4) array
        Voxel indices ``(i, j, k)`` to RAS mm.

    Returns
    -------
    str
        One letter per voxel axis: the direction each axis *increases* towards.
    """
    import nibabel as nib

    return "".join(c or "?" for c in nib.aff2axcodes(np.asarray(affine, dtype=float)))


def spacing_from_affine(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size per voxel axis (column norms of the linear part), in the affine's units."""
    lin = np.asarray(affine, dtype=float)[:-1, :-1]
    return tuple(float(v) for v in np.sqrt((lin**2).sum(axis=0)))


# --------------------------------------------------------------------------- ITK / LPS geometry


def affine_from_itk(origin: Any, spacing: Any, direction: Any, axes: str = "ijk") -> np.ndarray:
    """Build a voxel-to-RAS affine from ITK-style LPS geometry.

    Parameters
    ----------
    origin : sequence of 3 floats
        LPS position (mm) of the centre of voxel ``(0, 0, 0)``.
    spacing : sequence of 3 floats
        Voxel size (mm) along ``i, j, k``.
    direction : (3, 3) or flat 9 floats
        Direction cosines, column ``n`` is the LPS direction of voxel axis ``n``
        (ITK's row-major ``GetDirection()`` reshaped to 3x3).
    axes : str
        Only ``"ijk"`` is supported; kept explicit for readers.

    Returns
    -------
    numpy.ndarray
        (4, 4) voxel ``(i, j, k)`` to RAS mm.
    """
    assert axes == "ijk"
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(spacing, dtype=float)[None, :]
    lps[:3, 3] = np.asarray(origin, dtype=float)
    return _LPS @ lps


def itk_from_affine(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Split a voxel-to-RAS affine into ITK ``(origin, spacing, direction)`` in LPS.

    Returns
    -------
    origin : tuple of 3 floats
    spacing : tuple of 3 floats
    direction : tuple of 9 floats, row-major, as ``SimpleITK.Image.SetDirection`` wants.
    """
    lps = _LPS @ np.asarray(affine, dtype=float)
    lin = lps[:3, :3]
    spacing = np.asarray(spacing_from_affine(lps))
    direction = lin / spacing[None, :]
    return (
        tuple(float(v) for v in lps[:3, 3]),
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.ravel()),
    )


# --------------------------------------------------------------------------- napari layers


def layer_axes(affine: np.ndarray) -> list[int]:
    """File axis to show on each napari world axis ``(S, A, R)``.

    Parameters
    ----------
    affine : (4, 4) array
        Voxel to RAS mm.

    Returns
    -------
    list of int
        ``perm`` such that ``layer_data = file_data.transpose(perm + extra_axes)``.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=float))
    ras_axis_of_file = [int(a) for a in ornt[:, 0]]
    perm = []
    for w in range(3):  # world S, A, R <-> RAS axis 2, 1, 0
        perm.append(ras_axis_of_file.index(2 - w))
    return perm


def layer_affine_from_file(affine: np.ndarray, perm: list[int]) -> np.ndarray:
    """napari affine (layer indices -> world ``(S, A, R)`` mm) for a transposed file array."""
    affine = np.asarray(affine, dtype=float)
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3][::-1][:, perm]
    out[:3, 3] = affine[:3, 3][::-1]
    return out


def _embed(affine: np.ndarray, n_extra: int) -> np.ndarray:
    """Embed a spatial affine in a larger one whose first ``n_extra`` axes are identity."""
    n = affine.shape[0] - 1
    out = np.eye(n + n_extra + 1)
    out[n_extra:, n_extra:] = affine
    return out


def record_to_layer_data(record: Any, layer_type: str = "image") -> tuple[Any, dict, str]:
    """Turn an :class:`ImageRecord` into a napari layer-data tuple (no napari import).

    Parameters
    ----------
    record : ImageRecord
    layer_type : {"image", "labels"}

    Returns
    -------
    tuple
        ``(data, kwargs, layer_type)``; ``data`` is a transposed view (or a list of levels for
        multiscale slides) and ``kwargs`` holds ``affine``, ``name``, ``metadata`` and display
        hints. ``metadata["medseg"]`` keeps the source affine, axis permutation, shape, modality
        and header so that writers can put data back in the file's own order and geometry.
    """
    nsp = record.spatial_ndim
    ndim = len(record.shape)
    n_trailing = ndim - nsp
    rgb = bool(record.rgb)
    n_extra = n_trailing - (1 if rgb else 0)
    if record.space == "RAS":
        perm = layer_axes(record.affine)
        lay_aff = layer_affine_from_file(record.affine, perm)
    else:
        perm = list(range(nsp))
        lay_aff = np.asarray(record.affine, dtype=float)
    extra = list(range(nsp, nsp + n_extra))
    full_perm = extra + perm + ([ndim - 1] if rgb else [])
    identity = full_perm == list(range(ndim))

    def _t(a: Any) -> Any:
        return a if identity else a.transpose(full_perm)

    data = [_t(level) for level in record.multiscale] if record.multiscale else _t(record.data)
    meta = {
        META_KEY: {
            "path": record.path,
            "space": record.space,
            "affine": np.asarray(record.affine, dtype=float).tolist(),
            "layer_axes": full_perm,
            "file_shape": list(record.shape),
            "modality": record.modality,
            "orientation": record.orientation,
            "spacing": list(record.spacing),
            "rgb": rgb,
            "source": record.metadata,
        }
    }
    kwargs: dict[str, Any] = {
        "name": record.name,
        "affine": _embed(lay_aff, n_extra),
        "metadata": meta,
    }
    if record.space == "RAS":
        # world axes are RAS millimetres: napari's scale bar and status read these
        kwargs["units"] = ("pixel",) * n_extra + ("mm",) * nsp
    if layer_type == "image":
        kwargs["rgb"] = rgb
        if record.multiscale:
            kwargs["multiscale"] = True
        if record.modality == "CT" and not rgb:
            kwargs["contrast_limits"] = (-160.0, 240.0)  # soft-tissue window, a user can change it
        if rgb or record.multiscale:
            pass
        else:
            kwargs["colormap"] = "gray"
    return data, kwargs, layer_type


def compose_layer_transform(attrs: dict) -> np.ndarray:
    """Full data-to-world matrix of a napari layer from its state attributes.

    napari keeps ``scale``, ``translate``, ``rotate`` and ``shear`` (data to physical) and a
    separate ``affine`` (physical to world); world = affine @ physical.

    Parameters
    ----------
    attrs : dict
        The layer attributes napari passes to writers (``layer.as_layer_data_tuple()[1]``).

    Returns
    -------
    numpy.ndarray
        ``(ndim+1, ndim+1)`` homogeneous matrix.
    """
    aff = np.asarray(attrs.get("affine", None) if attrs.get("affine") is not None else np.eye(1))
    if hasattr(attrs.get("affine"), "affine_matrix"):
        aff = np.asarray(attrs["affine"].affine_matrix)
    scale = np.asarray(attrs.get("scale", [1.0]), dtype=float)
    n = len(scale)
    if aff.shape != (n + 1, n + 1):
        aff = np.eye(n + 1)
    translate = np.asarray(attrs.get("translate", np.zeros(n)), dtype=float)
    rotate = np.asarray(attrs.get("rotate", np.eye(n)), dtype=float)
    shear = attrs.get("shear", None)
    shear_m = np.eye(n)
    if shear is not None:
        s = np.asarray(shear, dtype=float)
        if s.ndim == 2:
            shear_m = s
        elif s.size:
            # napari stores the upper triangle of a unit upper-triangular matrix, row by row
            shear_m = np.eye(n)
            shear_m[np.triu_indices(n, 1)] = s
    if rotate.shape != (n, n):
        rotate = np.eye(n)
    phys = np.eye(n + 1)
    phys[:n, :n] = rotate @ shear_m @ np.diag(scale)
    phys[:n, n] = translate
    return aff.astype(float) @ phys


def layer_to_record_parts(data: Any, attrs: dict) -> tuple[Any, np.ndarray, str, dict]:
    """Put napari layer data back in a file's axis order with its voxel-to-world affine.

    When the layer carries ``metadata["medseg"]`` from a scan (it was opened by this plugin,
    or made by one of its tools on the scan's grid) and its spatial shape matches, the data is
    transposed back to the source file's axis order and the source affine is returned
    unchanged, so the saved file lies on exactly the scan's voxels. Otherwise (a layer made by
    hand in napari) the geometry comes from the layer's own transform, and the axes are
    reversed into the usual NIfTI order ``(x, y, z)``.

    Parameters
    ----------
    data : array-like
        Layer data in layer axis order.
    attrs : dict
        Layer attributes (``affine``, ``scale``, ``translate``, ``metadata``, ...).

    Returns
    -------
    data : array-like
        In file axis order (spatial axes first).
    affine : numpy.ndarray
        Voxel to RAS mm (4x4) or voxel to pixel (3x3).
    space : {"RAS", "pixel"}
    source : dict
        The ``metadata["medseg"]`` dict it came with (empty when none).
    """
    meta = (attrs.get("metadata") or {}).get(META_KEY) or {}
    shape = tuple(int(s) for s in np.shape(data))
    if meta:
        perm = list(meta["layer_axes"])
        file_shape = tuple(meta["file_shape"])
        src_rgb = bool(meta.get("rgb"))
        nsp = len(meta["affine"]) - 1
        if len(shape) == len(perm):
            candidate = tuple(shape[perm.index(i)] for i in range(len(perm)))
            if candidate == file_shape:
                inv = list(np.argsort(perm))
                return data.transpose(inv), np.asarray(meta["affine"]), meta["space"], meta
        # same spatial grid, without the source's time/colour axes (a mask on a 4D or RGB image)
        spatial_perm = [p for p in perm if p < nsp]
        if len(shape) == nsp and tuple(shape[spatial_perm.index(i)] for i in range(nsp)) == tuple(
            file_shape[:nsp]
        ):
            inv = list(np.argsort(spatial_perm))
            out = data.transpose(inv) if inv != list(range(nsp)) else data
            return out, np.asarray(meta["affine"]), meta["space"], meta
        del src_rgb
    world = compose_layer_transform(attrs)
    nd = len(shape)
    rgb = bool(attrs.get("rgb", False))
    nsp = nd - (1 if rgb else 0)
    if nsp == 3 and world.shape[0] == 4:
        rev = list(range(nsp))[::-1]
        aff = np.eye(4)
        aff[:3, :3] = world[:3, :3][::-1][:, rev]
        aff[:3, 3] = world[:3, 3][::-1]
        return data.transpose(rev), aff, "RAS", {}
    if nsp == 2:
        aff = world[-3:, -3:] if world.shape[0] >= 3 else np.eye(3)
        return data, aff, "pixel", {}
    raise ValueError(
        f"cannot save a {nd}-dimensional layer: only 2D images and 3D volumes have a file geometry"
    )
