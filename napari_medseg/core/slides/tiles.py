"""Tiles of a slide: which level a model runs on, which tiles touch tissue, and a reader that
decodes only the TIFF tiles a region needs.

* :func:`level_for_mpp` / :func:`model_level`: the coarsest pyramid level whose pixel size is at
  most 1.5 x the model's (the card's ``spacing``, µm per pixel), from the slide's
  ``metadata["mpp"]``; level 0 when either is unknown.
* :func:`plan_tiles` / :func:`plan_slide_tiles`: output tiles ``(y0, x0, y1, x1)`` of
  ``tile x tile`` working-level pixels that touch tissue (:func:`~napari_medseg.core.slides.
  tissue.tissue_mask`) or a level-0 region; :class:`TilePlan` holds a run's plan.
* :class:`TileReader`: regions of one level straight from the TIFF (a bounded LRU cache of
  decoded TIFF tiles; a dask fallback), zeros where a tile cannot be decoded (reported);
  :func:`read_with_margin`: a tile with ``margin`` pixels of context, mirrored at the slide's
  edge.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_medseg.core.slides.tissue import slide_levels, tissue_mask
from napari_medseg.errors import MedsegError

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = [
    "TILE_CACHE_BYTES",
    "TilePlan",
    "TileReader",
    "level_for_mpp",
    "model_level",
    "plan_slide_tiles",
    "plan_tiles",
    "read_with_margin",
]

#: Upper bound of the decoded-TIFF-tile cache of one reader (bytes).
TILE_CACHE_BYTES = 400e6


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
    for i, lv in enumerate(slide_levels(record)):
        f = record.data.shape[0] / lv.shape[0]
        if mpp * f <= want * 1.5:
            best = i
    return best


def model_level(record: ImageRecord, model: LoadedModel) -> int:
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


@dataclass
class TilePlan:
    """The tiles of one slide run.

    Attributes
    ----------
    level : int
        Pyramid level the tiles are on (the working level).
    scale : int
        Level-0 pixels per working-level pixel.
    work_shape : (rows, cols)
        Shape of the working level.
    tiles : list of (y0, x0, y1, x1)
        Output tiles in working-level pixels, in run order.
    tile, margin : int
        Tile side and context read around each tile (working-level pixels).
    """

    level: int
    scale: int
    work_shape: tuple[int, int]
    tiles: list
    tile: int
    margin: int

    @property
    def chunk0(self) -> int:
        """The tile side in level-0 pixels (the Zarr chunk side of a segmentation)."""
        return self.tile * self.scale

    def region0(self, i: int) -> tuple[int, ...]:
        """Tile ``i`` in level-0 pixels ``(y0, x0, y1, x1)``."""
        return tuple(int(v * self.scale) for v in self.tiles[i])


def plan_slide_tiles(
    record: ImageRecord,
    lvl: int,
    tile: int,
    tissue_only: bool,
    region: Sequence[int] | None,
) -> tuple[int, tuple[int, int], list]:
    """(level-0 pixels per working pixel, working-level shape, tiles over tissue/region)."""
    levels = slide_levels(record)
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


class TileReader:
    """Reads ``(y0, x0, y1, x1)`` regions of one level, decoding only the TIFF tiles needed.

    Falls back to the dask level for files whose layout is not plain ``YX[S]``. Tiles that fail
    to decode come back as zeros (see :mod:`napari_medseg.io.raster`) and are reported.
    """

    def __init__(self, record: ImageRecord, level: int) -> None:
        self.record = record
        self.level = level
        self.dask = slide_levels(record)[level]
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


def read_with_margin(
    reader: TileReader, t: tuple[int, int, int, int], tile: int, margin: int, shape: Sequence[int]
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
