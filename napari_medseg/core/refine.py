"""Click-guided refinement of a mask: re-segment the region around positive/negative clicks.

Model-free version: a random walker (Grady 2006, :func:`skimage.segmentation.random_walker`)
on the image intensities inside a region of interest around the clicks. Seeds:

* positive clicks (a small disc) are the structure, negative clicks are background;
* the current mask is the structure except within ``reach_mm`` of a negative click, and the
  background is background except within ``reach_mm`` of a positive click;
* those zones are decided by the random walker, which follows intensity edges. So a positive
  click only adds, a negative click only removes, and further than ``reach_mm`` from every
  click nothing changes.

So a positive click in a missed region adds the region around it up to its edges, a negative
click in a false region removes it, and the rest of the mask is left alone. Work happens in the
2D slice of each click (``mode="2d"``, the reader's view, well under a second on a CPU) or in
a 3D box (``mode="3d"``).

:func:`simulate_click` places the click a user would make from a ground-truth mask (the point
of the largest error region farthest from its boundary), for benchmarks and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .corrections import Edit, _edit

__all__ = ["refine_with_clicks", "simulate_click"]


def _norm(img: np.ndarray, window: Sequence[float] | None = None) -> np.ndarray:
    lo, hi = (float(window[0]), float(window[1])) if window else np.percentile(img, [1, 99])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img.astype(np.float32) - lo) / (hi - lo), 0, 1)


def _disc(shape: Sequence[int], centre: Sequence[float], r_vox: np.ndarray) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d = sum(((g - c) / max(r, 1e-6)) ** 2 for g, c, r in zip(grids, centre, r_vox))
    return d <= 1.0


def _refine_region(
    img: np.ndarray,
    cur: np.ndarray,
    pos: list[np.ndarray],
    neg: list[np.ndarray],
    sp: np.ndarray,
    reach_mm: float,
    seed_mm: float,
    beta: float,
    window: Sequence[float] | None = None,
) -> np.ndarray:
    """Random walker in one region; returns the new mask of the structure there."""
    from skimage.segmentation import random_walker

    shape = img.shape
    seeds = np.zeros(shape, np.uint8)
    near_pos = np.zeros(shape, bool)
    near_neg = np.zeros(shape, bool)
    for c in pos:
        near_pos |= _disc(shape, c, reach_mm / sp)
    for c in neg:
        near_neg |= _disc(shape, c, reach_mm / sp)
    # positive clicks only add, negative clicks only remove; away from the clicks (further
    # than reach_mm) nothing changes: the current mask is the seed there
    fg = cur & ~near_neg
    bg = ~cur & ~near_pos
    seeds[bg] = 2
    seeds[fg] = 1
    for c in pos:
        seeds[_disc(shape, c, seed_mm / sp)] = 1
    for c in neg:
        seeds[_disc(shape, c, seed_mm / sp)] = 2
    if not (seeds == 1).any():
        return np.zeros(shape, bool)
    if not (seeds == 2).any():
        return cur | (seeds == 1)
    if not (seeds == 0).any():
        return seeds == 1
    import warnings

    with warnings.catch_warnings():
        # tolerance notes about probabilities just outside [0, 1]: harmless for the argmax
        warnings.filterwarnings("ignore", message="The probability range", category=UserWarning)
        # few unknown pixels (the usual case): a direct sparse solve, fast whatever beta is;
        # many (big 3D regions): conjugate gradients
        mode = "bf" if int((seeds == 0).sum()) <= 300_000 else "cg_j"
        out = random_walker(
            _norm(img, window),
            seeds,
            beta=beta,
            mode=mode,
            tol=1e-3,
            spacing=sp,
            return_full_prob=False,
        )
    return out == 1


def refine_with_clicks(
    image: np.ndarray,
    labels: np.ndarray,
    label: int,
    positive: Sequence[Sequence[float]] = (),
    negative: Sequence[Sequence[float]] = (),
    spacing: Sequence[float] | None = None,
    *,
    mode: str = "2d",
    axis: int = 0,
    reach_mm: float = 25.0,
    seed_mm: float = 1.5,
    beta: float = 2000.0,
    window: Sequence[float] | None = None,
    overwrite: bool = False,
) -> Edit:
    """Re-segment ``label`` around the clicks; returns the change as an :class:`Edit`.

    Parameters
    ----------
    image : numpy.ndarray
        Intensities on the same grid and axes as ``labels`` (one channel).
    labels : numpy.ndarray
        2D or 3D integer label map.
    label : int
        The structure to refine.
    positive, negative : sequence of coordinates
        Click positions in voxel indices of ``labels`` (napari data coordinates).
    spacing : sequence of float, optional
        Voxel size in mm along each axis (default 1).
    mode : {"2d", "3d"}
        ``"2d"``: refine in the slice (perpendicular to ``axis``) of each click; ``"3d"``: in a
        3D box around all clicks.
    axis : int
        Slice axis for ``"2d"`` on a 3D map.
    reach_mm : float
        How far from a click the structure may change (the region is the clicks' box padded
        by ``1.5 * reach_mm``).
    seed_mm : float
        Radius of the seed disc painted at each click.
    beta : float
        Random-walker edge sensitivity (on intensities scaled to [0, 1]). The defaults
        (``reach_mm=25``, ``beta=2000``) scored best of a small sweep on the spleen CT and the
        DSB nuclei (``benchmarks/bench_click_refine.py``).
    window : (low, high), optional
        Intensity window to work in (e.g. the contrast limits the reader sees, a CT soft-tissue
        window); default: the 1st-99th percentiles of the region.
    overwrite : bool
        Let the structure grow over other classes (default: only background and itself).
    """
    labels_arr = np.asarray(labels)
    img = np.asarray(image)
    if img.shape != labels_arr.shape:
        raise ValueError(f"image {img.shape} and labels {labels_arr.shape} must share a grid")
    nd = labels_arr.ndim
    sp = np.ones(nd) if spacing is None else np.asarray(spacing, float)[-nd:]
    pos = [np.asarray(p, float)[-nd:] for p in positive]
    neg = [np.asarray(p, float)[-nd:] for p in negative]
    if not pos and not neg:
        return Edit.empty(labels_arr)
    groups: list[tuple[tuple[slice, ...], list, list]] = []
    if mode == "2d" and nd == 3:
        ks = sorted({round(p[axis]) for p in pos + neg})
        for k in ks:
            gp = [p for p in pos if round(p[axis]) == k]
            gn = [p for p in neg if round(p[axis]) == k]
            groups.append((_region(labels_arr.shape, gp + gn, sp, reach_mm, axis, k), gp, gn))
    elif mode in ("2d", "3d"):
        groups.append((_region(labels_arr.shape, pos + neg, sp, reach_mm, None, None), pos, neg))
    else:
        raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")
    parts = []
    for box, gp, gn in groups:
        off = np.array([s.start for s in box], float)
        keep = [i for i, s in enumerate(box) if s.stop - s.start > 1 or nd == 2]
        if len(keep) < nd and mode == "2d":
            squeeze = [i for i in range(nd) if i not in keep]
        else:
            squeeze, keep = [], list(range(nd))
        sub_lab = labels_arr[box]
        sub_img = img[box].astype(np.float32)
        cur = sub_lab == label
        if squeeze:
            sub_img, cur2 = sub_img.squeeze(tuple(squeeze)), cur.squeeze(tuple(squeeze))
        else:
            cur2 = cur
        spk = sp[keep]
        gp2 = [(p - off)[keep] for p in gp]
        gn2 = [(p - off)[keep] for p in gn]
        new = _refine_region(sub_img, cur2, gp2, gn2, spk, reach_mm, seed_mm, beta, window)
        if squeeze:
            new = np.expand_dims(new, tuple(squeeze))
        allowed = (sub_lab == 0) | (sub_lab == label) if not overwrite else np.ones_like(cur)
        add = new & ~cur & allowed
        remove = cur & ~new
        after = np.array(sub_lab, copy=True)
        after[add] = label
        after[remove] = 0
        parts.append((box, add | remove, after))
    return _edit(labels_arr, parts, dedupe=len(parts) > 1)


def _region(
    shape: Sequence[int],
    clicks: list[np.ndarray],
    sp: np.ndarray,
    reach_mm: float,
    axis: int | None,
    k: int | None,
) -> tuple[slice, ...]:
    pts = np.array(clicks)
    pad = np.ceil(1.5 * reach_mm / sp).astype(int)
    lo = np.floor(pts.min(axis=0)).astype(int) - pad
    hi = np.ceil(pts.max(axis=0)).astype(int) + pad + 1
    box = [slice(max(0, int(a)), min(int(n), int(b))) for a, b, n in zip(lo, hi, shape)]
    if axis is not None and k is not None:
        box[axis] = slice(int(k), int(k) + 1)
    return tuple(box)


def simulate_click(
    truth: np.ndarray, current: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, bool] | None:
    """The click a careful user would make next: inside the largest error, far from its edge.

    Parameters
    ----------
    truth, current : numpy.ndarray
        Boolean masks of the structure (ground truth and the current segmentation).

    Returns
    -------
    (coordinates, positive) or None
        Voxel indices of the click and whether it is positive (a missed region) or negative
        (a false region); None when there is no error.
    """
    from scipy import ndimage as ndi

    truth = np.asarray(truth, bool)
    current = np.asarray(current, bool)
    sp = None if spacing is None else np.asarray(spacing, float)[-truth.ndim :]
    best: Any = None
    for positive, err in ((True, truth & ~current), (False, current & ~truth)):
        if not err.any():
            continue
        d = ndi.distance_transform_edt(np.pad(err, 1), sampling=sp)
        d = d[tuple(slice(1, -1) for _ in range(err.ndim))]
        i = int(np.argmax(d))
        if best is None or d.flat[i] > best[0]:
            best = (d.flat[i], np.array(np.unravel_index(i, err.shape)), positive)
    if best is None:
        return None
    return best[1], best[2]
