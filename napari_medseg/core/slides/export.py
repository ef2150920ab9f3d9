"""Slide results on disk: the OME-Zarr label pyramid a segmentation writes, its OME-TIFF export,
and slide detections as CSV or QuPath GeoJSON.

Output layout (OME-NGFF 0.5 on Zarr v3)
---------------------------------------
``OUT.zarr/`` is a group with arrays ``0, 1, ...`` (``(y, x)``, uint8, level ``k`` is level 0
subsampled by ``2**k``) and attributes ``ome.multiscales`` (axes ``y, x`` in micrometres when
the slide states mpp, else pixels, with per-level ``scale``), ``ome.image-label`` (class colours)
and ``medseg`` (``complete``, tiles done/skipped, provenance). A cancelled run leaves a readable
partial result with ``medseg.complete == false`` (level 0 holds the tiles finished so far).

:func:`export_labels_ome_tiff` turns such a result into a tiled, pyramidal (SubIFDs) OME-TIFF
chunk row by chunk row. :func:`write_slide_detections` streams detections to CSV or GeoJSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from napari_medseg.core.slides.detect import SlideDetections

__all__ = [
    "build_pyramid",
    "create_labels_zarr",
    "export_labels_ome_tiff",
    "finish_attrs",
    "open_result",
    "write_slide_detections",
]


def _pyramid_shapes(shape: Sequence[int], tile: int) -> list[tuple[int, int]]:
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > tile and min(shapes[-1]) >= 2:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def create_labels_zarr(
    out: Path, shape: Sequence[int], chunk: int, card: Any, mpp: float | None, overwrite: bool
) -> Any:
    """Create ``out`` (an OME-Zarr group): empty uint8 levels ``0, 1, ...`` of the level-0
    ``shape`` halved until one chunk, the multiscales and class-colour attributes of ``card``,
    and ``medseg.complete = false``."""
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


def finish_attrs(out: Path, extra: dict) -> None:
    """Merge ``extra`` (JSON-able) into the result's ``medseg`` attributes."""
    import zarr

    g = zarr.open_group(str(out), mode="r+")
    med = dict(g.attrs.get("medseg", {}))
    med.update(json.loads(json.dumps(extra, default=str)))
    g.attrs["medseg"] = med


def build_pyramid(
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
    """The levels of a result written by
    :func:`napari_medseg.core.slides.segment.segment_slide`, as lazy dask arrays.

    Returns
    -------
    list of dask.array.Array
        ``(rows, cols)`` uint8, level 0 (slide full resolution) first; for a napari
        multiscale Labels layer (:func:`napari_medseg.io.raster.open_labels_zarr`).
    """
    from napari_medseg.io.raster import open_labels_zarr

    return open_labels_zarr(out_zarr)[0]


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
    writer's buffers); the file is written under a hidden temporary name beside OUT and renamed
    when complete (:func:`napari_medseg._files.atomic_path`).

    Parameters
    ----------
    zarr_path : str or Path
        A result of :func:`napari_medseg.core.slides.segment.segment_slide` (``OUT.zarr``,
        levels ``(y, x)`` uint8).
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


# --------------------------------------------------------------------------- detections


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
        From :func:`napari_medseg.core.slides.detect.detect_slide`.
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
