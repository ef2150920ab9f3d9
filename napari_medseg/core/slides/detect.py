"""Object detection on whole slides, tile by tile, with bounded memory.

How a slide is searched
-----------------------
1. The tissue mask and the tile plan of :mod:`napari_medseg.core.slides.tiles` (only tiles
   touching tissue, or a level-0 ``region``) on the working level (:func:`~napari_medseg.core.
   slides.tiles.level_for_mpp`: from the model card's ``spacing`` and the slide's mpp, or
   ``target_mpp``).
2. Each tile is read with ``margin`` pixels of context on every side (clipped at the slide's
   edge, never mirrored: a mirror would invent objects) by the same prefetching, TIFF-tile
   caching reader as segmentation; the next tile is read in a thread while the current one runs.
3. Objects are found on the tile by :func:`napari_medseg.core.detect.detection.detect` (any
   model kind ``detect`` accepts) or by any callable ``f(record) -> DetectionResult`` (or a
   progress generator returning one), e.g.
   :func:`~napari_medseg.core.detect.classical.detect_classical`. The tile is an in-memory
   :class:`~napari_medseg.io.record.ImageRecord` with an identity affine (working-level
   pixels) and ``metadata["mpp"]`` = the slide's mpp x the level's downsample.
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
   :func:`napari_medseg.core.slides.export.write_slide_detections` writes CSV or QuPath
   GeoJSON from it, streaming.

The table has the columns of :mod:`napari_medseg.core.detect.result` (``id`` renumbered 1..N over
the slide, in tile order), plus any extra columns the detector adds.

One driver (:func:`detect_slide`) runs in this process or, with ``scheduler``, on a
dask.distributed cluster (:func:`napari_medseg.core.slides.run.run_tiles`): each task opens the
slide and the detector itself and returns only its tiles' tables and outlines; the driver merges
them in tile order, so the result is the same as in one process.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.core.correct.mask_store import software_versions
from napari_medseg.core.detect.detection import load_detector
from napari_medseg.core.slides.run import run_tiles
from napari_medseg.core.slides.tile_results import (
    Collector,
    TileDetections,
    map_tile,
    tile_record,
)
from napari_medseg.core.slides.tiles import (
    TilePlan,
    TileReader,
    level_for_mpp,
    model_level,
    plan_slide_tiles,
)
from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from napari_medseg.io.record import ImageRecord

__all__ = ["SlideDetections", "detect_slide", "detect_tiles"]

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


# --------------------------------------------------------------------------- tiles


def _detect_tiles(
    record: ImageRecord,
    detector: Detector,
    plan: TilePlan,
    indices: Sequence[int],
    filters: dict,
    outlines: bool,
) -> Iterator[Progress | TileDetections]:
    """Run ``detector`` on tiles ``plan.tiles[i] for i in indices`` (next one prefetched).

    Yields the detector's :class:`Progress` (re-labelled) and one :class:`TileDetections` per tile.
    """
    reader = TileReader(record, plan.level)
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
                yield TileDetections(i, region0, None, [], np.zeros(0, bool), {}, {}, skipped=True)
                continue
            rec = tile_record(record, a, origin, plan)
            del a
            gen = _run_detector(detector, rec)
            while True:
                try:
                    p = next(gen)
                except StopIteration as stop:
                    res = stop.value
                    break
                yield Progress(p.done, p.total, p.message, {"tile_index": i})
            tbl, rings, border = map_tile(res, t, origin, plan, affine, filters, outlines)
            yield TileDetections(
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


def detect_tiles(
    record: ImageRecord,
    detector: Any,
    indices: Sequence[int],
    plan: TilePlan,
    filters: dict,
    outlines: bool,
    detector_opts: dict,
) -> Iterator[Progress | TileDetections]:
    """Detect on tiles ``plan.tiles[i] for i in indices``: the work function of
    :func:`detect_slide`, in this process or on a dask worker.

    ``detector`` is a loaded model or a detector function; ``detector_opts`` holds
    ``device``, ``min_distance``, ``batch_size`` and ``detect_kwargs`` for it. Yields the
    detector's progress and one tile output (table and outlines in level-0 pixels) per tile.
    """
    f, _ = _as_detector(
        detector,
        detector_opts["device"],
        detector_opts["min_distance"],
        detector_opts["batch_size"],
        detector_opts["detect_kwargs"],
    )
    yield from _detect_tiles(record, f, plan, indices, filters, outlines)


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
) -> TilePlan:
    if record.spatial_ndim != 2:
        raise MedsegError(f"{record.name!r} is not a 2D slide")
    if tile < 16 or margin < 0:
        raise MedsegError(f"the tile ({tile}) must be at least 16 pixels and the margin >= 0")
    if level is None:
        if target_mpp is not None:
            level = level_for_mpp(record, target_mpp)
        elif _is_model(model_or_callable):
            level = model_level(record, model_or_callable)
        else:
            level = 0
    scale, work, tiles = plan_slide_tiles(record, int(level), int(tile), tissue_only, region)
    return TilePlan(int(level), scale, work, tiles, int(tile), int(margin))


def detect_slide(
    slide: ImageRecord | str | Path,
    detector: Any,
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
    scheduler: Any = None,
    tiles_per_task: int | None = None,
) -> Generator[Progress, None, SlideDetections]:
    """Detect objects (nuclei, cells) on a whole slide, tile by tile (module docstring).

    Parameters
    ----------
    slide : ImageRecord, str or Path
        A slide from :func:`napari_medseg.io.raster.read_slide` (lazy levels ``(row, col[, C])``)
        or its file (read here). On a cluster every worker opens the file at this path.
    detector : LoadedModel, callable or str
        A model :func:`napari_medseg.core.detect.detection.detect` accepts, a detector
        ``f(record, **detect_kwargs)`` returning a
        :class:`~napari_medseg.core.detect.result.DetectionResult` (or a progress generator
        that returns one), e.g. ``functools.partial(detect_classical, dark_objects=True)``, or
        a name :func:`~napari_medseg.core.detect.detection.load_detector` knows
        (``"classical"``, ``"classical-dark"``, ``"classical-he"``, a model name or folder). A
        cluster run needs a name or a model folder (each worker loads it).
    level : int, optional
        Pyramid level to search; default from ``target_mpp``, else from the model card's
        ``spacing`` and the slide's mpp (:func:`~napari_medseg.core.slides.tiles.level_for_mpp`),
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
        Only tiles touching tissue (:func:`~napari_medseg.core.slides.tissue.tissue_mask`).
    region : (y0, x0, y1, x1), optional
        Level-0 pixels; only tiles intersecting it run.
    outlines : bool
        Keep one outline per object (for GeoJSON polygons); False keeps the table only.
    detect_kwargs : dict, optional
        More keyword arguments for the detector.
    scheduler : None, "local", str or distributed.Client
        ``None``: run in this process. Otherwise on a dask cluster
        (:func:`napari_medseg.core.slides.run.run_tiles`); each task returns only its tiles'
        tables and outlines (never pixels) and the driver merges them in tile order, so the
        result equals that of one process.
    tiles_per_task : int, optional
        On a cluster: tiles per task; default about 4 tasks per worker.

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
    from napari_medseg.io.raster import read_slide

    t0 = time.perf_counter()
    record = slide if hasattr(slide, "spatial_ndim") else read_slide(slide)
    obj = load_detector(detector) if isinstance(detector, str) else detector
    slide_path = ref = None
    if scheduler is not None:
        slide_path = str(slide) if isinstance(slide, (str, Path)) else record.path
        ref = detector if isinstance(detector, str) else getattr(detector, "source", "")
        if not slide_path or not ref:
            raise MedsegError(
                "a dask run opens the slide and the detector on every worker: give the slide's "
                "file and the detector's name or model folder"
            )
    plan = _plan_detect(record, obj, tile, margin, level, target_mpp, tissue_only, region)
    _, desc = _as_detector(obj, device, min_distance, batch_size, detect_kwargs)
    filters = {"score_threshold": threshold, "min_size": min_size, "nms_iou": nms_iou}
    detector_opts = {
        "device": device,
        "min_distance": min_distance,
        "batch_size": batch_size,
        "detect_kwargs": detect_kwargs,
    }
    total = len(plan.tiles)
    yield Progress(0, total, f"{total} tiles over tissue (level {plan.level})")
    col = Collector()
    done = 0
    n_obj = 0
    for item in run_tiles(
        detect_tiles,
        (plan, filters, outlines, detector_opts),
        total,
        record=record,
        obj=obj,
        scheduler=scheduler,
        slide_path=slide_path,
        ref=ref,
        load=load_detector,
        tiles_per_task=tiles_per_task,
    ):
        if isinstance(item, Progress):
            if "tile_index" in (item.info or {}):
                msg = f"tile {done + 1}/{total}: {item.message}"
            else:
                msg = item.message
            yield Progress(done, total, msg, item.info)
            continue
        col.add(item)
        done += 1
        info: dict[str, Any] = {"tiles": [item.region0]}
        if item.table is not None:
            n_obj += len(item.table)
            info.update(detections=item.table, outlines=item.outlines)
        yield Progress(done, total, f"tile {done}/{total}: {n_obj} objects", info)
    params = {
        **filters,
        "border_iou": border_iou,
        "min_distance": min_distance,
        "device": str(device),
        "tissue_only": tissue_only,
        "region": list(region) if region else None,
    }
    if scheduler is not None:
        params["scheduler"] = str(scheduler)
    return _finish(record, plan, col, desc, done, border_iou, outlines, t0, params)


def _finish(
    record: ImageRecord,
    plan: TilePlan,
    col: Collector,
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
