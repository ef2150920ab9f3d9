"""The "Detect" dock widget: image + model -> editable Points (centres) and Shapes (boxes).

Thin (docs/ARCHITECTURE.md rule 3): :func:`napari_medseg.core.detect.detection.detect` (or the
classical baseline) runs in a napari worker; its full table is kept, and the score threshold,
minimum size and NMS IoU only re-filter that table (:func:`~napari_medseg.core.detect.detection.
filter_detections`), so moving the slider updates the layers live without running the model.

Layers: ``<image>_detections`` (Points at object centres, ``features`` = id, class, score,
area/volume; a dot coloured by score, a third of the object's diameter, so the object stays
visible under it: the editable objects) and
``<image>_boxes`` (Shapes: a rectangle per object in 2D; in 3D a rectangle on every slice the
box spans, along napari's slider axis). Both carry the image's transform, so they overlay the
scan; hovering an object shows its features as a tooltip. The Points layer holds every object
the model found; the score threshold, minimum size and NMS IoU only set its ``shown`` mask
(debounced, 60 ms), so the slider stays fluid with thousands of objects and the user's edits
and selection stay (hand-added points are always shown). The box outlines add and remove only
the objects that entered or left the filtered table. ``Export...`` and File > Save Selected
Layers save what the Points layer shows now, edits included (deleted, added and moved points),
as CSV or QuPath GeoJSON.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
)

from napari_medseg.progress import Progress
from napari_medseg.widgets._task import ImageInput, JobRunner

if TYPE_CHECKING:
    import napari
    import pandas as pd

CLASSICAL = "classical"
CLASSICAL_HE = "classical-he"
#: Most box outlines drawn as Shapes (beyond, only the Points are shown: napari's Shapes
#: layer needs about 0.3 ms per rectangle to build).
MAX_BOXES = 10_000


def _detect_job(record: Any, model_ref: str, device: str) -> Any:
    """Worker generator: load the detector (a model or a classical one), then detect."""
    from napari_medseg.core.detect.detection import detect, load_detector

    yield Progress(0, 0, f"loading {model_ref}")
    detector = load_detector(model_ref)  # "classical", "classical-he", or a model (CPU)
    if callable(detector):
        return (yield from detector(record))
    return (yield from detect(record, detector, device=device))


class DetectWidget(ImageInput, Container):
    """Dock widget: image, model, score threshold (live), min size, NMS IoU, Run / Cancel."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._t0 = 0.0
        self._result: Any = None
        self._record: Any = None
        self._layer_kw: dict = {}
        self._source_name = ""
        self.n_refreshes = 0  # how many times the layers were rebuilt from the table
        self.image = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        self.model = ComboBox(label="Model", choices=self._model_choices)
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.threshold = FloatSlider(
            label="Score threshold", value=0.5, min=0.0, max=1.0, step=0.01
        )
        self.min_size = FloatSpinBox(
            label="Min size (px / mm^3)", value=0.0, min=0.0, max=1e9, step=5.0
        )
        self.nms_iou = FloatSpinBox(label="NMS IoU", value=0.5, min=0.0, max=1.0, step=0.05)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self.status = Label(label="", value="Choose an image and a model, then press Run.")
        self.counts = Label(label="Counts", value="")
        self.export_button = PushButton(text="Export...", enabled=False)
        self.extend(
            [
                self.image,
                self.model,
                self.device,
                self.threshold,
                self.min_size,
                self.nms_iou,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.status,
                self.counts,
                self.export_button,
            ]
        )
        self.job = JobRunner([self.run_button], self.cancel_button, self.progress, self.status)
        self.run_button.changed.connect(self._on_run)
        self.export_button.changed.connect(self._on_export)
        from qtpy.QtCore import QTimer

        self._shown_ids: set[int] | None = None  # model ids shown in the layers now
        self._nms_key: tuple | None = None  # (result, min size, IoU) of the cached NMS table
        self._nms_table: Any = None
        self._refresh_timer = QTimer()
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(60)
        self._refresh_timer.timeout.connect(self._refresh)
        for w in (self.threshold, self.min_size, self.nms_iou):
            w.changed.connect(self._schedule_refresh)
        self.image.changed.connect(lambda _v=None: self.model.reset_choices())
        self._follow_layers()

    # ------------------------------------------------------------------ choices

    def _image_dims(self) -> int | None:
        layer = self.image.value if hasattr(self, "image") else None
        if layer is None:
            return None
        meta = (layer.metadata or {}).get("medseg") or {}
        if meta.get("space") == "RAS":
            return 3
        return layer.ndim - (1 if getattr(layer, "rgb", False) else 0)

    def _model_choices(self, _w: Any = None) -> list[tuple[str, str]]:
        from napari_medseg.models.registry import list_models

        dims = self._image_dims()
        choices: list[tuple[str, str]] = []
        for card in list_models():
            task = card.get("task", "segmentation")
            if task not in ("segmentation", "detection"):
                continue
            d = card.get("dims")
            slicewise = d == 2 and dims == 3 and task == "segmentation"  # 2D seg runs per slice
            if dims is not None and not (d == dims or slicewise):
                continue
            how = "box detector" if task == "detection" else "segmentation + watershed"
            choices.append(
                (f"{card['name']} ({how}, {card.get('modality', '?')}, {d}D)", card["name"])
            )
        layer = self.image.value if hasattr(self, "image") else None
        if layer is not None and getattr(layer, "rgb", False):
            choices.append(("classical H&E nuclei (haematoxylin + Otsu + watershed)", CLASSICAL_HE))
        choices.append(("classical (Otsu + watershed, no network)", CLASSICAL))
        return choices

    def _on_layers_changed(self, event: Any = None) -> None:
        super()._on_layers_changed(event)
        self.model.reset_choices()

    # ------------------------------------------------------------------ run

    def _on_run(self, _v: Any = None) -> None:
        from napari.utils.notifications import show_error

        if not self.model.value and self.image.value is not None:
            show_error("Choose a model.")
            return
        chosen = self._chosen_record("detect objects in")
        if chosen is None:
            return
        layer, record = chosen
        self._t0 = time.perf_counter()
        self.job.start(
            _detect_job,
            record,
            self.model.value,
            self.device.value,
            on_result=lambda result: self._on_result(layer, record, result),
        )

    def _on_result(self, source_layer: Any, record: Any, result: Any) -> None:
        from napari_medseg.io.geometry import record_to_layer_data
        from napari_medseg.io.record import ImageRecord

        # the image's layer transform and axis permutation, without touching its voxels
        ghost = ImageRecord(
            data=np.broadcast_to(np.zeros(1, np.uint8), record.spatial_shape),
            affine=record.affine,
            space=record.space,
            name=source_layer.name,
            metadata=record.metadata,
        )
        _, kw, _ = record_to_layer_data(ghost, "labels")
        self._layer_kw = kw
        self._record = record
        self._result = result
        self._source_name = source_layer.name
        self.export_button.enabled = True
        secs = time.perf_counter() - self._t0
        self.progress.value = self.progress.max
        self.status.value = f"Done in {secs:.1f} s: {len(result.table)} objects before filtering."
        self._refresh(rebuild=True)

    # ------------------------------------------------------------------ live filtering

    def shown_table(self) -> pd.DataFrame | None:
        """The model's table filtered by the current threshold, minimum size and NMS IoU.

        Size filter and NMS are computed once per (min size, IoU) and cached; the threshold is
        then a cheap row mask. That equals :func:`filter_detections` with all three: greedy NMS
        lets a box be suppressed only by higher-scoring ones, which pass any threshold it
        passes.
        """
        if self._result is None:
            return None
        from napari_medseg.core.detect.result import filter_detections

        key = (id(self._result), float(self.min_size.value), float(self.nms_iou.value))
        if self._nms_key != key:
            self._nms_table = filter_detections(
                self._result.table, float("-inf"), min_size=key[1], nms_iou=key[2]
            )
            self._nms_key = key
        t = self._nms_table
        return t[t["score"].to_numpy(float) >= float(self.threshold.value)].reset_index(drop=True)

    def _perm(self) -> list[int]:
        nd = self._result.ndim
        perm = list(self._layer_kw["metadata"]["medseg"]["layer_axes"])
        return [p for p in perm if p < nd]

    def _schedule_refresh(self, _v: Any = None) -> None:
        """A filter moved: update the layers once the slider rests (debounced, 60 ms)."""
        self._refresh_timer.start()

    def _refresh(self, _v: Any = None, *, rebuild: bool = False) -> None:
        """Update the Points/Shapes layers from the kept table (no model run).

        After a new result (or with ``rebuild``) the Points layer gets every object the model
        found; a filter change then only sets the layer's ``shown`` mask (objects below the
        threshold, too small or suppressed by NMS are hidden, not deleted: milliseconds for
        thousands of points), and the user's edits, selection and hand-added points (``id`` 0,
        always shown) stay. The box outlines (a Shapes layer has no ``shown``) add and remove
        only the objects that entered or left the filtered table; with thousands of boxes that
        is most of a step's cost (docs/detection.md).
        """
        if self._result is None:
            return
        table = self.shown_table()
        ids = table["id"].to_numpy()
        layers = self._viewer.layers
        pname, bname = f"{self._source_name}_detections", f"{self._source_name}_boxes"
        incremental = (
            not rebuild
            and self._shown_ids is not None
            and pname in layers
            and type(layers[pname]).__name__ == "Points"
        )
        if not incremental:
            self._show_points(*self._point_rows(self._result.table))
            self._show_boxes(table)
            # hovering an object shows its id, class, score and size as a tooltip (this
            # session's viewer only; napari's saved preference is left alone)
            self._viewer.tooltip.visible = True
        else:
            gone = self._shown_ids - set(ids.tolist())
            new = table[~np.isin(ids, list(self._shown_ids))]
            if bname in layers and type(layers[bname]).__name__ == "Shapes":
                self._update_boxes(layers[bname], gone, new)
        points = layers[pname]
        layer_ids = points.features["id"].to_numpy() if len(points.features) else np.zeros(0)
        points.shown = np.isin(layer_ids, ids) | (layer_ids == 0)
        self._shown_ids = set(ids.tolist())
        self.n_refreshes += 1
        counts = table["class"].value_counts()
        self.counts.value = ", ".join(f"{c}: {n}" for c, n in counts.items()) or "none"

    def _point_rows(self, table: Any) -> tuple[np.ndarray, Any, np.ndarray]:
        """Centres (layer axis order), features and sizes of the Points for ``table`` rows."""
        from napari_medseg.core.detect.result import axis_names

        nd = self._result.ndim
        names = axis_names(nd)
        centres = table[names].to_numpy(float).reshape(-1, nd)[:, self._perm()]
        size_col = "area" if nd == 2 else "volume_mm3"
        features = table[["id", "class", "score", size_col]].reset_index(drop=True)
        if nd == 2:
            diam = np.sqrt(table[size_col].to_numpy(float) * 4 / np.pi)
        else:
            lo = table[[f"{a}_min" for a in names]].to_numpy(float).reshape(-1, nd)
            hi = table[[f"{a}_max" for a in names]].to_numpy(float).reshape(-1, nd)
            diam = (hi - lo).max(axis=1) if len(table) else np.zeros(0)
        # a dot (a third of the diameter, 3 to 12 px) that leaves the object visible around it;
        # the boxes show the extent
        return centres, features, np.clip(np.nan_to_num(diam, nan=9.0) / 3.0, 3.0, 12.0)

    def _geometry_kw(self) -> dict:
        """The image's transform, metadata and units (mm for scans) for the result layers."""
        keys = ("affine", "metadata", "units")
        return {k: self._layer_kw[k] for k in keys if k in self._layer_kw}

    def _show_points(self, centres: np.ndarray, features: Any, sizes: np.ndarray) -> None:
        name = f"{self._source_name}_detections"
        kw = self._geometry_kw()
        layers = self._viewer.layers
        if name in layers and type(layers[name]).__name__ == "Points":
            layer = layers[name]
            layer.data = centres
            layer.features = features
            layer.size = sizes if len(sizes) else 10
            layer.affine = kw["affine"]
        else:
            layer = self._viewer.add_points(
                centres,
                name=name,
                features=features,
                size=sizes if len(sizes) else 10,
                face_color="score",
                face_colormap="viridis",
                border_color="white",
                border_width=0.1,
                opacity=1.0,
                **kw,
            )
        if not getattr(layer, "_medseg_hooked", False):
            layer.events.data.connect(lambda ev, lyr=layer: self._on_points_edited(lyr, ev))
            layer._medseg_hooked = True
        layer.face_color_mode = "colormap"
        layer.face_color = "score"
        layer.face_contrast_limits = (0.0, 1.0)
        layer.feature_defaults = {
            "id": 0,
            "class": str(features["class"].iloc[0]) if len(features) else "object",
            "score": 1.0,
            features.columns[-1]: np.nan,
        }
        layer.refresh()

    @staticmethod
    def _on_points_edited(layer: Any, event: Any) -> None:
        """A point added by hand is a new object: id 0, score 1 (napari copies the selected)."""
        if str(getattr(event, "action", "")).lower().endswith("added"):
            idx = list(getattr(event, "data_indices", ()) or ())
            feats = layer.features
            if idx and "id" in feats.columns:
                idx = [i if i >= 0 else len(feats) + i for i in idx]
                feats.loc[idx, "id"] = 0
                feats.loc[idx, "score"] = 1.0
                feats.loc[idx, feats.columns[-1]] = np.nan
                layer.refresh_colors()

    def _box_rects(self, table: Any) -> tuple[list[np.ndarray], Any]:
        """Rectangles (layer axis order) and their features for ``table`` rows.

        2D: one rectangle per object. 3D: one rectangle on every slice the box spans, along the
        file axis shown as napari's first (slider) axis; the rectangles of one object share its
        ``id``. Box edges lie on voxel borders (centre - 0.5).
        """
        from napari_medseg.core.detect.result import axis_names

        nd = self._result.ndim
        names = axis_names(nd)
        perm = self._perm()
        lo = table[[f"{a}_min" for a in names]].to_numpy(float).reshape(-1, nd) - 0.5
        hi = table[[f"{a}_max" for a in names]].to_numpy(float).reshape(-1, nd) - 0.5
        feats = table[["id", "class", "score"]].reset_index(drop=True)
        if nd == 2:
            b, c = 0, 1
            rects = [
                np.array([[a0, b0], [a0, b1], [a1, b1], [a1, b0]])[:, perm]
                for (a0, b0), (a1, b1) in zip(lo, hi)
            ]
            return rects, feats
        s_ax, b, c = perm  # the slider axis (file order) and the two shown axes
        rects, rows = [], []
        for i in range(len(lo)):
            for k in range(int(lo[i, s_ax] + 0.5), int(hi[i, s_ax] + 0.5)):
                corners = np.empty((4, 3))
                corners[:, s_ax] = k
                corners[:, b] = [lo[i, b], lo[i, b], hi[i, b], hi[i, b]]
                corners[:, c] = [lo[i, c], hi[i, c], hi[i, c], lo[i, c]]
                rects.append(corners[:, perm])
                rows.append(i)
        return rects, feats.iloc[rows].reset_index(drop=True)

    def _show_boxes(self, table: Any) -> None:
        name = f"{self._source_name}_boxes"
        layers = self._viewer.layers
        if name in layers:
            layers.remove(name)
        rects, feats = self._box_rects(table)
        if len(rects) > MAX_BOXES:
            self.status.value += (
                f" {len(rects)} box outlines are too many to draw: centres only"
                " (raise the score threshold to see boxes)."
            )
            return
        kw = self._geometry_kw()
        if rects:
            self._viewer.add_shapes(
                rects,
                shape_type="rectangle",
                name=name,
                features=feats,
                edge_color="score",
                edge_colormap="viridis",
                face_color="transparent",
                edge_width=1,
                **kw,
            )
        else:
            self._viewer.add_shapes(name=name, ndim=self._result.ndim, **kw)

    def _update_boxes(self, layer: Any, gone: set, new: Any) -> None:
        import pandas as pd

        feats = layer.features.reset_index(drop=True)
        drop = np.nonzero(np.isin(feats["id"].to_numpy(), list(gone)))[0] if gone else []
        rects, f_new = self._box_rects(new)
        if len(drop) == 0 and not rects:
            return
        if len(layer.data) - len(drop) + len(rects) > MAX_BOXES:
            self._show_boxes(self.shown_table())  # rebuilt, or dropped with a message
            return
        if len(drop):
            layer.selected_data = set(drop.tolist())
            layer.remove_selected()
            feats = feats.drop(index=drop).reset_index(drop=True)
        if rects:
            layer.add(rects, shape_type="rectangle")
            layer.features = pd.concat([feats, f_new], ignore_index=True)
            layer.refresh_colors()

    # ------------------------------------------------------------------ export

    def edited_table(self) -> pd.DataFrame:
        """The table of what the Points layer shows now (after the user's edits).

        Points hidden by the filters are left out; deleted points are gone; added points get
        ``id`` 0, score 1 and the default class; moved points keep their id, score and class
        with the new centre (world coordinates
        recomputed from the image's affine; their box shrinks to the centre voxel).
        """
        import pandas as pd

        from napari_medseg.core.detect.result import axis_names, world_names

        layer = self._viewer.layers[f"{self._source_name}_detections"]
        nd = self._result.ndim
        names = axis_names(nd)
        inv = np.argsort(self._perm())
        shown = np.asarray(layer.shown, bool)
        centres = np.asarray(layer.data, dtype=float).reshape(-1, nd)[shown][:, inv]
        feats = layer.features.reset_index(drop=True)[shown].reset_index(drop=True)
        full = self._result.table.set_index("id")
        rows = []
        seen: set[int] = set()
        aff = np.asarray(self._result.affine, dtype=float)
        for i in range(len(centres)):
            f = feats.iloc[i]
            oid = int(f["id"]) if f["id"] == f["id"] else 0
            oid = 0 if oid in seen else oid  # a copy of an object is a new object
            seen.add(oid)
            c = centres[i]
            if oid in full.index and np.allclose(
                full.loc[oid, names].to_numpy(float), c, atol=1e-3
            ):
                rows.append(full.loc[oid].to_dict() | {"id": oid})
                continue
            w = aff[:nd, :nd] @ c + aff[:nd, nd]
            row: dict[str, Any] = {"id": oid, "class": str(f["class"]), "score": float(f["score"])}
            row.update(dict(zip(names, c)))
            wn = world_names(nd)
            row.update(dict(zip(wn, w)) if nd == 3 else {"world_y": w[0], "world_x": w[1]})
            for a, v in zip(names, c):
                row[f"{a}_min"], row[f"{a}_max"] = round(float(v)), round(float(v)) + 1
            size_col = "area" if nd == 2 else "volume_mm3"
            row[size_col] = float(f[size_col]) if size_col in f else np.nan
            rows.append(row)
        return pd.DataFrame(rows, columns=list(self._result.table.columns))

    def export(self, path: str) -> Any:
        """Write :meth:`edited_table` to ``path`` (.csv or .geojson), replacing it."""
        from napari_medseg.io.detections import write_detections

        res = self._result
        return write_detections(
            path,
            self.edited_table(),
            instances=res.instances,
            affine=res.affine if res.space == "pixel" else None,
            class_colors=res.class_colors,
            overwrite=True,
        )

    def _on_export(self, _v: Any = None) -> None:
        from napari.utils.notifications import show_error, show_info
        from qtpy.QtWidgets import QFileDialog

        if self._result is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self.native,
            "Export detections",
            f"{self._source_name}_detections.csv",
            "CSV (*.csv);;QuPath GeoJSON (*.geojson)",
        )
        if not path:
            return
        try:
            out = self.export(path)
        except Exception as e:  # noqa: BLE001 - one sentence for the user
            show_error(str(e))
            return
        show_info(f"Saved {out}")
