"""Image registration by instance optimisation: rigid, affine and deformable, in world space.

The engine aligns a *moving* image to a *fixed* image. Both are
:class:`~napari_medseg.io.record.ImageRecord` with their own grids, spacings, orientations and
fields of view; everything happens in world coordinates (RAS millimetres for volumes, the
record's pixel frame for 2D images), so the images never need to share a grid.

Transform convention
--------------------
A :class:`RegistrationTransform` maps a point ``x`` of the FIXED image's world to the point of the
MOVING image's world that lies on it (the "pull-back" convention of ITK, ANTs and elastix)::

    T(x) = M @ (x + d(x))          (homogeneous; M is (n+1)x(n+1), d in mm)

``M`` is the rigid/affine part and ``d`` a displacement field (mm, world axes) stored on a
regular grid that spans the fixed image's field of view and is interpolated linearly. The warped
image is ``moving(T(x))`` sampled at the fixed voxels, so it lies on the fixed grid. Points given
in fixed world coordinates map to moving world coordinates with :meth:`RegistrationTransform.
map_points`; :meth:`~RegistrationTransform.map_points_inverse` goes the other way.

Method
------
A multi-resolution pyramid (box-filtered, coarse to fine) and Adam on the transform parameters,
in the spirit of ConvexAdam/FireANTs: rigid (rotation vector + translation about the fixed
image's centre), then affine (full matrix), then deformable: a stationary velocity field on a
coarse control grid integrated by scaling and squaring (diffeomorphic; 7 squarings), upsampled
linearly, with a diffusion (first-derivative) or bending-energy (second-derivative) regulariser
measured in millimetres. Similarities are MONAI's
:class:`~monai.losses.LocalNormalizedCrossCorrelationLoss` (same modality),
:class:`~monai.losses.GlobalMutualInformationLoss` (across modalities) or a mean squared error
(masks). The moving image is sampled with :func:`torch.nn.functional.grid_sample` at the fixed
grid's world points mapped through the transform; voxels that map outside the moving field of
view, or outside the optional masks, do not count.

Files written by :meth:`RegistrationTransform.save` (``T`` = the chosen stem)
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
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import Progress, ProgressGen

MODES = ("rigid", "affine", "deformable")
SIMILARITIES = ("auto", "lncc", "mi", "mse")
REGULARIZERS = ("diffusion", "bending")
INITS = ("identity", "com", "geometry")


class RegistrationError(MedsegError, ValueError):
    """Inputs that cannot be registered (one sentence for a person)."""


@dataclass
class RegistrationOptions:
    """Settings of :func:`register`.

    Attributes
    ----------
    mode : {"rigid", "affine", "deformable"}
        Deformable runs rigid and affine first.
    similarity : {"auto", "lncc", "mi", "mse"}
        ``auto``: MI when the two images' modalities differ, MSE for two masks, else LNCC.
    regularization : float
        Weight of the deformation regulariser (diffusion: dimensionless mean squared
        displacement gradient; bending: mean squared second derivatives times the control
        spacing squared).
    regularizer : {"diffusion", "bending"}
    iterations : int
        Adam iterations per pyramid level of the deformable stage; the rigid and affine stages
        use half as many each.
    levels : int
        Pyramid levels (the coarsest is about ``2**(levels-1)`` times the finest spacing).
    max_voxels : int
        The finest level optimised holds at most this many voxels (larger images are
        registered on a downsampled grid; outputs are still full resolution).
    init : {"identity", "com", "geometry"}
        Start from the images' world positions, from matched centres of mass, or from matched
        field-of-view centres.
    lncc_kernel : int
        LNCC window (voxels per side, odd).
    mi_bins : int
        Histogram bins of mutual information.
    grid_step : int
        Control-grid step of the displacement field in voxels of each pyramid level.
    diffeomorphic : bool
        Integrate a stationary velocity field (scaling and squaring) instead of optimising the
        displacement directly; keeps the Jacobian determinant positive in practice.
    learning_rate : float
        Adam step of the deformable stage in units of the level's spacing.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    seed : int
    """

    mode: str = "deformable"
    similarity: str = "auto"
    regularization: float = 0.3
    regularizer: str = "diffusion"
    iterations: int = 100
    levels: int = 3
    max_voxels: int = 1_000_000
    init: str = "identity"
    lncc_kernel: int = 7
    mi_bins: int = 32
    grid_step: int = 2
    diffeomorphic: bool = True
    learning_rate: float = 0.25
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`RegistrationError` for settings out of range."""
        if self.mode not in MODES:
            raise RegistrationError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}.")
        if self.similarity not in SIMILARITIES:
            raise RegistrationError(
                f"similarity must be one of {', '.join(SIMILARITIES)}, not {self.similarity!r}."
            )
        if self.regularizer not in REGULARIZERS:
            raise RegistrationError(
                f"regularizer must be one of {', '.join(REGULARIZERS)}, not {self.regularizer!r}."
            )
        if self.init not in INITS:
            raise RegistrationError(f"init must be one of {', '.join(INITS)}, not {self.init!r}.")
        if self.iterations < 0 or self.levels < 1 or self.regularization < 0:
            raise RegistrationError("iterations, levels and regularization must be positive.")


# ============================================================================ the transform


@dataclass
class RegistrationTransform:
    """Fixed-world to moving-world mapping ``T(x) = M @ (x + d(x))``.

    Attributes
    ----------
    matrix : (n+1, n+1) array
        Affine part ``M``, fixed world -> moving world (RAS mm for volumes).
    fixed_affine : (n+1, n+1) array
        Voxel-to-world affine of the fixed image (file axis order).
    fixed_shape : tuple of int
        Spatial shape of the fixed image (file axis order).
    space : {"RAS", "pixel"}
    displacement : array or None
        ``(*grid_shape, n)`` displacement ``d`` in world mm (RAS components for volumes) on
        the control grid; ``None`` for rigid/affine transforms.
    grid_shape : tuple of int or None
        Control-grid shape; node ``g`` lies at fixed voxel index
        ``g * (fixed_shape - 1) / (grid_shape - 1)`` (the grid spans the fixed image exactly).
    """

    matrix: np.ndarray
    fixed_affine: np.ndarray
    fixed_shape: tuple
    space: str = "RAS"
    displacement: np.ndarray | None = None
    grid_shape: tuple | None = None

    @property
    def ndim(self) -> int:
        return int(self.matrix.shape[0] - 1)

    @property
    def grid_affine(self) -> np.ndarray:
        """Control-grid index -> world affine (same origin and direction as the fixed image)."""
        n = self.ndim
        step = np.ones(n)
        if self.grid_shape is not None:
            step = np.array(
                [
                    (f - 1) / (g - 1) if g > 1 else 1.0
                    for f, g in zip(self.fixed_shape, self.grid_shape)
                ]
            )
        scale = np.eye(n + 1)
        scale[:n, :n] = np.diag(step)
        return np.asarray(self.fixed_affine, dtype=float) @ scale

    def displacement_at(self, xyz: np.ndarray) -> np.ndarray:
        """Deformable part ``d(x)`` (mm) at world points ``xyz`` ``(N, n)``.

        Points outside the fixed field of view take the value at the nearest border node.
        """
        xyz = np.asarray(xyz, dtype=float).reshape(-1, self.ndim)
        if self.displacement is None:
            return np.zeros_like(xyz)
        import torch

        inv = np.linalg.inv(self.grid_affine)
        idx = xyz @ inv[:-1, :-1].T + inv[:-1, -1]
        g = np.asarray(self.grid_shape, dtype=float)
        norm = np.where(g > 1, 2 * idx / np.maximum(g - 1, 1) - 1, 0.0)[:, ::-1]
        field_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self.displacement, -1, 0)))
        grid = torch.from_numpy(np.ascontiguousarray(norm)).to(field_t.dtype)
        grid = grid.reshape((1, -1) + (1,) * (self.ndim - 1) + (self.ndim,))
        out = torch.nn.functional.grid_sample(
            field_t[None].float(),
            grid.float(),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )
        return out.reshape(self.ndim, -1).T.double().numpy()

    def map_points(self, xyz: np.ndarray) -> np.ndarray:
        """Map points from the fixed image's world to the moving image's world.

        Parameters
        ----------
        xyz : (N, n) array
            World coordinates in the fixed image (RAS mm ``x, y, z`` for volumes).

        Returns
        -------
        (N, n) array
            Where each point lies in the moving image (same units).
        """
        xyz = np.asarray(xyz, dtype=float).reshape(-1, self.ndim)
        p = xyz + self.displacement_at(xyz)
        return p @ self.matrix[:-1, :-1].T + self.matrix[:-1, -1]

    def map_points_inverse(self, xyz: np.ndarray, iterations: int = 30) -> np.ndarray:
        """Map moving-world points to the fixed world (fixed-point inversion of :meth:`map_points`).

        Parameters
        ----------
        xyz : (N, n) array
            World coordinates in the moving image.
        iterations : int
            Fixed-point iterations (the residual is usually below 0.01 mm after 10).
        """
        y = np.asarray(xyz, dtype=float).reshape(-1, self.ndim)
        inv = np.linalg.inv(self.matrix)
        target = y @ inv[:-1, :-1].T + inv[:-1, -1]  # x + d(x) = M^-1 y
        x = target.copy()
        if self.displacement is None:
            return x
        for _ in range(iterations):
            x = target - self.displacement_at(x)
        return x

    def to_dict(self) -> dict:
        return {
            "type": "napari-medseg registration transform",
            "convention": "maps FIXED world points to MOVING world points: "
            "T(x) = M @ (x + d(x)); world = RAS mm for volumes",
            "matrix_ras" if self.space == "RAS" else "matrix": np.asarray(self.matrix).tolist(),
            "space": self.space,
            "fixed_affine": np.asarray(self.fixed_affine).tolist(),
            "fixed_shape": [int(s) for s in self.fixed_shape],
            "grid_shape": None if self.grid_shape is None else [int(s) for s in self.grid_shape],
        }

    def save(self, path: str | Path) -> list[Path]:
        """Write ``T.json``, ``T.tfm`` and (deformable) ``T_displacement.nii.gz``.

        Parameters
        ----------
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
        meta = self.to_dict()
        if self.displacement is not None:
            if self.space == "RAS" and self.ndim == 3:
                disp_path = stem.with_name(stem.name + "_displacement.nii.gz")
                _write_itk_displacement(self, disp_path)
            else:
                disp_path = stem.with_name(stem.name + "_displacement.npy")
                _atomic(disp_path, lambda p: np.save(p, self.displacement.astype(np.float32)))
            meta["displacement_file"] = disp_path.name
            meta["displacement_convention"] = (
                "ITK DisplacementFieldTransform: LPS mm, p -> p + D(p), affine included"
                if disp_path.suffix == ".gz"
                else "numpy (*grid_shape, n) d in world units, without the affine"
            )
            written.append(disp_path)
        if self.space == "RAS" and self.ndim == 3:
            tfm_path = stem.with_name(stem.name + ".tfm")
            _write_itk_affine(self.matrix, tfm_path)
            meta["itk_affine_file"] = tfm_path.name
            written.append(tfm_path)
        json_path = stem.with_name(stem.name + ".json")
        _atomic(json_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
        written.insert(0, json_path)
        return written


def load_transform(path: str | Path) -> RegistrationTransform:
    """Read a transform written by :meth:`RegistrationTransform.save` (the ``.json`` file).

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


# ============================================================================ points I/O


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


# ============================================================================ result


@dataclass
class RegistrationResult:
    """What :func:`register` returns.

    Attributes
    ----------
    transform : RegistrationTransform
    warped : array
        The moving image resampled onto the fixed grid (fixed file axis order, float32).
    warped_labels : array or None
        Moving labels resampled with nearest interpolation onto the fixed grid.
    points : array or None
        The input points (fixed world) mapped into the moving world, ``(N, n)``.
    jacobian : array or None
        Jacobian determinant of ``T`` on the fixed grid (deformable only; volume ratio).
    magnitude : array or None
        Length (mm) of the deformable displacement ``d`` on the fixed grid.
    folding_fraction : float
        Fraction of fixed voxels with ``det J <= 0``.
    similarity : str
        The similarity used (``lncc``, ``mi`` or ``mse``).
    similarity_before, similarity_after : float
        That similarity (higher is better: local squared NCC, MI in nats, or minus the MSE)
        with the images as they lie in world space, and after registration.
    losses : list of float
    seconds : float
    provenance : dict
    """

    transform: RegistrationTransform
    warped: np.ndarray
    warped_labels: np.ndarray | None = None
    points: np.ndarray | None = None
    jacobian: np.ndarray | None = None
    magnitude: np.ndarray | None = None
    folding_fraction: float = 0.0
    similarity: str = ""
    similarity_before: float = float("nan")
    similarity_after: float = float("nan")
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    provenance: dict = field(default_factory=dict)


# ============================================================================ checks


def _as_float_array(record: ImageRecord, what: str) -> np.ndarray:
    arr = np.asarray(record.data)
    if record.rgb:
        raise RegistrationError(
            f"the {what} image is a colour (RGB) image; convert it to grey levels first."
        )
    nsp = record.spatial_ndim
    if arr.ndim != nsp:
        extra = arr.shape[nsp:]
        if all(s == 1 for s in extra):
            arr = arr.reshape(arr.shape[:nsp])
        else:
            raise RegistrationError(
                f"the {what} image has {arr.ndim} axes (time or channels); register one "
                f"{nsp}D volume at a time."
            )
    if min(arr.shape) < 2:
        raise RegistrationError(
            f"the {what} image is a single slice {arr.shape}; register 2D images as 2D "
            "images or give a volume with at least 2 voxels along each axis."
        )
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise RegistrationError(
            f"the {what} image contains NaN or infinite values; replace them (for example "
            "with 0) before registering."
        )
    return arr


def check_inputs(fixed: ImageRecord, moving: ImageRecord) -> None:
    """Raise :class:`RegistrationError` (one sentence) for pairs that cannot be registered."""
    if fixed.spatial_ndim != moving.spatial_ndim or fixed.space != moving.space:
        fd = f"{fixed.spatial_ndim}D" + (" volume" if fixed.space == "RAS" else " image")
        md = f"{moving.spatial_ndim}D" + (" volume" if moving.space == "RAS" else " image")
        raise RegistrationError(
            f"the fixed image is a {fd} and the moving image a {md}; register images of the "
            "same dimensionality (both 2D or both 3D)."
        )
    if fixed.spatial_ndim not in (2, 3):
        raise RegistrationError("only 2D images and 3D volumes can be registered.")


def _fov_corners(shape: tuple, affine: np.ndarray) -> np.ndarray:
    n = len(shape)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in shape], indexing="ij"))
    corners = corners.reshape(n, -1).T
    return corners @ affine[:n, :n].T + affine[:n, n]


def overlap_fraction(
    fixed_shape: tuple,
    fixed_affine: np.ndarray,
    moving_shape: tuple,
    moving_affine: np.ndarray,
    matrix: np.ndarray | None = None,
) -> float:
    """Fraction of the fixed field of view that maps inside the moving field of view.

    Parameters
    ----------
    fixed_shape, moving_shape : tuple of int
    fixed_affine, moving_affine : array
        Voxel-to-world affines.
    matrix : array, optional
        Fixed-world to moving-world affine (identity by default).
    """
    n = len(fixed_shape)
    matrix = np.eye(n + 1) if matrix is None else matrix
    axes = [np.linspace(0, s - 1, min(s, 16)) for s in fixed_shape]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, n)
    full = matrix @ np.asarray(fixed_affine, dtype=float)
    m_idx = idx @ (np.linalg.inv(moving_affine) @ full)[:n, :n].T
    m_idx += (np.linalg.inv(moving_affine) @ full)[:n, n]
    inside = np.all((m_idx >= -0.5) & (m_idx <= np.asarray(moving_shape) - 0.5), axis=1)
    return float(inside.mean())


# ============================================================================ torch helpers


def _norm_factors(shape: tuple) -> np.ndarray:
    """Index -> normalised grid_sample coordinate scale per axis (align_corners=True)."""
    return np.array([2.0 / (s - 1) if s > 1 else 0.0 for s in shape])


def _normalise_intensity(arr: np.ndarray, is_label: bool) -> np.ndarray:
    if is_label:
        mx = float(arr.max()) if arr.size else 1.0
        return (arr > 0).astype(np.float32) if mx > 0 else arr
    lo, hi = np.percentile(arr[:: max(1, arr.size // 2_000_000)], [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


@dataclass
class _Level:
    fixed: Any  # tensor (1,1,*shape)
    fixed_weight: Any  # tensor (1,1,*shape) or None
    moving: Any  # tensor (1,1,*mshape)
    moving_weight: Any
    world: Any  # tensor (n, N) world coords of fixed level voxels
    field_grid: Any  # tensor (1,*shape,n) normalised coords into a grid spanning the fixed image
    to_grid: Any  # tensor (n+1, n+1) moving world -> normalised grid_sample coords (reversed)
    grid_limit: Any  # tensor (n, 1): |coord| beyond this is outside the moving field of view
    m_shape: tuple
    shape: tuple
    spacing: float


class _Engine:
    """Internal state of one registration (tensors on one device)."""

    def __init__(
        self,
        fixed: ImageRecord,
        moving: ImageRecord,
        opts: RegistrationOptions,
        fixed_mask: np.ndarray | None,
        moving_mask: np.ndarray | None,
    ) -> None:
        import torch

        from napari_medseg.core.engine.windows import resolve_device

        self.torch = torch
        self.F = torch.nn.functional
        self.opts = opts
        self.device = resolve_device(opts.device)
        self.n = fixed.spatial_ndim
        self.fixed_rec, self.moving_rec = fixed, moving
        self.f_arr = _as_float_array(fixed, "fixed")
        self.m_arr = _as_float_array(moving, "moving")
        self.f_shape = self.f_arr.shape
        self.m_shape = self.m_arr.shape
        self.f_aff = np.asarray(fixed.affine, dtype=float)
        self.m_aff = np.asarray(moving.affine, dtype=float)
        self.similarity = self._pick_similarity()
        both_labels = self.similarity == "mse" and fixed.modality == moving.modality == "label"
        self.f_norm = _normalise_intensity(self.f_arr, both_labels)
        self.m_norm = _normalise_intensity(self.m_arr, both_labels)
        self.f_mask = None if fixed_mask is None else (np.asarray(fixed_mask) > 0)
        self.m_mask = None if moving_mask is None else (np.asarray(moving_mask) > 0)
        for mask, shp, what in (
            (self.f_mask, self.f_shape, "fixed"),
            (self.m_mask, self.m_shape, "moving"),
        ):
            if mask is not None and mask.shape != shp:
                raise RegistrationError(
                    f"the {what} mask {mask.shape} is not on the {what} image's grid {shp}."
                )
        self.center = _fov_corners(self.f_shape, self.f_aff).mean(0)
        self.levels = self._build_levels()

    def _pick_similarity(self) -> str:
        s = self.opts.similarity
        if s != "auto":
            return s
        fm, mm = self.fixed_rec.modality, self.moving_rec.modality
        if fm == mm == "label":
            return "mse"
        known = {"CT", "MR", "PT", "US"}
        if fm in known and mm in known and fm != mm:
            return "mi"
        return "lncc"

    # ------------------------------------------------------------------ pyramid

    def _factors(self, spacing: np.ndarray, shape: tuple, target: float) -> list[int]:
        out = []
        for sp, n in zip(spacing, shape):
            f = max(1, math.floor(target / sp + 0.5))
            while f > 1 and n // f < 4:
                f -= 1
            out.append(f)
        return out

    def _pool(self, arr: np.ndarray, factors: list[int]) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
        if any(f > 1 for f in factors):
            pool = self.F.avg_pool3d if self.n == 3 else self.F.avg_pool2d
            t = pool(t, kernel_size=factors, stride=factors)
        return t.to(self.device)

    @staticmethod
    def _level_affine(aff: np.ndarray, factors: list[int]) -> np.ndarray:
        n = len(factors)
        s = np.eye(n + 1)
        s[:n, :n] = np.diag(factors)
        s[:n, n] = (np.asarray(factors) - 1) / 2.0
        return aff @ s

    def _build_levels(self) -> list[_Level]:
        torch = self.torch
        f_sp = np.sqrt((self.f_aff[:-1, :-1] ** 2).sum(0))
        m_sp = np.sqrt((self.m_aff[:-1, :-1] ** 2).sum(0))
        base = float(min(f_sp.min(), m_sp.min()))
        b = 0
        while True:
            fac = self._factors(f_sp, self.f_shape, base * 2**b)
            nvox = np.prod([s // f for s, f in zip(self.f_shape, fac)])
            if nvox <= self.opts.max_voxels or all(s // f <= 8 for s, f in zip(self.f_shape, fac)):
                break
            b += 1
        levels = []
        for lev in range(self.opts.levels - 1, -1, -1):  # coarse -> fine
            target = base * 2 ** (b + lev)
            ff = self._factors(f_sp, self.f_shape, target)
            mf = self._factors(m_sp, self.m_shape, target)
            fixed = self._pool(self.f_norm, ff)
            shape = tuple(fixed.shape[2:])
            fw = None
            if self.f_mask is not None:
                fw = (self._pool(self.f_mask.astype(np.float32), ff) > 0.5).float()
            moving = self._pool(self.m_norm, mf)
            mw = None
            if self.m_mask is not None:
                mw = self._pool(self.m_mask.astype(np.float32), mf)
            la = self._level_affine(self.f_aff, ff)
            idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
            idx = idx.reshape(-1, self.n).astype(np.float64)
            world = idx @ la[: self.n, : self.n].T + la[: self.n, self.n]
            full_idx = idx * np.asarray(ff) + (np.asarray(ff) - 1) / 2.0
            norm = full_idx * _norm_factors(self.f_shape) - 1.0
            field_grid = torch.from_numpy(norm[:, ::-1].copy()).float()
            field_grid = field_grid.reshape((1, *shape, self.n)).to(self.device)
            m_inv = np.linalg.inv(self._level_affine(self.m_aff, mf))
            m_shape = tuple(moving.shape[2:])
            nf = _norm_factors(m_shape)
            to_norm = np.eye(self.n + 1)
            to_norm[: self.n, : self.n] = np.diag(nf)
            to_norm[: self.n, self.n] = -1.0
            to_norm[: self.n] = to_norm[: self.n][::-1]
            limit = np.array([1.0 + 0.5 * f if f > 0 else 1e9 for f in nf])[::-1]
            levels.append(
                _Level(
                    fixed=fixed,
                    fixed_weight=fw,
                    moving=moving,
                    moving_weight=mw,
                    world=torch.from_numpy(world.T.copy()).float().to(self.device),
                    field_grid=field_grid,
                    to_grid=torch.from_numpy(to_norm @ m_inv).float().to(self.device),
                    grid_limit=torch.from_numpy(limit.copy()).float()[:, None].to(self.device),
                    m_shape=m_shape,
                    shape=shape,
                    spacing=float(target),
                )
            )
        return levels

    # ------------------------------------------------------------------ sampling

    def _apply(self, lev: _Level, matrix: Any, disp: Any | None) -> tuple[Any, Any]:
        """Warp the level's moving image with ``M`` and a displacement on the control grid.

        Coordinates stay channel-first ``(n, N)`` so each step is one small matrix product.
        """
        torch = self.torch
        n = self.n
        x = lev.world  # (n, N)
        if disp is not None:
            d = self.F.grid_sample(
                disp, lev.field_grid, mode="bilinear", padding_mode="border", align_corners=True
            )
            x = x + d.reshape(n, -1)
        # world -> normalised moving coordinates in grid_sample order, one affine
        g = lev.to_grid @ matrix
        grid = torch.addmm(g[:n, n:], g[:n, :n], x)  # (n, N)
        with torch.no_grad():
            valid = (grid.abs() <= lev.grid_limit).all(dim=0).float()
        grid = grid.T.reshape((1, *lev.shape, n))
        warped = self.F.grid_sample(
            lev.moving, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        weight = valid.reshape((1, 1, *lev.shape))
        if lev.moving_weight is not None:
            mw = self.F.grid_sample(
                lev.moving_weight,
                grid.detach(),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=True,
            )
            weight = weight * (mw > 0.5).float()
        if lev.fixed_weight is not None:
            weight = weight * lev.fixed_weight
        return warped, weight

    # ------------------------------------------------------------------ similarity

    def _loss_fn(self, lev: _Level) -> Any:
        if self.similarity == "lncc":
            import monai.losses as ml

            k = int(self.opts.lncc_kernel) | 1
            k = max(3, min(k, *(2 * (s // 2) + 1 for s in lev.shape if s >= 3)))
            lncc = ml.LocalNormalizedCrossCorrelationLoss(
                spatial_dims=self.n, kernel_size=k, reduction="none"
            )

            def loss(f: Any, w: Any, wt: Any) -> Any:
                m = lncc(w * (wt > 0), f * (wt > 0))
                return (m * wt).sum() / wt.sum().clamp_min(1.0)

            return loss
        if self.similarity == "mi":
            import monai.losses as ml

            mi = ml.GlobalMutualInformationLoss(num_bins=self.opts.mi_bins)

            def loss(f: Any, w: Any, wt: Any) -> Any:
                sel = wt > 0.5
                if int(sel.sum()) < 16:
                    return (w * 0).sum()
                return mi(w[sel].reshape(1, 1, -1), f[sel].reshape(1, 1, -1))

            return loss

        def loss(f: Any, w: Any, wt: Any) -> Any:
            return (((f - w) ** 2) * wt).sum() / wt.sum().clamp_min(1.0)

        return loss

    # ------------------------------------------------------------------ regulariser

    def _regulariser(self, disp: Any, grid_spacing_mm: np.ndarray) -> Any:
        torch = self.torch
        n = self.n
        total = disp.new_zeros(())
        h = [float(v) for v in grid_spacing_mm]
        if self.opts.regularizer == "diffusion":
            for a in range(n):
                if disp.shape[2 + a] < 2:
                    continue
                g = torch.diff(disp, dim=2 + a) / h[a]
                total = total + (g**2).mean() * n
            return total
        hm = float(np.mean(h))
        for a in range(n):
            for b in range(a, n):
                if disp.shape[2 + a] < 3 or disp.shape[2 + b] < 3:
                    continue
                if a == b:
                    g = torch.diff(disp, n=2, dim=2 + a) / h[a] ** 2
                else:
                    g = torch.diff(torch.diff(disp, dim=2 + a), dim=2 + b) / (h[a] * h[b])
                total = total + (1 if a == b else 2) * (g**2).mean() * hm**2
        return total

    def _integrate(self, v: Any, k_mat: Any, base: Any, steps: int = 7) -> Any:
        """Scaling and squaring of a stationary velocity field ``v`` (1, n, *g) in mm."""
        n = self.n
        phi = v / (2**steps)
        for _ in range(steps):
            disp_norm = (phi.reshape(n, -1).T @ k_mat.T).reshape(base.shape)
            s = self.F.grid_sample(
                phi, base + disp_norm, mode="bilinear", padding_mode="border", align_corners=True
            )
            phi = phi + s
        return phi


def _levels_for(eng: _Engine, stage: str) -> list[int]:
    """Indices of the pyramid levels a stage runs on (coarse first)."""
    all_levels = list(range(len(eng.levels)))
    if stage == "deformable":
        return all_levels
    # linear stages: skip levels above ~300k voxels (they rarely change the answer)
    keep = [i for i in all_levels if np.prod(eng.levels[i].shape) <= 300_000]
    return keep or all_levels[:1]


def _check_overlap(fixed: ImageRecord, moving: ImageRecord, init: Any) -> None:
    """Raise when the fixed field of view maps entirely outside the moving one."""
    n = fixed.spatial_ndim
    fshape, mshape = fixed.spatial_shape, moving.spatial_shape
    if isinstance(init, str):
        init_m = np.eye(n + 1)
        if init == "geometry":
            init_m[:n, n] = _fov_corners(mshape, moving.affine).mean(0) - _fov_corners(
                fshape, fixed.affine
            ).mean(0)
    else:
        init_m = init
    if overlap_fraction(fshape, fixed.affine, mshape, moving.affine, init_m) <= 0.0:
        gap = float(
            np.linalg.norm(
                _fov_corners(mshape, moving.affine).mean(0)
                - _fov_corners(fshape, fixed.affine).mean(0)
            )
        )
        raise RegistrationError(
            f"the fixed and moving images do not overlap in world space (their centres are "
            f"{gap:.0f} mm apart); initialise by centres of mass (--init com, or Initialise: "
            "centres of mass in the widget)."
        )


def _center_of_mass(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    w = np.clip(arr, 0, None).astype(np.float64)
    total = w.sum()
    n = arr.ndim
    if total <= 0:
        return _fov_corners(arr.shape, affine).mean(0)
    idx = []
    for a in range(n):
        other = tuple(b for b in range(n) if b != a)
        prof = w.sum(axis=other)
        idx.append(float((prof * np.arange(arr.shape[a])).sum() / total))
    return affine[:n, :n] @ np.array(idx) + affine[:n, n]


def register(
    fixed: ImageRecord,
    moving: ImageRecord,
    options: RegistrationOptions | None = None,
    *,
    moving_labels: ImageRecord | None = None,
    points: np.ndarray | None = None,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    outputs: bool = True,
) -> ProgressGen[RegistrationResult]:
    """Register ``moving`` to ``fixed`` (progress generator; returns a :class:`RegistrationResult`).

    Parameters
    ----------
    fixed, moving : ImageRecord
        Grey-level images (file axis order, voxel-to-world affines); grids, spacings and
        fields of view may differ. Both 3D (``space="RAS"``) or both 2D.
    options : RegistrationOptions, optional
    moving_labels : ImageRecord, optional
        Labels in the moving image's world (any grid), warped onto the fixed grid with nearest
        interpolation.
    points : (N, n) array, optional
        Points in the FIXED world (RAS mm ``x, y, z``), mapped into the MOVING world.
    fixed_mask, moving_mask : array, optional
        Non-zero where the similarity should count, on the fixed / moving grid.
    outputs : bool
        Also compute the Jacobian-determinant and deformation-magnitude maps.

    Yields
    ------
    Progress
        ``info={"loss": float, "stage": str, "level": int}`` every few iterations.

    Raises
    ------
    RegistrationError
        2D with 3D, NaNs, images that do not overlap in world space (with the hint to use
        centre-of-mass initialisation), masks on the wrong grid.
    """
    import torch

    opts = options or RegistrationOptions()
    opts.validate()
    check_inputs(fixed, moving)
    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    if opts.init != "com":  # before any work: the commonest mistake gets the fastest answer
        _check_overlap(fixed, moving, opts.init)
    yield Progress(0, 0, "preparing the image pyramid")
    eng = _Engine(fixed, moving, opts, fixed_mask, moving_mask)
    n = eng.n
    # ---------------------------------------------------------------- initial transform
    init = np.eye(n + 1)
    if opts.init == "com":
        init[:n, n] = _center_of_mass(eng.m_norm, eng.m_aff) - _center_of_mass(
            eng.f_norm, eng.f_aff
        )
    elif opts.init == "geometry":
        init[:n, n] = _fov_corners(eng.m_shape, eng.m_aff).mean(0) - eng.center
    _check_overlap(fixed, moving, init)
    stages = {"rigid": ["rigid"], "affine": ["rigid", "affine"]}.get(
        opts.mode, ["rigid", "affine", "deformable"]
    )
    plan = []
    for st in stages:
        lv = _levels_for(eng, st)
        for rank, li in enumerate(lv):
            # halve the iterations at each finer level: the coarse levels do most of the work
            its = opts.iterations / 2 ** (rank if st == "deformable" else 1)
            plan.append((st, li, max(min(5, opts.iterations), round(its))))
    total = sum(p[2] for p in plan) + 4
    done = 0
    dev = eng.device
    center = torch.from_numpy(eng.center).float().to(dev)
    init_t = torch.from_numpy(init).float().to(dev)
    rot = torch.zeros(n * (n - 1) // 2, device=dev, requires_grad=True)
    trans = torch.zeros(n, device=dev, requires_grad=True)
    lin = torch.zeros(n, n, device=dev, requires_grad=True)
    iu = torch.triu_indices(n, n, 1)

    def matrix(stage_lin: bool) -> Any:
        skew = torch.zeros(n, n, device=dev)
        skew = skew.index_put((iu[0], iu[1]), rot)
        skew = skew - skew.T
        r = torch.linalg.matrix_exp(skew)
        if stage_lin:
            r = r + lin
        top = torch.cat([r, (center + trans - r @ center)[:, None]], dim=1)
        bottom = torch.zeros(1, n + 1, device=dev)
        bottom[0, n] = 1.0
        return init_t @ torch.cat([top, bottom], dim=0)

    losses: list[float] = []
    velocity = None
    grid_shape: tuple | None = None
    disp_final = None
    f_sp = np.sqrt((eng.f_aff[:-1, :-1] ** 2).sum(0))
    with torch.no_grad():
        lev0 = eng.levels[-1]
        lf = eng._loss_fn(lev0)
        w, wt = eng._apply(lev0, torch.eye(n + 1, device=dev), None)
        before = -float(lf(lev0.fixed, w, wt)) if float(wt.sum()) > 0 else float("nan")
    for st, li, its in plan:
        lev = eng.levels[li]
        lf = eng._loss_fn(lev)
        if st == "deformable":
            g = tuple(max(2, math.ceil((s - 1) / opts.grid_step) + 1) for s in lev.shape)
            if velocity is None:
                velocity = torch.zeros((1, n, *g), device=dev)
            else:
                mode = "trilinear" if n == 3 else "bilinear"
                velocity = eng.F.interpolate(
                    velocity.detach(), size=g, mode=mode, align_corners=True
                )
            velocity.requires_grad_(True)
            grid_shape = g
            step = np.array(
                [(f - 1) / (gg - 1) if gg > 1 else 1.0 for f, gg in zip(eng.f_shape, g)]
            )
            grid_mm = f_sp * step
            # mm displacement -> normalised control-grid coordinates (grid_sample order)
            lin_inv = np.linalg.inv(eng.f_aff[:n, :n])
            k_np = (
                np.diag(
                    _norm_factors(g) * (np.array(g) - 1) / np.maximum(np.array(eng.f_shape) - 1, 1)
                )
                @ lin_inv
            )[::-1]
            k_mat = torch.from_numpy(k_np.copy()).float().to(dev)
            axes = [torch.linspace(-1, 1, s, device=dev) for s in g]
            base = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], -1)[None]
            lr = opts.learning_rate * lev.spacing
            optim = torch.optim.Adam([velocity], lr=lr)
            with torch.no_grad():
                mat_fixed = matrix(True).detach()
        else:
            params = [rot, trans] + ([lin] if st == "affine" else [])
            groups = [
                {"params": [rot], "lr": 0.01},
                {"params": [trans], "lr": 0.2 * lev.spacing},
            ]
            if st == "affine":
                groups.append({"params": [lin], "lr": 0.005})
            del params
            optim = torch.optim.Adam(groups)
        # linear decay to 10% of the step within each level: settles instead of jittering
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lambda i, its=its: 1.0 - 0.9 * min(i, its) / max(its, 1)
        )
        for it in range(its):
            optim.zero_grad(set_to_none=True)
            if st == "deformable":
                disp = eng._integrate(velocity, k_mat, base) if opts.diffeomorphic else velocity
                w, wt = eng._apply(lev, mat_fixed, disp)
                sim = lf(lev.fixed, w, wt)
                reg = eng._regulariser(disp, grid_mm)
                loss = sim + opts.regularization * reg
            else:
                w, wt = eng._apply(lev, matrix(st == "affine"), None)
                loss = lf(lev.fixed, w, wt)
            loss.backward()
            optim.step()
            sched.step()
            lv = float(loss.detach())
            losses.append(lv)
            done += 1
            if it % 2 == 0 or it == its - 1:
                yield Progress(
                    done,
                    total,
                    f"{st} level {li + 1}/{len(eng.levels)}: iteration {it + 1}/{its}, "
                    f"loss {lv:.4f}",
                    {"loss": lv, "stage": st, "level": li},
                )
        if st == "deformable":
            with torch.no_grad():
                disp_final = (
                    eng._integrate(velocity, k_mat, base) if opts.diffeomorphic else velocity
                ).detach()
    with torch.no_grad():
        mat = matrix(opts.mode != "rigid").detach()
        lev0 = eng.levels[-1]
        lf = eng._loss_fn(lev0)
        w, wt = eng._apply(lev0, mat, disp_final)
        after = -float(lf(lev0.fixed, w, wt)) if float(wt.sum()) > 0 else float("nan")
    transform = RegistrationTransform(
        matrix=mat.double().cpu().numpy(),
        fixed_affine=eng.f_aff,
        fixed_shape=tuple(eng.f_shape),
        space=fixed.space,
        displacement=None
        if disp_final is None
        else np.moveaxis(disp_final[0].double().cpu().numpy(), 0, -1),
        grid_shape=grid_shape if disp_final is not None else None,
    )
    sources = [(eng.m_arr, eng.m_aff, "linear")]
    if moving_labels is not None:
        lab = np.asarray(moving_labels.data)
        if lab.ndim != n:
            raise RegistrationError(
                f"the moving labels have {lab.ndim} axes; a {n}D label image was expected."
            )
        sources.append((lab, np.asarray(moving_labels.affine, dtype=float), "nearest"))
    done += 1
    yield Progress(done, total, "warping the moving image onto the fixed grid")
    warped_all = yield from _warp_gen(transform, sources, eng.device)
    warped = warped_all[0]
    warped_labels = warped_all[1] if moving_labels is not None else None
    mapped = None
    if points is not None:
        pts = np.asarray(points, dtype=float).reshape(-1, n)
        mapped = transform.map_points(pts)
    jac = mag = None
    folding = 0.0
    if outputs and transform.displacement is not None:
        done += 1
        yield Progress(done, total, "Jacobian determinant")
        jac, mag = jacobian_and_magnitude(transform)
        folding = float((jac <= 0).mean())
    secs = time.perf_counter() - t0
    yield Progress(total, total, f"done in {secs:.1f} s")
    prov = {
        "task": "registration",
        "options": asdict(opts),
        "similarity": eng.similarity,
        "device": str(eng.device),
        "fixed": fixed.path or fixed.name,
        "moving": moving.path or moving.name,
        "levels": [list(lv.shape) for lv in eng.levels],
        "seconds": round(secs, 3),
        "similarity_before": before,
        "similarity_after": after,
        "folding_fraction": folding,
    }
    return RegistrationResult(
        transform=transform,
        warped=warped,
        warped_labels=warped_labels,
        points=mapped,
        jacobian=jac,
        magnitude=mag,
        folding_fraction=folding,
        similarity=eng.similarity,
        similarity_before=before,
        similarity_after=after,
        losses=losses,
        seconds=secs,
        provenance=prov,
    )


# ============================================================================ warping


def _warp_gen(
    tr: RegistrationTransform,
    sources: list[tuple[np.ndarray, np.ndarray, str]],
    device: Any = "cpu",
    fill: float = 0.0,
) -> ProgressGen[list[np.ndarray]]:
    """Resample arrays of the moving world onto the fixed grid, slab by slab, in torch.

    Parameters
    ----------
    sources : list of (array, voxel-to-world affine, interpolation)
        ``interpolation`` is ``"linear"`` or ``"nearest"`` (labels; keeps the dtype).
    """
    import torch

    F = torch.nn.functional
    n = tr.ndim
    fshape = tuple(int(s) for s in tr.fixed_shape)
    mat = torch.from_numpy(np.asarray(tr.matrix, dtype=np.float64))
    prepared = []
    for arr, affine, interp in sources:
        arr = np.asarray(arr)
        src = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
        nf = _norm_factors(arr.shape)
        to_norm = np.eye(n + 1)
        to_norm[:n, :n] = np.diag(nf)
        to_norm[:n, n] = -1.0
        to_norm[:n] = to_norm[:n][::-1]
        g = torch.from_numpy(to_norm @ np.linalg.inv(np.asarray(affine, dtype=float))) @ mat
        limit = torch.tensor([1.0 + 0.5 * f if f > 0 else 1e9 for f in nf][::-1])[:, None]
        out_dtype = arr.dtype if interp == "nearest" else np.float32
        prepared.append(
            (
                src.to(device),
                g.float().to(device),
                limit.to(device),
                interp,
                out_dtype,
                np.empty(fshape, dtype=out_dtype),
            )
        )
    faff = torch.from_numpy(np.asarray(tr.fixed_affine, dtype=np.float64)).float().to(device)
    disp = None
    if tr.displacement is not None:
        disp = torch.from_numpy(np.moveaxis(np.asarray(tr.displacement, np.float32), -1, 0))
        disp = disp[None].contiguous().to(device)
    fnorm = torch.from_numpy(_norm_factors(fshape)).float().to(device)[:, None]
    per = int(np.prod(fshape[1:]))
    chunk = max(1, 1_000_000 // max(per, 1))
    with torch.no_grad():
        for i0 in range(0, fshape[0], chunk):
            i1 = min(fshape[0], i0 + chunk)
            sl = (i1 - i0, *fshape[1:])
            axes = [torch.arange(s, dtype=torch.float32, device=device) for s in sl]
            axes[0] = axes[0] + i0
            idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).reshape(n, -1)
            x = torch.addmm(faff[:n, n:], faff[:n, :n], idx)
            if disp is not None:
                dg = (idx * fnorm - 1.0).flip(0).T.reshape((1, *sl, n))
                d = F.grid_sample(
                    disp, dg, mode="bilinear", padding_mode="border", align_corners=True
                )
                x = x + d.reshape(n, -1)
            for src, g, limit, interp, out_dtype, out in prepared:
                grid = torch.addmm(g[:n, n:], g[:n, :n], x)
                valid = (grid.abs() <= limit).all(dim=0)
                vals = F.grid_sample(
                    src,
                    grid.T.reshape((1, *sl, n)),
                    mode="nearest" if interp == "nearest" else "bilinear",
                    padding_mode="border",
                    align_corners=True,
                ).reshape(-1)
                vals = torch.where(valid, vals, torch.full_like(vals, fill))
                out[i0:i1] = vals.reshape(sl).cpu().numpy().astype(out_dtype)
            yield Progress(i1, fshape[0], f"warping {i1}/{fshape[0]}")
    return [p[-1] for p in prepared]


def warp(
    transform: RegistrationTransform,
    record: ImageRecord,
    interpolation: str = "linear",
    fill: float = 0.0,
) -> np.ndarray:
    """Resample an image or labels of the moving world onto the transform's fixed grid.

    Parameters
    ----------
    transform : RegistrationTransform
    record : ImageRecord
        Any image lying in the moving image's world (any grid).
    interpolation : {"linear", "nearest"}
        ``nearest`` for labels (keeps the label values and dtype).
    fill : float
        Value outside the record's field of view.

    Returns
    -------
    array
        Fixed grid, fixed file axis order.
    """
    from napari_medseg.progress import run_sync

    arr = np.asarray(record.data)
    if arr.ndim != transform.ndim:
        raise RegistrationError(
            f"{record.name} has {arr.ndim} axes; a {transform.ndim}D image was expected."
        )
    return run_sync(_warp_gen(transform, [(arr, record.affine, interpolation)], "cpu", fill))[0]


def jacobian_and_magnitude(tr: RegistrationTransform) -> tuple[np.ndarray, np.ndarray]:
    """Jacobian determinant of ``T`` and ``|d|`` (mm), both on the fixed grid (file axes).

    The determinant is computed with central differences on the control grid, in world mm,
    ``det(M) * det(I + grad d)``, and interpolated linearly to the fixed voxels; values
    ``<= 0`` mark folding.
    """
    import torch

    n = tr.ndim
    lin = np.asarray(tr.matrix)[:n, :n]
    fixed_shape = tuple(tr.fixed_shape)
    if tr.displacement is None:
        return (
            np.full(fixed_shape, np.linalg.det(lin), np.float32),
            np.zeros(fixed_shape, np.float32),
        )
    d = np.asarray(tr.displacement, dtype=np.float64)  # (*g, n)
    ga = tr.grid_affine[:n, :n]
    grads = []
    for a in range(n):
        if d.shape[a] > 1:
            grads.append(np.gradient(d, axis=a))
        else:
            grads.append(np.zeros_like(d))
    jg = np.stack(grads, -1)  # (*g, n comp, n grid axis): d d_c / d g_a
    jw = jg @ np.linalg.inv(ga)  # d d_c / d x_b
    jw = jw + np.eye(n)
    det = np.linalg.det(jw) * np.linalg.det(lin)
    mag = np.sqrt((d**2).sum(-1))
    mode = "trilinear" if n == 3 else "bilinear"
    stack = torch.from_numpy(np.stack([det, mag]).astype(np.float32))[None]
    up = torch.nn.functional.interpolate(stack, size=fixed_shape, mode=mode, align_corners=True)
    return up[0, 0].numpy(), up[0, 1].numpy()


def dice(a: np.ndarray, b: np.ndarray, labels: list[int] | None = None) -> float:
    """Mean Dice over ``labels`` (all non-zero labels of ``a`` by default)."""
    a, b = np.asarray(a), np.asarray(b)
    labels = [int(v) for v in np.unique(a) if v != 0] if labels is None else labels
    scores = []
    for lab in labels:
        x, y = a == lab, b == lab
        s = x.sum() + y.sum()
        if s:
            scores.append(2.0 * np.logical_and(x, y).sum() / s)
    return float(np.mean(scores)) if scores else float("nan")


def checkerboard(a: np.ndarray, b: np.ndarray, squares: int = 8) -> np.ndarray:
    """Checkerboard of two same-shape images (each scaled to [0, 1] by its 1-99th percentiles).

    Parameters
    ----------
    a, b : array
        Same shape (e.g. fixed and warped on the fixed grid).
    squares : int
        Squares along the longest axis.
    """
    a = _normalise_intensity(np.asarray(a, dtype=np.float32), False)
    b = _normalise_intensity(np.asarray(b, dtype=np.float32), False)
    side = max(1, max(a.shape) // squares)
    parity = sum(np.indices(a.shape)[i] // side for i in range(a.ndim)) % 2
    return np.where(parity == 0, a, b).astype(np.float32)
