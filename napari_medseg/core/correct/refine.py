"""Click-guided refinement of a mask: re-segment the region around positive/negative clicks.

Model-free version: a random walker (Grady 2006, :func:`skimage.segmentation.random_walker`)
on the image intensities inside a region of interest around the clicks. Seeds:

* positive clicks (a small disc) are the structure, negative clicks are background;
* the current mask is the structure except within ``reach`` of a negative click, and the
  background is background except within ``reach`` of a positive click;
* those zones are decided by the random walker, which follows intensity edges. So a positive
  click only adds, a negative click only removes, and further than ``reach`` from every
  click nothing changes.

So a positive click in a missed region adds the region around it up to its edges, a negative
click in a false region removes it, and the rest of the mask is left alone. Work happens in the
2D slice of each click (``mode="2d"``, the reader's view, well under a second on a CPU) or in
a 3D box (``mode="3d"``).

Learned version (``method="learned"``, DeepEdit/nnInteractive style): a small 2D U-Net (the
built-in ``click_refine_2d``, :func:`load_click_model`) takes four channels over the same region
of interest, ``[image scaled to [0, 1], current mask, positive-click map, negative-click map]``
(:func:`click_model_input`; click maps are Gaussians of ``sigma`` pixels, :func:`click_maps`),
and predicts the structure there. Its prediction is held to the same guarantee as the random
walker: it may add only within ``reach`` of a positive click and remove only within
``reach`` of a negative click (and, by default, only the connected piece touching a click),
the seed discs are forced to their click's side, and nothing else changes. It works in the 2D
slice of each click (a 3D volume is refined slice by slice, in each click's slice) on the
slice's pixels, without resampling.

:func:`simulate_click` places the click a user would make from a ground-truth mask (the point
of the largest error region farthest from its boundary), for benchmarks and tests;
:func:`simulate_session` plays a series of such clicks and scores each step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_medseg.core.correct.edits import Edit, edit_from_parts
from napari_medseg.core.engine.metrics import dice
from napari_medseg.errors import MedsegError

__all__ = [
    "BUILTIN_CLICK_MODEL",
    "METHODS",
    "apply_click_prediction",
    "click_maps",
    "click_model_input",
    "load_click_model",
    "predict_clicks",
    "refine_with_clicks",
    "simulate_click",
    "simulate_session",
]

#: Refinement methods of :func:`refine_with_clicks`.
METHODS = ("random_walker", "learned")
#: Registry name of the built-in learned click model.
BUILTIN_CLICK_MODEL = "click_refine_2d"
#: ``extra["interactive"]`` value that marks a click-refinement model card.
CLICK_MODEL_KIND = "clicks"


def to_unit_range(img: np.ndarray, window: Sequence[float] | None = None) -> np.ndarray:
    """``img`` as float32 in [0, 1]: ``window`` (low, high; e.g. the viewer's CT window in HU),
    else the 1st-99th percentiles, mapped to 0-1 and clipped (any shape, any axis order)."""
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
    reach: float,
    seed_radius: float,
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
        near_pos |= _disc(shape, c, reach / sp)
    for c in neg:
        near_neg |= _disc(shape, c, reach / sp)
    # positive clicks only add, negative clicks only remove; away from the clicks (further
    # than reach) nothing changes: the current mask is the seed there
    fg = cur & ~near_neg
    bg = ~cur & ~near_pos
    seeds[bg] = 2
    seeds[fg] = 1
    for c in pos:
        seeds[_disc(shape, c, seed_radius / sp)] = 1
    for c in neg:
        seeds[_disc(shape, c, seed_radius / sp)] = 2
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
            to_unit_range(img, window),
            seeds,
            beta=beta,
            mode=mode,
            tol=1e-3,
            spacing=sp,
            return_full_prob=False,
        )
    return out == 1


# --------------------------------------------------------------------------- learned model


def click_maps(
    shape: Sequence[int],
    positive: Sequence[Sequence[float]] = (),
    negative: Sequence[Sequence[float]] = (),
    sigma: float = 2.0,
) -> np.ndarray:
    """Encode clicks as two Gaussian maps (DeepEdit style).

    Parameters
    ----------
    shape : (rows, cols)
        Pixel grid of the region.
    positive, negative : sequence of (row, col)
        Click positions in pixel indices of that grid (may be fractional).
    sigma : float
        Gaussian width in pixels.

    Returns
    -------
    numpy.ndarray
        ``(2, rows, cols)`` float32: channel 0 positive, channel 1 negative clicks; each pixel
        holds ``max over clicks of exp(-d^2 / (2 sigma^2))`` (1 at a click, 0 without clicks).
    """
    out = np.zeros((2, *tuple(int(n) for n in shape)), np.float32)
    grids = np.ogrid[tuple(slice(0, int(n)) for n in shape)]
    for ch, clicks in ((0, positive), (1, negative)):
        for c in clicks:
            c = np.asarray(c, float)[-len(shape) :]
            d2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
            np.maximum(out[ch], np.exp(-d2 / (2.0 * sigma**2)).astype(np.float32), out=out[ch])
    return out


def click_model_input(
    image01: np.ndarray,
    mask: np.ndarray,
    positive: Sequence[Sequence[float]] = (),
    negative: Sequence[Sequence[float]] = (),
    sigma: float = 2.0,
) -> np.ndarray:
    """The four input channels of a click model for one 2D region.

    Parameters
    ----------
    image01 : (rows, cols) array
        Intensities already scaled to [0, 1] (as :func:`refine_with_clicks` does: the window,
        else the region's 1st-99th percentiles).
    mask : (rows, cols) bool array
        The current mask of the structure.
    positive, negative : sequence of (row, col)
        Clicks in pixel indices of the region.
    sigma : float
        Click Gaussian width in pixels (:func:`click_maps`).

    Returns
    -------
    numpy.ndarray
        ``(4, rows, cols)`` float32: ``[image, mask, positive clicks, negative clicks]``.
    """
    image01 = np.asarray(image01, np.float32)
    if image01.ndim != 2 or np.shape(mask) != image01.shape:
        raise MedsegError(
            f"a click model needs a 2D image and mask of one shape, got {image01.shape} and "
            f"{np.shape(mask)}"
        )
    x = np.empty((4, *image01.shape), np.float32)
    x[0] = image01
    x[1] = np.asarray(mask, bool)
    x[2:] = click_maps(image01.shape, positive, negative, sigma)
    return x


_MODEL_CACHE: dict[tuple[str, float], Any] = {}


def _check_click_card(card: Any) -> None:
    kind = (card.extra or {}).get("interactive")
    if (card.task, kind, card.dims, card.in_channels, card.out_channels) != (
        "interactive",
        CLICK_MODEL_KIND,
        2,
        4,
        2,
    ):
        raise MedsegError(
            f"model {card.name!r} is not a click-refinement model: it needs a 2D card with "
            "4 input channels (image, mask, positive and negative clicks), 2 classes and "
            '"interactive": "clicks"'
        )


def load_click_model(name_or_path: Any = None, device: str = "cpu") -> Any:
    """Load a learned click-refinement model (the built-in ``click_refine_2d`` by default).

    Parameters
    ----------
    name_or_path : str, path or LoadedModel, optional
        A registry name, a model folder, or an already loaded model (checked and returned).
    device : str
        Where the network runs (``"cpu"`` is fast enough: well under a second per click).

    Returns
    -------
    napari_medseg.models.networks.LoadedModel
        Cached per folder and weights file version, so a dock can call this on every click.

    Raises
    ------
    MedsegError
        Unknown name or path, damaged weights, or a model that is not a click model.
    """
    from napari_medseg.models.networks import LoadedModel

    if isinstance(name_or_path, LoadedModel):
        _check_click_card(name_or_path.card)
        return name_or_path
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise MedsegError(
            f"a click model must be a registry name, a model folder or a loaded model, "
            f"not {type(name_or_path).__name__}"
        )
    from napari_medseg.models.registry import load_model, resolve_model

    path = resolve_model(name_or_path or BUILTIN_CLICK_MODEL)
    card_file = path / "model.json" if path.is_dir() else path
    key = (f"{path.resolve()}|{device}", card_file.stat().st_mtime if card_file.exists() else 0)
    if key not in _MODEL_CACHE:
        loaded = load_model(path, device=device)
        _check_click_card(loaded.card)
        _MODEL_CACHE.clear()  # one click model at a time is plenty
        _MODEL_CACHE[key] = loaded
    return _MODEL_CACHE[key]


def predict_clicks(model: Any, x: np.ndarray) -> np.ndarray:
    """Foreground probability of a click model for one or more 2D regions.

    Parameters
    ----------
    model : LoadedModel
        From :func:`load_click_model`.
    x : ``(4, rows, cols)`` or ``(B, 4, rows, cols)`` float32
        :func:`click_model_input` output (any size: padded to the network's stride here).

    Returns
    -------
    numpy.ndarray
        ``(rows, cols)`` or ``(B, rows, cols)`` float32 probabilities in [0, 1].
    """
    import torch

    single = x.ndim == 3
    xb = x[None] if single else x
    h, w = xb.shape[-2:]
    m = _stride_multiple(model.card)
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        xb = np.pad(xb, ((0, 0), (0, 0), (0, ph), (0, pw)))
    dev = next(model.network.parameters()).device
    from napari_medseg.core.engine.fastpath import prepare_network

    net, _ = prepare_network(model.network, dev, "auto", fold_bn=False)  # one click: no copy
    with torch.inference_mode():
        logits = net(torch.from_numpy(np.ascontiguousarray(xb, np.float32)).to(dev))
        prob = torch.softmax(logits.float(), dim=1)[:, 1, :h, :w].cpu().numpy()
    return prob[0] if single else prob


def _stride_multiple(card: Any) -> int:
    strides = (card.architecture.get("kwargs") or {}).get("strides") or []
    return int(np.prod([int(np.max(s)) for s in strides])) if strides else 1


def apply_click_prediction(
    pred: np.ndarray,
    cur: np.ndarray,
    pos: Sequence[np.ndarray],
    neg: Sequence[np.ndarray],
    sp: Sequence[float] | np.ndarray,
    reach: float,
    seed_radius: float,
    connected: bool = True,
) -> np.ndarray:
    """Hold a predicted mask to the clicks' guarantee; returns the new mask of the region.

    A pixel may be added only within ``reach`` of a positive click and removed only within
    ``reach`` of a negative click; seed discs (``seed_radius``) are forced to their click's side;
    with ``connected`` only the added (removed) pieces that touch a positive (negative) seed
    disc are kept, so a click changes the object under it and not a neighbour.
    """
    from scipy import ndimage as ndi

    sp = np.asarray(sp, float)
    shape = cur.shape
    pred = np.asarray(pred, bool).copy()
    near_pos = np.zeros(shape, bool)
    near_neg = np.zeros(shape, bool)
    seed_pos = np.zeros(shape, bool)
    seed_neg = np.zeros(shape, bool)
    for c in pos:
        near_pos |= _disc(shape, c, reach / sp)
        seed_pos |= _disc(shape, c, seed_radius / sp)
    for c in neg:
        near_neg |= _disc(shape, c, reach / sp)
        seed_neg |= _disc(shape, c, seed_radius / sp)
    pred |= seed_pos
    pred &= ~seed_neg
    add = pred & ~cur & near_pos
    remove = ~pred & cur & near_neg
    if connected:
        for change, seed in ((add, seed_pos), (remove, seed_neg)):
            if change.any():
                lab, _ = ndi.label(change)
                ids = np.unique(lab[seed & change])
                change &= np.isin(lab, ids[ids > 0])
    return (cur | add) & ~remove


def _refine_region_learned(
    model: Any,
    img: np.ndarray,
    cur: np.ndarray,
    pos: list[np.ndarray],
    neg: list[np.ndarray],
    sp: np.ndarray,
    reach: float,
    seed_radius: float,
    window: Sequence[float] | None,
    connected: bool,
) -> np.ndarray:
    sigma = float((model.card.extra or {}).get("click_sigma_px", 2.0))
    x = click_model_input(to_unit_range(img, window), cur, pos, neg, sigma)
    pred = predict_clicks(model, x) > 0.5
    return apply_click_prediction(pred, cur, pos, neg, sp, reach, seed_radius, connected)


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
    reach: float = 25.0,
    seed_radius: float = 1.5,
    beta: float = 2000.0,
    window: Sequence[float] | None = None,
    overwrite: bool = False,
    method: str = "random_walker",
    model: Any = None,
    connected: bool = True,
    reach_mm: float | None = None,
    seed_mm: float | None = None,
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
    reach : float
        How far from a click the structure may change, in the units of ``spacing``: mm when
        ``spacing`` is the scan's voxel size in mm, pixels for a 2D image without one (spacing
        1). The region worked on is the clicks' box padded by ``1.5 * reach``.
    seed_radius : float
        Radius of the seed disc painted at each click (units of ``spacing``).
    beta : float
        Random-walker edge sensitivity (on intensities scaled to [0, 1]). The defaults
        (``reach=25``, ``beta=2000``) scored best of a small sweep on the spleen CT and the
        DSB nuclei (``benchmarks/bench_click_refine.py``).
    window : (low, high), optional
        Intensity window to work in (e.g. the contrast limits the reader sees, a CT soft-tissue
        window); default: the 1st-99th percentiles of the region.
    overwrite : bool
        Let the structure grow over other classes (default: only background and itself).
    method : {"random_walker", "learned"}
        Model-free random walker, or the learned click model (2D: ``mode="2d"`` only; it works
        on the slice's pixels as they are).
    model : str, path or LoadedModel, optional
        The click model for ``method="learned"`` (default: the built-in ``click_refine_2d``,
        see :func:`load_click_model`).
    connected : bool
        Learned method: keep only the added/removed pieces that touch a click.
    reach_mm, seed_mm : float, optional
        Former names of ``reach`` and ``seed_radius`` (they are not always mm: on a 2D image
        without a pixel size they are pixels); still accepted, and they win when given.

    Both methods keep the guarantee: a positive click only adds, a negative click only
    removes, and nothing further than ``reach`` from every click changes.

    Raises
    ------
    MedsegError
        Unknown method, a learned model in ``mode="3d"``, or a model that cannot be loaded or
        is not a click model.
    """
    if method not in METHODS:
        raise MedsegError(f"unknown refinement method {method!r}; use one of {', '.join(METHODS)}")
    loaded = None
    if method == "learned":
        if mode == "3d" and np.ndim(labels) == 3:
            raise MedsegError(
                "the learned click model works in 2D slices: use mode='2d' (the slice of each "
                "click) or the random walker for a 3D region"
            )
        loaded = load_click_model(model)
    labels_arr = np.asarray(labels)
    img = np.asarray(image)
    if img.shape != labels_arr.shape:
        raise ValueError(f"image {img.shape} and labels {labels_arr.shape} must share a grid")
    nd = labels_arr.ndim
    sp = np.ones(nd) if spacing is None else np.asarray(spacing, float)[-nd:]
    reach = float(reach if reach_mm is None else reach_mm)
    seed_radius = float(seed_radius if seed_mm is None else seed_mm)
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
            groups.append((_region(labels_arr.shape, gp + gn, sp, reach, axis, k), gp, gn))
    elif mode in ("2d", "3d"):
        groups.append((_region(labels_arr.shape, pos + neg, sp, reach, None, None), pos, neg))
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
        if loaded is not None:
            new = _refine_region_learned(
                loaded, sub_img, cur2, gp2, gn2, spk, reach, seed_radius, window, connected
            )
        else:
            new = _refine_region(sub_img, cur2, gp2, gn2, spk, reach, seed_radius, beta, window)
        if squeeze:
            new = np.expand_dims(new, tuple(squeeze))
        allowed = (sub_lab == 0) | (sub_lab == label) if not overwrite else np.ones_like(cur)
        add = new & ~cur & allowed
        remove = cur & ~new
        after = np.array(sub_lab, copy=True)
        after[add] = label
        after[remove] = 0
        parts.append((box, add | remove, after))
    return edit_from_parts(labels_arr, parts, dedupe=len(parts) > 1)


def _region(
    shape: Sequence[int],
    clicks: list[np.ndarray],
    sp: np.ndarray,
    reach: float,
    axis: int | None,
    k: int | None,
) -> tuple[slice, ...]:
    pts = np.array(clicks)
    pad = np.ceil(1.5 * reach / sp).astype(int)
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


def simulate_session(
    image: np.ndarray,
    truth: np.ndarray,
    start: np.ndarray,
    n_clicks: int = 5,
    spacing: Sequence[float] | None = None,
    **kwargs: Any,
) -> tuple[list[float], list[float]]:
    """Play ``n_clicks`` simulated clicks on a 2D image and score each step.

    Each step places the next click with :func:`simulate_click` (largest error of the current
    mask), then calls :func:`refine_with_clicks` with all clicks so far, as a user pressing
    Refine after each click would.

    Parameters
    ----------
    image : (rows, cols) array
        Intensities.
    truth, start : (rows, cols) bool arrays
        Ground truth and the starting mask.
    n_clicks : int
    spacing : (row, col) mm, optional
    **kwargs
        Passed to :func:`refine_with_clicks` (``method``, ``model``, ``window``, ...).

    Returns
    -------
    dice : list of float
        Dice of the start and after each click (``n_clicks + 1`` values; when no error is
        left the last value is repeated).
    seconds : list of float
        Wall time of each refinement call.
    """
    import time

    truth = np.asarray(truth, bool)
    cur = np.asarray(start, bool).astype(np.uint8)
    pos: list[np.ndarray] = []
    neg: list[np.ndarray] = []
    scores = [dice(cur == 1, truth, [1], empty=1.0)]
    seconds: list[float] = []
    for _ in range(n_clicks):
        c = simulate_click(truth, cur == 1, spacing)
        if c is None:
            scores.append(scores[-1])
            continue
        (pos if c[1] else neg).append(c[0].astype(float))
        t0 = time.perf_counter()
        edit = refine_with_clicks(image, cur, 1, pos, neg, spacing, **kwargs)
        seconds.append(time.perf_counter() - t0)
        cur = edit.apply(cur)
        scores.append(dice(cur == 1, truth, [1], empty=1.0))
    return scores, seconds
