"""Object detection on whole slides, tile by tile, with bounded memory.

How a slide is searched
-----------------------
1. The tissue mask and the tile plan of :mod:`napari_medseg.core.slides.wsi` (only tiles touching
   tissue, or a level-0 ``region``) on the working level (:func:`~napari_medseg.core.slides.wsi.
   level_for_mpp`: from the model card's ``spacing`` and the slide's mpp, or ``target_mpp``).
2. Each tile is read with ``margin`` pixels of context on every side (clipped at the slide's
   edge, never mirrored: a mirror would invent objects) by the same prefetching, TIFF-tile
   caching reader as segmentation; the next tile is read in a thread while the current one runs.
3. Objects are found on the tile by :func:`napari_medseg.core.detect.detection.detect` (any model
kind
   ``detect`` accepts) or by any callable ``f(record) -> DetectionResult`` (or a progress
   generator returning one), e.g. :func:`~napari_medseg.core.detect.detection.detect_classical`. The
   tile is an in-memory :class:`~napari_medseg.io.record.ImageRecord` with an identity affine
   (working-level pixels) and ``metadata["mpp"]`` = the slide's mpp x the level's downsample.
4. **De-duplication**: an object is kept only by the tile whose core (the tile without its
   margin) contains its centre; cores partition the slide, so an object seen whole by two
   tiles is kept once. With a margin larger than the objects every object is seen whole by the
   tile that keeps it. Objects near a core's edge whose box reaches into a neighbour can still be
   found twice with slightly different outlines (different context): a greedy NMS on box IoU
   (``border_iou``) between objects of *different* tiles removes those; objects of the same tile
   are never suppressed by it.
5. Coordinates are mapped to **level-0 (full-resolution) pixels**: a working-level pixel ``r``
   at downsample ``s`` covers level-0 rows ``[s r, s r + s)``, so centres become
   ``s (r + origin) + (s - 1) / 2``, boxes ``s (min + origin)`` .. ``s (max + origin)`` and areas
   are multiplied by ``s^2``. ``y``/``x`` then index the slide's level 0 (``record.data``);
   ``world_*`` apply the slide's affine (the identity of :func:`~napari_medseg.io.raster.
   read_slide`), i.e. QuPath's full-resolution pixel coordinates.
6. The result holds only the table and, when the detector gives an instance map, one outline
   per object (float32 ``(K, 2)`` ``[x, y]`` rings in level-0 pixels with QuPath's corner
   convention, simplified to 0.5 working pixels), never the slide or a slide-sized mask.
   :func:`write_slide_detections` writes CSV or QuPath GeoJSON from it, streaming.

The table has the columns of :mod:`napari_medseg.core.detect.detection` (``id`` renumbered 1..N over
the slide, in tile order), plus any extra columns the detector adds.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import json
import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.core.correct.mask_store import software_versions
from napari_medseg.core.detect.detection import load_detector
from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from napari_medseg.io.record import ImageRecord

__all__ = [
    "SlideDetections",
    "detect_slide",
    "detect_slide_dask",
    "write_slide_detections",
]

Detector = Callable[..., Any]


@dataclass
class SlideDetections:
    """Objects detected on a whole slide (level-0 pixel coordinates).

    Attributes
    ----------
    table : pandas.DataFrame
        One row per object, the columns of :mod:`napari_medseg.core.detect.detection`; ``y``, ``x``,
        boxes and ``world_*`` in level-0 (full-resolution) pixels, ``area`` in level-0 pixels.
    outlines : list
        Per row, a closed ring ``(K, 2)`` float32 ``[x, y]`` in level-0 pixels, QuPath's corner
        convention (pixel ``(row, col)`` covers ``[col, col + 1] x [row, row + 1]``), or
        ``None`` where the detector gave no instance map (boxes, points).
    shape : tuple of int
        Level-0 shape ``(rows, cols)``.
    level, scale : int
        The pyramid level the detector ran on and its downsample (level-0 pixels per pixel).
    tiles_done, tiles_total : int
        Tiles searched / tiles planned.
    skipped : list of tuple
        ``(y0, x0, y1, x1)`` level-0 regions of tiles not searched because they could not be
        decoded.
    class_colors : dict
        ``{class name: "#rrggbb"}``.
    mpp : float or None
        µm per level-0 pixel.
    provenance : dict
        Detector, parameters, timings.
    affine, space
        The slide's 3x3 pixel affine and ``"pixel"`` (as in
        :class:`~napari_medseg.core.detect.detection.DetectionResult`).
    """

    table: pd.DataFrame
    outlines: list
    shape: tuple[int, int]
    level: int
    scale: int
    tiles_done: int
    tiles_total: int
    skipped: list = field(default_factory=list)
    class_colors: dict = field(default_factory=dict)
    mpp: float | None = None
    provenance: dict = field(default_factory=dict)
    affine: np.ndarray = field(default_factory=lambda: np.eye(3))
    space: str = "pixel"


@dataclass
class _TilePlan:
    level: int
    scale: int
    work_shape: tuple[int, int]
    tiles: list
    tile: int
    margin: int


@dataclass
class _TileOut:
    """Detections of one tile after the centre rule, mapped to level 0."""

    index: int
    region0: tuple[int, int, int, int]
    table: Any  # DataFrame or None
    outlines: list
    border: np.ndarray  # bool per row: the box reaches outside the tile's core
    colors: dict
    provenance: dict
    skipped: bool = False


# --------------------------------------------------------------------------- detectors


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "card") and hasattr(obj, "network")


def _as_detector(
    model_or_callable: Any,
    device: Any,
    min_distance: float | None,
    batch_size: int,
    detect_kwargs: dict | None,
) -> tuple[Detector, dict]:
    """``f(tile_record) -> generator or DetectionResult`` and a description for provenance."""
    kw = dict(detect_kwargs or {})
    if _is_model(model_or_callable):
        from napari_medseg.core.detect.detection import detect

        model = model_or_callable
        kw.setdefault("device", device)
        kw.setdefault("batch_size", batch_size)
        if min_distance is not None:
            kw.setdefault("min_distance", float(min_distance))
        card = model.card
        desc = {
            "name": card.name,
            "version": getattr(card, "version", None),
            "source": getattr(model, "source", ""),
            "kind": getattr(model, "kind", ""),
            "weights_sha256": getattr(model, "weights_sha256", None),
        }
        return (lambda rec: detect(rec, model, **kw)), desc
    if callable(model_or_callable):
        f = model_or_callable
        if min_distance is not None:
            kw.setdefault("min_distance", float(min_distance))
        name = getattr(f, "__name__", None) or getattr(getattr(f, "func", None), "__name__", "")
        return (lambda rec: f(rec, **kw)), {"name": name or repr(f), "callable": repr(f)}
    raise MedsegError(
        "detect_slide needs a loaded model or a detector function, not "
        f"{type(model_or_callable).__name__}"
    )


def _run_detector(f: Detector, rec: ImageRecord) -> Generator[Progress, None, Any]:
    out = f(rec)
    if isinstance(out, Generator):
        out = yield from out
    return out


# --------------------------------------------------------------------------- one tile


def _tile_record(
    record: ImageRecord, a: np.ndarray, origin: tuple[int, int], plan: _TilePlan
) -> ImageRecord:
    from napari_medseg.io.record import ImageRecord

    if record.data.ndim == 2 and a.ndim == 3:
        a = a[..., 0]
    mpp = (record.metadata or {}).get("mpp")
    return ImageRecord(
        data=a,
        affine=np.eye(3),
        space="pixel",
        modality=record.modality,
        name=f"{record.name}@L{plan.level}:{origin[0]},{origin[1]}",
        path=None,
        rgb=record.rgb,
        metadata={
            "mpp": mpp * plan.scale if mpp else None,
            "slide": record.path,
            "level": plan.level,
            "origin": list(origin),
        },
    )


def _drop_collinear(rc: np.ndarray) -> np.ndarray:
    """Remove vertices of a closed contour that lie on a straight run (exact, vectorised)."""
    if len(rc) < 5:
        return rc
    closed = np.array_equal(rc[0], rc[-1])
    pts = rc[:-1] if closed else rc
    d_prev = pts - np.roll(pts, 1, axis=0)
    d_next = np.roll(pts, -1, axis=0) - pts
    cross = d_prev[:, 0] * d_next[:, 1] - d_prev[:, 1] * d_next[:, 0]
    keep = np.abs(cross) > 1e-9
    if keep.sum() < 3:
        return rc
    pts = pts[keep]
    return np.vstack([pts, pts[:1]])


def _ring_outlines(
    inst: np.ndarray | None, ids: np.ndarray, origin: tuple[int, int], s: int
) -> list:
    """Level-0 ``[x, y]`` rings (QuPath corners) of objects ``ids`` of a tile's instance map."""
    if inst is None or np.ndim(inst) != 2 or not np.size(inst) or ids.size == 0:
        return [None] * len(ids)
    from scipy import ndimage as ndi

    from napari_medseg.io.detections import _outline

    inst = np.asarray(inst)
    objs = ndi.find_objects(inst)
    off = np.array([origin[0], origin[1]], dtype=float)
    out = []
    for lab in ids:
        lab = int(lab)
        if not 0 < lab <= len(objs) or objs[lab - 1] is None:
            out.append(None)
            continue
        rc = _outline(inst, objs[lab - 1], lab)
        if rc is None or len(rc) < 4:
            out.append(None)
            continue
        rc = _drop_collinear(rc)
        yx = s * (rc + off) + (s - 1) / 2.0 + 0.5
        ring = np.ascontiguousarray(yx[:, ::-1], dtype=np.float32)
        if not np.array_equal(ring[0], ring[-1]):
            ring = np.vstack([ring, ring[:1]])
        out.append(ring)
    return out


def _map_tile(
    res: Any,
    t: tuple[int, int, int, int],
    origin: tuple[int, int],
    plan: _TilePlan,
    affine: np.ndarray,
    filters: dict,
    outlines: bool,
) -> tuple[Any, list, np.ndarray]:
    """Centre rule, level-0 coordinates, filters and outlines for one tile's result."""
    from napari_medseg.core.detect.result import filter_detections

    tbl = res.table
    if tbl is None or len(tbl) == 0:
        return None, [], np.zeros(0, bool)
    y0, x0, y1, x1 = t
    ry0, rx0 = origin
    cy = tbl["y"].to_numpy(float) + ry0
    cx = tbl["x"].to_numpy(float) + rx0
    keep = (cy >= y0 - 0.5) & (cy < y1 - 0.5) & (cx >= x0 - 0.5) & (cx < x1 - 0.5)
    tbl = tbl[keep].copy()
    if not len(tbl):
        return None, [], np.zeros(0, bool)
    s = plan.scale
    off = (s - 1) / 2.0
    inner = np.ones(len(tbl), bool)
    for a, lo, hi, o in (("y", y0, y1, ry0), ("x", x0, x1, rx0)):
        vmin = tbl[f"{a}_min"].to_numpy(float) + o
        vmax = tbl[f"{a}_max"].to_numpy(float) + o
        inner &= (vmin >= lo) & (vmax <= hi)
        tbl[a] = s * (tbl[a].to_numpy(float) + o) + off
        for col, v in ((f"{a}_min", vmin), (f"{a}_max", vmax)):
            is_int = np.issubdtype(tbl[col].dtype, np.integer)  # boxes of a box detector: float
            tbl[col] = np.round(s * v).astype(np.int64) if is_int else s * v
    yx = tbl[["y", "x"]].to_numpy(float)
    world = yx @ affine[:2, :2].T + affine[:2, 2]
    tbl["world_y"], tbl["world_x"] = world[:, 0], world[:, 1]
    if "area" in tbl.columns:
        tbl["area"] = tbl["area"].to_numpy(float) * s * s
    tbl["_border"] = ~inner
    tbl = filter_detections(tbl, **filters)
    border = tbl.pop("_border").to_numpy(bool)
    ids = tbl["id"].to_numpy() if "id" in tbl.columns else np.zeros(len(tbl), int)
    rings = (
        _ring_outlines(getattr(res, "instances", None), ids, origin, s)
        if outlines
        else [None] * len(tbl)
    )
    return tbl, rings, border


def _detect_tiles(
    record: ImageRecord,
    detector: Detector,
    plan: _TilePlan,
    indices: Sequence[int],
    filters: dict,
    outlines: bool,
) -> Iterator[Progress | _TileOut]:
    """Run ``detector`` on tiles ``plan.tiles[i] for i in indices`` (next one prefetched).

    Yields the detector's :class:`Progress` (re-labelled) and one :class:`_TileOut` per tile.
    """
    from napari_medseg.core.slides.wsi import _TileReader

    reader = _TileReader(record, plan.level)
    h, w = plan.work_shape
    m = plan.margin
    affine = np.asarray(record.affine, dtype=float)

    def load(i: int) -> tuple[np.ndarray, tuple[int, int], bool]:
        y0, x0, y1, x1 = plan.tiles[i]
        ry0, rx0 = max(0, y0 - m), max(0, x0 - m)
        ry1, rx1 = min(h, y1 + m), min(w, x1 + m)
        a = reader.read(ry0, rx0, ry1, rx1)
        return a, (ry0, rx0), reader.damaged(y0, x0, y1, x1)

    pool = cf.ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(load, indices[0]) if len(indices) else None
    try:
        for k, i in enumerate(indices):
            a, origin, bad = fut.result()
            fut = pool.submit(load, indices[k + 1]) if k + 1 < len(indices) else None
            t = plan.tiles[i]
            region0 = tuple(int(v * plan.scale) for v in t)
            if bad:
                yield _TileOut(i, region0, None, [], np.zeros(0, bool), {}, {}, skipped=True)
                continue
            rec = _tile_record(record, a, origin, plan)
            del a
            gen = _run_detector(detector, rec)
            while True:
                try:
                    p = next(gen)
                except StopIteration as stop:
                    res = stop.value
                    break
                yield Progress(p.done, p.total, p.message, {"tile_index": i})
            tbl, rings, border = _map_tile(res, t, origin, plan, affine, filters, outlines)
            yield _TileOut(
                i,
                region0,
                tbl,
                rings,
                border,
                dict(getattr(res, "class_colors", {}) or {}),
                dict(getattr(res, "provenance", {}) or {}),
            )
    finally:
        if fut is not None:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- merging


def _border_nms(
    boxes: np.ndarray, scores: np.ndarray, tiles: np.ndarray, iou: float, cell: float
) -> np.ndarray:
    """Greedy NMS (by score) between boxes of different tiles; returns the kept mask.

    ``boxes`` ``(N, 4)`` ``y_min, x_min, y_max, x_max``; neighbours are found through a grid of
    ``cell``-sized buckets, so the cost grows with the number of border objects, not N^2.
    """
    from napari_medseg.core.detect.result import box_iou

    n = len(boxes)
    keep = np.ones(n, bool)
    if n < 2:
        return keep
    grid: dict[tuple[int, int], list[int]] = {}
    cells = []
    for j, (a, b, c, d) in enumerate(boxes):
        cs = [
            (gy, gx)
            for gy in range(int(a // cell), int(max(a, c - 1e-9) // cell) + 1)
            for gx in range(int(b // cell), int(max(b, d - 1e-9) // cell) + 1)
        ]
        cells.append(cs)
        for key in cs:
            grid.setdefault(key, []).append(j)
    for i in np.argsort(-scores, kind="stable"):
        if not keep[i]:
            continue
        near = {j for key in cells[i] for j in grid[key] if j != i and keep[j]}
        near = [j for j in near if tiles[j] != tiles[i]]
        if not near:
            continue
        ious = box_iou(boxes[i : i + 1], boxes[near])[0]
        for j, v in zip(near, ious):
            if v > iou and (scores[j], -j) <= (scores[i], -i):
                keep[j] = False
    return keep


class _Collector:
    """Accumulates tile outputs; merges them (in tile order) into a :class:`SlideDetections`."""

    def __init__(self) -> None:
        self.parts: dict[int, _TileOut] = {}
        self.colors: dict = {}
        self.skipped: list = []
        self.first_prov: dict = {}

    def add(self, out: _TileOut) -> None:
        if out.skipped:
            self.skipped.append(out.region0)
            return
        self.colors.update(out.colors)
        if not self.first_prov and out.provenance:
            self.first_prov = out.provenance
        if out.table is not None and len(out.table):
            self.parts[out.index] = out

    def merge(self, border_iou: float | None, cell: float) -> tuple[Any, list, int]:
        import pandas as pd

        order = sorted(self.parts)
        if not order:
            from napari_medseg.core.detect.instances import measure_instances
            from napari_medseg.progress import run_sync

            empty = run_sync(measure_instances(np.zeros((1, 1), np.int32), np.eye(3), "pixel"))
            return empty, [], 0
        tables = [self.parts[i].table for i in order]
        table = pd.concat(tables, ignore_index=True)
        rings = [r for i in order for r in self.parts[i].outlines]
        border = np.concatenate([self.parts[i].border for i in order])
        tiles = np.concatenate([np.full(len(self.parts[i].table), i) for i in order])
        removed = 0
        if border_iou is not None and border_iou < 1.0 and border.any():
            idx = np.flatnonzero(border)
            sub = table.iloc[idx]
            boxes = sub[["y_min", "x_min", "y_max", "x_max"]].to_numpy(float)
            kept = _border_nms(boxes, sub["score"].to_numpy(float), tiles[idx], border_iou, cell)
            drop = idx[~kept]
            if len(drop):
                removed = len(drop)
                alive = np.ones(len(table), bool)
                alive[drop] = False
                table = table[alive].reset_index(drop=True)
                rings = [r for r, a in zip(rings, alive) if a]
        table["id"] = np.arange(1, len(table) + 1, dtype=np.int64)
        return table, rings, removed


# --------------------------------------------------------------------------- public API


def _plan_detect(
    record: ImageRecord,
    model_or_callable: Any,
    tile: int,
    margin: int,
    level: int | None,
    target_mpp: float | None,
    tissue_only: bool,
    region: Sequence[int] | None,
) -> _TilePlan:
    from napari_medseg.core.slides.wsi import _model_level, _tile_plan, level_for_mpp

    if record.spatial_ndim != 2:
        raise MedsegError(f"{record.name!r} is not a 2D slide")
    if tile < 16 or margin < 0:
        raise MedsegError(f"the tile ({tile}) must be at least 16 pixels and the margin >= 0")
    if level is None:
        if target_mpp is not None:
            level = level_for_mpp(record, target_mpp)
        elif _is_model(model_or_callable):
            level = _model_level(record, model_or_callable)
        else:
            level = 0
    scale, work, tiles = _tile_plan(record, int(level), int(tile), tissue_only, region)
    return _TilePlan(int(level), scale, work, tiles, int(tile), int(margin))


def detect_slide(
    record: ImageRecord,
    model_or_callable: Any,
    *,
    level: int | None = None,
    target_mpp: float | None = None,
    tile: int = 1024,
    margin: int = 64,
    threshold: float = 0.0,
    min_size: float = 0.0,
    nms_iou: float | None = None,
    border_iou: float | None = 0.5,
    min_distance: float | None = None,
    device: Any = "auto",
    batch_size: int = 4,
    tissue_only: bool = True,
    region: Sequence[int] | None = None,
    outlines: bool = True,
    detect_kwargs: dict | None = None,
) -> Generator[Progress, None, SlideDetections]:
    """Detect objects (nuclei, cells) on a whole slide, tile by tile (module docstring).

    Parameters
    ----------
    record : ImageRecord
        A slide from :func:`napari_medseg.io.raster.read_slide` (lazy levels ``(row, col[, C])``).
    model_or_callable : LoadedModel or callable
        A model :func:`napari_medseg.core.detect.detection.detect` accepts, or a detector
        ``f(record, **detect_kwargs)`` returning a
        :class:`~napari_medseg.core.detect.detection.DetectionResult` (or a progress generator that
        returns one), e.g. ``functools.partial(detect_classical, dark_objects=True)``.
    level : int, optional
        Pyramid level to search; default from ``target_mpp``, else from the model card's
        ``spacing`` and the slide's mpp (:func:`~napari_medseg.core.slides.wsi.level_for_mpp`),
        else 0.
    target_mpp : float, optional
        µm per pixel the detector is made for (used when ``level`` is None).
    tile : int
        Core tile side in working-level pixels.
    margin : int
        Context read around each tile (working-level pixels); should exceed the largest
        object's size so that every object is seen whole by the tile that keeps it.
    threshold, min_size, nms_iou
        As :func:`~napari_medseg.core.detect.detection.filter_detections`, applied per tile (after
        mapping, so ``min_size`` is in level-0 pixels); only kept objects are held.
    border_iou : float or None
        NMS between objects of different tiles near tile borders (None: off).
    min_distance : float, optional
        Watershed seed distance in working-level pixels (passed to the detector).
    device, batch_size
        Passed to :func:`~napari_medseg.core.detect.detection.detect` for a model.
    tissue_only : bool
        Only tiles touching tissue (:func:`~napari_medseg.core.slides.wsi.tissue_mask`).
    region : (y0, x0, y1, x1), optional
        Level-0 pixels; only tiles intersecting it run.
    outlines : bool
        Keep one outline per object (for GeoJSON polygons); False keeps the table only.
    detect_kwargs : dict, optional
        More keyword arguments for the detector.

    Yields
    ------
    Progress
        ``done``/``total`` in tiles. After each tile ``info`` holds ``"tiles"`` (its level-0
        region), ``"detections"`` (the new rows, level-0 table, ids not final) and
        ``"outlines"`` (their rings), for live display; the border NMS at the end may still
        remove a few of them.

    Returns
    -------
    SlideDetections

    Raises
    ------
    MedsegError
        No tissue, a bad level, a detector that does not fit the slide.
    """
    t0 = time.perf_counter()
    plan = _plan_detect(
        record, model_or_callable, tile, margin, level, target_mpp, tissue_only, region
    )
    detector, desc = _as_detector(
        model_or_callable, device, min_distance, batch_size, detect_kwargs
    )
    filters = {"score_threshold": threshold, "min_size": min_size, "nms_iou": nms_iou}
    total = len(plan.tiles)
    yield Progress(0, total, f"{total} tiles over tissue (level {plan.level})")
    col = _Collector()
    done = 0
    n_obj = 0
    for item in _detect_tiles(record, detector, plan, range(total), filters, outlines):
        if isinstance(item, Progress):
            yield Progress(done, total, f"tile {done + 1}/{total}: {item.message}", item.info)
            continue
        col.add(item)
        done += 1
        info: dict[str, Any] = {"tiles": [item.region0]}
        if item.table is not None:
            n_obj += len(item.table)
            info.update(detections=item.table, outlines=item.outlines)
        yield Progress(done, total, f"tile {done}/{total}: {n_obj} objects", info)
    return _finish(
        record, plan, col, desc, done, border_iou, outlines, t0,
        {**filters, "border_iou": border_iou, "min_distance": min_distance, "device": str(device),
         "tissue_only": tissue_only, "region": list(region) if region else None},
    )  # fmt: skip


def _finish(
    record: ImageRecord,
    plan: _TilePlan,
    col: _Collector,
    desc: dict,
    done: int,
    border_iou: float | None,
    outlines: bool,
    t0: float,
    params: dict,
) -> SlideDetections:
    table, rings, removed = col.merge(border_iou, float(plan.tile * plan.scale))
    if not outlines:
        rings = [None] * len(table)
    mpp = (record.metadata or {}).get("mpp")
    prov = {
        "task": "detection (whole slide)",
        "model": desc,
        "detector": col.first_prov.get("method") or col.first_prov.get("task"),
        "parameters": {
            **params,
            "level": plan.level,
            "scale": plan.scale,
            "tile": plan.tile,
            "margin": plan.margin,
            "method": "per tile + margin; kept by the tile whose core holds the centre; "
            "box NMS across tile borders",
        },
        "input": {
            "name": record.name,
            "path": record.path,
            "shape": list(record.data.shape),
            "mpp": mpp,
        },
        "coordinates": "level-0 (full-resolution) pixels",
        "n_objects": len(table),
        "border_duplicates_removed": removed,
        "tiles_done": done,
        "tiles_total": len(plan.tiles),
        "skipped": [list(s) for s in col.skipped],
        "versions": software_versions(),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return SlideDetections(
        table=table,
        outlines=rings,
        shape=(int(record.data.shape[0]), int(record.data.shape[1])),
        level=plan.level,
        scale=plan.scale,
        tiles_done=done,
        tiles_total=len(plan.tiles),
        skipped=sorted(col.skipped),
        class_colors=col.colors or {"object": "#e6194b"},
        mpp=mpp,
        provenance=prov,
        affine=np.asarray(record.affine, dtype=float),
    )


# --------------------------------------------------------------------------- writing


def _row_positions(result: SlideDetections, tbl: pd.DataFrame) -> np.ndarray:
    """Row of ``result.table`` (and ``result.outlines``) of each row of ``tbl``, -1 if none."""
    if "id" in tbl.columns and "id" in result.table.columns:
        where = {int(v): i for i, v in enumerate(result.table["id"].to_numpy())}
        return np.array([where.get(int(v), -1) for v in tbl["id"].to_numpy()], dtype=np.int64)
    return result.table.index.get_indexer(tbl.index)


def write_slide_detections(
    path: str | Path,
    result: SlideDetections,
    table: pd.DataFrame | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write slide detections as ``.csv`` or QuPath ``.geojson`` (atomic, streamed).

    Parameters
    ----------
    path : path
        Output; the suffix chooses the format (as
        :func:`napari_medseg.io.detections.write_detections`).
    result : SlideDetections
        From :func:`detect_slide`.
    table : pandas.DataFrame, optional
        A subset of ``result.table`` to write instead (e.g. from
        :func:`~napari_medseg.core.detect.detection.filter_detections`); rows are matched to their
        outlines by ``id``.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path

    Notes
    -----
    GeoJSON features are those of :func:`napari_medseg.io.detections.to_geojson` (properties
    ``objectType``, ``classification``, ``measurements`` with the level-0 centre), with the
    object's outline as the ``Polygon`` when known (else a ``Point``). Features are written
    in batches of 2000, so the file is never built in memory as one document.
    """
    from napari_medseg._files import atomic_path
    from napari_medseg.errors import ImageWriteError
    from napari_medseg.io.detections import to_geojson, write_detections

    path = Path(path).expanduser()
    tbl = result.table if table is None else table
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return write_detections(path, tbl, overwrite=overwrite)
    if suffix not in (".geojson", ".json"):
        raise ImageWriteError(
            f"cannot write detections to {path.name}: use a .csv or .geojson file name"
        )
    if path.exists() and not overwrite:
        raise ImageWriteError(f"{path} exists; pass --overwrite to replace it.")
    if not path.parent.is_dir():
        raise ImageWriteError(f"cannot write {path}: the folder {path.parent} does not exist.")
    pos = _row_positions(result, tbl)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        first = True
        for s in range(0, len(tbl), 2000):
            part = tbl.iloc[s : s + 2000]
            doc = to_geojson(part, affine=result.affine, class_colors=result.class_colors)
            for feat, p in zip(doc["features"], pos[s : s + 2000]):
                ring = result.outlines[p] if 0 <= p < len(result.outlines) else None
                if ring is not None:
                    coords = np.round(ring.astype(float), 3).tolist()
                    feat["geometry"] = {"type": "Polygon", "coordinates": [coords]}
                f.write(("" if first else ",") + "\n" + json.dumps(feat))
                first = False
        f.write("\n]}\n")
    return path


# --------------------------------------------------------------------------- dask scale-out


def _dask_task(slide_path: str, ref: str, plan: dict, indices: list, opts: dict) -> list:
    """Worker side: open slide and detector (cached per worker), run ``indices``; tile outputs."""
    from napari_medseg.core.slides.wsi import worker_slide

    rec, obj = worker_slide(slide_path, ref, load_detector)
    detector, _ = _as_detector(
        obj, opts["device"], opts["min_distance"], opts["batch_size"], opts["detect_kwargs"]
    )
    outs = []
    for item in _detect_tiles(
        rec, detector, _TilePlan(**plan), indices, opts["filters"], opts["outlines"]
    ):
        if isinstance(item, _TileOut):
            outs.append(item)
    return outs


def detect_slide_dask(
    slide_path: str | Path,
    model_ref: str,
    *,
    scheduler: str | Any = None,
    tiles_per_task: int | None = None,
    level: int | None = None,
    target_mpp: float | None = None,
    tile: int = 1024,
    margin: int = 64,
    threshold: float = 0.0,
    min_size: float = 0.0,
    nms_iou: float | None = None,
    border_iou: float | None = 0.5,
    min_distance: float | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    tissue_only: bool = True,
    region: Sequence[int] | None = None,
    outlines: bool = True,
    detect_kwargs: dict | None = None,
) -> Generator[Progress, None, SlideDetections]:
    """:func:`detect_slide` on a dask.distributed cluster (same result as one process).

    The driver plans the tiles (tissue mask); each task gets the slide path, ``model_ref`` and a
    run of tile indices, opens slide and detector itself (once per worker) and returns its
    tiles' tables and outlines (only the objects, never pixels). The driver merges them in tile
    order, as the single-process run does.

    Parameters
    ----------
    slide_path : str or Path
        The slide file (every worker must see it at this path).
    model_ref : str
        Model name or folder (:func:`napari_medseg.models.registry.load_model`), or
        ``"classical"`` / ``"classical-dark"``
        (:func:`~napari_medseg.core.detect.detection.detect_classical`, dark objects for
        bright-field).
    scheduler : None, "local", str or distributed.Client
        As :func:`napari_medseg.core.slides.wsi.segment_slide_dask`.
    tiles_per_task : int, optional
        Tiles per task; default about 4 tasks per worker.
    Other parameters
        As :func:`detect_slide`.

    Returns
    -------
    SlideDetections
    """
    from contextlib import closing

    from napari_medseg.core.engine.cluster import as_finished, connect, worker_count
    from napari_medseg.io.raster import read_slide

    t0 = time.perf_counter()
    rec = read_slide(slide_path)
    obj = load_detector(str(model_ref))
    plan = _plan_detect(rec, obj, tile, margin, level, target_mpp, tissue_only, region)
    _, desc = _as_detector(obj, device, min_distance, batch_size, detect_kwargs)
    filters = {"score_threshold": threshold, "min_size": min_size, "nms_iou": nms_iou}
    total = len(plan.tiles)
    yield Progress(0, total, "starting the dask cluster")
    client, close_client = connect(scheduler)
    col = _Collector()
    done = 0
    try:
        n_workers = worker_count(client)
        per = int(tiles_per_task or max(1, math.ceil(total / (4 * n_workers))))
        opts = {
            "device": device,
            "min_distance": min_distance,
            "batch_size": batch_size,
            "detect_kwargs": detect_kwargs,
            "filters": filters,
            "outlines": outlines,
        }
        pd_plan = {**plan.__dict__}
        runs = [list(range(i, min(total, i + per))) for i in range(0, total, per)]
        argsets = [(str(slide_path), str(model_ref), pd_plan, r, opts) for r in runs]
        yield Progress(0, total, f"{total} tiles in {len(runs)} tasks on {n_workers} workers")
        with closing(as_finished(client, _dask_task, argsets)) as tasks:
            for _, items in tasks:
                for item in items:
                    col.add(item)
                    done += 1
                yield Progress(done, total, f"tile {done}/{total}")
    finally:
        close_client()
    return _finish(
        rec, plan, col, desc, done, border_iou, outlines, t0,
        {**filters, "border_iou": border_iou, "min_distance": min_distance, "device": device,
         "tissue_only": tissue_only, "region": list(region) if region else None,
         "scheduler": str(scheduler or "local")},
    )  # fmt: skip
