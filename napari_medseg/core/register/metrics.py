"""Measures of a registration: field-of-view overlap, Jacobian determinant, folding and
deformation magnitude. Label overlap (Dice) is :func:`napari_medseg.core.engine.metrics.dice`;
target registration error is the distance between mapped and reference points,
``np.linalg.norm(transform.map_points(fixed_pts) - moving_pts, axis=1)``.
"""

from __future__ import annotations

import numpy as np

from napari_medseg.core.register.transform import RegistrationTransform

__all__ = ["folding_fraction", "jacobian_and_magnitude", "labels_fov_report", "overlap_fraction"]


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


def labels_fov_report(
    labels: np.ndarray,
    labels_affine: np.ndarray,
    moving_shape: tuple,
    moving_affine: np.ndarray,
    warped_labels: np.ndarray,
    fixed_affine: np.ndarray,
    max_points: int = 200_000,
) -> dict:
    """How much of a label map lies inside the moving image and survives the warp.

    Labels drawn on another grid can lie partly or wholly outside the moving image's field of
    view; the warp then returns zeros there (all zeros when none overlaps) and nothing says so.

    Parameters
    ----------
    labels : array
        Moving labels in their file axis order; ``labels_affine`` maps their voxels to world mm.
    moving_shape, moving_affine
        The moving image's spatial shape and voxel-to-world affine.
    warped_labels : array
        The labels resampled onto the fixed grid; ``fixed_affine`` its voxel-to-world affine.
    max_points : int
        Labelled voxels tested (an even subsample beyond this many).

    Returns
    -------
    dict
        ``inside_moving_fov`` (fraction of labelled voxels inside the moving image's field of
        view), ``volume_ml_before``/``volume_ml_after`` (labelled volume in mL before and after
        the warp), ``kept`` (their ratio) and ``note`` (a sentence when labels were lost, else
        ``""``).
    """
    lab = np.asarray(labels)
    n = len(moving_shape)
    idx = np.argwhere(lab != 0)
    if len(idx) == 0:
        return {"inside_moving_fov": 1.0, "volume_ml_before": 0.0, "volume_ml_after": 0.0,
                "kept": 1.0, "note": ""}  # fmt: skip
    if len(idx) > max_points:
        idx = idx[:: int(np.ceil(len(idx) / max_points))]
    to_moving = np.linalg.inv(np.asarray(moving_affine, float)) @ np.asarray(labels_affine, float)
    m_idx = idx @ to_moving[:n, :n].T + to_moving[:n, n]
    inside = float(
        np.all((m_idx >= -0.5) & (m_idx <= np.asarray(moving_shape) - 0.5), axis=1).mean()
    )

    def voxel_ml(aff: np.ndarray) -> float:
        return float(abs(np.linalg.det(np.asarray(aff, float)[:n, :n]))) / 1000.0

    before = float(np.count_nonzero(lab)) * voxel_ml(labels_affine)
    after = float(np.count_nonzero(np.asarray(warped_labels))) * voxel_ml(fixed_affine)
    kept = after / before if before else 1.0
    note = ""
    if inside < 0.99:
        note = (
            f"{100 * (1 - inside):.0f}% of the labelled voxels lie outside the moving image's "
            "field of view (the labels are on another grid?); "
        )
    if kept < 0.5 or after == 0:
        note += (
            f"the warped labels keep {100 * kept:.0f}% of the labelled volume "
            f"({after:.2f} of {before:.2f} mL)" + ("; they are all zero" if after == 0 else "")
        )
    elif note:
        note += f"the warped labels keep {100 * kept:.0f}% of the labelled volume"
    return {
        "inside_moving_fov": round(inside, 4),
        "volume_ml_before": round(before, 4),
        "volume_ml_after": round(after, 4),
        "kept": round(kept, 4),
        "note": note.strip("; "),
    }
