"""Warping through a registration transform: images and labels of the moving world resampled
onto the fixed grid (slab by slab, in torch), and the checkerboard view of two aligned images.

Points are mapped by
:meth:`~napari_medseg.core.register.transform.RegistrationTransform.map_points`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_medseg.core.register.transform import RegistrationError, RegistrationTransform
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import Progress, ProgressGen

__all__ = ["checkerboard", "grid_sample_scale", "normalise_intensity", "warp", "warp_gen"]


def grid_sample_scale(shape: tuple) -> np.ndarray:
    """Voxel index to :func:`torch.nn.functional.grid_sample` coordinate scale, per axis.

    With ``align_corners=True`` index ``i`` of an axis of length ``s`` lies at
    ``i * 2 / (s - 1) - 1``; axes of length 1 get 0.
    """
    return np.array([2.0 / (s - 1) if s > 1 else 0.0 for s in shape])


def normalise_intensity(arr: np.ndarray, is_label: bool) -> np.ndarray:
    """Grey levels scaled to [0, 1] by their 0.5-99.5th percentiles (float32).

    ``is_label``: masks become 0/1 (non-zero is 1) instead.
    """
    if is_label:
        mx = float(arr.max()) if arr.size else 1.0
        return (arr > 0).astype(np.float32) if mx > 0 else arr
    lo, hi = np.percentile(arr[:: max(1, arr.size // 2_000_000)], [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def warp_gen(
    tr: RegistrationTransform,
    sources: list[tuple[np.ndarray, np.ndarray, str]],
    device: Any = "cpu",
    fill: float = 0.0,
) -> ProgressGen[list[np.ndarray]]:
    """Resample arrays of the moving world onto the fixed grid, slab by slab, in torch.

    A progress generator (one step per slab along the first fixed axis); returns the warped
    arrays, in the order of ``sources``, on the fixed grid (fixed file axis order).

    Parameters
    ----------
    tr : RegistrationTransform
    sources : list of (array, voxel-to-world affine, interpolation)
        ``interpolation`` is ``"linear"`` or ``"nearest"`` (labels; keeps the dtype).
    device : str or torch.device
    fill : float
        Value where a fixed voxel maps outside a source's field of view.
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
        nf = grid_sample_scale(arr.shape)
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
    fnorm = torch.from_numpy(grid_sample_scale(fshape)).float().to(device)[:, None]
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
    return run_sync(warp_gen(transform, [(arr, record.affine, interpolation)], "cpu", fill))[0]


def checkerboard(a: np.ndarray, b: np.ndarray, squares: int = 8) -> np.ndarray:
    """Checkerboard of two same-shape images (each scaled to [0, 1] by its 1-99th percentiles).

    Parameters
    ----------
    a, b : array
        Same shape (e.g. fixed and warped on the fixed grid).
    squares : int
        Squares along the longest axis.
    """
    a = normalise_intensity(np.asarray(a, dtype=np.float32), False)
    b = normalise_intensity(np.asarray(b, dtype=np.float32), False)
    side = max(1, max(a.shape) // squares)
    parity = sum(np.indices(a.shape)[i] // side for i in range(a.ndim)) % 2
    return np.where(parity == 0, a, b).astype(np.float32)
