"""Glue between napari layers and the compute records (the only place that touches both)."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_medseg.io.geometry import (
    META_KEY,
    RADIOLOGICAL_ORIENTATION2D,
    record_to_layer_data,
)
from napari_medseg.io.record import ImageRecord, layer_to_record


def layer_state(layer: Any) -> dict:
    """The geometry-relevant state of a layer, as napari passes it to writers."""
    return {
        "name": layer.name,
        "affine": np.asarray(layer.affine.affine_matrix),
        "scale": np.asarray(layer.scale),
        "translate": np.asarray(layer.translate),
        "rotate": np.asarray(layer.rotate),
        "shear": np.asarray(layer.shear),
        "metadata": dict(layer.metadata),
        "rgb": bool(getattr(layer, "rgb", False)),
    }


def record_from_layer(layer: Any) -> ImageRecord:
    """An :class:`ImageRecord` in the source file's axis order and geometry for an Image layer."""
    if getattr(layer, "multiscale", False):
        from napari_medseg.errors import MedsegError

        raise MedsegError(
            f"{layer.name} is a multiscale slide; run whole-slide tools on it, or crop a region "
            "into a new layer first."
        )
    return layer_to_record(layer.data, layer_state(layer), name=layer.name)


def labels_layer_data(
    source_layer: Any, labels: np.ndarray, record: ImageRecord, name: str, metadata: dict
) -> tuple[np.ndarray, dict]:
    """Layer data and kwargs for labels computed on ``record``'s grid (file axis order).

    The result gets exactly the source layer's spatial transform, so it overlays the scan.
    """
    rec = ImageRecord(
        data=labels,
        affine=record.affine,
        space=record.space,
        modality="label",
        name=name,
        path=None,
        metadata=record.metadata,
    )
    data, kwargs, _ = record_to_layer_data(rec, "labels")
    kwargs["metadata"][META_KEY]["provenance"] = metadata.get("provenance", {})
    kwargs["metadata"].update({k: v for k, v in metadata.items() if k != META_KEY})
    return data, kwargs


def use_radiological_view(viewer: Any) -> None:
    """Show axial slices as radiologists read them: anterior up, patient's right on the left."""
    try:
        viewer.camera.orientation = ("towards", *RADIOLOGICAL_ORIENTATION2D)
    except (AttributeError, ValueError):  # older napari without camera orientation
        pass


def is_volume_layer(layer: Any) -> bool:
    meta = (getattr(layer, "metadata", None) or {}).get(META_KEY) or {}
    return meta.get("space") == "RAS"


def find_source_layer(viewer: Any, data: Any, attrs: dict) -> Any | None:
    """The Image layer a hand-made Labels layer was drawn on: same grid, carries our metadata."""
    from napari_medseg.io.geometry import compose_layer_transform

    shape = tuple(np.shape(data))
    target = compose_layer_transform(attrs)
    for layer in viewer.layers:
        meta = (layer.metadata or {}).get(META_KEY)
        if not meta or layer.__class__.__name__ != "Image":
            continue
        lshape = tuple(layer.data.shape)
        if getattr(layer, "rgb", False):
            lshape = lshape[:-1]
        if lshape[-len(shape) :] != shape:
            continue
        t = compose_layer_transform(layer_state(layer))
        n = len(shape) + 1
        if t.shape[0] >= n and np.allclose(t[-n:, -n:], target[-n:, -n:], atol=1e-6):
            return layer
    return None
