"""Registration transforms and points on disk: the transform JSON, ITK affine and displacement
files, point CSVs and elastix landmark files.

Files written by :func:`save_transform` (``T`` = the chosen stem)
---------------------------------------------------------------------------
``T.json``
    ``matrix_ras``: the 4x4 ``M`` (fixed RAS mm -> moving RAS mm), the fixed grid, and the name
    of the displacement file. Read it back with :func:`load_transform`.
``T.tfm``
    ``M`` as an ITK ``AffineTransform_double_3_3`` in ITK's LPS physical space (ITK/SimpleITK/
    3D Slicer/ANTs read it: ``sitk.ReadTransform``). Like every ITK transform it maps fixed
    points to moving points, so it is what ``sitk.Resample(moving, fixed, tfm)`` wants.
``T_displacement.nii.gz`` (deformable only)
    The *whole* transform (affine included) as an ITK displacement field: a 3-component vector
    image on the control grid (same origin and direction as the fixed image, coarser spacing);
    each voxel holds ``D(p)`` in LPS mm such that a fixed physical point ``p`` (LPS) maps to
    ``p + D(p)`` in the moving image. This is ITK's ``DisplacementFieldTransform`` convention,
    also used by ANTs warp files; SimpleITK reads it with
    ``sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(f), sitk.sitkVectorFloat64))``.
    ITK returns a zero displacement outside the grid, i.e. outside the fixed image's field of
    view, where :meth:`RegistrationTransform.map_points` keeps the affine part.

For 2D images (``space="pixel"``) only ``T.json`` and ``T_displacement.npy`` are written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.core.register.transform import RegistrationError, RegistrationTransform

__all__ = [
    "load_transform",
    "read_itk_landmarks",
    "read_points_csv",
    "save_transform",
    "write_points_csv",
]


def save_transform(transform: RegistrationTransform, path: str | Path) -> list[Path]:
    """Write ``T.json``, ``T.tfm`` and (deformable) ``T_displacement.nii.gz``.

    Parameters
    ----------
    transform : RegistrationTransform
    path : path-like
        Any of ``T``, ``T.json`` or ``T.tfm``; the stem ``T`` names all files.

    Returns
    -------
    list of Path
        The files written (see the module docstring for their conventions).
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".json", ".tfm") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    meta = transform.to_dict()
    if transform.displacement is not None:
        if transform.space == "RAS" and transform.ndim == 3:
            disp_path = stem.with_name(stem.name + "_displacement.nii.gz")
            _write_itk_displacement(transform, disp_path)
        else:
            disp_path = stem.with_name(stem.name + "_displacement.npy")
            _atomic(disp_path, lambda p: np.save(p, transform.displacement.astype(np.float32)))
        meta["displacement_file"] = disp_path.name
        meta["displacement_convention"] = (
            "ITK DisplacementFieldTransform: LPS mm, p -> p + D(p), affine included"
            if disp_path.suffix == ".gz"
            else "numpy (*grid_shape, n) d in world units, without the affine"
        )
        written.append(disp_path)
    if transform.space == "RAS" and transform.ndim == 3:
        tfm_path = stem.with_name(stem.name + ".tfm")
        _write_itk_affine(transform.matrix, tfm_path)
        meta["itk_affine_file"] = tfm_path.name
        written.append(tfm_path)
    json_path = stem.with_name(stem.name + ".json")
    _atomic(json_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    written.insert(0, json_path)
    return written


def load_transform(path: str | Path) -> RegistrationTransform:
    """Read a transform written by :func:`save_transform` (the ``.json`` file).

    An ITK ``.tfm`` affine written by another program is also accepted (its matrix is
    converted from LPS to RAS); it has no fixed grid, so only :meth:`~RegistrationTransform.
    map_points` is meaningful for it.
    """
    path = Path(path)
    if path.suffix.lower() == ".tfm" and not path.with_suffix(".json").exists():
        return RegistrationTransform(
            matrix=_read_itk_affine(path), fixed_affine=np.eye(4), fixed_shape=(1, 1, 1)
        )
    if path.suffix.lower() != ".json":
        path = path.with_suffix(".json") if path.suffix else path.with_name(path.name + ".json")
    try:
        meta = json.loads(path.read_text())
        matrix = np.asarray(meta.get("matrix_ras", meta.get("matrix")), dtype=float)
        tr = RegistrationTransform(
            matrix=matrix,
            fixed_affine=np.asarray(meta["fixed_affine"], dtype=float),
            fixed_shape=tuple(meta["fixed_shape"]),
            space=meta.get("space", "RAS"),
            grid_shape=tuple(meta["grid_shape"]) if meta.get("grid_shape") else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RegistrationError(f"{path} is not a napari-medseg transform file ({e}).") from e
    disp = meta.get("displacement_file")
    if disp:
        dpath = path.with_name(disp)
        if dpath.suffix == ".npy":
            tr.displacement = np.load(dpath)
        else:
            tr.displacement = _read_itk_displacement(tr, dpath)
    return tr


def _atomic(path: Path, write: Any) -> None:
    from napari_medseg._files import atomic_path

    with atomic_path(path) as tmp:
        write(tmp)


_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _write_itk_affine(matrix_ras: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    lps = _LPS @ np.asarray(matrix_ras, dtype=float) @ _LPS
    tfm = sitk.AffineTransform(3)
    tfm.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
    tfm.SetTranslation([float(v) for v in lps[:3, 3]])
    _atomic(path, lambda tmp: sitk.WriteTransform(tfm, str(tmp)))


def _read_itk_affine(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    tfm = sitk.ReadTransform(str(path))
    n = tfm.GetDimension()
    if n != 3:
        raise RegistrationError(f"{path} holds a {n}D transform; a 3D affine was expected.")
    try:
        aff = sitk.AffineTransform(tfm)
    except (RuntimeError, TypeError) as e:
        raise RegistrationError(f"{path} does not hold an affine ITK transform.") from e
    m = np.array(aff.GetMatrix(), dtype=float).reshape(3, 3)
    c = np.array(aff.GetCenter(), dtype=float)
    t = np.array(aff.GetTranslation(), dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = m
    lps[:3, 3] = t + c - m @ c
    return _LPS @ lps @ _LPS


def _total_displacement_lps(tr: RegistrationTransform) -> np.ndarray:
    """``T(p) - p`` in LPS at the control-grid nodes, array ``(*grid_shape, 3)``."""
    g = tr.grid_shape
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in g], indexing="ij"), -1).reshape(-1, 3)
    ga = tr.grid_affine
    x = idx @ ga[:3, :3].T + ga[:3, 3]
    p = x + tr.displacement.reshape(-1, 3)
    y = p @ tr.matrix[:3, :3].T + tr.matrix[:3, 3]
    d = (y - x) * np.array([-1.0, -1.0, 1.0])
    return d.reshape(*g, 3)


def _write_itk_displacement(tr: RegistrationTransform, path: Path) -> None:
    import SimpleITK as sitk

    from napari_medseg.io.geometry import itk_from_affine

    d = _total_displacement_lps(tr)  # (i, j, k, 3)
    img = sitk.GetImageFromArray(np.ascontiguousarray(d.transpose(2, 1, 0, 3)), isVector=True)
    origin, spacing, direction = itk_from_affine(tr.grid_affine)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    _atomic(path, lambda tmp: sitk.WriteImage(sitk.Cast(img, sitk.sitkVectorFloat32), str(tmp)))


def _read_itk_displacement(tr: RegistrationTransform, path: Path) -> np.ndarray:
    """Recover ``d`` on the control grid from an ITK displacement file written by us."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    total = sitk.GetArrayFromImage(img).transpose(2, 1, 0, 3).astype(float)  # (i, j, k, 3) LPS
    g = total.shape[:3]
    if tuple(g) != tuple(tr.grid_shape):
        raise RegistrationError(f"{path} does not match the grid its transform file states.")
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in g], indexing="ij"), -1).reshape(-1, 3)
    ga = tr.grid_affine
    x = idx @ ga[:3, :3].T + ga[:3, 3]
    y = x + total.reshape(-1, 3) * np.array([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(tr.matrix)
    p = y @ inv[:3, :3].T + inv[:3, 3]
    return (p - x).reshape(*g, 3)


# ---------------------------------------------------------------------------- points


def read_points_csv(path: str | Path, ndim: int = 3) -> np.ndarray:
    """Read points from a CSV with a header naming columns ``x,y,z`` (or ``y,x`` in 2D).

    Returns
    -------
    (N, ndim) array
        World coordinates (RAS mm ``x, y, z`` for volumes).
    """
    import csv

    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise RegistrationError(f"cannot read the points file {path}: {e.strerror}.") from e
    cols = ["x", "y", "z"][:ndim]
    if not rows or any(c not in {k.strip().lower() for k in rows[0]} for c in cols):
        raise RegistrationError(
            f"{path} must be a CSV with a header row and columns {','.join(cols)}."
        )
    try:
        out = np.array(
            [[float({k.strip().lower(): v for k, v in r.items()}[c]) for c in cols] for r in rows]
        )
    except (TypeError, ValueError) as e:
        raise RegistrationError(f"{path} holds a value that is not a number ({e}).") from e
    return out


def write_points_csv(path: str | Path, xyz: np.ndarray, extra: dict | None = None) -> Path:
    """Write points ``(N, n)`` as a CSV with columns ``x,y,z`` (plus ``extra`` columns)."""
    path = Path(path)
    xyz = np.asarray(xyz, dtype=float)
    cols = ["x", "y", "z"][: xyz.shape[1]]
    extra = extra or {}
    lines = [",".join(cols + list(extra))]
    for i, p in enumerate(xyz):
        vals = [f"{v:.4f}" for v in p] + [str(extra[k][i]) for k in extra]
        lines.append(",".join(vals))
    _atomic(path, lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    return path


def read_itk_landmarks(path: str | Path) -> np.ndarray:
    """Read an elastix/ITK ``point`` landmark file (LPS mm) and return RAS mm ``(N, 3)``."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or lines[0][0].lower() not in ("point", "index"):
        raise RegistrationError(f"{path} is not an elastix point file.")
    if lines[0][0].lower() != "point":
        raise RegistrationError(f"{path} holds voxel indices; world points were expected.")
    n = int(lines[1][0])
    pts = np.array([[float(v) for v in ln] for ln in lines[2 : 2 + n]])
    return pts * np.array([-1.0, -1.0, 1.0])
