"""Detection tables to and from CSV and QuPath-style GeoJSON (atomic writes).

The table is the one of :mod:`napari_medseg.core.detect.detection` (columns ``id``, ``class``,
``score``, centre ``y, x`` (2D) or ``z, y, x`` (3D) in array indices of the file's axis order,
``world_*``, boxes ``<axis>_min/_max``, ``area`` or ``volume_mm3``).

CSV
    One row per object, those columns, comma-separated, header first. Reading gives the same
    table back (numbers as float, ``id`` as int).

GeoJSON (2D only, QuPath's convention)
    A ``FeatureCollection``; each object is a ``Feature`` with
    ``properties.objectType = "detection"``, ``properties.classification = {"name": class,
    "color": [r, g, b]}`` and ``properties.measurements`` (``score``, ``area``, ``id``, and the
    exact centre ``centroid_y``/``centroid_x``). Geometry: the object's outline as a
    ``Polygon`` in full-resolution pixel coordinates ``[x, y]`` with QuPath's corner
    convention (pixel ``(row, col)`` covers ``[col, col+1] x [row, row+1]``; the contour is
    traced at the 0.5 iso-line, so its area is slightly below the pixel count), when the
    instance map is given and the object still sits where it was detected; a ``Point`` at the
    centre otherwise (objects added or moved by hand). Reading takes the centre from the
    ``centroid_*`` measurements when present, else from the polygon's centroid (or the point).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg._files import write_text
from napari_medseg.errors import ImageReadError, ImageWriteError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["read_detections", "write_detections"]


def _hex_to_rgb(color: Any) -> list[int]:
    if isinstance(color, (list, tuple, np.ndarray)):
        vals = [float(v) for v in list(color)[:3]]
        if max(vals) <= 1.0:
            vals = [v * 255 for v in vals]
        return [round(v) for v in vals]
    s = str(color).lstrip("#")
    if len(s) >= 6:
        return [int(s[i : i + 2], 16) for i in (0, 2, 4)]
    return [230, 25, 75]


def _ndim(table: pd.DataFrame) -> int:
    return 3 if "z" in table.columns else 2


def write_detections(
    path: str | Path,
    table: pd.DataFrame,
    *,
    instances: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    class_colors: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a detection table as ``.csv`` or ``.geojson``/``.json`` (atomic).

    Parameters
    ----------
    path : path
        Output file; the suffix chooses the format.
    table : pandas.DataFrame
        Detection table (see :mod:`napari_medseg.core.detect.detection`).
    instances : int array, optional
        Instance map (file axis order) for GeoJSON outlines.
    affine : (3, 3) array, optional
        Pixel affine of the 2D image (row, col) -> full-resolution (y, x); identity by default.
    class_colors : dict, optional
        ``{class name: "#rrggbb"}`` for the GeoJSON classification colours.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise ImageWriteError(f"{path} exists; pass --overwrite to replace it.")
    if not path.parent.is_dir():
        raise ImageWriteError(f"cannot write {path}: the folder {path.parent} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        write_text(path, table.to_csv(index=False, float_format="%.10g"))
    elif suffix in (".geojson", ".json"):
        doc = to_geojson(table, instances=instances, affine=affine, class_colors=class_colors)
        write_text(path, json.dumps(doc) + "\n")
    else:
        raise ImageWriteError(
            f"cannot write detections to {path.name}: use a .csv or .geojson file name"
        )
    return path


def object_outline(instances: np.ndarray, box: tuple[slice, ...], label: int) -> np.ndarray | None:
    """Outline of one object of a 2D instance map: its longest 0.5 iso-contour.

    Parameters
    ----------
    instances : (rows, cols) int array
        Instance map, 0 = background.
    box : tuple of slice
        The object's bounding box in ``instances`` (e.g. from ``scipy.ndimage.find_objects``).
    label : int
        The object's value.

    Returns
    -------
    (K, 2) float array or None
        ``(row, col)`` vertices in image indices (pixel centres at integers; the ring runs
        half a pixel outside the object's pixels), None when the object is empty.
    """
    from skimage.measure import find_contours

    crop = np.pad(instances[box] == label, 1)
    contours = find_contours(crop.astype(np.float32), 0.5)
    if not contours:
        return None
    c = max(contours, key=len)
    return c + np.array([box[0].start - 1, box[1].start - 1], dtype=float)


def _box_polygon(row: dict, aff: np.ndarray) -> dict | None:
    """A box row (``y_min``..``x_max``, array indices, max exclusive) as a closed rectangle in
    QuPath's corner convention; None for a missing or single-pixel box (a point moved by hand).
    """
    try:
        y0, y1 = float(row["y_min"]), float(row["y_max"])
        x0, x1 = float(row["x_min"]), float(row["x_max"])
    except (KeyError, TypeError, ValueError):
        return None
    if not all(np.isfinite([y0, y1, x0, x1])) or (y1 - y0) * (x1 - x0) <= 1.0:
        return None
    corners = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0], [y0, x0]]) - 0.5
    yx = corners @ aff[:2, :2].T + aff[:2, 2] + 0.5
    return {
        "type": "Polygon",
        "coordinates": [[[round(float(x), 3), round(float(y), 3)] for y, x in yx]],
    }


def to_geojson(
    table: pd.DataFrame,
    *,
    instances: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    class_colors: dict | None = None,
) -> dict:
    """A QuPath-style ``FeatureCollection`` of a 2D detection table (module docstring)."""
    from scipy import ndimage as ndi

    if _ndim(table) != 2:
        raise ImageWriteError(
            "GeoJSON (QuPath) export is for 2D images; save 3D detections as .csv"
        )
    aff = np.eye(3) if affine is None else np.asarray(affine, dtype=float)
    colors = class_colors or {}
    objs = ndi.find_objects(instances) if instances is not None and instances.max() > 0 else []
    feats = []
    for r in table.to_dict("records"):
        cy, cx = float(r["y"]), float(r["x"])
        lab_v = float(r.get("id", 0) or 0)
        lab = int(lab_v) if np.isfinite(lab_v) else 0
        geom = None
        if 0 < lab <= len(objs) and objs[lab - 1] is not None:
            box = objs[lab - 1]
            mask = instances[box] == lab
            com = np.argwhere(mask).mean(axis=0) + np.array([box[0].start, box[1].start])
            if np.hypot(com[0] - cy, com[1] - cx) <= 1.0:  # not moved by hand
                rc = object_outline(instances, box, lab)
                if rc is not None and len(rc) >= 4:
                    yx = rc @ aff[:2, :2].T + aff[:2, 2] + 0.5
                    ring = [[round(float(x), 3), round(float(y), 3)] for y, x in yx]
                    if ring[0] != ring[-1]:
                        ring.append(ring[0])
                    geom = {"type": "Polygon", "coordinates": [ring]}
        if geom is None and instances is None:  # a box detector: the box as a rectangle
            geom = _box_polygon(r, aff)
        wy, wx = aff[:2, :2] @ [cy, cx] + aff[:2, 2]
        if geom is None:
            geom = {"type": "Point", "coordinates": [float(wx) + 0.5, float(wy) + 0.5]}
        cls = str(r.get("class", "object"))
        meas = {"score": float(r.get("score", 1.0)), "centroid_y": cy, "centroid_x": cx}
        if "area" in r and r["area"] == r["area"]:
            meas["area"] = float(r["area"])
        meas["id"] = lab
        feats.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": geom,
                "properties": {
                    "objectType": "detection",
                    "classification": {
                        "name": cls,
                        "color": _hex_to_rgb(colors.get(cls, "#e6194b")),
                    },
                    "measurements": meas,
                },
            }
        )
    return {"type": "FeatureCollection", "features": feats}


def _polygon_centroid(ring: np.ndarray) -> np.ndarray:
    """Area centroid ``(x, y)`` of a closed ring (shoelace); falls back to the vertex mean."""
    x, y = ring[:, 0], ring[:, 1]
    cross = x[:-1] * y[1:] - x[1:] * y[:-1]
    a = cross.sum() / 2
    if abs(a) < 1e-9:
        return ring.mean(axis=0)
    cx = ((x[:-1] + x[1:]) * cross).sum() / (6 * a)
    cy = ((y[:-1] + y[1:]) * cross).sum() / (6 * a)
    return np.array([cx, cy])


def from_geojson(doc: dict, affine: np.ndarray | None = None) -> pd.DataFrame:
    """Detection table (2D) from a QuPath-style GeoJSON dict (FeatureCollection or list)."""
    import pandas as pd

    aff = np.eye(3) if affine is None else np.asarray(affine, dtype=float)
    inv = np.linalg.inv(aff)
    feats = doc.get("features", []) if isinstance(doc, dict) else list(doc)
    rows = []
    for f in feats:
        props = f.get("properties") or {}
        meas = props.get("measurements") or {}
        if isinstance(meas, list):  # QuPath <= 0.3: [{"name": ..., "value": ...}]
            meas = {m.get("name"): m.get("value") for m in meas}
        geom = f.get("geometry") or {}
        box = None
        if "centroid_y" in meas and "centroid_x" in meas:
            cy, cx = float(meas["centroid_y"]), float(meas["centroid_x"])
        else:
            if geom.get("type") == "Point":
                wx, wy = (float(v) - 0.5 for v in geom["coordinates"][:2])
            elif geom.get("type") == "Polygon":
                ring = np.asarray(geom["coordinates"][0], dtype=float)
                wx, wy = _polygon_centroid(ring) - 0.5
            else:
                continue
            cy, cx = inv[:2, :2] @ [wy, wx] + inv[:2, 2]
        if geom.get("type") == "Polygon":
            ring = np.asarray(geom["coordinates"][0], dtype=float) - 0.5
            yx = ring[:, ::-1] @ inv[:2, :2].T + inv[:2, 2]
            box = (
                int(np.floor(yx[:, 0].min() + 0.5)),
                int(np.floor(yx[:, 1].min() + 0.5)),
                int(np.ceil(yx[:, 0].max() + 0.5)),
                int(np.ceil(yx[:, 1].max() + 0.5)),
            )
        cls = props.get("classification") or {}
        wy, wx = aff[:2, :2] @ [cy, cx] + aff[:2, 2]
        row = {
            "id": int(meas.get("id", 0) or 0),
            "class": cls.get("name", "object") if isinstance(cls, dict) else str(cls),
            "score": float(meas.get("score", 1.0)),
            "y": cy,
            "x": cx,
            "world_y": wy,
            "world_x": wx,
        }
        if box is None:
            iy, ix = round(float(cy)), round(float(cx))
            box = (iy, ix, iy + 1, ix + 1)
        row.update(y_min=box[0], x_min=box[1], y_max=box[2], x_max=box[3])
        row["area"] = float(meas["area"]) if "area" in meas else np.nan
        rows.append(row)
    cols = ["id", "class", "score", "y", "x", "world_y", "world_x"]
    cols += ["y_min", "x_min", "y_max", "x_max", "area"]
    return pd.DataFrame(rows, columns=cols)


def read_detections(path: str | Path, affine: np.ndarray | None = None) -> pd.DataFrame:
    """Read a detection table written by :func:`write_detections` (or by QuPath, GeoJSON).

    Parameters
    ----------
    path : path
        ``.csv`` or ``.geojson``/``.json``.
    affine : (3, 3) array, optional
        For GeoJSON: the image's pixel affine (identity by default).

    Returns
    -------
    pandas.DataFrame
    """
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise ImageReadError(f"{path} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            table = pd.read_csv(path)
            if "score" not in table.columns or "y" not in table.columns:
                raise ImageReadError(
                    f"{path.name} is not a detection table (it needs score, y and x columns)"
                )
            if "id" in table.columns:
                table["id"] = table["id"].fillna(0).astype(np.int64)
            if "class" in table.columns:
                table["class"] = table["class"].astype(str)
            return table
        if suffix in (".geojson", ".json"):
            return from_geojson(json.loads(path.read_text(encoding="utf-8")), affine)
    except (ValueError, KeyError, TypeError) as e:
        raise ImageReadError(f"cannot read detections from {path.name}: {e}") from e
    raise ImageReadError(f"cannot read detections from {path.name}: use .csv or .geojson")
