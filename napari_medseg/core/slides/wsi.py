"""Whole-slide (gigapixel) tiled inference with bounded memory, written to OME-Zarr labels.

How a slide is segmented
------------------------
1. :func:`tissue_mask`: Otsu threshold on the HSV saturation of a low-resolution pyramid level
   (the smallest level whose longer side is at least :data:`MASK_MIN_SIDE` pixels), floored at
   :data:`MIN_SATURATION` so a blank slide finds nothing (and used alone when Otsu's lower class
   is itself saturated, i.e. not glass: a slide all tissue), then small objects and holes
   removed.
2. The slide (at the model's level, see below) is cut into output tiles of ``tile x tile``
   pixels; only tiles that touch tissue run.
3. Each tile is read with ``margin`` pixels of context on every side (mirrored where the slide
   ends), so every network input has the same size ``tile + 2 * margin`` and tiles are batched.
   The network (fully convolutional) runs once per input; its argmax is **cropped** to the
   central ``tile x tile``. Tiles do not overlap in the output, so there are no seams to blend:
   with ``margin`` at least the network's receptive field, the result equals one forward pass
   over the whole image away from the slide border (measured in ``tests/core/test_wsi.py``).
4. Tiles are read straight from the TIFF (only the TIFF tiles a region touches are decoded) in
   a background thread, one batch ahead of the network.
5. Labels go into a chunked Zarr array (uint8, chunks = tile) on the slide's full-resolution
   grid; lower levels (nearest neighbour, factor 2) are built from it chunk by chunk at the end.
   Only one batch of tiles plus one batch being prefetched is ever in memory.

The model's level: when the card states ``spacing`` (µm per pixel for 2D models) and the slide
states ``metadata["mpp"]``, the coarsest pyramid level whose pixel size is at most 1.5 x the
card's is used (:func:`level_for_mpp`) and the labels are repeated (nearest) onto level 0.

Output layout (OME-NGFF 0.5 on Zarr v3)
---------------------------------------
``OUT.zarr/`` is a group with arrays ``0, 1, ...`` (``(y, x)``, uint8, level ``k`` is level 0
subsampled by ``2**k``) and attributes ``ome.multiscales`` (axes ``y, x`` in micrometres when
the slide states mpp, else pixels, with per-level ``scale``), ``ome.image-label`` (class colours)
and ``medseg`` (``complete``, tiles done/skipped, provenance). A cancelled run leaves a readable
partial result with ``medseg.complete == false`` (level 0 holds the tiles finished so far).

:func:`export_labels_ome_tiff` turns such a result into a tiled, pyramidal (SubIFDs) OME-TIFF
chunk row by chunk row. Detections on slides are in :mod:`napari_medseg.core.slides.detect`.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import json
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = [
    "SlideResult",
    "export_labels_ome_tiff",
    "level_for_mpp",
    "open_result",
    "plan_tiles",
    "segment_slide",
    "segment_slide_dask",
    "tissue_mask",
]

#: The tissue mask is computed on the smallest level with at least this many pixels per side.
MASK_MIN_SIDE = 1024
#: Saturation below this is never tissue (white glass, black corrupt tiles).
MIN_SATURATION = 0.05
#: Tissue fragments smaller than this many level-0 pixels per side may be dropped as specks.
MIN_FRAGMENT = 256
#: Upper bound of the decoded-TIFF-tile cache of one reader (bytes).
TILE_CACHE_BYTES = 400e6


@dataclass
class SlideResult:
    """What a whole-slide run produced.

    Attributes
    ----------
    path : str
        The OME-Zarr folder.
    shape : tuple of int
        Level-0 shape ``(rows, cols)`` (= the slide's full resolution).
    levels : list of tuple
        Shapes of all written levels.
    tiles_done, tiles_total : int
        Tiles computed / tiles over tissue.
    skipped : list of tuple
        ``(y0, x0, y1, x1)`` level-0 regions of tiles that could not be decoded (read as zeros,
        labelled 0, listed also in the zarr attributes).
    complete : bool
        False when the run was cancelled.
    provenance : dict
        Model, parameters, timings.
    """

    path: str
    shape: tuple[int, int]
    levels: list[tuple[int, int]]
    tiles_done: int
    tiles_total: int
    skipped: list[tuple[int, int, int, int]] = field(default_factory=list)
    complete: bool = True
    provenance: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- tissue


def _levels(record: ImageRecord) -> list:
    return list(record.multiscale) if record.multiscale else [record.data]


def tissue_mask(record: ImageRecord, level: int | None = None) -> tuple[np.ndarray, float]:
    """Where the tissue is, on a low-resolution level.

    Parameters
    ----------
    record : ImageRecord
        An RGB slide from :func:`napari_medseg.io.raster.read_slide` (levels ``(row, col, 3)``).
    level : int, optional
        Pyramid level to use; default the smallest level with a side >= :data:`MASK_MIN_SIDE`
        (the lowest level if none is that large).

    Returns
    -------
    mask : numpy.ndarray
        bool ``(rows, cols)`` of that level.
    downsample : float
        Level-0 pixels per mask pixel (rows).
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    levels = _levels(record)
    if level is None:
        level = 0
        for i, lv in enumerate(levels):
            if max(lv.shape[:2]) >= MASK_MIN_SIDE:
                level = i
    lv = levels[level]
    arr = np.asarray(lv.compute() if hasattr(lv, "compute") else lv)
    if arr.ndim == 2 or arr.shape[-1] < 3:
        raise MedsegError(
            f"tissue detection needs an RGB slide; {record.name!r} has shape {arr.shape}"
        )
    rgb = arr[..., :3].astype(np.float32)
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)
    thr = MIN_SATURATION
    if float(sat.max()) > MIN_SATURATION:
        try:
            thr = max(MIN_SATURATION, float(threshold_otsu(sat)))
        except ValueError:
            thr = MIN_SATURATION
        # Otsu always splits in two; when its lower class is not glass (a slide or region all
        # tissue), it would split the tissue into specks: keep the floor instead
        low = sat[sat <= thr]
        if low.size and float(low.mean()) > 2 * MIN_SATURATION:
            thr = MIN_SATURATION
    mask = sat > thr
    down = float(levels[0].shape[0]) / float(arr.shape[0])
    # specks below 1e-4 of the level, and never more than a 256 x 256 level-0 fragment
    min_size = max(4, int(min(mask.size * 1e-4, (MIN_FRAGMENT / down) ** 2)))
    mask = remove_small_objects(mask, max_size=min_size)
    mask = remove_small_holes(mask, max_size=min_size * 4)
    return mask, down


# --------------------------------------------------------------------------- planning


def level_for_mpp(record: ImageRecord, want_um: float | None) -> int:
    """The pyramid level to run a model made for ``want_um`` µm per pixel on.

    The coarsest level whose pixel size is at most 1.5 x ``want_um`` (so never much coarser
    than the model expects); level 0 when the slide's ``metadata["mpp"]`` or ``want_um`` is
    unknown.

    Parameters
    ----------
    record : ImageRecord
        A slide from :func:`napari_medseg.io.raster.read_slide`.
    want_um : float or None
        The model's pixel size in micrometres.
    """
    mpp = (record.metadata or {}).get("mpp")
    if not want_um or not mpp:
        return 0
    want = float(want_um)
    best = 0
    for i, lv in enumerate(_levels(record)):
        f = record.data.shape[0] / lv.shape[0]
        if mpp * f <= want * 1.5:
            best = i
    return best


def _model_level(record: ImageRecord, model: LoadedModel) -> int:
    """The pyramid level that matches the card's pixel size (``spacing[0]`` µm), see
    :func:`level_for_mpp`; 0 when either is unknown."""
    card = model.card
    return level_for_mpp(record, float(card.spacing[0]) if card.spacing else None)


def plan_tiles(
    shape: Sequence[int],
    tile: int,
    mask: np.ndarray | None = None,
    mask_down: float = 1.0,
    region: Sequence[int] | None = None,
    scale: int = 1,
) -> list[tuple[int, int, int, int]]:
    """Output tiles ``(y0, x0, y1, x1)`` on the working level that touch tissue / the region.

    Parameters
    ----------
    shape : (rows, cols)
        Working-level shape.
    tile : int
        Tile side (pixels of the working level).
    mask, mask_down : tissue mask and its downsample relative to level 0.
    region : (y0, x0, y1, x1), optional
        Level-0 pixels; only tiles intersecting it are kept.
    scale : int
        Level-0 pixels per working-level pixel.
    """
    h, w = int(shape[0]), int(shape[1])
    out = []
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(h, y0 + tile), min(w, x0 + tile)
            if region is not None:
                ry0, rx0, ry1, rx1 = region
                if y1 * scale <= ry0 or y0 * scale >= ry1 or x1 * scale <= rx0 or x0 * scale >= rx1:
                    continue
            if mask is not None:
                f = scale / mask_down
                my0, mx0 = math.floor(y0 * f), math.floor(x0 * f)
                my1, mx1 = max(my0 + 1, math.ceil(y1 * f)), max(mx0 + 1, math.ceil(x1 * f))
                if not mask[my0:my1, mx0:mx1].any():
                    continue
            out.append((y0, x0, y1, x1))
    return out


# --------------------------------------------------------------------------- reading


class _TileReader:
    """Reads ``(y0, x0, y1, x1)`` regions of one level, decoding only the TIFF tiles needed.

    Falls back to the dask level for files whose layout is not plain ``YX[S]``. Tiles that fail
    to decode come back as zeros (see :mod:`napari_medseg.io.raster`) and are reported.
    """

    def __init__(self, record: ImageRecord, level: int) -> None:
        self.record = record
        self.level = level
        self.dask = _levels(record)[level]
        self.safe = None
        self._tf = None
        self._bad: set = set()  # (level, tiff tile index) that failed to decode
        self._dask_bad: list = []  # regions read with a decode warning (dask fallback)
        self._cache: OrderedDict = OrderedDict()
        self._capacity = 16
        lazy = (record.metadata or {}).get("lazy_pyramid")
        if record.path and not (lazy and level > 0):
            try:
                import tifffile
                import zarr

                from napari_medseg.io import raster

                tf = tifffile.TiffFile(record.path)
                series = tf.series[0]
                lvl = series.levels[level]
                if lvl.axes in ("YXS", "YX"):
                    z = zarr.open(series.aszarr(level=level), mode="r")
                    owner = raster.SlideFile(tf)
                    self.safe = raster.SafeLevel(
                        z, lvl.axes, level, Path(record.path).name, self._bad, owner
                    )
                    self._tf = owner
                    # three rows of TIFF tiles (a tile row plus its margins), at most ~400 MB
                    row = math.ceil(self.safe.shape[1] / self.safe.chunks[1]) + 2
                    per = int(np.prod(self.safe.chunks)) * self.safe.dtype.itemsize
                    self._capacity = max(16, min(3 * row, int(TILE_CACHE_BYTES // max(1, per))))
                else:
                    tf.close()
            except Exception:  # noqa: BLE001 - fall back to dask
                self.safe = None

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """The region as ``(rows, cols, C)`` (zeros where a TIFF tile cannot be decoded)."""
        if self.safe is not None:
            a = self._read_cached(y0, x0, y1, x1)
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                a = np.asarray(self.dask[y0:y1, x0:x1].compute(scheduler="synchronous"))
            if any("decode" in str(w.message) for w in caught):
                self._dask_bad.append((y0, x0, y1, x1))
            for w in caught:
                warnings.warn(w.message, w.category, stacklevel=2)
        if a.ndim == 2:
            a = a[..., None]
        return a

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        key = (ty, tx)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        cy, cx = self.safe.chunks[0], self.safe.chunks[1]
        h, w = self.safe.shape[0], self.safe.shape[1]
        a = np.asarray(self.safe[ty * cy : min(h, (ty + 1) * cy), tx * cx : min(w, (tx + 1) * cx)])
        self._cache[key] = a
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return a

    def _read_cached(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Assemble a region from decoded TIFF tiles kept in a bounded LRU cache (neighbouring
        tiles and their margins share TIFF tiles: each is decoded about once)."""
        cy, cx = self.safe.chunks[0], self.safe.chunks[1]
        out = np.empty((y1 - y0, x1 - x0, *self.safe.shape[2:]), dtype=self.safe.dtype)
        for ty in range(y0 // cy, (y1 - 1) // cy + 1):
            for tx in range(x0 // cx, (x1 - 1) // cx + 1):
                t = self._tile(ty, tx)
                sy0, sx0 = max(y0, ty * cy), max(x0, tx * cx)
                sy1, sx1 = min(y1, ty * cy + t.shape[0]), min(x1, tx * cx + t.shape[1])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = t[
                    sy0 - ty * cy : sy1 - ty * cy, sx0 - tx * cx : sx1 - tx * cx
                ]
        return out

    def damaged(self, y0: int, x0: int, y1: int, x1: int) -> bool:
        """Does the region overlap a tile that failed to decode (so far)?"""
        if self.safe is not None:
            cy, cx = self.safe.chunks[0], self.safe.chunks[1]
            for _lvl, idx in list(self._bad):
                ty, tx = idx[0] * cy, idx[1] * cx
                if ty < y1 and ty + cy > y0 and tx < x1 and tx + cx > x0:
                    return True
            return False
        return any(a < y1 and c > y0 and b < x1 and d > x0 for a, b, c, d in self._dask_bad)


def _read_with_margin(
    reader: _TileReader, t: tuple[int, int, int, int], tile: int, margin: int, shape: Sequence[int]
) -> tuple[np.ndarray, bool]:
    """``(tile + 2 margin, tile + 2 margin, C)`` input for output tile ``t``; mirrored outside."""
    y0, x0 = t[0], t[1]
    h, w = int(shape[0]), int(shape[1])
    ry0, rx0 = max(0, y0 - margin), max(0, x0 - margin)
    ry1, rx1 = min(h, y0 + tile + margin), min(w, x0 + tile + margin)
    a = reader.read(ry0, rx0, ry1, rx1)
    bad = reader.damaged(t[0], t[1], t[2], t[3])
    pads = [
        (ry0 - (y0 - margin), (y0 + tile + margin) - ry1),
        (rx0 - (x0 - margin), (x0 + tile + margin) - rx1),
        (0, 0),
    ]
    if any(p for pair in pads for p in pair):
        mode = "reflect" if min(a.shape[:2]) > max(max(p) for p in pads[:2]) else "symmetric"
        try:
            a = np.pad(a, pads, mode=mode)
        except ValueError:
            a = np.pad(a, pads, mode="edge")
    return a, bad


# --------------------------------------------------------------------------- zarr output


def _pyramid_shapes(shape: Sequence[int], tile: int) -> list[tuple[int, int]]:
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > tile and min(shapes[-1]) >= 2:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _create_zarr(
    out: Path, shape: Sequence[int], chunk: int, card: Any, mpp: float | None, overwrite: bool
) -> Any:
    import zarr

    if out.exists():
        if not overwrite:
            raise MedsegError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        import shutil

        shutil.rmtree(out)
    g = zarr.open_group(str(out), mode="w", zarr_format=3)
    shapes = _pyramid_shapes(shape, chunk)
    unit = "micrometer" if mpp else None
    datasets = []
    for k, s in enumerate(shapes):
        g.create_array(str(k), shape=s, chunks=(chunk, chunk), dtype="uint8", fill_value=0)
        sc = float((mpp or 1.0) * 2**k)
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [sc, sc]}]}
        )
    axes = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in "yx"]
    colors = []
    for cid, col in card.class_colors.items():
        c = col.lstrip("#")
        rgba = [int(c[i : i + 2], 16) for i in (0, 2, 4)] + [255] if len(c) == 6 else None
        if rgba and int(cid):
            colors.append({"label-value": int(cid), "rgba": rgba})
    g.attrs.update(
        {
            "ome": {
                "version": "0.5",
                "multiscales": [
                    {"name": f"{card.name}_labels", "axes": axes, "datasets": datasets}
                ],
                "image-label": {"version": "0.5", "colors": colors},
            },
            "medseg": {
                "complete": False,
                "class_names": {str(k): v for k, v in card.class_names.items()},
            },
        }
    )
    return g


def _finish_attrs(out: Path, extra: dict) -> None:
    import zarr

    g = zarr.open_group(str(out), mode="r+")
    med = dict(g.attrs.get("medseg", {}))
    med.update(json.loads(json.dumps(extra, default=str)))
    g.attrs["medseg"] = med


def _build_pyramid(
    out: Path, tiles0: list[tuple[int, int, int, int]], chunk: int
) -> Iterator[Progress]:
    """Levels 1.. from level 0 (nearest, factor 2), only over chunks that hold results."""
    import zarr

    g = zarr.open_group(str(out), mode="r+")
    k = 1
    touched = {(y0 // chunk, x0 // chunk) for y0, x0, _, _ in tiles0}
    while str(k) in g:
        src, dst = g[str(k - 1)], g[str(k)]
        blocks = sorted({(cy // 2, cx // 2) for cy, cx in touched})
        for n, (by, bx) in enumerate(blocks):
            y0, x0 = by * chunk, bx * chunk
            y1, x1 = min(dst.shape[0], y0 + chunk), min(dst.shape[1], x0 + chunk)
            s = src[2 * y0 : 2 * y1, 2 * x0 : 2 * x1]
            dst[y0:y1, x0:x1] = s[::2, ::2][: y1 - y0, : x1 - x0]
            if n % 16 == 15:
                yield Progress(n + 1, len(blocks), f"building level {k}: {n + 1}/{len(blocks)}")
        touched = set(blocks)
        k += 1


def open_result(out_zarr: str | Path) -> list:
    """The levels of a result written by :func:`segment_slide` as lazy dask arrays.

    Returns
    -------
    list of dask.array.Array
        ``(rows, cols)`` uint8, level 0 (slide full resolution) first; for a napari
        multiscale Labels layer (:func:`napari_medseg.io.raster.open_labels_zarr`).
    """
    from napari_medseg.io.raster import open_labels_zarr

    return open_labels_zarr(out_zarr)[0]


# --------------------------------------------------------------------------- inference


def _predict_batch(
    net: Any, inputs: list[np.ndarray], card: Any, dev: Any, lut: np.ndarray | None
) -> np.ndarray:
    """Argmax labels ``(B, H, W)`` uint8 for a list of ``(H, W, C)`` inputs of equal size."""
    import torch

    from napari_medseg.core.engine.preprocess import normalize
    from napari_medseg.core.engine.windows import _first

    x = np.stack([normalize(a, card.normalization, channel_axis=-1) for a in inputs])
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev)
    with torch.inference_mode():
        y = _first(net(xt))
    lab = y.argmax(1).to(torch.uint8).cpu().numpy()
    if lut is not None:
        lab = lut[lab]
    return lab


def _check_model(record: ImageRecord, model: LoadedModel) -> None:
    card = model.card
    if card.task != "segmentation":
        raise MedsegError(f"model {card.name!r} is a model for {card.task}, not segmentation")
    if card.dims != 2:
        raise MedsegError(f"model {card.name!r} is {card.dims}D; slides need a 2D model")
    nch = record.data.shape[-1] if record.data.ndim == 3 else 1
    if nch != card.in_channels:
        raise MedsegError(
            f"model {card.name!r} expects {card.in_channels} channel(s) but the slide "
            f"{record.name!r} has {nch}"
        )


def _net_multiple(card: Any) -> int:
    strides = (card.architecture or {}).get("kwargs", {}).get("strides") or [2, 2, 2, 2, 2]
    m = 1
    for s in strides:
        m *= int(s if np.isscalar(s) else max(s))
    return max(1, m)


@dataclass
class _Plan:
    level: int
    scale: int
    work_shape: tuple[int, int]
    tiles: list
    tile: int
    margin: int
    chunk0: int


def _tile_plan(
    record: ImageRecord,
    lvl: int,
    tile: int,
    tissue_only: bool,
    region: Sequence[int] | None,
) -> tuple[int, tuple[int, int], list]:
    """(level-0 pixels per working pixel, working-level shape, tiles over tissue/region)."""
    levels = _levels(record)
    if not 0 <= lvl < len(levels):
        raise MedsegError(f"level {lvl} does not exist; the slide has {len(levels)} level(s)")
    scale = max(1, round(record.data.shape[0] / levels[lvl].shape[0]))
    mask, down = (None, 1.0)
    if tissue_only and record.rgb:  # bright-field only; fluorescence slides run on all tiles
        mask, down = tissue_mask(record)
        if not mask.any():
            raise MedsegError(
                f"no tissue was found on {record.name!r}; check the slide or run with "
                "tissue_only=False (--all-tiles)"
            )
    work = (int(levels[lvl].shape[0]), int(levels[lvl].shape[1]))
    tiles = plan_tiles(work, tile, mask, down, region, scale)
    if not tiles:
        raise MedsegError(
            "no tissue was found in the requested region"
            if region is not None
            else f"no tissue was found on {record.name!r}"
        )
    return scale, work, tiles


def _plan(
    record: ImageRecord,
    model: LoadedModel,
    tile: int,
    margin: int | None,
    level: int | None,
    tissue_only: bool,
    region: Sequence[int] | None,
) -> _Plan:
    _check_model(record, model)
    levels = _levels(record)
    lvl = _model_level(record, model) if level is None else int(level)
    if not 0 <= lvl < len(levels):
        raise MedsegError(f"level {lvl} does not exist; the slide has {len(levels)} level(s)")
    mult = _net_multiple(model.card)
    if margin is None:
        margin = 64
    if (tile + 2 * margin) % mult:
        raise MedsegError(
            f"tile + 2 x margin ({tile + 2 * margin}) must be a multiple of {mult} for this network"
        )
    scale, work, tiles = _tile_plan(record, lvl, int(tile), tissue_only, region)
    return _Plan(lvl, scale, work, tiles, int(tile), int(margin), int(tile) * scale)


def _write_labels(arr0: Any, t: tuple, lab: np.ndarray, scale: int, shape0: Sequence[int]) -> None:
    y0, x0, y1, x1 = t
    lab = lab[: y1 - y0, : x1 - x0]
    if scale > 1:
        lab = np.repeat(np.repeat(lab, scale, axis=0), scale, axis=1)
    Y0, X0 = y0 * scale, x0 * scale
    Y1, X1 = min(int(shape0[0]), Y0 + lab.shape[0]), min(int(shape0[1]), X0 + lab.shape[1])
    arr0[Y0:Y1, X0:X1] = lab[: Y1 - Y0, : X1 - X0]


def _run_tiles(
    record: ImageRecord,
    model: LoadedModel,
    out: Path,
    plan: _Plan,
    tiles: list,
    batch_size: int,
    dev: Any,
) -> Iterator[tuple[int, list]]:
    """Compute ``tiles`` in batches (next batch prefetched in a thread); yield (n done, bad)."""
    import zarr

    card = model.card
    net = model.network
    net.to(dev)
    net.eval()
    ids = [int(c["id"]) for c in card.classes]
    lut = None if ids == list(range(len(ids))) else np.asarray(ids, dtype=np.uint8)
    arr0 = zarr.open_group(str(out), mode="r+")["0"]
    reader = _TileReader(record, plan.level)
    shape0 = record.data.shape[:2]
    batches = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]

    def load(batch: list) -> list:
        return [
            _read_with_margin(reader, t, plan.tile, plan.margin, plan.work_shape) for t in batch
        ]

    pool = cf.ThreadPoolExecutor(max_workers=1)
    try:
        fut = pool.submit(load, batches[0]) if batches else None
        for bi, batch in enumerate(batches):
            got = fut.result()
            fut = pool.submit(load, batches[bi + 1]) if bi + 1 < len(batches) else None
            labs = _predict_batch(net, [a for a, _ in got], card, dev, lut)
            m, t = plan.margin, plan.tile
            bad = []
            for tt, lab, (_, was_bad) in zip(batch, labs, got):
                if was_bad:
                    lab = np.zeros_like(lab)
                    bad.append(tuple(int(v * plan.scale) for v in tt))
                _write_labels(arr0, tt, lab[m : m + t, m : m + t], plan.scale, shape0)
            yield len(batch), bad
    finally:
        if fut is not None:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _provenance(record: ImageRecord, model: LoadedModel, plan: _Plan, params: dict) -> dict:
    from napari_medseg.core.correct.mask_store import software_versions

    card = model.card
    return {
        "task": "segmentation (whole slide)",
        "model": model.provenance(),
        "parameters": {
            **params,
            "level": plan.level,
            "tile": plan.tile,
            "margin": plan.margin,
            "method": "one forward pass per tile + margin (mirrored at slide edges), argmax, "
            "margin cropped; no blending",
            "normalization": card.normalization,
        },
        "input": {
            "name": record.name,
            "path": record.path,
            "shape": list(record.data.shape),
            "mpp": (record.metadata or {}).get("mpp"),
        },
        "versions": software_versions(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def segment_slide(
    record: ImageRecord,
    model: LoadedModel,
    out_zarr: str | Path,
    *,
    tile: int = 512,
    margin: int | None = 64,
    batch_size: int = 4,
    device: Any = "auto",
    level: int | None = None,
    tissue_only: bool = True,
    region: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Generator[Progress, None, SlideResult]:
    """Segment a whole slide (or a region of it) tile by tile into an OME-Zarr label pyramid.

    Parameters
    ----------
    record : ImageRecord
        A slide from :func:`napari_medseg.io.raster.read_slide` (lazy levels ``(row, col, 3)``).
    model : LoadedModel
        A 2D segmentation model with ``in_channels`` = the slide's channels.
    out_zarr : str or Path
        Output folder (``.zarr``); see the module docstring for its layout.
    tile : int
        Output tile side in working-level pixels (also the Zarr chunk side at level 0).
    margin : int
        Context read on every side of a tile and cropped off (pixels); ``tile + 2 * margin``
        must be a multiple of the network's total stride.
    batch_size : int
        Tiles per forward pass.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    level : int, optional
        Pyramid level to run on; default from the card's spacing and the slide's mpp (0 when
        either is unknown).
    tissue_only : bool
        Skip tiles without tissue (:func:`tissue_mask`).
    region : (y0, x0, y1, x1), optional
        Level-0 pixels: only tiles intersecting it run ("run on current view").
    overwrite : bool
        Replace an existing ``out_zarr``.

    Yields
    ------
    Progress
        After every batch (``done``/``total`` in tiles; ``info["tiles"]`` the level-0 regions
        just written, for live display).

    Returns
    -------
    SlideResult

    Raises
    ------
    MedsegError
        No tissue, a model that does not fit, an existing output.
    """
    from napari_medseg.core.engine.windows import resolve_device

    t0 = time.perf_counter()
    out = Path(out_zarr)
    dev = resolve_device(device)
    plan = _plan(record, model, tile, margin, level, tissue_only, region)
    mpp = (record.metadata or {}).get("mpp")
    _create_zarr(out, record.data.shape[:2], plan.chunk0, model.card, mpp, overwrite)
    total = len(plan.tiles)
    yield Progress(0, total, f"{total} tiles over tissue")
    done, skipped = 0, []
    finished = False
    try:
        for n, bad in _run_tiles(record, model, out, plan, plan.tiles, batch_size, dev):
            regions = [tuple(v * plan.scale for v in t) for t in plan.tiles[done : done + n]]
            done += n
            skipped += bad
            yield Progress(done, total, f"tile {done}/{total}", {"tiles": regions})
        yield Progress(done, total, "building lower-resolution levels")
        yield from _build_pyramid(
            out, [tuple(v * plan.scale for v in t) for t in plan.tiles], plan.chunk0
        )
        finished = True
    finally:
        prov = _provenance(
            record,
            model,
            plan,
            {
                "batch_size": batch_size,
                "tissue_only": tissue_only,
                "region": list(region) if region else None,
            },
        )
        prov["device"] = str(dev)
        prov["elapsed_s"] = round(time.perf_counter() - t0, 3)
        _finish_attrs(
            out,
            {
                "complete": finished,
                "tiles_done": done,
                "tiles_total": total,
                "skipped": skipped,
                "provenance": prov,
            },
        )
    levels = [tuple(a.shape) for a in open_result(out)]
    yield Progress(total, total, f"done in {time.perf_counter() - t0:.1f} s")
    return SlideResult(
        str(out), tuple(record.data.shape[:2]), levels, done, total, skipped, True, prov
    )


# --------------------------------------------------------------------------- dask scale-out

_WORKER_CACHE: dict = {}


def worker_slide(slide_path: str, ref: str, load: Callable[[str], Any]) -> tuple[ImageRecord, Any]:
    """Dask worker side: the opened slide and ``load(ref)`` (a model or detector), kept
    between the tasks of one run (keyed by the slide file's path, mtime and size, and ``ref``;
    one entry per worker process)."""
    import os

    from napari_medseg.io.raster import read_slide

    st = os.stat(slide_path)
    key = (slide_path, st.st_mtime_ns, st.st_size, ref)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = read_slide(slide_path)
        _WORKER_CACHE[key] = (rec, load(ref))
    return _WORKER_CACHE[key]


def _dask_task(
    slide_path: str, model_ref: str, out: str, tiles: list, opts: dict
) -> tuple[int, list]:
    """Worker side: open the slide and the model (cached per worker), compute ``tiles``."""
    from napari_medseg.core.engine.windows import resolve_device
    from napari_medseg.models.registry import load_model

    rec, model = worker_slide(slide_path, model_ref, lambda r: load_model(r, device="cpu"))
    plan = _Plan(**opts["plan"])
    dev = resolve_device(opts["device"])
    n_done, bad = 0, []
    for n, b in _run_tiles(rec, model, Path(out), plan, tiles, opts["batch_size"], dev):
        n_done += n
        bad += b
    return n_done, bad


def segment_slide_dask(
    record_path: str | Path,
    model_ref: str,
    out_zarr: str | Path,
    *,
    scheduler: str | Any = None,
    tile: int = 512,
    margin: int | None = 64,
    batch_size: int = 4,
    device: str = "cpu",
    level: int | None = None,
    tissue_only: bool = True,
    region: Sequence[int] | None = None,
    overwrite: bool = False,
    tiles_per_task: int | None = None,
) -> Generator[Progress, None, SlideResult]:
    """:func:`segment_slide` on a dask.distributed cluster.

    The driver plans the tiles (tissue mask) and creates the Zarr; each task gets paths (the
    slide, the model reference, the Zarr) and a run of tiles, opens slide and model itself
    (once per worker) and writes its tiles. Tiles are chunk-aligned and disjoint, so concurrent
    writes never touch the same Zarr chunk. Batches are cut from the same ordered tile list as
    the single-process run (``tiles_per_task`` is a multiple of ``batch_size``), so results are
    identical.

    Parameters
    ----------
    record_path : str or Path
        The slide file (every worker must see it at this path).
    model_ref : str
        Model name or folder (as :func:`napari_medseg.models.registry.load_model` takes).
    out_zarr : str or Path
        Output folder, on storage every worker can write.
    scheduler : None, "local", str or distributed.Client
        ``None``/``"local"``: a ``LocalCluster(n_workers=2, threads_per_worker=1)`` started and
        stopped here; ``"tcp://host:port"``: an existing scheduler; or a ``Client``.
    tiles_per_task : int, optional
        Tiles per task (rounded up to a multiple of ``batch_size``); default: about 4 tasks
        per worker.
    Other parameters
        As :func:`segment_slide`.

    Returns
    -------
    SlideResult
    """
    import dataclasses
    from contextlib import closing

    from napari_medseg.core.engine.cluster import as_finished, connect, worker_count
    from napari_medseg.io.raster import read_slide
    from napari_medseg.models.registry import load_model

    t0 = time.perf_counter()
    out = Path(out_zarr)
    rec = read_slide(record_path)
    model = load_model(model_ref, device="cpu")
    plan = _plan(rec, model, tile, margin, level, tissue_only, region)
    mpp = (rec.metadata or {}).get("mpp")
    _create_zarr(out, rec.data.shape[:2], plan.chunk0, model.card, mpp, overwrite)
    total = len(plan.tiles)
    yield Progress(0, total, "starting the dask cluster")

    client, close_client = connect(scheduler)
    done, skipped, finished = 0, [], False
    try:
        n_workers = worker_count(client)
        per = tiles_per_task or max(batch_size, math.ceil(total / (4 * n_workers)))
        per = int(math.ceil(per / batch_size) * batch_size)
        opts = {
            "plan": dataclasses.asdict(plan) | {"tiles": []},
            "device": device,
            "batch_size": batch_size,
        }
        chunks = [plan.tiles[i : i + per] for i in range(0, total, per)]
        argsets = [(str(record_path), str(model_ref), str(out), c, opts) for c in chunks]
        yield Progress(0, total, f"{total} tiles in {len(chunks)} tasks on {n_workers} workers")
        with closing(as_finished(client, _dask_task, argsets)) as tasks:
            for _, (n, bad) in tasks:
                done += n
                skipped += [tuple(b) for b in bad]
                yield Progress(done, total, f"tile {done}/{total}")
        yield Progress(done, total, "building lower-resolution levels")
        yield from _build_pyramid(
            out, [tuple(v * plan.scale for v in t) for t in plan.tiles], plan.chunk0
        )
        finished = True
    finally:
        close_client()
        prov = _provenance(
            rec,
            model,
            plan,
            {
                "batch_size": batch_size,
                "tissue_only": tissue_only,
                "region": list(region) if region else None,
                "scheduler": str(scheduler or "local"),
            },
        )
        prov["device"] = device
        prov["elapsed_s"] = round(time.perf_counter() - t0, 3)
        _finish_attrs(
            out,
            {
                "complete": finished,
                "tiles_done": done,
                "tiles_total": total,
                "skipped": sorted(skipped),
                "provenance": prov,
            },
        )
    levels = [tuple(a.shape) for a in open_result(out)]
    yield Progress(total, total, f"done in {time.perf_counter() - t0:.1f} s")
    return SlideResult(
        str(out), tuple(rec.data.shape[:2]), levels, done, total, sorted(skipped), True, prov
    )


# --------------------------------------------------------------------------- OME-TIFF export


def _result_mpp(attrs: Any) -> float | None:
    """µm per level-0 pixel from the OME-NGFF attributes of a result (None in pixels)."""
    try:
        ms = attrs["ome"]["multiscales"][0]
        if ms["axes"][-1].get("unit") != "micrometer":
            return None
        sc = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        return float(sc[-1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def export_labels_ome_tiff(
    zarr_path: str | Path,
    out_tif: str | Path,
    *,
    tile: int | None = None,
    compression: str | None = "zlib",
    overwrite: bool = False,
) -> Generator[Progress, None, Path]:
    """Write a whole-slide label result as a tiled, pyramidal OME-TIFF, one tile row at a time.

    Level 0 is the top-level IFD, lower levels are its SubIFDs (the OME-TIFF pyramid layout that
    QuPath, OMERO, tifffile and :func:`napari_medseg.io.raster.read_slide` read). Each level is
    copied from the same level of the Zarr, so the TIFF's levels equal the Zarr's pixel for
    pixel. At most one row of ``tile x width`` pixels of one level is in memory (plus the TIFF
    writer's buffers); the file is written as ``OUT.part`` and renamed when complete.

    Parameters
    ----------
    zarr_path : str or Path
        A result of :func:`segment_slide` (``OUT.zarr``, levels ``(y, x)`` uint8).
    out_tif : str or Path
        Output file, ``.ome.tif`` recommended.
    tile : int, optional
        TIFF tile side in pixels (multiple of 16); default the Zarr's level-0 chunk side when
        it is a multiple of 16, else 512.
    compression : str or None
        TIFF compression as tifffile names it (``"zlib"``, ``"zstd"``, ``"lzw"``, ``None``).
    overwrite : bool
        Replace an existing ``out_tif``.

    Yields
    ------
    Progress
        After each row of tiles (``done``/``total`` in tile rows over all levels). Closing the
        generator stops the export within one tile row and removes the partial file.

    Returns
    -------
    Path
        ``out_tif``. The OME-XML states ``PhysicalSizeX/Y`` in µm when the Zarr does (the
        slide's mpp), also written as TIFF resolution tags per level.

    Raises
    ------
    MedsegError
        Missing or foreign Zarr, existing output.
    """
    import threading

    import tifffile
    import zarr

    from napari_medseg._files import atomic_path

    src = Path(zarr_path)
    out = Path(out_tif)
    open_result(src)  # checks the layout
    if out.exists() and not overwrite:
        raise MedsegError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    g = zarr.open_group(str(src), mode="r")
    arrays = [g[d["path"]] for d in g.attrs["ome"]["multiscales"][0]["datasets"]]
    name = g.attrs["ome"]["multiscales"][0].get("name", src.stem)
    mpp = _result_mpp(g.attrs)
    if tile is None:
        c = int(arrays[0].chunks[0])
        tile = c if c % 16 == 0 else 512
    tile = int(tile)
    if tile % 16:
        raise MedsegError(f"the TIFF tile side must be a multiple of 16, not {tile}")
    rows_per = [math.ceil(a.shape[0] / tile) for a in arrays]
    total = sum(rows_per)
    done = [0]
    stop = threading.Event()
    failed: list[BaseException] = []

    def tiles_of(arr: Any) -> Iterator[np.ndarray]:
        h, w = int(arr.shape[0]), int(arr.shape[1])
        for y in range(0, h, tile):
            if stop.is_set():
                raise _CancelledExport
            strip = np.asarray(arr[y : min(h, y + tile), :], dtype=np.uint8)
            if strip.shape[0] < tile:
                strip = np.pad(strip, ((0, tile - strip.shape[0]), (0, 0)))
            for x in range(0, w, tile):
                t = strip[:, x : x + tile]
                if t.shape[1] < tile:
                    t = np.pad(t, ((0, 0), (0, tile - t.shape[1])))
                yield np.ascontiguousarray(t)
            done[0] += 1

    def write() -> None:
        try:
            with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
                for k, arr in enumerate(arrays):
                    kw: dict[str, Any] = {
                        "tile": (tile, tile),
                        "photometric": "minisblack",
                        "compression": compression,
                        "dtype": np.uint8,
                    }
                    if mpp:
                        res = 1e4 / (mpp * 2**k)
                        kw.update(resolution=(res, res), resolutionunit="CENTIMETER")
                    if k == 0:
                        meta: dict[str, Any] = {"axes": "YX", "Name": str(name)}
                        if mpp:
                            meta.update(
                                PhysicalSizeX=mpp, PhysicalSizeXUnit="µm",
                                PhysicalSizeY=mpp, PhysicalSizeYUnit="µm",
                            )  # fmt: skip
                        kw.update(subifds=len(arrays) - 1, metadata=meta)
                    else:
                        kw.update(subfiletype=1, metadata=None)
                    tw.write(tiles_of(arr), shape=tuple(int(s) for s in arr.shape), **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the generator
            failed.append(exc)

    yield Progress(0, total, f"writing {out.name}: {len(arrays)} levels")
    th = threading.Thread(target=write, name="medseg-ome-tiff-export", daemon=True)
    finished = False
    with atomic_path(out) as tmp:  # removed on failure, cancel or Ctrl-C
        try:
            th.start()
            last = -1
            while th.is_alive():
                th.join(timeout=0.2)
                if done[0] != last:
                    last = done[0]
                    yield Progress(
                        min(last, total), total, f"writing {out.name}: row {last}/{total}"
                    )
            if failed:
                exc = failed[0]
                raise MedsegError(f"could not write {out.name}: {exc}") from exc
            finished = True
        finally:
            if not finished:
                stop.set()
                if th.ident is not None:  # started
                    th.join()
    yield Progress(total, total, f"wrote {out.name}")
    return out


class _CancelledExport(Exception):
    """Raised inside the writer thread when the export generator is closed."""
