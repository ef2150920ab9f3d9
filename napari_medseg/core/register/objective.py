"""The differentiable objective of a registration: an image pyramid of the fixed and moving
images, the warp of a level's moving image through a matrix and a displacement, the similarity
(LNCC, MI or MSE), the deformation regulariser and the scaling-and-squaring integration.

:func:`napari_medseg.core.register.optimise.register` drives it; tensors live on one device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.core.register.transform import RegistrationError, fov_corners
from napari_medseg.core.register.warp import grid_sample_scale, normalise_intensity
from napari_medseg.io.geometry import spacing_from_affine
from napari_medseg.io.record import ImageRecord

if TYPE_CHECKING:
    from napari_medseg.core.register.optimise import RegistrationOptions

__all__ = ["Objective", "PyramidLevel", "as_float_array"]


def as_float_array(record: ImageRecord, what: str) -> np.ndarray:
    """The record's grey levels as one float32 spatial array (trailing length-1 axes dropped).

    Raises :class:`RegistrationError` for RGB, extra axes, single slices and NaN/inf values;
    ``what`` (``"fixed"``/``"moving"``) names the image in the message.
    """
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


@dataclass
class PyramidLevel:
    """One pyramid level: tensors of the fixed and moving images and the sampling geometry."""

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


class Objective:
    """The pyramid, similarity, regulariser and integration of one registration."""

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
        self.f_arr = as_float_array(fixed, "fixed")
        self.m_arr = as_float_array(moving, "moving")
        self.f_shape = self.f_arr.shape
        self.m_shape = self.m_arr.shape
        self.f_aff = np.asarray(fixed.affine, dtype=float)
        self.m_aff = np.asarray(moving.affine, dtype=float)
        self.similarity = self._pick_similarity()
        both_labels = self.similarity == "mse" and fixed.modality == moving.modality == "label"
        self.f_norm = normalise_intensity(self.f_arr, both_labels)
        self.m_norm = normalise_intensity(self.m_arr, both_labels)
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
        self.center = fov_corners(self.f_shape, self.f_aff).mean(0)
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

    def _build_levels(self) -> list[PyramidLevel]:
        torch = self.torch
        f_sp = np.asarray(spacing_from_affine(self.f_aff))
        m_sp = np.asarray(spacing_from_affine(self.m_aff))
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
            norm = full_idx * grid_sample_scale(self.f_shape) - 1.0
            field_grid = torch.from_numpy(norm[:, ::-1].copy()).float()
            field_grid = field_grid.reshape((1, *shape, self.n)).to(self.device)
            m_inv = np.linalg.inv(self._level_affine(self.m_aff, mf))
            m_shape = tuple(moving.shape[2:])
            nf = grid_sample_scale(m_shape)
            to_norm = np.eye(self.n + 1)
            to_norm[: self.n, : self.n] = np.diag(nf)
            to_norm[: self.n, self.n] = -1.0
            to_norm[: self.n] = to_norm[: self.n][::-1]
            limit = np.array([1.0 + 0.5 * f if f > 0 else 1e9 for f in nf])[::-1]
            levels.append(
                PyramidLevel(
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

    def apply(self, lev: PyramidLevel, matrix: Any, disp: Any | None) -> tuple[Any, Any]:
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

    def loss_fn(self, lev: PyramidLevel) -> Any:
        """``loss(fixed, warped, weight)`` of the chosen similarity on ``lev`` (lower is better)."""
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

    def regulariser(self, disp: Any, grid_spacing_mm: np.ndarray) -> Any:
        """Diffusion or bending energy of ``disp`` (1, n, *grid) in mm on a grid of that spacing."""
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

    def integrate(self, v: Any, k_mat: Any, base: Any, steps: int = 7) -> Any:
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
