"""npe2 reader, writer and sample-data contributions (layer-data tuples; no napari import).

napari calls :func:`get_reader` for files dropped on the canvas or opened with File > Open,
the ``write_*`` functions from File > Save Layers, and the ``sample_*`` functions from
File > Open Sample. All geometry handling is in :mod:`napari_medseg.io.geometry`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg._files import split_ext
from napari_medseg.errors import ImageReadError, ImageWriteError
from napari_medseg.io.geometry import layer_to_record_parts, record_to_layer_data
from napari_medseg.io.raster import is_labels_zarr, is_slide, open_labels_zarr
from napari_medseg.io.readers import (
    DICOM_EXT,
    RASTER_EXT,
    SUPPORTED_EXTENSIONS,
    TIFF_EXT,
    read_image,
    write_image,
)
from napari_medseg.io.record import ImageRecord

LayerData = tuple[Any, dict, str]


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader for the files this plugin adds something to, or None.

    Claimed (see :func:`claims`): NIfTI, NRRD, MetaImage, DICOM files and folders that hold
    DICOM, slides and TIFFs with physical pixel size, pyramid levels or a Z axis, the plugin's
    own OME-Zarr labels, and its detection tables (QuPath GeoJSON, CSV). Plain PNG/JPEG/TIFF
    images and other folders are left to napari's own reader, which shows them the same way.
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(claims(p) for p in paths):
        return None
    return read_layers


def claims(p: str | os.PathLike) -> bool:
    """Does napari-medseg add something to what napari's own reader gives for ``p``?

    Parameters
    ----------
    p : path-like
        A file or a folder.

    Returns
    -------
    bool
        True for volumes with geometry (NIfTI, NRRD, MetaImage, DICOM files and folders holding
        DICOM), slides and TIFFs that state a physical pixel size or hold pyramid levels or a Z
        axis, the plugin's own OME-Zarr labels (``.zarr``) and detection tables (``.geojson``,
        a ``.csv`` with ``score`` and centre columns); False for plain PNG/JPEG/BMP images,
        plain 2D TIFFs and other folders.
    """
    path = Path(p)
    name = path.name.lower()
    if path.is_dir():
        if name.endswith(".zarr"):
            return is_labels_zarr(path)
        from napari_medseg.io.dicom import is_dicom_path

        return is_dicom_path(path)
    if name.endswith(".geojson"):
        return True  # detections (QuPath's convention), e.g. saved beside a slide
    if name.endswith(".csv"):
        return is_detection_csv(path)
    _, ext = split_ext(path)
    if ext in RASTER_EXT:
        return False  # no geometry, no pixel size: napari's reader shows it the same
    if ext in TIFF_EXT:
        return tiff_has_geometry(path)
    if ext in SUPPORTED_EXTENSIONS:
        return True
    if ext == "":
        from napari_medseg.io.dicom import is_dicom_path

        return is_dicom_path(path)
    return ext in DICOM_EXT


def tiff_has_geometry(path: str | os.PathLike) -> bool:
    """Is this TIFF more than a plain picture: a slide, OME/ImageJ metadata, a pixel size or Z?

    Slide formats (``.svs``, ``.ndpi``, ``.scn``, ``.btf``, ``.ome.tif``) always are; a
    ``.tif`` is when it holds pyramid levels or is large and tiled (:func:`is_slide`), carries
    OME or ImageJ metadata, has a Z axis, or states its resolution in centimetres, or in inches
    finer than 1000 dpi (screen images say 72 or 300 dpi, which is no physical pixel size).
    """
    p = Path(path)
    _, ext = split_ext(p)
    if ext in (".svs", ".ndpi", ".scn", ".btf", ".ome.tif", ".ome.tiff"):
        return True
    if is_slide(p):
        return True
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            if tf.is_ome or tf.is_imagej or tf.is_svs or tf.is_ndpi:
                return True
            series = tf.series[0]
            sizes = dict(zip(series.axes, series.shape))
            if any(sizes.get(a, 1) > 1 for a in "ZIQ"):  # a stack: a volume
                return True
            page = series.keyframe
            unit = int(page.resolutionunit)
            xres = float(page.resolution[0])
    except Exception:  # noqa: BLE001 - not a readable TIFF: let napari's reader say so
        return False
    return (unit == 3 and xres != 1.0) or (unit == 2 and xres >= 1000.0)


def is_detection_csv(path: str | os.PathLike) -> bool:
    """Is ``path`` a detection table: a CSV whose header has ``score`` and ``y``/``x`` (or
    ``world_*``) columns, as the Detect dock, ``napari-medseg detect`` and the Points writer
    save it?"""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    cols = {c.strip().strip('"') for c in header.strip().split(",")}
    return "score" in cols and ({"y", "x"} <= cols or {"world_y", "world_x"} <= cols)


def read_layers(path: str | list[str]) -> list[LayerData]:
    """Read one or more files/folders into napari layer-data tuples.

    Label maps (integer files named ``*seg*``, ``*label*``, ``*mask*``) open as Labels layers,
    everything else as Image layers; each layer carries its geometry (see
    :mod:`napari_medseg.io.geometry`).
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    out: list[LayerData] = []
    for p in paths:
        if is_labels_zarr(p):
            out.append(labels_zarr_layer(p))
        elif str(p).lower().endswith((".geojson", ".csv")):
            out.append(detections_layer(p))
        else:
            out.extend(record_to_layer(rec) for rec in read_image(p))
    return out


def labels_zarr_layer(path: str | os.PathLike) -> LayerData:
    """A whole-slide labels result (OME-Zarr) as a lazy multiscale Labels layer.

    Level 0 lies on the slide's full-resolution pixel grid (identity transform, like the slide
    layer :func:`~napari_medseg.io.raster.read_slide` gives), so it overlays the slide.
    """
    levels, attrs = open_labels_zarr(path)
    ours = attrs.get("medseg") or {}
    p = Path(path)
    meta = {
        "medseg": {
            "path": str(p),
            "space": "pixel",
            "class_names": ours.get("class_names", {}),
            "complete": ours.get("complete"),
            "provenance": ours.get("provenance", {}),
        }
    }
    name = p.name[: -len(".zarr")] if p.name.lower().endswith(".zarr") else p.name
    return levels, {"name": name, "multiscale": True, "opacity": 0.5, "metadata": meta}, "labels"


def detections_layer(path: str | os.PathLike) -> LayerData:
    """Detections (QuPath GeoJSON or a CSV detection table) as a Points layer.

    A table with world columns (``world_y, world_x`` for 2D images and slides, in
    full-resolution pixels; ``world_x, world_y, world_z`` in RAS millimetres for volumes) is
    placed by them: the Points lie on the scan wherever its voxels are, with napari world
    axes ``(y, x)`` or ``(S, A, R)``. Otherwise (GeoJSON, QuPath's own files) the centres are
    full-resolution pixel ``(y, x)``. Features: ``id``, ``class``, ``score`` and ``area`` /
    ``volume_mm3`` where the file has them; points are coloured by score.
    """
    from napari_medseg.io.detections import read_detections

    table = read_detections(path)
    p = Path(path)
    if {"world_z", "world_y", "world_x"} <= set(table.columns):
        cols, space = ["world_z", "world_y", "world_x"], "RAS"  # (S, A, R) mm
    elif {"world_y", "world_x"} <= set(table.columns):
        cols, space = ["world_y", "world_x"], "pixel"
    else:
        cols = ["z", "y", "x"] if "z" in table.columns else ["y", "x"]
        space = "pixel"
    data = table[cols].to_numpy(float).reshape(-1, len(cols))
    keep = ("id", "class", "score", "area", "volume_mm3")
    feats = table[[c for c in keep if c in table.columns]]
    stem = p.name
    for suffix in (".geojson", ".csv"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    kwargs = {
        "name": stem,
        "features": feats.reset_index(drop=True),
        "size": 12 if space == "pixel" else 4,
        "face_color": "transparent",
        "border_color": "score" if "score" in feats.columns and len(feats) else "yellow",
        "border_width": 0.15,
        "metadata": {"medseg": {"path": str(p), "space": space}},
    }
    if space == "RAS":
        kwargs["units"] = ("mm", "mm", "mm")
        kwargs["axis_labels"] = ("S", "A", "R")
    if kwargs["border_color"] == "score":
        kwargs["border_colormap"] = "viridis"
        kwargs["border_contrast_limits"] = (0.0, 1.0)
    return data, kwargs, "points"


def record_to_layer(rec: ImageRecord) -> LayerData:
    """Layer-data tuple for one record: Labels for label maps, Image otherwise."""
    if rec.modality == "label" and not rec.rgb:
        arr = np.asarray(rec.data)
        if not np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.int32)
        rec = ImageRecord(**{**rec.__dict__, "data": arr})
        return record_to_layer_data(rec, "labels")
    return record_to_layer_data(rec, "image")


def _write(path: str, data: Any, attributes: dict, is_label: bool) -> list[str]:
    if isinstance(data, list):
        raise ImageReadError(
            "multiscale (slide) layers are saved by the slide tools, not File > Save Layers."
        )
    arr, affine, space, meta = layer_to_record_parts(np.asarray(data), attributes)
    rec = ImageRecord(
        data=arr,
        affine=affine,
        space=space,
        modality="label" if is_label else meta.get("modality", "unknown"),
        name=attributes.get("name", "layer"),
        rgb=bool(attributes.get("rgb", False)),
        metadata=meta.get("source", {}) if meta else {},
    )
    return [str(write_image(path, rec, is_label=is_label))]


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """Save a Labels layer with its scan's geometry (integer dtype), atomically."""
    return _write(path, data, attributes, is_label=True)


def write_image_layer(path: str, data: Any, attributes: dict) -> list[str]:
    """Save an Image layer with its geometry, atomically."""
    return _write(path, data, attributes, is_label=False)


def _layer_geometry(attributes: dict, nd: int) -> tuple[np.ndarray, list[int], str]:
    """(data-to-world matrix, layer-to-file axis order, space) of a Points/Shapes layer."""
    from napari_medseg.io.geometry import compose_layer_transform

    world = compose_layer_transform(attributes)
    if world.shape != (nd + 1, nd + 1):
        world = np.eye(nd + 1)
    meta = (attributes.get("metadata") or {}).get("medseg") or {}
    perm = [int(a) for a in meta.get("layer_axes", [])]
    perm = [a for a in perm if a < nd] if len(perm) >= nd else list(range(nd))
    space = meta.get("space") or ("RAS" if nd == 3 else "pixel")
    return world, perm, space


def _feature_columns(attributes: dict, n: int, keep: np.ndarray) -> Any:
    """``id``, ``class``, ``score`` (defaults for a hand-made layer) and the other features."""
    import pandas as pd

    feats = attributes.get("features")
    feats = pd.DataFrame(feats).reset_index(drop=True) if feats is not None else pd.DataFrame()
    if len(feats) != n:
        feats = pd.DataFrame(index=range(n))
    feats = feats[keep].reset_index(drop=True)
    out = pd.DataFrame(index=feats.index)
    out["id"] = (
        pd.to_numeric(feats["id"], errors="coerce").fillna(0).astype(np.int64)
        if "id" in feats.columns
        else np.arange(1, len(feats) + 1, dtype=np.int64)
    )
    out["class"] = feats["class"].astype(str) if "class" in feats.columns else "object"
    out["score"] = (
        pd.to_numeric(feats["score"], errors="coerce").fillna(1.0)
        if "score" in feats.columns
        else 1.0
    )
    return out, feats.drop(columns=[c for c in ("id", "class", "score") if c in feats.columns])


def _table_from_coords(
    centres: np.ndarray, lo: np.ndarray, hi: np.ndarray, attributes: dict, keep: np.ndarray
) -> Any:
    """A detection table (see :mod:`napari_medseg.io.detections`) from layer coordinates."""
    import pandas as pd

    nd = centres.shape[1]
    world_m, perm, space = _layer_geometry(attributes, nd)
    names = ["y", "x"] if nd == 2 else ["z", "y", "x"]
    inv = np.argsort(perm)
    base, extra = _feature_columns(attributes, len(keep), keep)
    table = base
    file_c = centres[:, inv]  # layer axes -> the file's axes (array indices)
    for j, a in enumerate(names):
        table[a] = file_c[:, j]
    world = centres @ world_m[:nd, :nd].T + world_m[:nd, nd]
    if nd == 2:
        table["world_y"], table["world_x"] = world[:, 0], world[:, 1]
    else:  # napari world (S, A, R) -> RAS columns
        table["world_x"], table["world_y"], table["world_z"] = world[:, 2], world[:, 1], world[:, 0]
    flo, fhi = lo[:, inv], hi[:, inv]
    for j, a in enumerate(names):
        table[f"{a}_min"] = np.floor(flo[:, j] + 0.5).astype(np.int64)
        table[f"{a}_max"] = np.floor(fhi[:, j] + 0.5).astype(np.int64) + 1
    return pd.concat([table, extra], axis=1), space


def points_table(data: Any, attributes: dict) -> Any:
    """The shown points of a Points layer as a detection table.

    Parameters
    ----------
    data : (N, D) array
        Point coordinates in the layer's data axes.
    attributes : dict
        The layer state napari passes to writers (``transform``, ``features``, ``shown``,
        ``metadata``).

    Returns
    -------
    pandas.DataFrame
        Columns ``id, class, score`` (from the features, or 1..N / ``object`` / 1.0 for a
        layer made by hand), the centre in the source file's array indices (``y, x`` or
        ``z, y, x``), its world position (``world_y, world_x`` in full-resolution pixels for
        2D; ``world_x, world_y, world_z`` in RAS mm for volumes), a one-voxel box and the
        other features. Points hidden by the layer's ``shown`` mask (e.g. under the Detect
        dock's score threshold) are left out.
    """
    pts = np.asarray(data, dtype=float)
    nd = pts.shape[1] if pts.ndim == 2 else int(attributes.get("ndim", 2))
    pts = pts.reshape(-1, nd)
    if nd not in (2, 3):
        raise ImageWriteError(f"points are saved for 2D images and volumes, not {nd}D layers")
    shown = attributes.get("shown")
    keep = np.ones(len(pts), bool) if shown is None else np.asarray(shown, bool).reshape(-1)
    if keep.size != len(pts):
        keep = np.ones(len(pts), bool)
    table, _ = _table_from_coords(pts[keep], pts[keep], pts[keep], attributes, keep)
    return table


def shapes_table(data: Any, attributes: dict) -> tuple[Any, list[np.ndarray]]:
    """Shapes (2D: rectangles, polygons, ellipses, paths; or one slice of a volume) as a
    detection table (centre = mean of the vertices, box = their bounding box) and their
    vertex arrays in the file's array axes."""
    shapes = [np.asarray(s, dtype=float) for s in data]
    nd = shapes[0].shape[1] if shapes else int(attributes.get("ndim", 2))
    if nd not in (2, 3):
        raise ImageWriteError(f"shapes are saved for 2D images and volumes, not {nd}D layers")
    keep = np.ones(len(shapes), bool)
    centres = np.array([s.mean(axis=0) for s in shapes]).reshape(-1, nd)
    lo = np.array([s.min(axis=0) for s in shapes]).reshape(-1, nd)
    hi = np.array([s.max(axis=0) for s in shapes]).reshape(-1, nd)
    table, _ = _table_from_coords(centres, lo, hi, attributes, keep)
    _, perm, _ = _layer_geometry(attributes, nd)
    inv = np.argsort(perm)
    return table, [s[:, inv] for s in shapes]


def _shapes_geojson(table: Any, vertices: list[np.ndarray], kinds: list[str]) -> dict:
    """QuPath-style GeoJSON of 2D shapes: each a closed ``Polygon`` (paths and lines as
    ``LineString``) in full-resolution pixel ``[x, y]`` with QuPath's corner convention."""
    import uuid

    from napari_medseg.io.detections import to_geojson

    doc = to_geojson(table)  # properties (class, score, centroid, id) as for detections
    for feat, verts, kind in zip(doc["features"], vertices, kinds):
        if kind == "ellipse":  # napari keeps an ellipse as its 4 bounding-box corners
            c, half = verts.mean(axis=0), (verts.max(axis=0) - verts.min(axis=0)) / 2
            t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            verts = c + np.stack([half[0] * np.sin(t), half[1] * np.cos(t)], axis=1)
        ring = [[round(float(x) + 0.5, 3), round(float(y) + 0.5, 3)] for y, x in verts]
        if kind in ("path", "line"):
            feat["geometry"] = {"type": "LineString", "coordinates": ring}
        else:
            feat["geometry"] = {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}
        feat["id"] = str(uuid.uuid4())
        feat["properties"]["objectType"] = "annotation"
    return doc


def write_points(path: str, data: Any, attributes: dict) -> list[str]:
    """Save the shown points of a Points layer as a CSV detection table (with world
    coordinates, see :func:`points_table`) or QuPath GeoJSON (2D), atomically."""
    from napari_medseg.io.detections import write_detections

    table = points_table(data, attributes)
    return [str(write_detections(path, table, overwrite=True))]


def write_shapes(path: str, data: Any, attributes: dict) -> list[str]:
    """Save a Shapes layer: ``.geojson`` as QuPath annotations (2D, the shapes' outlines),
    ``.csv`` as a detection table (one row per shape: centre, bounding box, world position),
    atomically."""
    import json

    from napari_medseg._files import write_text
    from napari_medseg.io.detections import write_detections

    table, verts = shapes_table(data, attributes)
    if Path(path).suffix.lower() == ".csv":
        return [str(write_detections(path, table, overwrite=True))]
    if verts and verts[0].shape[1] != 2:
        raise ImageWriteError("GeoJSON (QuPath) export is for 2D shapes; save 3D shapes as .csv")
    kinds = list(attributes.get("shape_type") or ["polygon"] * len(verts))
    doc = _shapes_geojson(table, verts, kinds)
    write_text(path, json.dumps(doc) + "\n")
    return [str(path)]


# --------------------------------------------------------------------------- sample data


def sample_path(name: str) -> Path:
    """Path of a file in the packaged ``sample_data`` folder."""
    p = Path(str(files("napari_medseg").joinpath("sample_data", name)))
    if not p.exists():
        raise ImageReadError(f"sample {name} is missing from the installation ({p}).")
    return p


def _sample(name: str, layer_name: str) -> list[LayerData]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = read_layers(str(sample_path(name)))
    data, kwargs, kind = layers[0]
    kwargs["name"] = layer_name
    return [(data, kwargs, kind)]


def sample_ct() -> list[LayerData]:
    """Abdominal CT (spleen), 164x166x26 voxels, 0.8x0.8x5 mm (MSD Task09, CC-BY-SA 4.0)."""
    return _sample("ct_abdomen_spleen.nii.gz", "CT abdomen")


def sample_mri() -> list[LayerData]:
    """Cervical spine T2 MRI, 60x55x52 voxels at 1 mm, PSR orientation (sct, MIT)."""
    return _sample("mr_cervical_spine_t2.nii.gz", "MR cervical spine T2")


def sample_pathology() -> list[LayerData]:
    """H&E pathology tile, 300x500 RGB (TCIA via stardist, BSD-3)."""
    return _sample("he_tile.jpg", "H&E tile")


def sample_nuclei() -> list[LayerData]:
    """Fluorescence nuclei, 256x256 uint16 (DSB 2018 via stardist, BSD-3)."""
    return _sample("fluo_nuclei.tif", "Fluorescence nuclei")
