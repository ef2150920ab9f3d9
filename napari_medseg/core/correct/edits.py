"""Correction tools for label maps: each returns the changed region as an :class:`Edit`.

Every tool takes a label map (2D or 3D integer array, any axis order; in napari's volume layers
that is ``(S, A, R)``) plus, where distances matter, the voxel ``spacing`` in mm along those
same axes, and returns an :class:`Edit`: the bounding box it worked in and the new values
there. Nothing is modified in place, so a widget can write only the voxels that changed into
napari's labels history (one undo step) and a script can call :meth:`Edit.apply`.

Work is done inside the bounding box of the class (padded where the tool reaches outside it),
so a tool's cost follows the size of the structure, not of the scan: on a 512x512x200 volume
each tool takes well under a second (numbers in ``tests/core/test_corrections.py``).

Tools never overwrite another class unless asked (``overwrite=True``): growing, filling and
interpolating only paint background (0).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Edit",
    "bounding_box",
    "class_counts",
    "class_volumes",
    "edit_from_parts",
    "fill_holes",
    "grow_shrink",
    "interpolate_slices",
    "keep_largest_component",
    "relabel",
    "remove_islands",
    "update_counts",
]

Box = tuple[slice, ...]


@dataclass
class Edit:
    """The voxels a tool changes: full-array indices and their new values.

    Attributes
    ----------
    indices : tuple of numpy.ndarray
        One integer array per axis of the label map (a numpy fancy index), each voxel once.
    values : numpy.ndarray
        New label of each of those voxels (the label map's dtype).

    ``napari.layers.Labels.data_setitem(edit.indices, edit.values)`` inside
    ``layer.block_history()`` applies it as one undo step.
    """

    indices: tuple[np.ndarray, ...]
    values: np.ndarray

    @classmethod
    def empty(cls, labels: np.ndarray) -> Edit:
        """An edit that changes nothing."""
        return cls(
            tuple(np.zeros(0, np.intp) for _ in range(labels.ndim)), np.zeros(0, labels.dtype)
        )

    @property
    def n_changed(self) -> int:
        """Number of voxels that change."""
        return int(self.values.size)

    def apply(self, labels: np.ndarray, inplace: bool = False) -> np.ndarray:
        """The label map with this edit applied (a copy unless ``inplace``)."""
        out = labels if inplace else np.array(labels, copy=True)
        if self.values.size:
            out[self.indices] = self.values
        return out


def edit_from_parts(
    labels: np.ndarray, parts: list[tuple[Box, np.ndarray, Any]], dedupe: bool
) -> Edit:
    """Build one :class:`Edit` from pieces that each lie in a box of ``labels``.

    Parameters
    ----------
    labels : numpy.ndarray
        The label map the edit applies to (its shape and dtype).
    parts : list of (box, changed, value)
        ``box``: slices into ``labels``; ``changed``: bool mask of the voxels to change, the
        box's shape; ``value``: the new label, or an array of new labels in the box.
    dedupe : bool
        Keep only the first piece's value where pieces overlap (needed when they may).
    """
    idx: list[list[np.ndarray]] = [[] for _ in range(labels.ndim)]
    vals: list[np.ndarray] = []
    for box, changed, value in parts:
        local = np.nonzero(changed)
        if not local[0].size:
            continue
        for ax, (ix, s) in enumerate(zip(local, box)):
            idx[ax].append(ix.astype(np.intp) + s.start)
        v = value[changed] if isinstance(value, np.ndarray) else np.full(local[0].size, value)
        vals.append(v.astype(labels.dtype, copy=False))
    if not vals:
        return Edit.empty(labels)
    indices = tuple(np.concatenate(i) for i in idx)
    values = np.concatenate(vals)
    if dedupe and len(vals) > 1:
        flat = np.ravel_multi_index(indices, labels.shape)
        flat, first = np.unique(flat, return_index=True)
        indices = np.unravel_index(flat, labels.shape)
        values = values[first]
    return Edit(tuple(np.asarray(i, np.intp) for i in indices), values)


# --------------------------------------------------------------------------- helpers


def bounding_box(mask: np.ndarray, pad: Sequence[int] | int = 0) -> Box | None:
    """Bounding box of the True voxels of ``mask``, padded and clipped; None when empty."""
    pads = [int(pad)] * mask.ndim if np.isscalar(pad) else [int(p) for p in pad]  # type: ignore[union-attr]
    if mask.ndim == 3:
        p12 = mask.any(axis=0)
        hits = [
            np.flatnonzero(mask.any(axis=(1, 2))) if p12.any() else np.zeros(0, int),
            np.flatnonzero(p12.any(axis=1)),
            np.flatnonzero(p12.any(axis=0)),
        ]
    else:
        hits = []
        for ax in range(mask.ndim):
            other = tuple(a for a in range(mask.ndim) if a != ax)
            hits.append(np.flatnonzero(mask.any(axis=other) if other else mask))
    box = []
    for ax, hit in enumerate(hits):
        if hit.size == 0:
            return None
        lo = max(0, int(hit[0]) - pads[ax])
        hi = min(mask.shape[ax], int(hit[-1]) + 1 + pads[ax])
        box.append(slice(lo, hi))
    return tuple(box)


def _pad_box(box: Box, pad: Sequence[int], shape: Sequence[int]) -> Box:
    return tuple(slice(max(0, s.start - p), min(n, s.stop + p)) for s, p, n in zip(box, pad, shape))


def _spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=float)[-ndim:]
    if sp.size != ndim or np.any(sp <= 0):
        raise ValueError(f"spacing must hold {ndim} positive values, got {spacing}")
    return sp


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.generate_binary_structure(ndim, max(1, min(int(connectivity), ndim)))


BLOCK = 4


def _block_any(m: np.ndarray) -> np.ndarray:
    """``m`` (C-contiguous bool, every size a multiple of 4) reduced by 4-voxel blocks."""
    c = m.view(np.uint32) != 0  # last axis: 4 bytes -> one word
    for ax in range(m.ndim - 1):
        shp = list(c.shape)
        shp[ax : ax + 1] = [shp[ax] // BLOCK, BLOCK]
        c = c.reshape(shp).any(axis=ax + 1)
    return c


def _components(labels: np.ndarray, label: int) -> list[tuple[Box, np.ndarray, int]]:
    """Coarse connected pieces of one class, each in its own box.

    The class mask is reduced to 4-voxel blocks and those blocks are labelled with full
    connectivity, so every fine connected component (any connectivity) lies inside exactly
    one coarse piece. Tools then work piece by piece in small boxes: stray islands cost
    almost nothing even when they are spread over the whole scan.

    Returns
    -------
    list of (box, mask, bound)
        ``box``: slices into ``labels``; ``mask``: the piece's voxels of ``label`` in that box
        (other pieces excluded); ``bound``: an upper bound of its voxel count. Largest first.
    """
    from scipy import ndimage as ndi

    m = np.asarray(labels) == label
    box = bounding_box(m)
    if box is None:
        return []
    crop = m[box]
    shape = crop.shape
    padded = np.zeros([-(-n // BLOCK) * BLOCK for n in shape], dtype=bool)
    padded[tuple(slice(0, n) for n in shape)] = crop
    coarse = _block_any(padded)
    cl, n = ndi.label(coarse, structure=np.ones((3,) * m.ndim, dtype=bool))
    objs = ndi.find_objects(cl)
    nblocks = np.bincount(cl.ravel(), minlength=n + 1)
    out = []
    for i, cbox in enumerate(objs, start=1):
        if cbox is None:
            continue
        fine = tuple(
            slice(s.start * BLOCK, min(s.stop * BLOCK, dim)) for s, dim in zip(cbox, shape)
        )
        sub = padded[fine]
        cl_sub = cl[cbox]
        if cl_sub.max() != i or np.any((cl_sub != 0) & (cl_sub != i)):
            own = cl_sub == i
            for ax in range(own.ndim):
                own = np.repeat(own, BLOCK, axis=ax)
            sub = sub & own[tuple(slice(0, k) for k in sub.shape)]
        else:
            sub = sub.copy()
        gbox = tuple(slice(b.start + f.start, b.start + f.stop) for b, f in zip(box, fine))
        out.append((gbox, sub, int(nblocks[i]) * BLOCK**m.ndim))
    out.sort(key=lambda t: -t[2])
    return out


def _sq_dist_bounded(seed: np.ndarray, spacing: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """Squared Euclidean distance (mm^2) to the nearest ``seed`` voxel, exact up to the radius.

    Separable (Felzenszwalb & Huttenlocher's decomposition of the squared distance) with each
    1D pass limited to ``radius[ax]`` voxels: any voxel further than ``radius * spacing`` along
    an axis is further than the margin anyway. Voxels beyond every window hold ``inf``.
    """
    g = np.where(seed, np.float32(0), np.float32(np.inf))
    for ax, r in enumerate(radius):
        if r <= 0:
            continue
        out = g.copy()
        for d in range(1, int(r) + 1):
            if d >= g.shape[ax]:
                break
            w = np.float32((d * spacing[ax]) ** 2)
            a = [slice(None)] * g.ndim
            b = [slice(None)] * g.ndim
            a[ax], b[ax] = slice(d, None), slice(None, -d)
            np.minimum(out[tuple(a)], g[tuple(b)] + w, out=out[tuple(a)])
            np.minimum(out[tuple(b)], g[tuple(a)] + w, out=out[tuple(b)])
        g = out
    return g


# --------------------------------------------------------------------------- tools


def keep_largest_component(labels: np.ndarray, label: int, connectivity: int = 1) -> Edit:
    """Keep only the largest connected component of ``label``; the rest becomes background.

    Parameters
    ----------
    labels : numpy.ndarray
        2D or 3D integer label map.
    label : int
        The class to clean.
    connectivity : int
        1 = faces only, ``ndim`` = faces, edges and corners.
    """
    from scipy import ndimage as ndi

    pieces = _components(labels, label)
    st = _structure(labels.ndim, connectivity)
    best = (-1, 0, None)  # piece index, size, fine component mask
    for k, (_box, sub, bound) in enumerate(pieces):
        if bound <= best[1]:
            break  # pieces are sorted by bound: none of the rest can be larger
        cc, n = ndi.label(sub, structure=st)
        sizes = np.bincount(cc[sub]) if n else np.zeros(1, int)
        if n and sizes.max() > best[1]:
            best = (k, int(sizes.max()), cc == int(sizes.argmax()))
    parts = []
    for k, (box, sub, _bound) in enumerate(pieces):
        changed = sub & ~best[2] if k == best[0] else sub
        parts.append((box, changed, 0))
    return edit_from_parts(labels, parts, dedupe=False)


def remove_islands(
    labels: np.ndarray,
    label: int,
    min_voxels: int | None = None,
    min_mm3: float | None = None,
    spacing: Sequence[float] | None = None,
    connectivity: int = 1,
) -> Edit:
    """Remove connected components of ``label`` smaller than a size.

    Parameters
    ----------
    labels : numpy.ndarray
        2D or 3D integer label map.
    label : int
    min_voxels : int, optional
        Components with fewer voxels are removed.
    min_mm3 : float, optional
        The same in mm^3 (mm^2 for 2D maps); needs ``spacing``: a component is removed when
        ``voxels * voxel_volume < min_mm3``.
    spacing : sequence of float, optional
        Voxel size (mm) along each axis of ``labels``.
    connectivity : int
    """
    from scipy import ndimage as ndi

    if min_mm3 is not None:
        if spacing is None:
            raise ValueError("remove_islands: min_mm3 needs the voxel spacing")
        vox = float(np.prod(_spacing(spacing, labels.ndim)))
        min_vox = float(min_mm3) / vox
    elif min_voxels is not None:
        min_vox = float(min_voxels)
    else:
        raise ValueError("remove_islands: give min_voxels or min_mm3")
    st = _structure(labels.ndim, connectivity)
    parts = []
    for box, sub, bound in _components(labels, label):
        if bound < min_vox:
            parts.append((box, sub, 0))
            continue
        cc, n = ndi.label(sub, structure=st)
        if not n:
            continue
        sizes = np.bincount(cc.ravel())
        small = sizes < min_vox
        small[0] = False
        if small.any():
            parts.append((box, small[cc], 0))
    return edit_from_parts(labels, parts, dedupe=False)


def fill_holes(
    labels: np.ndarray, label: int, mode: str = "3d", axis: int = 0, overwrite: bool = False
) -> Edit:
    """Fill enclosed holes of ``label``.

    Parameters
    ----------
    labels : numpy.ndarray
        2D or 3D integer label map.
    label : int
    mode : {"3d", "2d"}
        ``"3d"``: background enclosed in the volume (face-connected background, as
        ``scipy.ndimage.binary_fill_holes``); ``"2d"``: background enclosed within each slice
        perpendicular to ``axis`` (what a reader sees when scrolling; also closes holes that
        open to the outside through a neighbouring slice).
    axis : int
        Slice axis for ``mode="2d"`` (0 = napari's slider axis).
    overwrite : bool
        Also fill over other classes inside a hole (default: background only).
    """
    from scipy import ndimage as ndi

    if mode not in ("2d", "3d"):
        raise ValueError(f"fill_holes: mode must be '2d' or '3d', got {mode!r}")
    nd = labels.ndim
    if mode == "2d" and nd == 3:
        st = np.zeros((3, 3, 3), dtype=bool)
        idx: list[Any] = [slice(None)] * 3
        idx[axis] = 1
        st[tuple(idx)] = ndi.generate_binary_structure(2, 1)
        border_axes = [a for a in range(3) if a != axis]
    else:
        st = ndi.generate_binary_structure(nd, 1)
        border_axes = list(range(nd))
    parts = []
    for box, sub, _bound in _components(labels, label):
        bg, n = ndi.label(~sub, structure=st)
        if not n:
            continue
        outside = np.zeros(n + 1, dtype=bool)
        for a in border_axes:
            for end in (0, -1):
                face: list[Any] = [slice(None)] * nd
                face[a] = end
                outside[np.unique(bg[tuple(face)])] = True
        outside[0] = True
        holes = ~outside[bg]
        if not holes.any():
            continue
        cur = np.asarray(labels[box])
        holes &= cur != label
        if not overwrite:
            holes &= cur == 0
        parts.append((box, holes, label))
    return edit_from_parts(labels, parts, dedupe=True)


def _signed_distance(mask2d: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Signed distance (mm) of a 2D mask: negative inside, positive outside."""
    from scipy import ndimage as ndi

    out = ndi.distance_transform_edt(~mask2d, sampling=sampling)
    inside = ndi.distance_transform_edt(mask2d, sampling=sampling)
    return (out - inside).astype(np.float32)


def interpolate_slices(
    labels: np.ndarray,
    label: int,
    axis: int = 0,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    align: bool = True,
) -> Edit:
    """Fill the slices between the slices where ``label`` was drawn (shape-based interpolation).

    Between two drawn slices ``i < j`` (slices perpendicular to ``axis`` that contain
    ``label``, with only empty slices between them) each slice ``k`` gets the region where the
    linear blend of the two slices' signed distance maps is ``<= 0``: shape-based
    interpolation (Raya & Udupa 1990), the idea behind 3D Slicer's "Fill between slices".
    Shapes that move or change size between the drawn slices morph smoothly.

    Parameters
    ----------
    labels : numpy.ndarray
        3D integer label map.
    label : int
    axis : int
        The slice axis (0 = napari's slider axis).
    spacing : sequence of float, optional
        Voxel size along each axis (only the in-plane values matter for the distances).
    overwrite : bool
        Also paint over other classes (default: background only).
    align : bool
        Move both drawn shapes towards each other's centroid before blending (so a structure
        that shifts more than its own width between the drawn slices, like a curving vessel,
        still connects); plain shape-based interpolation when False.
    """
    from scipy import ndimage as ndi

    if labels.ndim != 3:
        raise ValueError("interpolate_slices needs a 3D label map")
    sp = _spacing(spacing, 3)
    lab = np.moveaxis(np.asarray(labels), axis, 0)
    mask = lab == label
    drawn = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    in_plane = np.delete(sp, axis)
    others = [a for a in range(3) if a != axis]
    parts = []

    def sd(k: int, box2: Box) -> np.ndarray:
        return _signed_distance(mask[k][box2], in_plane)

    for i, j in itertools.pairwise(drawn):
        if j - i <= 1:
            continue
        # in-plane box: both drawn slices (a blend is positive outside both of them)
        b = bounding_box(mask[i] | mask[j], pad=1)
        assert b is not None
        sd_i, sd_j = sd(int(i), b), sd(int(j), b)
        delta = np.zeros(2)
        if align:
            delta = np.subtract(ndi.center_of_mass(mask[j][b]), ndi.center_of_mass(mask[i][b]))
        for k in range(i + 1, j):
            t = (k - i) / (j - i)
            a_k, b_k = sd_i, sd_j
            if np.abs(delta).max() >= 0.5:
                a_k = ndi.shift(sd_i, t * delta, order=1, mode="nearest")
                b_k = ndi.shift(sd_j, -(1.0 - t) * delta, order=1, mode="nearest")
            inside = (1.0 - t) * a_k + t * b_k <= 0
            cur = lab[k][b]
            inside &= cur != label
            if not overwrite:
                inside &= cur == 0
            box_f: list[slice] = [slice(int(k), int(k) + 1)] * 3
            box_f[others[0]], box_f[others[1]] = b[0], b[1]
            parts.append((tuple(box_f), np.expand_dims(inside, axis), label))
    return edit_from_parts(labels, parts, dedupe=False)


def grow_shrink(
    labels: np.ndarray,
    label: int,
    margin_mm: float,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
) -> Edit:
    """Grow (``margin_mm > 0``) or shrink (``< 0``) ``label`` by a distance in millimetres.

    Distances are Euclidean in mm with the voxel ``spacing`` (anisotropic voxels handled
    exactly, e.g. 0.8x0.8x5 mm CT): growing adds every voxel whose centre lies within
    ``margin_mm`` of a voxel centre of the class; shrinking removes every voxel of the class
    whose centre lies within ``|margin_mm|`` of a voxel centre outside it. Voxels beyond the
    edge of the array do not count as outside (a structure cut by the scan's edge is not
    eaten from that side).

    Parameters
    ----------
    labels : numpy.ndarray
        2D or 3D integer label map.
    label : int
    margin_mm : float
    spacing : sequence of float, optional
        Voxel size (mm) along each axis of ``labels`` (default 1).
    overwrite : bool
        When growing, also take voxels of other classes (default: background only).
    """
    sp = _spacing(spacing, labels.ndim)
    m = float(margin_mm)
    if m == 0:
        return Edit.empty(labels)
    radius = [int(np.floor(abs(m) / s + 1e-9)) for s in sp]
    m2 = np.float32(m * m * (1 + 1e-6))
    parts = []
    for box, sub, _bound in _components(labels, label):
        if m > 0:
            pbox = _pad_box(box, radius, labels.shape)
            seed = np.zeros([s.stop - s.start for s in pbox], dtype=bool)
            inner = tuple(slice(b.start - p.start, b.stop - p.start) for b, p in zip(box, pbox))
            seed[inner] = sub
            near = _sq_dist_bounded(seed, sp, radius) <= m2
            cur = np.asarray(labels[pbox])
            near &= cur != label
            if not overwrite:
                near &= cur == 0
            parts.append((pbox, near, label))
        else:
            pbox = _pad_box(box, [1] * labels.ndim, labels.shape)
            cur = np.asarray(labels[pbox])
            outside = cur != label
            near = _sq_dist_bounded(outside, sp, radius) <= m2
            inner = tuple(slice(b.start - p.start, b.stop - p.start) for b, p in zip(box, pbox))
            own = np.zeros_like(outside)
            own[inner] = sub
            parts.append((pbox, near & own, 0))
    return edit_from_parts(labels, parts, dedupe=m > 0)


def relabel(labels: np.ndarray, mapping: Mapping[int, int]) -> Edit:
    """Change class ids: ``{old: new}`` (merge several classes by mapping them to one id).

    ``{3: 0}`` deletes class 3; ``{2: 1, 3: 1}`` merges classes 2 and 3 into 1.
    """
    mapping = {int(k): int(v) for k, v in mapping.items() if int(k) != int(v)}
    if not mapping:
        return Edit.empty(labels)
    if labels.dtype.kind in "iu":
        info = np.iinfo(labels.dtype)
        for v in mapping.values():
            if not info.min <= v <= info.max:
                raise ValueError(f"label {v} does not fit the label map's type {labels.dtype}")
    parts = []
    for old, new in mapping.items():
        sel = np.asarray(labels) == old
        box = bounding_box(sel)
        if box is not None:
            parts.append((box, sel[box], new))
    return edit_from_parts(labels, parts, dedupe=False)


# --------------------------------------------------------------------------- measurements


def class_counts(labels: Any, chunk: int = 8_000_000) -> np.ndarray:
    """Voxel count of every label value ``0 .. max`` (int64 array), in bounded memory."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        arr = arr.view(np.uint8)
    if arr.dtype.kind not in "iu":
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError("class_counts: negative labels")
    flat = arr.reshape(-1)
    counts = np.zeros(1, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        c = np.bincount(flat[start : start + chunk])
        if c.size > counts.size:
            c[: counts.size] += counts
            counts = c
        else:
            counts[: c.size] += c
    return counts


def class_volumes(
    labels: Any, spacing: Sequence[float] | None = None, counts: np.ndarray | None = None
) -> dict[int, dict[str, float]]:
    """Voxel count and volume of each non-zero class present.

    Parameters
    ----------
    labels : array-like
        2D or 3D integer label map.
    spacing : sequence of float, optional
        Voxel size (mm) along each axis; without it ``mm3`` is None.
    counts : numpy.ndarray, optional
        Precomputed :func:`class_counts` (e.g. kept up to date with :func:`update_counts`).

    Returns
    -------
    dict
        ``{class: {"voxels": int, "mm3": float | None}}`` (mm^2 for 2D maps).
    """
    if counts is None:
        counts = class_counts(labels)
    nd = np.ndim(labels)
    vox = float(np.prod(_spacing(spacing, nd))) if spacing is not None else None
    return {
        int(c): {"voxels": int(n), "mm3": (float(n) * vox if vox is not None else None)}
        for c, n in enumerate(counts)
        if c and n
    }


def update_counts(counts: np.ndarray, old_values: Any, new_values: Any) -> np.ndarray:
    """Update per-class voxel counts after voxels changed from ``old_values`` to ``new_values``.

    Cheap enough to run on every napari paint event (the history atoms carry both).
    """
    old = np.asarray(old_values).ravel().astype(np.int64)
    new = np.broadcast_to(np.asarray(new_values), np.shape(old_values)).ravel().astype(np.int64)
    n = max(counts.size, int(old.max(initial=0)) + 1, int(new.max(initial=0)) + 1)
    out = np.zeros(n, dtype=np.int64)
    out[: counts.size] = counts
    out -= np.bincount(old, minlength=n)
    out += np.bincount(new, minlength=n)
    return out
