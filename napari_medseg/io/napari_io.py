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
from napari_medseg.errors import ImageReadError
from napari_medseg.io.geometry import layer_to_record_parts, record_to_layer_data
from napari_medseg.io.raster import is_labels_zarr, open_labels_zarr
from napari_medseg.io.readers import DICOM_EXT, SUPPORTED_EXTENSIONS, read_image, write_image
from napari_medseg.io.record import ImageRecord

LayerData = tuple[Any, dict, str]


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader for medical image files and DICOM folders, or None if not ours."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(_is_ours(p) for p in paths):
        return None
    return read_layers


def _is_ours(p: str | os.PathLike) -> bool:
    path = Path(p)
    if path.name.lower().endswith(".geojson"):
        return True  # detections (QuPath's convention), e.g. saved beside a slide
    if path.is_dir():
        return True  # a DICOM folder; read_dicom says clearly when it holds no images
    _, ext = split_ext(path)
    if ext in SUPPORTED_EXTENSIONS:
        return True
    if ext == "":
        from napari_medseg.io.dicom import is_dicom_path

        return is_dicom_path(path)
    return ext in DICOM_EXT


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
        elif str(p).lower().endswith(".geojson"):
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
    """Detections in QuPath GeoJSON as a Points layer (centres in full-resolution pixels).

    Features: ``id``, ``class``, ``score`` and ``area`` where the file has them; points are
    coloured by score.
    """
    from napari_medseg.io.detections import read_detections

    table = read_detections(path)
    p = Path(path)
    ndim = 3 if "z" in table.columns else 2
    cols = ["z", "y", "x"] if ndim == 3 else ["y", "x"]
    data = table[cols].to_numpy(float).reshape(-1, ndim)
    feats = table[[c for c in ("id", "class", "score", "area") if c in table.columns]]
    kwargs = {
        "name": p.name[: -len(".geojson")],
        "features": feats.reset_index(drop=True),
        "size": 12,
        "face_color": "transparent",
        "border_color": "score" if "score" in feats.columns and len(feats) else "yellow",
        "border_width": 0.15,
        "metadata": {"medseg": {"path": str(p), "space": "pixel"}},
    }
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
