"""Intensity normalisation and the map between a file's voxel grid and a model's grid.

Normalisation schemes are the ones a model card names (see :mod:`napari_medseg.models.card`).

Grid convention
---------------
:func:`to_model_grid` takes an :class:`~napari_medseg.io.record.ImageRecord` (array in the file's
own axis order) to the grid a model was trained on, in two steps:

1. **Reorientation** (3D models): transpose and flip the file axes so they point to the card's
   ``orientation`` codes (e.g. ``"RAS"``), with nibabel's orientation utilities. This is exact
   (no interpolation). Oblique scans go to the closest axes, as MONAI's ``Orientation`` does.
2. **Resampling** to ``card.spacing`` (mm, model axis order) with ``F.interpolate``
   (trilinear, ``align_corners=False``) on the chosen device. The new size along an axis is
   ``round(n * spacing / card.spacing)`` and both grids cover the same field of view (voxel
   *edges* line up), so the effective spacing is ``n * spacing / new_n`` (within half a voxel of
   the card's) and the inverse is the same operation with the source size: going back lands on
   the source voxels exactly. ``card.spacing is None`` means no resampling.

2D models on a 3D volume run slice by slice along the acquisition axis: the file axis with the
largest spacing (the last one on ties, the NIfTI slice axis). It is moved last, the in-plane
axes keep the file order (no reorientation), ``card.spacing`` (2 values) resamples in-plane
only. 2D images (``space="pixel"``) keep their ``(row, col)`` axes, RGB goes channels-first;
they are resampled only when both ``card.spacing`` and ``record.metadata["mpp"]`` are known
(micrometres per pixel). A card with ``normalization["raster_axes"] == "xy"`` (MONAI bundles:
MONAI's ``LoadImage`` reads PNG/JPEG/TIFF as ``(x, y)``, i.e. ``(col, row)``) sees 2D images
transposed, as the bundle's network does in MONAI.

A card with ``normalization["resize"]`` (MONAI's ``Resize``:
``{"spatial_size": [...], "size_mode": "all" | "longest", "align_corners": bool,
"mode": "linear" | "area"}``) resizes the reoriented image to a fixed shape with
``F.interpolate``'s (bi/tri)linear arithmetic, or with its ``"area"`` mode (each model voxel
the mean of the source voxels its box overlaps, torch's adaptive average pooling), instead of
resampling to a spacing; its inverse is the same resize back to the source shape, in the same
mode, as MONAI's ``Invertd`` does. ``resize["intensity_steps_before"] = k`` runs the first
``k`` of the card's ``monai_steps`` before the resize and the rest after it (MONAI's order:
e.g. a CT window clipped before area averaging is not the same as after it).

A card with ``extra["guidance_channels"] = n`` (an interactive MONAI bundle such as DeepEdit,
run in automatic mode) gets ``n`` channels of zeros appended to the image on the model grid:
the click-guidance channels its network takes, empty because no clicks are given.

:class:`GridMap` undoes the map onto the source file grid: labels with nearest neighbour (an
index gather, exact for any integer dtype), probabilities with (tri)linear interpolation, and
:meth:`GridMap.argmax_to_source` which interpolates class probabilities one class at a time and
keeps the running argmax (same result as interpolating all probabilities then argmax, with
memory for two float maps instead of ``K``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.card import ModelCard

__all__ = [
    "GridMap",
    "normalize",
    "replace_nonfinite",
    "resize_grid",
    "slice_axis_of",
    "to_model_grid",
]

_MAX_STAT_SAMPLES = 2_000_000


# --------------------------------------------------------------------------- intensities


def replace_nonfinite(array: np.ndarray) -> tuple[np.ndarray, int]:
    """Replace NaN and +-Inf by the smallest finite value, in place for float arrays.

    Returns
    -------
    array : numpy.ndarray
        The same array (float arrays) with non-finite voxels replaced (0 when none is finite).
    n : int
        How many voxels were replaced.
    """
    a = np.asarray(array)
    if not np.issubdtype(a.dtype, np.floating):
        return a, 0
    bad = ~np.isfinite(a)
    n = int(bad.sum())
    if n:
        finite = a[~bad]
        a[bad] = finite.min() if finite.size else 0.0
    return a, n


def _sample(x: np.ndarray) -> np.ndarray:
    """A strided sample of at most ~2 million voxels for statistics (deterministic)."""
    flat = x.reshape(-1)
    step = max(1, int(np.ceil(flat.size / _MAX_STAT_SAMPLES)))
    return flat[::step]


def normalize(
    array: Any, card_normalization: dict | None, channel_axis: int | None = 0, copy: bool = True
) -> np.ndarray:
    """Normalise intensities as a model card says.

    Parameters
    ----------
    array : array-like
        Image with spatial axes and (optionally) a channel axis at ``channel_axis``.
    card_normalization : dict
        ``{"scheme": "ct", "window": [lo, hi]}`` (clip HU, scale to [0, 1]);
        ``{"scheme": "zscore", "foreground_only": true, "foreground_percentile": 1.0}``
        (per channel ``(x - mean) / std``; with ``foreground_only`` the statistics use voxels
        above the channel's ``foreground_percentile``-th percentile, i.e. not the air/background;
        fixed ``"mean"``/``"std"`` may be given instead);
        ``{"scheme": "percentile", "lower": 0.5, "upper": 99.5}`` (clip to the per-channel
        percentiles, scale to [0, 1]); ``{"scheme": "rgb", "mean": [...], "std": [...]}``
        (values to [0, 1] by dtype - uint8 /255, uint16 /65535, floats above 1 /255 - then
        per-channel ``(x - mean) / std`` when given); ``{"scheme": "none"}`` or ``None``.
    channel_axis : int or None
        Axis holding channels (``None``: a single-channel image).
    copy : bool
        ``False`` lets a float32 input be normalised in place (saves a copy of big volumes).

    Returns
    -------
    numpy.ndarray
        float32, same shape. NaN/Inf are replaced by the finite minimum first (with a warning).
    """
    norm = dict(card_normalization or {"scheme": "none"})
    if norm.get("monai_steps"):
        return monai_intensity(array, norm["monai_steps"], channel_axis=channel_axis)
    scheme = str(norm.get("scheme", "none")).lower()
    src = np.asarray(array)
    src_dtype = src.dtype
    x = src.astype(np.float32, copy=copy)
    x, n_bad = replace_nonfinite(x)
    if n_bad:
        warnings.warn(
            f"napari-medseg: the image has {n_bad} NaN/Inf voxels; they were replaced by the "
            "smallest finite value",
            RuntimeWarning,
            stacklevel=2,
        )
    if x.size == 0:
        raise MedsegError("the image is empty (it has no voxels)")
    if channel_axis is None:
        chans = [x]
    else:
        x = np.moveaxis(x, channel_axis, 0)
        chans = list(x)  # views: edits write through into x

    if scheme == "none":
        pass
    elif scheme == "ct":
        lo, hi = (float(v) for v in norm.get("window", [-1000.0, 1000.0]))
        if hi <= lo:
            raise MedsegError(f"the CT window {lo, hi} of the model card is empty")
        for c in chans:
            np.clip(c, lo, hi, out=c)
            c -= lo
            c *= 1.0 / (hi - lo)
            np.clip(c, 0.0, 1.0, out=c)
    elif scheme == "zscore":
        means, stds = norm.get("mean"), norm.get("std")
        for i, c in enumerate(chans):
            if means is not None and stds is not None:
                m = float(np.atleast_1d(means)[i % np.size(means)])
                s = float(np.atleast_1d(stds)[i % np.size(stds)])
            else:
                sample = _sample(c)
                if norm.get("foreground_only", False):
                    thr = np.percentile(sample, float(norm.get("foreground_percentile", 1.0)))
                    fg = sample[sample > thr]
                    if fg.size > 0:
                        sample = fg
                m = float(sample.mean(dtype=np.float64))
                s = float(sample.std(dtype=np.float64))
            c -= m
            c *= 1.0 / max(s, 1e-8)
    elif scheme == "percentile":
        lo_p, hi_p = float(norm.get("lower", 0.5)), float(norm.get("upper", 99.5))
        for c in chans:
            lo, hi = np.percentile(_sample(c), [lo_p, hi_p])
            np.clip(c, lo, hi, out=c)
            c -= lo
            c *= 1.0 / max(float(hi - lo), 1e-8)
            np.clip(c, 0.0, 1.0, out=c)  # float rounding must not leave [0, 1]
    elif scheme == "rgb":
        if src_dtype == np.uint8:
            scale = 1.0 / 255.0
        elif src_dtype == np.uint16:
            scale = 1.0 / 65535.0
        else:
            scale = 1.0 / 255.0 if float(np.max(_sample(x))) > 1.0 else 1.0
        mean, std = norm.get("mean"), norm.get("std")
        for i, c in enumerate(chans):
            c *= scale
            if mean is not None:
                c -= float(np.atleast_1d(mean)[i % np.size(mean)])
            if std is not None:
                c *= 1.0 / float(np.atleast_1d(std)[i % np.size(std)])
    else:
        raise MedsegError(
            f"unknown intensity normalisation {scheme!r} in the model card; "
            "use ct, zscore, percentile, rgb or none"
        )
    if channel_axis is not None:
        x = np.moveaxis(x, 0, channel_axis)
    return x


def monai_intensity(array: Any, steps: list[dict], channel_axis: int | None = 0) -> np.ndarray:
    """MONAI's intensity transforms, in order, with MONAI's exact arithmetic (no sampling).

    A MONAI bundle's card lists its ``preprocessing`` intensity transforms as
    ``normalization["monai_steps"]``; each step is one of

    * ``{"op": "range", "a_min", "a_max", "b_min", "b_max", "clip"}`` (``ScaleIntensityRange``:
      ``(x - a_min) / (a_max - a_min) * (b_max - b_min) + b_min``, clipped to ``[b_min, b_max]``);
    * ``{"op": "normalize", "nonzero", "channel_wise"}`` (``NormalizeIntensity``: mean and
      population std over all voxels, or over the voxels ``!= 0`` only, which alone change);
    * ``{"op": "minmax", "minv", "maxv", "channel_wise"}`` (``ScaleIntensity``: min-max to
      ``[minv, maxv]``);
    * ``{"op": "percentiles", "lower", "upper", "b_min", "b_max", "clip", "relative",
      "channel_wise"}`` (``ScaleIntensityRangePercentiles``).

    Parameters
    ----------
    array : array-like
        Image with a channel axis at ``channel_axis`` (``None``: one channel).
    steps : list of dict
        The steps above.
    channel_axis : int or None
        Axis of the channels.

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    x = np.array(array, dtype=np.float32, copy=True)
    if channel_axis is None:
        x = x[None]
    else:
        x = np.moveaxis(x, channel_axis, 0)

    def groups(channel_wise: bool) -> list[np.ndarray]:
        return list(x) if channel_wise else [x]  # views: edits write through

    def scale_range(v: np.ndarray, a_min: float, a_max: float, b_min: Any, b_max: Any, clip: bool):
        if a_max - a_min == 0.0:
            v[...] = v - a_min if b_min is None else v - a_min + float(b_min)
            return
        v -= a_min
        v /= a_max - a_min
        if b_min is not None and b_max is not None:
            v *= float(b_max) - float(b_min)
            v += float(b_min)
            if clip:
                np.clip(v, float(b_min), float(b_max), out=v)

    for st in steps:
        op = st.get("op")
        if op == "range":
            scale_range(
                x,
                float(st["a_min"]),
                float(st["a_max"]),
                st.get("b_min"),
                st.get("b_max"),
                bool(st.get("clip", False)),
            )
        elif op == "normalize":
            for g in groups(bool(st.get("channel_wise", False))):
                mask = g != 0 if st.get("nonzero", False) else None
                vals = g[mask] if mask is not None else g
                if vals.size == 0:
                    continue
                m = float(vals.mean(dtype=np.float64))
                sd = float(vals.std(dtype=np.float64))
                sd = 1.0 if sd == 0.0 else sd
                if mask is None:
                    g -= m
                    g /= sd
                else:
                    g[mask] = (vals - m) / sd
        elif op == "minmax":
            minv, maxv = st.get("minv", 0.0), st.get("maxv", 1.0)
            for g in groups(bool(st.get("channel_wise", False))):
                lo, hi = float(g.min()), float(g.max())
                if lo == hi:
                    if minv is not None:
                        g *= float(minv)
                    continue
                g -= lo
                g /= hi - lo
                if minv is not None and maxv is not None:
                    g *= float(maxv) - float(minv)
                    g += float(minv)
        elif op == "percentiles":
            lower, upper = float(st["lower"]), float(st["upper"])
            b_min, b_max = st.get("b_min"), st.get("b_max")
            if st.get("relative", False) and b_min is not None and b_max is not None:
                b_min, b_max = (
                    (b_max - b_min) * lower / 100.0 + b_min,
                    (b_max - b_min) * upper / 100.0 + b_min,
                )
            for g in groups(bool(st.get("channel_wise", False))):
                a_min, a_max = (float(v) for v in np.percentile(g, [lower, upper]))
                scale_range(g, a_min, a_max, b_min, b_max, bool(st.get("clip", False)))
        else:
            raise MedsegError(f"unknown MONAI intensity step {op!r} in the model card")
    x = x[0] if channel_axis is None else np.moveaxis(x, 0, channel_axis)
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- grids


def slice_axis_of(record: ImageRecord) -> int:
    """The acquisition (slice) axis of a volume: largest spacing, the last axis on ties."""
    sp = np.asarray(record.spacing, dtype=float)
    best = sp.max()
    return int(np.nonzero(np.isclose(sp, best, rtol=1e-3))[0][-1])


def _positions(n_out: int, step: float, align: str = "centres") -> np.ndarray:
    """Positions (in input index units) of ``n_out`` output voxels ``step`` input voxels apart.

    ``align="centres"``: MONAI's ``Spacing`` convention, the first voxel centres coincide and
    the spacing is exactly the requested one. ``align="corners"``: the same placement for
    ``F.interpolate`` with ``align_corners=True``, whose step is ``(n_in - 1) / (n_out - 1)``.
    ``align="edges"``: ``F.interpolate`` with ``align_corners=False`` (MONAI's ``Resize``),
    the two grids cover the same extent, output voxel ``j`` lies at ``(j + 0.5) * step - 0.5``
    (at least 0) with ``step = n_in / n_out``. A resize (``"edges"``, ``"corners"``) computes
    the positions in float32, as torch does. Either way a MONAI bundle sees the same grid here
    as in MONAI.
    """
    if align == "edges":
        j = np.arange(n_out, dtype=np.float32)
        pos = np.float32(step) * (j + np.float32(0.5)) - np.float32(0.5)
        return np.maximum(pos, np.float32(0.0)).astype(np.float64)
    if align == "corners":
        j = np.arange(n_out, dtype=np.float32)
        return (np.float32(step) * j).astype(np.float64)
    return np.arange(n_out, dtype=np.float64) * float(step)


def _take(x: Any, axis: int, idx: np.ndarray) -> Any:
    """``x.index_select(axis, idx)``; on the CPU through :func:`numpy.take`.

    torch's CPU ``index_select`` along an inner axis of a large tensor is 10-40x slower than
    ``numpy.take`` (measured on a 274x274x375 float32 map, 2 cores: 3.5-4.6 s vs 0.1 s of CPU
    time per axis); the result is the same array.
    """
    import torch

    if x.device.type == "cpu" and x.dtype != torch.bfloat16:
        return torch.from_numpy(np.take(x.detach().numpy(), idx, axis=axis))
    return x.index_select(axis, torch.from_numpy(idx).to(x.device))


def _resample_axis(x: Any, axis: int, pos: np.ndarray, mode: str) -> Any:
    """Resample a tensor along one axis at float positions (linear or nearest), clamped."""
    import torch

    n = x.shape[axis]
    dev = x.device
    if mode == "nearest":
        return _take(x, axis, np.clip(np.rint(pos), 0, n - 1).astype(np.int64))
    p = np.clip(pos, 0, n - 1)
    i0 = np.minimum(np.floor(p).astype(np.int64), max(n - 2, 0))
    w = p - i0
    if n == 1:
        return _take(x, axis, np.zeros(len(pos), dtype=np.int64))
    shape = [1] * x.ndim
    shape[axis] = len(pos)
    wt = torch.from_numpy(w.astype(np.float32)).to(dev).reshape(shape)
    a = _take(x, axis, i0)
    b = _take(x, axis, i0 + 1)
    return a.lerp_(b, wt) if a.dtype == wt.dtype else a + (b - a) * wt


@dataclass
class GridMap:
    """How an image was taken from its file grid to a model grid, and back.

    Attributes
    ----------
    source_shape : tuple of int
        Spatial shape of the source record (file axis order).
    source_affine : numpy.ndarray
        The record's affine (unchanged).
    flip_axes : tuple of int
        File spatial axes flipped (before the transpose).
    perm : tuple of int
        Model axis ``j`` holds (flipped) file axis ``perm[j]``.
    oriented_shape : tuple of int
        Spatial shape after flip + transpose, before resampling.
    model_shape : tuple of int
        Spatial shape on the model grid.
    model_spacing : tuple of float
        Voxel size on the model grid (mm, or pixels/um for 2D images): the card's spacing.
    step : tuple of float
        Model voxel ``j`` lies at oriented source index ``j * step`` (MONAI ``Spacing``
        convention: first voxel centres aligned, exact target spacing), or with
        ``align="edges"`` (or ``"area"``) at ``(j + 0.5) * step - 0.5`` (MONAI ``Resize``:
        ``step`` is the ratio of the sizes and both grids cover the same extent).
    model_affine : numpy.ndarray
        Model-grid voxel indices to world (for checks and debugging).
    slice_axis : int or None
        For a 2D model on a volume: the file axis run slice by slice (last model axis).
    device : str
        Where resampling runs.
    info : dict
        Notes such as ``{"nonfinite_replaced": n}``.
    align : {"centres", "edges", "corners", "area"}
        How the two grids line up (see ``step``): ``"centres"`` MONAI's ``Spacing``;
        ``"edges"`` and ``"corners"`` MONAI's ``Resize`` with ``align_corners`` False or True
        (``"corners"`` places voxels as ``"centres"`` does, ``step = (n - 1) / (m - 1)``);
        ``"area"`` MONAI's ``Resize`` with ``mode="area"``: placed as ``"edges"``, values are
        box means (see :meth:`resample`) instead of interpolated.
    """

    source_shape: tuple[int, ...]
    source_affine: np.ndarray
    flip_axes: tuple[int, ...]
    perm: tuple[int, ...]
    oriented_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    model_spacing: tuple[float, ...]
    model_affine: np.ndarray
    step: tuple[float, ...] = ()
    slice_axis: int | None = None
    device: str = "cpu"
    info: dict = field(default_factory=dict)
    align: str = "centres"

    @property
    def resampled(self) -> bool:
        """True when the model grid differs from the reoriented source grid."""
        return bool(self.step) and not np.allclose(self.step, 1.0, rtol=0, atol=1e-9)

    @property
    def reoriented(self) -> bool:
        """True when axes were flipped or transposed."""
        return bool(self.flip_axes) or tuple(self.perm) != tuple(range(len(self.perm)))

    # -- helpers on channel-first tensors (C, *spatial)

    def _forward_orient(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        if self.flip_axes:
            x = torch.flip(x, [a + 1 for a in self.flip_axes])
        if self.reoriented:
            x = x.permute(0, *[p + 1 for p in self.perm])
        return x

    def _inverse_orient(self, x: Any) -> Any:
        """Undo flip + transpose on a channel-first tensor or numpy array."""
        import torch

        inv = [int(v) for v in np.argsort(self.perm)]
        if isinstance(x, torch.Tensor):
            if self.reoriented:
                x = x.permute(0, *[p + 1 for p in inv])
            if self.flip_axes:
                x = torch.flip(x, [a + 1 for a in self.flip_axes])
            return x
        x = np.transpose(x, [0, *[p + 1 for p in inv]])
        if self.flip_axes:
            x = np.flip(x, [a + 1 for a in self.flip_axes])
        return x

    def resample(self, x: torch.Tensor, to_model: bool, mode: str = "linear") -> Any:
        """Resample a channel-first tensor ``(C, *spatial)`` between the two grids.

        ``to_model=True``: oriented source grid -> model grid; ``False``: model grid ->
        oriented source grid. Separable (tri)linear or nearest interpolation at the exact
        positions of the other grid's voxel centres (edges clamped), on the tensor's device.
        With ``align="area"`` every mode but ``"nearest"`` is torch's ``F.interpolate(...,
        mode="area")`` (what MONAI's ``Resize(mode="area")`` and its inverse run): output voxel
        ``j`` along an axis of ``n_in -> n_out`` voxels is the mean of input voxels
        ``floor(j * n_in / n_out)`` to ``ceil((j + 1) * n_in / n_out) - 1``, in both directions.
        """
        if not self.resampled:
            return x
        size = self.model_shape if to_model else self.oriented_shape
        if self.align == "area" and mode != "nearest":
            import torch.nn.functional as F

            return F.interpolate(x.float()[None], size=tuple(size), mode="area")[0]
        out = x if mode == "nearest" else x.float()
        # axes that shrink first, then those that grow: fewer voxels to interpolate (the
        # separable steps commute; 512x512x300 <-> 274x274x375: 142M instead of 228M outputs)
        order = sorted(range(len(size)), key=lambda a: size[a] / max(out.shape[a + 1], 1))
        for ax in order:
            n_out, st = size[ax], self.step[ax]
            if abs(st - 1.0) < 1e-9 and out.shape[ax + 1] == n_out:
                continue
            # (a resize to one voxel with align_corners has step 0: every voxel reads voxel 0)
            inv = 1.0 / st if st else 0.0
            align = "edges" if self.align == "area" else self.align
            pos = _positions(n_out, st if to_model else inv, align)
            out = _resample_axis(out, ax + 1, pos, mode)
        return out

    # -- public inverse maps

    def labels_to_source(self, labels: Any) -> np.ndarray:
        """Labels on the model grid ``(*model_shape)`` to the source file grid (nearest).

        Exact index gather: each source voxel takes the label of the model voxel whose centre
        is nearest (a resize, ``align`` ``"edges"``, ``"corners"`` or ``"area"``: model voxel
        ``floor(i * n_model / n_source)``, what ``F.interpolate(mode="nearest")`` and so
        MONAI's ``Resize`` inverse with ``nearest_interp`` pick); dtype is kept. Returns a
        numpy array of shape ``source_shape``.
        """
        import torch

        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
        lab = np.asarray(lab)
        if tuple(lab.shape) != tuple(self.model_shape):
            raise ValueError(f"labels shape {lab.shape} is not the model grid {self.model_shape}")
        if self.resampled:
            # one axis at a time (last first): several times faster than np.ix_ on big maps
            for ax in reversed(range(lab.ndim)):
                n_src = self.oriented_shape[ax]
                if self.align in ("edges", "corners", "area"):  # torch's "nearest", as MONAI
                    scale = np.float32(lab.shape[ax]) / np.float32(n_src)  # float32, as torch
                    pos = np.floor(np.arange(n_src, dtype=np.float32) * scale)
                else:
                    pos = np.rint(_positions(n_src, 1.0 / self.step[ax]))
                idx = np.clip(pos, 0, lab.shape[ax] - 1).astype(np.int64)
                lab = lab.take(idx, ax)
        out = self._inverse_orient(lab[None])[0]
        return np.ascontiguousarray(out)

    def probs_to_source(self, probs: Any) -> np.ndarray:
        """Probabilities ``(K, *model_shape)`` to the source grid ``(K, *source_shape)``.

        (Tri)linear interpolation on the device, float32 numpy result.
        """
        import torch

        p = torch.as_tensor(probs)
        p = self.resample(p.to(self.device).float(), False, "linear")
        out = self._inverse_orient(p)
        return np.ascontiguousarray(out.detach().cpu().numpy(), dtype=np.float32)

    def argmax_to_source(self, probs: Any, dtype: Any = np.uint8) -> np.ndarray:
        """Class index (channel argmax) on the source grid from model-grid probabilities.

        Interpolates probabilities linearly one class at a time and keeps the running best,
        equal to ``probs_to_source(probs).argmax(0)`` with memory for two float maps. Without
        resampling it is the argmax on the model grid, reoriented (exact).
        """
        import torch

        from napari_medseg.core.engine.postprocess import channel_argmax

        p = torch.as_tensor(probs)
        if not self.resampled:
            lab = channel_argmax(p, dtype)
            return self.labels_to_source(lab.cpu().numpy().astype(dtype, copy=False))
        if p.shape[0] == 2:
            # interpolation is linear: p1 > p0 after resampling <=> (p1 - p0) > 0 after it
            d = self.resample((p[1:2] - p[0:1]).to(self.device).float(), False)[0]
            arg = (d > 0).cpu().numpy().astype(dtype)
        else:
            best = None
            arg_t = None
            for k in range(p.shape[0]):
                pk = self.resample(p[k : k + 1].to(self.device).float(), False)[0]
                if best is None:
                    best = pk
                    arg_t = torch.zeros(pk.shape, dtype=torch.int32, device=pk.device)
                else:
                    better = pk > best
                    best = torch.where(better, pk, best)
                    arg_t.masked_fill_(better, k)
            assert arg_t is not None
            arg = arg_t.cpu().numpy().astype(dtype)
        out = self._inverse_orient(arg[None])[0]
        return np.ascontiguousarray(out)

    def image_to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the forward map to a channel-first float tensor on the source grid."""
        x = self._forward_orient(x)
        return self.resample(x, True, "linear")


def _channels_first(record: ImageRecord) -> np.ndarray:
    """Record data as ``(C, *spatial)`` (trailing time/channel/RGB axes folded into C)."""
    data = np.asarray(record.data)
    nsp = record.spatial_ndim
    spatial = data.shape[:nsp]
    rest = int(np.prod(data.shape[nsp:])) if data.ndim > nsp else 1
    return np.moveaxis(data.reshape(*spatial, rest), -1, 0)


def to_model_grid(
    record: ImageRecord, card: ModelCard, device: Any = "cpu"
) -> tuple[torch.Tensor, GridMap]:
    """Normalise an image and bring it onto a model's grid.

    Parameters
    ----------
    record : ImageRecord
        Source image, file axis order; trailing axes (time, channels, RGB) become channels.
    card : ModelCard
        Uses ``dims``, ``orientation``, ``spacing`` (mm, model axes) and ``normalization``.
    device : str or torch.device
        Where reorientation and resampling run (the result stays there).

    Returns
    -------
    image : torch.Tensor
        ``(C, *model_axes)`` float32 on ``device``; for a 2D model on a volume the last axis is
        the slice axis. A card with ``extra["guidance_channels"] = n`` gets ``n`` channels of
        zeros after the image's own (empty click guidance: ``C`` is then the card's
        ``in_channels``).
    grid : GridMap
        The map back to the source grid.
    """
    import nibabel as nib
    import torch

    nsp = record.spatial_ndim
    if min(record.spatial_shape, default=0) < 1 or np.prod(record.shape) == 0:
        raise MedsegError(f"the image {record.name!r} is empty (shape {record.shape})")
    x = _channels_first(record)
    x = x.astype(np.float32, copy=True)
    x, n_bad = replace_nonfinite(x)
    if n_bad:
        warnings.warn(
            f"napari-medseg: {record.name!r} has {n_bad} NaN/Inf voxels; they were replaced by "
            "the smallest finite value",
            RuntimeWarning,
            stacklevel=2,
        )
    # MONAI bundles scale intensities after Spacing (statistics of the resampled image); the
    # project's own models normalise on the source grid (cheaper, and how they were trained)
    late = bool((card.normalization or {}).get("on_model_grid"))
    late_norm = card.normalization
    if not late:
        x = normalize(x, card.normalization, channel_axis=0, copy=False)
    else:
        x, late_norm = _intensity_before_resize(x, card.normalization)
    src_shape = tuple(int(s) for s in record.spatial_shape)
    src_spacing = np.asarray(record.spacing, dtype=float)
    affine = np.asarray(record.affine, dtype=float)

    flip_axes: tuple[int, ...] = ()
    perm = tuple(range(nsp))
    slice_axis = None
    if card.dims == 3 and nsp == 3 and record.space == "RAS":
        start = nib.orientations.io_orientation(affine)
        end = nib.orientations.axcodes2ornt(tuple(card.orientation or "RAS"))
        tr = nib.orientations.ornt_transform(start, end)
        flip_axes = tuple(int(i) for i in range(3) if tr[i, 1] < 0)
        perm = tuple(int(v) for v in np.argsort(tr[:, 0]))
        # affine of the reoriented grid: nibabel's inv_ornt_aff
        oriented_affine = affine @ nib.orientations.inv_ornt_aff(tr, src_shape)
    elif card.dims == 2 and nsp == 3:
        slice_axis = slice_axis_of(record)
        perm = tuple([a for a in range(3) if a != slice_axis] + [slice_axis])
        oriented_affine = affine.copy()
        oriented_affine[:, :3] = affine[:, list(perm)]
    elif (
        record.space == "pixel"
        and nsp == 2
        and (card.normalization or {}).get("raster_axes") == "xy"
    ):
        perm = (1, 0)  # MONAI reads 2D rasters as (x, y): the network sees them transposed
        oriented_affine = affine.copy()
        oriented_affine[:, :2] = affine[:, [1, 0]]
    else:
        oriented_affine = affine.copy()
    oriented_shape = tuple(src_shape[p] for p in perm)
    oriented_spacing = src_spacing[list(perm)]

    # target spacing along model axes
    target = None
    if card.spacing is not None:
        sp = [float(v) for v in card.spacing]
        if record.space == "RAS" and nsp == 3 and card.dims == 3:
            target = sp[:3] if len(sp) >= 3 else None
        elif record.space == "RAS" and nsp == 3 and card.dims == 2:
            target = [*sp[:2], float(oriented_spacing[2])]
        elif record.space == "pixel" and record.metadata.get("mpp"):
            mpp = float(np.atleast_1d(record.metadata["mpp"])[0])
            oriented_spacing = np.full(nsp, mpp)
            target = sp[:2]
        elif record.space == "RAS" and nsp == 2:
            target = sp[:2]
    resize = (card.normalization or {}).get("resize")
    align = "centres"
    if isinstance(resize, dict):
        if target is not None:
            raise MedsegError(
                f"model {card.name!r} asks for both a spacing and a fixed image size (resize); "
                "its card can have only one of them"
            )
        model_shape, step, align = resize_grid(oriented_shape, resize)
    elif target is not None:
        # MONAI Spacing: the first voxel centres coincide, spacing is exactly the target
        step = tuple(float(t) / float(sp_) for t, sp_ in zip(target, oriented_spacing))
        # spacings equal up to rounding (e.g. a card spacing printed with 4 decimals): keep the
        # source grid, exactly, rather than interpolate by a hundredth of a voxel
        step = tuple(
            1.0 if abs(st - 1.0) * max(n - 1, 1) < 0.01 else st
            for st, n in zip(step, oriented_shape)
        )
        model_shape = tuple(max(1, round((n - 1) / st + 1)) for n, st in zip(oriented_shape, step))
    else:
        step = tuple(1.0 for _ in oriented_shape)
        model_shape = oriented_shape
    model_spacing = tuple(float(v) * st for v, st in zip(oriented_spacing, step))
    s_mat = np.eye(nsp + 1)
    s_mat[:nsp, :nsp] = np.diag(step)
    if align in ("edges", "area"):  # model voxel j at source index (j + 0.5) * step - 0.5
        s_mat[:nsp, nsp] = 0.5 * (np.asarray(step) - 1.0)
    model_affine = oriented_affine @ s_mat

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    grid = GridMap(
        source_shape=src_shape,
        source_affine=affine,
        flip_axes=flip_axes,
        perm=perm,
        oriented_shape=oriented_shape,
        model_shape=model_shape,
        model_spacing=model_spacing,
        model_affine=model_affine,
        step=step,
        slice_axis=slice_axis,
        device=str(dev),
        info={"nonfinite_replaced": n_bad},
        align=align,
    )
    t = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    t = grid.image_to_model(t)
    if late and late_norm is not None:
        arr = normalize(t.cpu().numpy(), late_norm, channel_axis=0, copy=False)
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(dev)
    n_guide = int((card.extra or {}).get("guidance_channels") or 0)
    if n_guide > 0:
        # an interactive bundle in automatic mode: its click-guidance channels, empty
        zeros = torch.zeros((n_guide, *t.shape[1:]), dtype=t.dtype, device=t.device)
        t = torch.cat([t, zeros], dim=0)
    return t.contiguous(), grid


def _intensity_before_resize(x: np.ndarray, norm: dict | None) -> tuple[np.ndarray, dict | None]:
    """Run the MONAI intensity steps a card's resize comes after, in MONAI's order.

    Parameters
    ----------
    x : numpy.ndarray
        ``(C, *spatial)`` float32 image on the source grid (axis order does not matter: the
        steps are voxel-wise or use whole-image statistics).
    norm : dict or None
        The card's ``normalization``; ``norm["resize"]["intensity_steps_before"] = k`` names
        how many of its ``monai_steps`` come before the resize.

    Returns
    -------
    x : numpy.ndarray
        The image with those ``k`` steps applied (unchanged when ``k`` is 0).
    late : dict or None
        The normalisation left for the model grid: ``norm`` itself when ``k`` is 0, the
        remaining steps otherwise, None when none remains.
    """
    resize = (norm or {}).get("resize")
    k = int(resize.get("intensity_steps_before", 0)) if isinstance(resize, dict) else 0
    steps = list((norm or {}).get("monai_steps") or [])
    if k <= 0 or not steps:
        return x, norm
    x = monai_intensity(x, steps[:k], channel_axis=0)
    rest = steps[k:]
    return x, ({"scheme": "none", "monai_steps": rest} if rest else None)


def resize_grid(
    shape: tuple[int, ...], resize: dict
) -> tuple[tuple[int, ...], tuple[float, ...], str]:
    """The grid MONAI's ``Resize`` makes of an image of spatial ``shape``.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape of the (reoriented) image, model axis order.
    resize : dict
        ``{"spatial_size": [...], "size_mode": "all", "align_corners": False, "mode":
        "linear"}``: ``size_mode="all"`` gives each axis its size (one int: every axis; ``-1``
        keeps the image's); ``"longest"`` scales the longest axis to ``spatial_size`` (an int)
        and the others by the same factor, rounded. ``mode`` ``"linear"`` (default) or
        ``"area"`` (box means, torch's ``F.interpolate(mode="area")``; no ``align_corners``).

    Returns
    -------
    model_shape : tuple of int
        The resized spatial shape.
    step : tuple of float
        Source voxels per model voxel along each axis (1.0 where the size does not change).
    align : {"edges", "corners", "area"}
        ``"edges"`` for ``align_corners=False`` (torch's default), ``"corners"`` for ``True``
        (then ``step = (n - 1) / (m - 1)``), ``"area"`` for ``mode="area"`` (placed as
        ``"edges"``); see :class:`GridMap`.
    """
    size = resize.get("spatial_size")
    if str(resize.get("size_mode", "all")) == "longest":
        if not isinstance(size, (int, float)) or isinstance(size, bool):
            raise MedsegError(f"a 'longest' resize needs one size, not {size!r}")
        scale = float(size) / max(shape)
        out = tuple(round(n * scale) for n in shape)
    else:
        sizes = [size] * len(shape) if isinstance(size, (int, float)) else list(size or [])
        if len(sizes) != len(shape):
            raise MedsegError(
                f"the model resizes images to {len(sizes)} axes {sizes} but the image has "
                f"{len(shape)} spatial axes {tuple(shape)}"
            )
        out = tuple(int(n) if s is None or int(s) <= 0 else int(s) for n, s in zip(shape, sizes))
    corners = bool(resize.get("align_corners", False))
    area = str(resize.get("mode", "linear")) == "area"
    if corners and area:
        raise MedsegError("an 'area' resize has no align_corners (torch refuses the pair)")
    if corners:
        step = tuple(
            1.0 if m == n else (n - 1) / (m - 1) if m > 1 else 0.0 for n, m in zip(shape, out)
        )
    else:
        step = tuple(1.0 if m == n else n / m for n, m in zip(shape, out))
    return out, step, "corners" if corners else "area" if area else "edges"


def foreground_box(image: Any, spec: dict) -> tuple[slice, ...] | None:
    """The bounding box MONAI's ``CropForeground`` keeps, on a model-grid image.

    Parameters
    ----------
    image : torch.Tensor or numpy.ndarray
        ``(C, *spatial)`` normalised image on the model grid.
    spec : dict
        ``{"margin": int | list, "k_divisible": int | list, "allow_smaller": bool}`` from the
        model card's ``normalization["crop_foreground"]``; foreground is ``value > 0`` in any
        channel (MONAI's default ``select_fn``).

    Returns
    -------
    tuple of slice or None
        One slice per spatial axis (within the image; MONAI pads a box that runs past the edge,
        which adds nothing the network could see), or None when nothing is foreground.
    """
    import torch

    x = image if isinstance(image, torch.Tensor) else torch.as_tensor(image)
    fg = (x > 0).any(dim=0)
    nsp = fg.ndim
    if not bool(fg.any()):
        return None
    margin = np.broadcast_to(np.asarray(spec.get("margin", 0), dtype=int), (nsp,))
    k = np.broadcast_to(np.asarray(spec.get("k_divisible", 1), dtype=int), (nsp,))
    shape = np.asarray(fg.shape)
    start = np.empty(nsp, dtype=int)
    end = np.empty(nsp, dtype=int)
    for ax in range(nsp):
        other = tuple(a for a in range(nsp) if a != ax)
        idx = torch.nonzero(fg.any(dim=other) if other else fg).flatten()
        start[ax], end[ax] = int(idx.min()), int(idx.max()) + 1
    start, end = start - margin, end + margin
    if bool(spec.get("allow_smaller", True)):
        start, end = np.maximum(start, 0), np.minimum(end, shape)
    size = end - start
    target = np.ceil(size / np.maximum(k, 1)).astype(int) * np.maximum(k, 1)
    start = start - (target - size) // 2
    end = start + target
    start, end = np.clip(start, 0, shape), np.clip(end, 0, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, end))
