"""Slide detections tile by tile: one tile's detections moved to level-0 pixels and filtered by
the centre rule, outlines as QuPath rings, and the merge of all tiles with a box NMS across tile
borders (the steps 3 to 6 of :mod:`napari_medseg.core.slides.detect`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.core.slides.tiles import TilePlan
    from napari_medseg.io.record import ImageRecord

__all__ = [
    "Collector",
    "TileDetections",
    "border_nms",
    "drop_collinear",
    "map_tile",
    "ring_outlines",
    "tile_record",
]


@dataclass
class TileDetections:
    """Detections of one tile after the centre rule, mapped to level 0 (``skipped``: the tile
    could not be decoded)."""

    index: int
    region0: tuple[int, int, int, int]
    table: Any  # DataFrame or None
    outlines: list
    border: np.ndarray  # bool per row: the box reaches outside the tile's core
    colors: dict
    provenance: dict
    skipped: bool = False


def tile_record(
    record: ImageRecord, a: np.ndarray, origin: tuple[int, int], plan: TilePlan
) -> ImageRecord:
    """The tile ``a`` (working-level pixels read from ``origin``) as an in-memory record: an
    identity affine, ``metadata["mpp"]`` = the slide's mpp x the level's downsample."""
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


def drop_collinear(rc: np.ndarray) -> np.ndarray:
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


def ring_outlines(
    inst: np.ndarray | None, ids: np.ndarray, origin: tuple[int, int], s: int
) -> list:
    """Level-0 ``[x, y]`` rings (QuPath corners) of objects ``ids`` of a tile's instance map."""
    if inst is None or np.ndim(inst) != 2 or not np.size(inst) or ids.size == 0:
        return [None] * len(ids)
    from scipy import ndimage as ndi

    from napari_medseg.io.detections import object_outline

    inst = np.asarray(inst)
    objs = ndi.find_objects(inst)
    off = np.array([origin[0], origin[1]], dtype=float)
    out = []
    for lab in ids:
        lab = int(lab)
        if not 0 < lab <= len(objs) or objs[lab - 1] is None:
            out.append(None)
            continue
        rc = object_outline(inst, objs[lab - 1], lab)
        if rc is None or len(rc) < 4:
            out.append(None)
            continue
        rc = drop_collinear(rc)
        yx = s * (rc + off) + (s - 1) / 2.0 + 0.5
        ring = np.ascontiguousarray(yx[:, ::-1], dtype=np.float32)
        if not np.array_equal(ring[0], ring[-1]):
            ring = np.vstack([ring, ring[:1]])
        out.append(ring)
    return out


def map_tile(
    res: Any,
    t: tuple[int, int, int, int],
    origin: tuple[int, int],
    plan: TilePlan,
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
        ring_outlines(getattr(res, "instances", None), ids, origin, s)
        if outlines
        else [None] * len(tbl)
    )
    return tbl, rings, border


# --------------------------------------------------------------------------- merging


def border_nms(
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


class Collector:
    """Accumulates tile outputs; merges them (in tile order) into a :class:`SlideDetections`."""

    def __init__(self) -> None:
        self.parts: dict[int, TileDetections] = {}
        self.colors: dict = {}
        self.skipped: list = []
        self.first_prov: dict = {}

    def add(self, out: TileDetections) -> None:
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
            kept = border_nms(boxes, sub["score"].to_numpy(float), tiles[idx], border_iou, cell)
            drop = idx[~kept]
            if len(drop):
                removed = len(drop)
                alive = np.ones(len(table), bool)
                alive[drop] = False
                table = table[alive].reset_index(drop=True)
                rings = [r for r, a in zip(rings, alive) if a]
        table["id"] = np.arange(1, len(table) + 1, dtype=np.int64)
        return table, rings, removed
