"""Glue between napari layers and the compute records (the only place that touches both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.io.geometry import (
    META_KEY,
    RADIOLOGICAL_ORIENTATION2D,
    WORLD_AXES,
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


#: Camera settings (vertical, horizontal) of napari's 2D view for each display convention.
#: World axes are ``(S, A, R)``: a slice shows two of them, the earlier one vertical.
#: Radiological: anterior (superior) up, patient's right on the screen's left, as a CT or MR
#: reading station shows an axial (coronal) slice. Neurological: patient's right on the right.
VIEW_CONVENTIONS: dict[str, tuple[str, str]] = {
    "radiological": RADIOLOGICAL_ORIENTATION2D,
    "neurological": (RADIOLOGICAL_ORIENTATION2D[0], "right"),
}
DEFAULT_CONVENTION = "radiological"
#: Letters for the positive and negative direction of each RAS world axis.
_AXIS_LETTERS = {"S": ("S", "I"), "A": ("A", "P"), "R": ("R", "L")}
#: Canvas overlays napari-medseg adds (napari.components.overlays.TextOverlay, public API).
_EDGES = {
    "top": "top_center",
    "bottom": "bottom_center",
    "left": "middle_left",
    "right": "middle_right",
}
_CURSOR = "medseg_cursor"


def settings_path() -> Path:
    """The small JSON settings file of napari-medseg's docks.

    ``$MEDSEG_CONFIG_DIR/settings.json``, else ``settings.json`` in the platform's user config
    folder (``platformdirs.user_config_dir("napari-medseg")``, e.g.
    ``~/.config/napari-medseg`` on Linux). napari has no public API for plugin settings.
    """
    import os

    folder = os.environ.get("MEDSEG_CONFIG_DIR")
    if not folder:
        import platformdirs

        folder = platformdirs.user_config_dir("napari-medseg")
    return Path(folder) / "settings.json"


def load_settings() -> dict:
    """The saved settings (an empty dict when there are none or the file is unreadable)."""
    import json

    try:
        data = json.loads(settings_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def view_convention() -> str:
    """The display convention the user chose last: ``"radiological"`` (default) or
    ``"neurological"``."""
    value = load_settings().get("view_convention", DEFAULT_CONVENTION)
    return value if value in VIEW_CONVENTIONS else DEFAULT_CONVENTION


def save_view_convention(convention: str) -> Path:
    """Remember ``convention`` for the next session (atomic write of the settings file)."""
    import json

    from napari_medseg._files import write_text

    if convention not in VIEW_CONVENTIONS:
        raise ValueError(f"unknown display convention {convention!r}")
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load_settings() | {"view_convention": convention}
    return write_text(path, json.dumps(data, indent=2) + "\n")


def apply_view_convention(viewer: Any, convention: str | None = None) -> None:
    """Show scans in the chosen convention, with orientation letters, a mm scale bar and the
    cursor's RAS position and value on the canvas.

    Parameters
    ----------
    viewer : napari.Viewer
    convention : {"radiological", "neurological"}, optional
        Defaults to the saved choice (:func:`view_convention`).

    Notes
    -----
    Sets ``viewer.scene.camera.orientation`` (napari >= 0.6), turns napari's scale bar on (its unit
    comes from the layers' ``units``, millimetres for scans), and adds text overlays to
    ``viewer.canvas.overlays``: a letter on each canvas edge (R/L, A/P, S/I of the world axis
    shown along it, updated when the displayed axes or the camera change; hidden in 3D) and,
    bottom left, the world position under the cursor in RAS mm with the value of the image
    under it (HU for CT).
    """
    convention = convention or view_convention()
    vertical, horizontal = VIEW_CONVENTIONS[convention]
    try:
        viewer.scene.camera.orientation = ("towards", vertical, horizontal)
    except (AttributeError, ValueError):  # older napari without camera orientation
        pass
    viewer.canvas.overlays.scale_bar.visible = True
    overlays = viewer.canvas.overlays
    if _CURSOR not in overlays:
        from napari.components.overlays import TextOverlay

        for edge, position in _EDGES.items():
            overlays[f"medseg_{edge}"] = TextOverlay(
                text="", position=position, visible=False, font_size=14, box=False
            )
        overlays[_CURSOR] = TextOverlay(text="", position="bottom_left", visible=False)
        update = lambda _e=None: update_orientation_letters(viewer)  # noqa: E731
        viewer.dims.events.displayed.connect(update)
        viewer.dims.events.ndisplay.connect(update)
        viewer.dims.events.ndim.connect(update)
        viewer.scene.camera.events.orientation.connect(update)
        viewer.layers.events.inserted.connect(update)
        viewer.layers.events.removed.connect(update)
        viewer.layers.events.inserted.connect(lambda _e=None: units_in_mm(viewer))
        viewer.mouse_move_callbacks.append(_show_cursor)
    units_in_mm(viewer)
    update_orientation_letters(viewer)


def units_in_mm(viewer: Any) -> None:
    """Give layers drawn over a scan without units (napari's "new labels/points/shapes", result
    layers built from an affine alone) the scan's millimetres, so napari's scale bar shows mm
    and does not warn about inconsistent units. Only the unit label changes: their world
    coordinates already are the scan's RAS mm."""
    scans = [lyr for lyr in viewer.layers if is_volume_layer(lyr)]
    if not scans:
        return
    ndim = scans[0].ndim
    for layer in viewer.layers:
        units = tuple(str(u) for u in getattr(layer, "units", ()))
        if layer.ndim == ndim and units and all(u == "pixel" for u in units[-3:]):
            layer.units = units[:-3] + ("mm",) * min(3, len(units))


def orientation_letters(viewer: Any) -> dict[str, str]:
    """The anatomical letter on each canvas edge (``top``, ``bottom``, ``left``, ``right``).

    Empty when the view is 3D or no scan in RAS millimetres is open. napari world axes are
    ``(..., S, A, R)``; a 2D view shows ``dims.displayed`` (vertical, horizontal), and
    ``camera.orientation2d`` says whether each increases ``up``/``down``, ``left``/``right``.
    """
    if viewer.dims.ndisplay != 2 or not any(is_volume_layer(lyr) for lyr in viewer.layers):
        return {}
    ndim = viewer.dims.ndim
    names = ["?"] * (ndim - 3) + list(WORLD_AXES) if ndim >= 3 else list(WORLD_AXES[-ndim:])
    vert_axis, horiz_axis = (names[d] for d in viewer.dims.displayed[-2:])
    if vert_axis not in _AXIS_LETTERS or horiz_axis not in _AXIS_LETTERS:
        return {}
    vertical, horizontal = (str(getattr(o, "value", o)) for o in viewer.scene.camera.orientation2d)
    pos_v, neg_v = _AXIS_LETTERS[vert_axis]
    pos_h, neg_h = _AXIS_LETTERS[horiz_axis]
    return {
        "top": pos_v if vertical == "up" else neg_v,
        "bottom": neg_v if vertical == "up" else pos_v,
        "left": pos_h if horizontal == "left" else neg_h,
        "right": neg_h if horizontal == "left" else pos_h,
    }


def update_orientation_letters(viewer: Any) -> None:
    """Put :func:`orientation_letters` on the canvas edges (hide them when there are none)."""
    letters = orientation_letters(viewer)
    overlays = viewer.canvas.overlays
    for edge in _EDGES:
        key = f"medseg_{edge}"
        if key in overlays:
            overlays[key].text = letters.get(edge, "")
            overlays[key].visible = bool(letters)
    if _CURSOR in overlays and not letters:
        overlays[_CURSOR].visible = False


def cursor_text(viewer: Any, position: Any) -> str:
    """``"R 12.3  A -45.6  S 78.9 mm  CT abdomen: 45 HU"`` for a world position (napari order).

    RAS millimetres with the letter of the side (``L 12.3`` is 12.3 mm to the patient's left);
    the value is the top visible scan's voxel under the cursor (HU for CT, else the stored
    intensity), blank outside it.
    """
    pos = np.asarray(position, dtype=float)[-3:]
    parts = []
    for axis, value in zip(WORLD_AXES, pos):
        pos_l, neg_l = _AXIS_LETTERS[axis]
        parts.append(f"{pos_l if value >= 0 else neg_l} {abs(value):.1f}")
    text = "  ".join(parts[::-1]) + " mm"
    for layer in reversed(list(viewer.layers)):
        if not (layer.visible and is_volume_layer(layer) and type(layer).__name__ == "Image"):
            continue
        value = layer.get_value(position, world=True)
        if value is None or isinstance(value, tuple):
            continue
        modality = layer.metadata[META_KEY].get("modality")
        unit = " HU" if modality == "CT" else ""
        text += f"  {layer.name}: {float(np.asarray(value).ravel()[0]):.4g}{unit}"
        break
    return text


def _show_cursor(viewer: Any, event: Any) -> None:
    overlay = viewer.canvas.overlays[_CURSOR]
    if viewer.dims.ndisplay != 2 or not any(is_volume_layer(lyr) for lyr in viewer.layers):
        overlay.visible = False
        return
    overlay.text = cursor_text(viewer, viewer.cursor.position)
    overlay.visible = True


def view_convention_choice(viewer: Any) -> Any:
    """A ``Display`` combo box (radiological / neurological) for a dock: choosing applies the
    convention to ``viewer`` and remembers it (:func:`save_view_convention`)."""
    from magicgui.widgets import ComboBox

    box = ComboBox(
        label="Display",
        choices=[
            ("radiological (patient's right on the left)", "radiological"),
            ("neurological (patient's right on the right)", "neurological"),
        ],
        value=view_convention(),
    )

    def _chosen(value: str) -> None:
        save_view_convention(value)
        if any(is_volume_layer(lyr) for lyr in viewer.layers):
            apply_view_convention(viewer, value)

    box.changed.connect(_chosen)
    return box


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


def points_to_pixels(points: Any, image_layer: Any, record: ImageRecord) -> np.ndarray:
    """The points of a napari Points layer as pixel positions on ``record``'s grid.

    Each point goes from the Points layer's data to world coordinates and into the image
    layer's data indices (napari's own transforms, as :func:`region_mask` does for shapes),
    then from the layer's spatial axes to the file's axis order (the image layer's
    ``layer_axes``, as :func:`record_from_layer` lays the record out).

    Parameters
    ----------
    points : napari.layers.Points
    image_layer : napari.layers.Image
        The image ``record`` comes from.
    record : ImageRecord

    Returns
    -------
    numpy.ndarray
        float ``(N, record.spatial_ndim)`` positions in pixels, file axis order (``(row, col)``
        for a 2D raster); not rounded, not checked against the image's bounds.
    """
    nsp = record.spatial_ndim
    meta = dict(image_layer.metadata).get(META_KEY, {})
    full = list(meta.get("layer_axes", range(len(record.shape))))
    sp_perm = [p for p in full if p < nsp]  # layer spatial axis j shows file axis sp_perm[j]
    out = []
    for v in np.asarray(points.data, dtype=float):
        d = np.asarray(image_layer.world_to_data(points.data_to_world(v)), dtype=float)
        out.append(d[len(d) - nsp :])  # the image's last nsp axes are its spatial ones
    pts = np.asarray(out, dtype=float).reshape(-1, nsp)
    return np.ascontiguousarray(pts[:, np.argsort(sp_perm)])


def region_mask(region: Any, image_layer: Any, record: ImageRecord) -> np.ndarray:
    """A region drawn in napari as a boolean mask on ``record``'s spatial grid (file order).

    Parameters
    ----------
    region : napari.layers.Shapes or napari.layers.Labels
        Shapes: the bounding box of all its shapes (in the image layer's voxel indices, the
        displayed slice only along axes where a shape is flat). Labels: every voxel with a label
        (the labels must lie on the image's grid: same spatial shape).
    image_layer : napari.layers.Image
        The image the region belongs to (``record`` comes from it).
    record : ImageRecord

    Returns
    -------
    numpy.ndarray of bool
        ``record.spatial_shape``.
    """
    from napari.layers import Labels, Shapes

    from napari_medseg.errors import MedsegError

    nsp = record.spatial_ndim
    meta = dict(image_layer.metadata).get(META_KEY, {})
    full = list(meta.get("layer_axes", range(len(record.shape))))
    sp_perm = [p for p in full if p < nsp]  # layer spatial axis j shows file axis sp_perm[j]
    lay_shape = [record.spatial_shape[p] for p in sp_perm]
    n_lead = image_layer.ndim - nsp - (1 if getattr(image_layer, "rgb", False) else 0)
    if isinstance(region, Labels):
        lab = np.asarray(region.data)
        lab = lab.reshape(lab.shape[-nsp:]) if lab.ndim > nsp and lab.shape[0] == 1 else lab
        if list(lab.shape[-nsp:]) != lay_shape:
            raise MedsegError(
                f"the region {region.name!r} has shape {lab.shape}; it must lie on the image's "
                f"grid {tuple(lay_shape)}"
            )
        mask_l = np.asarray(lab[(0,) * (lab.ndim - nsp)] if lab.ndim > nsp else lab) > 0
    elif isinstance(region, Shapes):
        if not len(region.data):
            raise MedsegError(f"draw a rectangle in {region.name!r} first (it has no shapes)")
        pts = []
        for shape in region.data:
            for v in np.asarray(shape):
                world = region.data_to_world(v)
                d = np.asarray(image_layer.world_to_data(world), dtype=float)
                pts.append(d[n_lead : n_lead + nsp])
        pts = np.asarray(pts)
        lo = np.floor(pts.min(0) + 0.5).astype(int)
        hi = np.floor(pts.max(0) + 0.5).astype(int) + 1
        lo = np.clip(lo, 0, lay_shape)
        hi = np.clip(hi, 0, lay_shape)
        if np.any(hi <= lo):
            raise MedsegError(f"the shapes in {region.name!r} lie outside the image")
        mask_l = np.zeros(lay_shape, dtype=bool)
        mask_l[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    else:
        raise MedsegError("a background region is a Shapes (rectangle) or Labels layer")
    inv = list(np.argsort(sp_perm))
    return np.ascontiguousarray(mask_l.transpose(inv))
