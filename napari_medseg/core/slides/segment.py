"""Whole-slide (gigapixel) segmentation, tile by tile with bounded memory, into OME-Zarr labels.

How a slide is segmented
------------------------
1. :func:`~napari_medseg.core.slides.tissue.tissue_mask`: Otsu threshold on the HSV
   saturation of a low-resolution pyramid level, floored so a blank slide finds nothing, then
   small objects and holes removed.
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
card's is used (:func:`~napari_medseg.core.slides.tiles.level_for_mpp`) and the labels are
repeated (nearest) onto level 0.

One driver (:func:`segment_slide`) runs in this process or, with ``scheduler``, on a
dask.distributed cluster (:func:`napari_medseg.core.slides.run.run_tiles`): the same tile plan,
the same batches, the same labels. The output layout is described in
:mod:`napari_medseg.core.slides.export`.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.core.slides.export import (
    build_pyramid,
    create_labels_zarr,
    finish_attrs,
    open_result,
)
from napari_medseg.core.slides.run import run_tiles
from napari_medseg.core.slides.tiles import (
    TilePlan,
    TileReader,
    model_level,
    plan_slide_tiles,
    read_with_margin,
)
from napari_medseg.core.slides.tissue import slide_levels
from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = [
    "SlideResult",
    "load_segmentation_model",
    "plan_segmentation",
    "predict_batch",
    "segment_slide",
    "segment_tiles",
]


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


def predict_batch(
    net: Any, inputs: list[np.ndarray], card: Any, dev: Any, lut: np.ndarray | None
) -> np.ndarray:
    """Argmax labels ``(B, H, W)`` uint8 for a list of ``(H, W, C)`` inputs of equal size."""
    import torch

    from napari_medseg.core.engine.preprocess import normalize
    from napari_medseg.core.engine.windows import main_output

    x = np.stack([normalize(a, card.normalization, channel_axis=-1) for a in inputs])
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev)
    with torch.inference_mode():
        y = main_output(net(xt))
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
    own = [k for k in ("hovernet", "nuclick", "guidance_channels") if (card.extra or {}).get(k)]
    if own:
        raise MedsegError(
            f"model {card.name!r} runs its own pipeline ({own[0]}), which napari-medseg runs on "
            "images, not yet tile by tile on whole slides: save a region of the slide as an image "
            "(e.g. a PNG or TIFF) and segment that"
        )
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


def plan_segmentation(
    record: ImageRecord,
    model: LoadedModel,
    tile: int,
    margin: int | None,
    level: int | None,
    tissue_only: bool,
    region: Sequence[int] | None,
) -> TilePlan:
    """Check the model against the slide and plan the tiles of a segmentation run."""
    _check_model(record, model)
    levels = slide_levels(record)
    lvl = model_level(record, model) if level is None else int(level)
    if not 0 <= lvl < len(levels):
        raise MedsegError(f"level {lvl} does not exist; the slide has {len(levels)} level(s)")
    mult = _net_multiple(model.card)
    if margin is None:
        margin = 64
    if (tile + 2 * margin) % mult:
        raise MedsegError(
            f"tile + 2 x margin ({tile + 2 * margin}) must be a multiple of {mult} for this network"
        )
    scale, work, tiles = plan_slide_tiles(record, lvl, int(tile), tissue_only, region)
    return TilePlan(lvl, scale, work, tiles, int(tile), int(margin))


def _write_labels(arr0: Any, t: tuple, lab: np.ndarray, scale: int, shape0: Sequence[int]) -> None:
    y0, x0, y1, x1 = t
    lab = lab[: y1 - y0, : x1 - x0]
    if scale > 1:
        lab = np.repeat(np.repeat(lab, scale, axis=0), scale, axis=1)
    Y0, X0 = y0 * scale, x0 * scale
    Y1, X1 = min(int(shape0[0]), Y0 + lab.shape[0]), min(int(shape0[1]), X0 + lab.shape[1])
    arr0[Y0:Y1, X0:X1] = lab[: Y1 - Y0, : X1 - X0]


def load_segmentation_model(ref: str) -> LoadedModel:
    """Load a model by name or folder on the CPU (what a dask worker does with ``ref``)."""
    from napari_medseg.models.registry import load_model

    return load_model(ref, device="cpu")


def segment_tiles(
    record: ImageRecord,
    model: LoadedModel,
    indices: Sequence[int],
    plan: TilePlan,
    out: str | Path,
    batch_size: int,
    device: Any,
) -> Iterator[tuple[list[int], list]]:
    """Segment tiles ``plan.tiles[i] for i in indices`` into the level-0 array of ``out``.

    Batches of ``batch_size`` consecutive indices, the next batch read in a thread while the
    network runs. Yields ``(indices of the batch, level-0 regions that could not be decoded)``
    after each batch. The work function of :func:`segment_slide`, in this process or on a dask
    worker.
    """
    import zarr

    from napari_medseg.core.engine.windows import resolve_device

    dev = resolve_device(device)
    card = model.card
    from napari_medseg.core.engine.fastpath import prepare_network

    net, _ = prepare_network(model.network, dev, "auto")  # precision, folding, memory format
    ids = [int(c["id"]) for c in card.classes]
    lut = None if ids == list(range(len(ids))) else np.asarray(ids, dtype=np.uint8)
    arr0 = zarr.open_group(str(out), mode="r+")["0"]
    reader = TileReader(record, plan.level)
    shape0 = record.data.shape[:2]
    indices = list(indices)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]

    def load(batch: list) -> list:
        return [
            read_with_margin(reader, plan.tiles[i], plan.tile, plan.margin, plan.work_shape)
            for i in batch
        ]

    pool = cf.ThreadPoolExecutor(max_workers=1)
    fut = None
    try:
        fut = pool.submit(load, batches[0]) if batches else None
        for bi, batch in enumerate(batches):
            got = fut.result()
            fut = pool.submit(load, batches[bi + 1]) if bi + 1 < len(batches) else None
            labs = predict_batch(net, [a for a, _ in got], card, dev, lut)
            m, t = plan.margin, plan.tile
            bad = []
            for i, lab, (_, was_bad) in zip(batch, labs, got):
                if was_bad:
                    lab = np.zeros_like(lab)
                    bad.append(plan.region0(i))
                _write_labels(arr0, plan.tiles[i], lab[m : m + t, m : m + t], plan.scale, shape0)
            yield batch, bad
    finally:
        if fut is not None:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _provenance(record: ImageRecord, model: LoadedModel, plan: TilePlan, params: dict) -> dict:
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


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "card") and hasattr(obj, "network")


def segment_slide(
    slide: ImageRecord | str | Path,
    model: LoadedModel | str | Path,
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
    scheduler: Any = None,
    tiles_per_task: int | None = None,
) -> Generator[Progress, None, SlideResult]:
    """Segment a whole slide (or a region of it) tile by tile into an OME-Zarr label pyramid.

    Parameters
    ----------
    slide : ImageRecord, str or Path
        A slide from :func:`napari_medseg.io.raster.read_slide` (lazy levels ``(row, col, 3)``)
        or its file (read here). On a cluster every worker opens the file at this path.
    model : LoadedModel, str or Path
        A 2D segmentation model with ``in_channels`` = the slide's channels, or its name or
        folder (loaded on the CPU, as on every dask worker).
    out_zarr : str or Path
        Output folder (``.zarr``; layout in :mod:`napari_medseg.core.slides.export`), on
        storage every worker can write when on a cluster.
    tile : int
        Output tile side in working-level pixels (also the Zarr chunk side at level 0).
    margin : int
        Context read on every side of a tile and cropped off (pixels); ``tile + 2 * margin``
        must be a multiple of the network's total stride.
    batch_size : int
        Tiles per forward pass.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` (on a cluster: each worker's device).
    level : int, optional
        Pyramid level to run on; default from the card's spacing and the slide's mpp (0 when
        either is unknown).
    tissue_only : bool
        Skip tiles without tissue (:func:`~napari_medseg.core.slides.tissue.tissue_mask`).
    region : (y0, x0, y1, x1), optional
        Level-0 pixels: only tiles intersecting it run ("run on current view").
    overwrite : bool
        Replace an existing ``out_zarr``.
    scheduler : None, "local", str or distributed.Client
        ``None``: run in this process. Otherwise on a dask cluster
        (:func:`napari_medseg.core.slides.run.run_tiles`): the driver plans the tiles and
        creates the Zarr, each task opens slide and model itself (once per worker) and writes
        its tiles; tiles are chunk-aligned and disjoint, so concurrent writes never touch the
        same Zarr chunk. Tasks run whole batches of the same ordered tile list, so the labels
        are identical to a run in one process.
    tiles_per_task : int, optional
        On a cluster: tiles per task (rounded up to a multiple of ``batch_size``); default
        about 4 tasks per worker.

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
        No tissue, a model that does not fit, an existing output, a cluster run without a
        slide file or a model reference.
    """
    from napari_medseg.io.raster import read_slide

    t0 = time.perf_counter()
    out = Path(out_zarr)
    record = slide if hasattr(slide, "spatial_ndim") else read_slide(slide)
    loaded = model if _is_model(model) else load_segmentation_model(str(model))
    slide_path = ref = None
    if scheduler is not None:
        slide_path = str(slide) if isinstance(slide, (str, Path)) else record.path
        ref = str(model) if isinstance(model, (str, Path)) else getattr(model, "source", "")
        if not slide_path or not ref:
            raise MedsegError(
                "a dask run opens the slide and the model on every worker: give the slide's "
                "file and the model's name or folder"
            )
        dev: Any = device
    else:
        from napari_medseg.core.engine.windows import resolve_device

        dev = resolve_device(device)
    plan = plan_segmentation(record, loaded, tile, margin, level, tissue_only, region)
    mpp = (record.metadata or {}).get("mpp")
    create_labels_zarr(out, record.data.shape[:2], plan.chunk0, loaded.card, mpp, overwrite)
    total = len(plan.tiles)
    yield Progress(0, total, f"{total} tiles over tissue")
    done, skipped = 0, []
    finished = False
    try:
        for item in run_tiles(
            segment_tiles,
            (plan, str(out), batch_size, dev),
            total,
            record=record,
            obj=loaded,
            scheduler=scheduler,
            slide_path=slide_path,
            ref=ref,
            load=load_segmentation_model,
            tiles_per_task=tiles_per_task,
            multiple=batch_size,
        ):
            if isinstance(item, Progress):
                yield Progress(done, total, item.message, item.info)
                continue
            batch, bad = item
            done += len(batch)
            skipped += [tuple(b) for b in bad]
            regions = [plan.region0(i) for i in batch]
            yield Progress(done, total, f"tile {done}/{total}", {"tiles": regions})
        yield Progress(done, total, "building lower-resolution levels")
        yield from build_pyramid(out, [plan.region0(i) for i in range(total)], plan.chunk0)
        finished = True
    finally:
        params: dict[str, Any] = {
            "batch_size": batch_size,
            "tissue_only": tissue_only,
            "region": list(region) if region else None,
        }
        if scheduler is not None:
            params["scheduler"] = str(scheduler)
            skipped = sorted(skipped)
        prov = _provenance(record, loaded, plan, params)
        prov["device"] = str(dev)
        prov["elapsed_s"] = round(time.perf_counter() - t0, 3)
        finish_attrs(
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
