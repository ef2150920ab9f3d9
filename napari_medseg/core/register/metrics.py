"""Measures of a registration: field-of-view overlap, Jacobian determinant, folding and
deformation magnitude. Label overlap (Dice) is :func:`napari_medseg.core.engine.metrics.dice`;
target registration error is the distance between mapped and reference points,
``np.linalg.norm(transform.map_points(fixed_pts) - moving_pts, axis=1)``.
"""

from __future__ import annotations

import numpy as np

from napari_medseg.core.register.transform import RegistrationTransform

__all__ = ["folding_fraction", "jacobian_and_magnitude", "overlap_fraction"]


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


def folding_fraction(jacobian: np.ndarray) -> float:
    """Fraction of voxels where the transform folds (Jacobian determinant ``<= 0``).

    Parameters
    ----------
    jacobian : array
        Jacobian determinant on the fixed grid (:func:`jacobian_and_magnitude`).
    """
    return float((np.asarray(jacobian) <= 0).mean())
