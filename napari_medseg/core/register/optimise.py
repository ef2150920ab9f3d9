"""Image registration by instance optimisation: rigid, affine and deformable, in world space.

:func:`register` aligns a *moving* image to a *fixed* image. Both are
:class:`~napari_medseg.io.record.ImageRecord` with their own grids, spacings, orientations and
fields of view; everything happens in world coordinates (RAS millimetres for volumes, the
record's pixel frame for 2D images), so the images never need to share a grid. It returns a
:class:`~napari_medseg.core.register.transform.RegistrationTransform` (the transform convention
is documented there) inside a :class:`RegistrationResult`.

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

Steps of :func:`register`: check the inputs and options, build the pyramid and objective
(:class:`~napari_medseg.core.register.objective.Objective`), choose the initial matrix
(:func:`_initial_matrix`), plan the stages and levels (:func:`_stage_plan`), optimise each
level (:func:`_optimise_level`: linear parameters in :class:`_LinearParams`, the deformable
velocity grid in :class:`_Deformation`), then warp the moving image, labels and points and
measure the result (:func:`_warp_outputs`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from napari_medseg.core.register.metrics import (
    folding_fraction,
    jacobian_and_magnitude,
    labels_fov_report,
    overlap_fraction,
)
from napari_medseg.core.register.objective import Objective, PyramidLevel
from napari_medseg.core.register.transform import (
    RegistrationError,
    RegistrationTransform,
    fov_corners,
)
from napari_medseg.core.register.warp import grid_sample_scale, warp_gen
from napari_medseg.io.geometry import spacing_from_affine
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import Progress, ProgressGen

__all__ = [
    "INITS",
    "MODES",
    "REGULARIZERS",
    "SIMILARITIES",
    "RegistrationOptions",
    "RegistrationResult",
    "check_inputs",
    "register",
]

MODES = ("rigid", "affine", "deformable")
SIMILARITIES = ("auto", "lncc", "mi", "mse")
REGULARIZERS = ("diffusion", "bending")
INITS = ("identity", "com", "geometry")


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


# ---------------------------------------------------------------------------- checks


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


def _check_overlap(fixed: ImageRecord, moving: ImageRecord, init: Any) -> None:
    """Raise when the fixed field of view maps entirely outside the moving one."""
    n = fixed.spatial_ndim
    fshape, mshape = fixed.spatial_shape, moving.spatial_shape
    if isinstance(init, str):
        init_m = np.eye(n + 1)
        if init == "geometry":
            init_m[:n, n] = fov_corners(mshape, moving.affine).mean(0) - fov_corners(
                fshape, fixed.affine
            ).mean(0)
    else:
        init_m = init
    if overlap_fraction(fshape, fixed.affine, mshape, moving.affine, init_m) <= 0.0:
        gap = float(
            np.linalg.norm(
                fov_corners(mshape, moving.affine).mean(0)
                - fov_corners(fshape, fixed.affine).mean(0)
            )
        )
        raise RegistrationError(
            f"the fixed and moving images do not overlap in world space (their centres are "
            f"{gap:.0f} mm apart); initialise by centres of mass (--init com, or Initialise: "
            "centres of mass in the widget)."
        )


def _levels_for(eng: Objective, stage: str) -> list[int]:
    """Indices of the pyramid levels a stage runs on (coarse first)."""
    all_levels = list(range(len(eng.levels)))
    if stage == "deformable":
        return all_levels
    # linear stages: skip levels above ~300k voxels (they rarely change the answer)
    keep = [i for i in all_levels if np.prod(eng.levels[i].shape) <= 300_000]
    return keep or all_levels[:1]


def _center_of_mass(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World position of the intensity-weighted centre (negative values count as 0)."""
    w = np.clip(arr, 0, None).astype(np.float64)
    total = w.sum()
    n = arr.ndim
    if total <= 0:
        return fov_corners(arr.shape, affine).mean(0)
    idx = []
    for a in range(n):
        other = tuple(b for b in range(n) if b != a)
        prof = w.sum(axis=other)
        idx.append(float((prof * np.arange(arr.shape[a])).sum() / total))
    return affine[:n, :n] @ np.array(idx) + affine[:n, n]


# ---------------------------------------------------------------------------- the steps


def _initial_matrix(eng: Objective) -> np.ndarray:
    """Starting fixed-world -> moving-world matrix: identity, matched centres of mass
    (``init="com"``) or matched field-of-view centres (``init="geometry"``)."""
    n = eng.n
    init = np.eye(n + 1)
    if eng.opts.init == "com":
        init[:n, n] = _center_of_mass(eng.m_norm, eng.m_aff) - _center_of_mass(
            eng.f_norm, eng.f_aff
        )
    elif eng.opts.init == "geometry":
        init[:n, n] = fov_corners(eng.m_shape, eng.m_aff).mean(0) - eng.center
    return init


def _stage_plan(eng: Objective) -> list[tuple[str, int, int]]:
    """``(stage, level index, iterations)`` in the order they run, coarse to fine per stage."""
    opts = eng.opts
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
    return plan


class _LinearParams:
    """The rigid/affine parameters (rotation vector, translation, linear correction) about the
    fixed image's centre, composed after the initial matrix."""

    def __init__(self, eng: Objective, init: np.ndarray) -> None:
        torch = eng.torch
        n, dev = eng.n, eng.device
        self.torch, self.n, self.device = torch, n, dev
        self.center = torch.from_numpy(eng.center).float().to(dev)
        self.init = torch.from_numpy(init).float().to(dev)
        self.rot = torch.zeros(n * (n - 1) // 2, device=dev, requires_grad=True)
        self.trans = torch.zeros(n, device=dev, requires_grad=True)
        self.lin = torch.zeros(n, n, device=dev, requires_grad=True)
        self.iu = torch.triu_indices(n, n, 1)

    def matrix(self, with_linear: bool) -> Any:
        """``(n+1, n+1)`` fixed-world -> moving-world matrix (a torch tensor with gradients)."""
        torch, n, dev = self.torch, self.n, self.device
        skew = torch.zeros(n, n, device=dev)
        skew = skew.index_put((self.iu[0], self.iu[1]), self.rot)
        skew = skew - skew.T
        r = torch.linalg.matrix_exp(skew)
        if with_linear:
            r = r + self.lin
        top = torch.cat([r, (self.center + self.trans - r @ self.center)[:, None]], dim=1)
        bottom = torch.zeros(1, n + 1, device=dev)
        bottom[0, n] = 1.0
        return self.init @ torch.cat([top, bottom], dim=0)

    def optimiser(self, stage: str, spacing: float) -> Any:
        """Adam over the rotation and translation (and the linear part for ``affine``)."""
        groups = [
            {"params": [self.rot], "lr": 0.01},
            {"params": [self.trans], "lr": 0.2 * spacing},
        ]
        if stage == "affine":
            groups.append({"params": [self.lin], "lr": 0.005})
        return self.torch.optim.Adam(groups)


@dataclass
class _Deformation:
    """The deformable stage's state: a velocity field on a control grid spanning the fixed image.

    ``velocity`` is ``(1, n, *grid_shape)`` in mm; at each level the grid is rebuilt for that
    level's shape and the previous velocity upsampled onto it. ``k_mat`` maps mm displacements
    to normalised control-grid coordinates, ``base`` is the identity sampling grid and
    ``grid_mm`` the control spacing in mm.
    """

    velocity: Any = None
    grid_shape: tuple | None = None
    grid_mm: np.ndarray | None = None
    k_mat: Any = None
    base: Any = None
    final: Any = None  # the integrated displacement after the last level

    def start_level(self, eng: Objective, lev: PyramidLevel) -> None:
        """Build the control grid of ``lev`` and carry the velocity over from the coarser level."""
        torch, n, dev, opts = eng.torch, eng.n, eng.device, eng.opts
        g = tuple(max(2, math.ceil((s - 1) / opts.grid_step) + 1) for s in lev.shape)
        if self.velocity is None:
            self.velocity = torch.zeros((1, n, *g), device=dev)
        else:
            mode = "trilinear" if n == 3 else "bilinear"
            self.velocity = eng.F.interpolate(
                self.velocity.detach(), size=g, mode=mode, align_corners=True
            )
        self.velocity.requires_grad_(True)
        self.grid_shape = g
        step = np.array([(f - 1) / (gg - 1) if gg > 1 else 1.0 for f, gg in zip(eng.f_shape, g)])
        self.grid_mm = np.asarray(spacing_from_affine(eng.f_aff)) * step
        # mm displacement -> normalised control-grid coordinates (grid_sample order)
        lin_inv = np.linalg.inv(eng.f_aff[:n, :n])
        k_np = (
            np.diag(
                grid_sample_scale(g) * (np.array(g) - 1) / np.maximum(np.array(eng.f_shape) - 1, 1)
            )
            @ lin_inv
        )[::-1]
        self.k_mat = torch.from_numpy(k_np.copy()).float().to(dev)
        axes = [torch.linspace(-1, 1, s, device=dev) for s in g]
        self.base = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], -1)[None]

    def displacement(self, eng: Objective) -> Any:
        """The displacement ``d`` (1, n, *grid) in mm: the integrated velocity (diffeomorphic)
        or the velocity itself."""
        if eng.opts.diffeomorphic:
            return eng.integrate(self.velocity, self.k_mat, self.base)
        return self.velocity


def _similarity(eng: Objective, matrix: Any, disp: Any | None) -> float:
    """The similarity (higher is better) on the finest level optimised; NaN without overlap."""
    with eng.torch.no_grad():
        lev0 = eng.levels[-1]
        lf = eng.loss_fn(lev0)
        w, wt = eng.apply(lev0, matrix, disp)
        return -float(lf(lev0.fixed, w, wt)) if float(wt.sum()) > 0 else float("nan")


def _optimise_level(
    eng: Objective,
    linear: _LinearParams,
    deformation: _Deformation,
    stage: str,
    li: int,
    its: int,
    losses: list[float],
    done: int,
    total: int,
) -> ProgressGen[int]:
    """Run ``its`` Adam iterations of one stage on pyramid level ``li``.

    Appends each loss to ``losses``, yields progress every other iteration and returns the
    updated progress count.
    """
    torch, opts = eng.torch, eng.opts
    lev = eng.levels[li]
    lf = eng.loss_fn(lev)
    if stage == "deformable":
        deformation.start_level(eng, lev)
        optim = torch.optim.Adam([deformation.velocity], lr=opts.learning_rate * lev.spacing)
        with torch.no_grad():
            mat_fixed = linear.matrix(True).detach()
    else:
        optim = linear.optimiser(stage, lev.spacing)
    # linear decay to 10% of the step within each level: settles instead of jittering
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda i, its=its: 1.0 - 0.9 * min(i, its) / max(its, 1)
    )
    for it in range(its):
        optim.zero_grad(set_to_none=True)
        if stage == "deformable":
            disp = deformation.displacement(eng)
            w, wt = eng.apply(lev, mat_fixed, disp)
            sim = lf(lev.fixed, w, wt)
            reg = eng.regulariser(disp, deformation.grid_mm)
            loss = sim + opts.regularization * reg
        else:
            w, wt = eng.apply(lev, linear.matrix(stage == "affine"), None)
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
                f"{stage} level {li + 1}/{len(eng.levels)}: iteration {it + 1}/{its}, "
                f"loss {lv:.4f}",
                {"loss": lv, "stage": stage, "level": li},
            )
    if stage == "deformable":
        with torch.no_grad():
            deformation.final = deformation.displacement(eng).detach()
    return done


def _warp_outputs(
    eng: Objective,
    transform: RegistrationTransform,
    moving_labels: ImageRecord | None,
    points: np.ndarray | None,
    outputs: bool,
    done: int,
    total: int,
) -> ProgressGen[tuple]:
    """Warp the moving image (and labels) onto the fixed grid, map the points, and (deformable,
    ``outputs``) compute the Jacobian determinant, displacement magnitude and folding.

    Returns ``(warped, warped_labels, mapped_points, jacobian, magnitude, folding_fraction)``.
    """
    n = eng.n
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
    warped_all = yield from warp_gen(transform, sources, eng.device)
    warped_labels = warped_all[1] if moving_labels is not None else None
    mapped = None
    if points is not None:
        mapped = transform.map_points(np.asarray(points, dtype=float).reshape(-1, n))
    jac = mag = None
    folding = 0.0
    if outputs and transform.displacement is not None:
        done += 1
        yield Progress(done, total, "Jacobian determinant")
        jac, mag = jacobian_and_magnitude(transform)
        folding = folding_fraction(jac)
    return warped_all[0], warped_labels, mapped, jac, mag, folding


# ---------------------------------------------------------------------------- register


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
    eng = Objective(fixed, moving, opts, fixed_mask, moving_mask)
    init = _initial_matrix(eng)
    _check_overlap(fixed, moving, init)
    plan = _stage_plan(eng)
    total = sum(p[2] for p in plan) + 4
    linear = _LinearParams(eng, init)
    deformation = _Deformation()
    before = _similarity(eng, torch.eye(eng.n + 1, device=eng.device), None)
    losses: list[float] = []
    done = 0
    for stage, li, its in plan:
        done = yield from _optimise_level(
            eng, linear, deformation, stage, li, its, losses, done, total
        )
    with torch.no_grad():
        mat = linear.matrix(opts.mode != "rigid").detach()
    disp = deformation.final
    after = _similarity(eng, mat, disp)
    transform = RegistrationTransform(
        matrix=mat.double().cpu().numpy(),
        fixed_affine=eng.f_aff,
        fixed_shape=tuple(eng.f_shape),
        space=fixed.space,
        displacement=None if disp is None else np.moveaxis(disp[0].double().cpu().numpy(), 0, -1),
        grid_shape=deformation.grid_shape if disp is not None else None,
    )
    warped, warped_labels, mapped, jac, mag, folding = yield from _warp_outputs(
        eng, transform, moving_labels, points, outputs, done, total
    )
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
        "notes": [],
    }
    if moving_labels is not None and warped_labels is not None:
        report = labels_fov_report(
            np.asarray(moving_labels.data),
            moving_labels.affine,
            eng.m_shape,
            eng.m_aff,
            warped_labels,
            eng.f_aff,
        )
        prov["labels"] = report
        if report["note"]:  # never an all-zero label map in silence
            prov["notes"].append(f"labels: {report['note']}")
            warnings.warn(f"registration: labels: {report['note']}.", UserWarning, stacklevel=2)
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
