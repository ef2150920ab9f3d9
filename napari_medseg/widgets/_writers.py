"""File > Save Layers for Labels drawn by hand in napari.

napari's "New labels layer" copies the image's shape and transform but not its metadata. This
writer finds the image the labels were drawn on in the current viewer and saves with that
scan's own file axis order and header, so the mask matches its scan in every tool. Without a
viewer (or no matching scan) it saves with the layer's own geometry, which is still exact.
"""

from __future__ import annotations

from typing import Any

from napari_medseg.io.geometry import META_KEY
from napari_medseg.io.napari_io import write_image_layer, write_labels


def _with_source(data: Any, attributes: dict) -> dict:
    if (attributes.get("metadata") or {}).get(META_KEY):
        return attributes
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 - no viewer: fall back to the layer's own geometry
        viewer = None
    if viewer is None:
        return attributes
    from napari_medseg.widgets._layers import find_source_layer

    src = find_source_layer(viewer, data, attributes)
    if src is None:
        return attributes
    meta = dict(attributes.get("metadata") or {})
    meta[META_KEY] = src.metadata[META_KEY]
    return {**attributes, "metadata": meta}


def save_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """Save a Labels layer with its scan's geometry (see module docstring)."""
    return write_labels(path, data, _with_source(data, attributes))


def save_image(path: str, data: Any, attributes: dict) -> list[str]:
    """Save an Image layer with its geometry."""
    return write_image_layer(path, data, attributes)
