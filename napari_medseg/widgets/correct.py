"""The "Correct & Train" dock widget: correction tools, live volumes, safe saving, recovery.

Thin (DESIGN.md rule 3): the maths is in :mod:`napari_medseg.core.correct.edits` and the saving
in :mod:`napari_medseg.core.correct.mask_store`. Each tool computes an
:class:`~napari_medseg.core.correct.edits.Edit` on the Labels layer's data and writes only the
changed voxels with ``layer.data_setitem`` inside ``layer.block_history()``: one entry in
napari's labels history, so one Ctrl+Z undoes it, exactly like a brush stroke.

Unsaved edits are autosaved every few seconds (only when something changed) to the recovery
folder; opening an image that has an autosave offers to restore it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)

from napari_medseg.core.correct import edits as C
from napari_medseg.io.geometry import META_KEY, compose_layer_transform
from napari_medseg.io.record import layer_to_record
from napari_medseg.widgets._layers import find_source_layer, layer_state
from napari_medseg.widgets._plot import TrainingPlot
from napari_medseg.widgets._task import ImageInput

if TYPE_CHECKING:
    import napari

AUTOSAVE_MS = 5000
FILL_MODES = ["3D", "2D slices"]
TABLE_COLUMNS = ["class", "name", "voxels", "mL"]
CASE_COLUMNS = ["case", "status", "versions"]
SIGNS = ["positive", "negative"]
CLICK_METHODS = [
    ("random walker (follows edges, any image)", "random_walker"),
    ("learned (click_refine_2d, 2D slices)", "learned"),
]
SIGN_COLORS = {"positive": "#30ff30", "negative": "#ff3030"}


def layer_spacing(layer: Any) -> tuple[float, ...]:
    """Voxel size along each data axis of a layer (mm for scans), from its full transform."""
    m = compose_layer_transform(layer_state(layer))
    n = layer.ndim
    lin = m[-n - 1 : -1, -n - 1 : -1]
    return tuple(float(v) for v in np.sqrt((lin**2).sum(axis=0)))


class CorrectWidget(ImageInput, Container):
    """Dock widget: correct a Labels layer, see class volumes, save versions, recover edits."""

    def __init__(self, viewer: napari.viewer.Viewer, autosave_ms: int = AUTOSAVE_MS) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self.labels = ComboBox(label="Labels", choices=self._labels_choices, nullable=True)
        self.image = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        self.label_id = SpinBox(label="Class", value=1, min=1, max=65535)
        self.largest_button = PushButton(text="Keep largest component")
        self.min_size = FloatSpinBox(label="Island below (mm³)", value=50.0, min=0.0, max=1e7)
        self.islands_button = PushButton(text="Remove islands")
        self.fill_mode = ComboBox(label="Fill holes in", choices=FILL_MODES, value="3D")
        self.fill_button = PushButton(text="Fill holes")
        self.interp_button = PushButton(text="Interpolate between slices")
        self.margin = FloatSpinBox(label="Margin (mm)", value=2.0, min=0.1, max=100.0, step=0.5)
        self.grow_button = PushButton(text="Grow")
        self.shrink_button = PushButton(text="Shrink")
        self.to_label = SpinBox(label="Relabel to (0 deletes)", value=2, min=0, max=65535)
        self.relabel_button = PushButton(text="Relabel class")
        self.click_sign = ComboBox(label="Click (T toggles)", choices=SIGNS, value=SIGNS[0])
        self.click_method = ComboBox(
            label="Click model", choices=CLICK_METHODS, value="random_walker"
        )
        self.reach = FloatSpinBox(
            label="Click reach (mm; px on 2D images)",
            value=25.0,
            min=1.0,
            max=500.0,
            step=1.0,
            tooltip="Nothing farther than this from every click changes. Smaller suits small "
            "objects (nuclei: 12 px was better for the random walker, docs/clicks.md).",
        )
        self.refine_button = PushButton(text="Refine from clicks (R)")
        self.clear_clicks_button = PushButton(text="Clear clicks")
        self.table = Table(value={"data": [], "index": [], "columns": TABLE_COLUMNS})
        self.save_dir = FileEdit(label="Save to", mode="d", value="")
        self.save_button = PushButton(text="Save mask")
        self.project = FileEdit(label="Worklist", mode="d", value="")
        self.next_button = PushButton(text="Next case")
        self.approve_button = PushButton(text="Approve case")
        self.cases_table = Table(value={"data": [], "index": [], "columns": CASE_COLUMNS})
        self.model = ComboBox(label="Model to fine-tune", choices=self._model_choices)
        self.train_minutes = FloatSpinBox(
            label="Training (min)", value=10.0, min=0.05, max=24 * 60.0, step=1.0
        )
        self.hold_out = CheckBox(
            text="Hold out cases to measure before/after",
            value=True,
            tooltip="Off: train on every corrected case (better with few cases; gain unmeasured)",
        )
        self.train_button = PushButton(text="Train on corrections")
        self.train_cancel = PushButton(text="Cancel", enabled=False)
        self.train_progress = ProgressBar(label="Training", min=0, max=100, value=0)
        self.train_info = Label(label="", value="")
        self.train_plot = TrainingPlot(score_name="val Dice")
        self.status = Label(label="", value="Choose a Labels layer to correct.")
        self.extend(
            [
                self.labels,
                self.image,
                self.label_id,
                self.largest_button,
                self.min_size,
                self.islands_button,
                self.fill_mode,
                self.fill_button,
                self.interp_button,
                self.margin,
                self.grow_button,
                self.shrink_button,
                self.to_label,
                self.relabel_button,
                self.click_sign,
                self.click_method,
                self.reach,
                self.refine_button,
                self.clear_clicks_button,
                self.table,
                self.save_dir,
                self.save_button,
                self.project,
                self.next_button,
                self.approve_button,
                self.cases_table,
                self.model,
                self.train_minutes,
                self.hold_out,
                self.train_button,
                self.train_cancel,
                self.train_progress,
                self.train_info,
                self.status,
            ]
        )
        # per labels layer (by id): prediction snapshot, counts, editing time, tools, autosaver
        self._state: dict[int, dict[str, Any]] = {}
        self._bound: Any = None
        self.largest_button.changed.connect(self.keep_largest)
        self.islands_button.changed.connect(self.remove_islands)
        self.fill_button.changed.connect(self.fill_holes)
        self.interp_button.changed.connect(self.interpolate)
        self.grow_button.changed.connect(lambda _=None: self.grow_shrink(+1))
        self.shrink_button.changed.connect(lambda _=None: self.grow_shrink(-1))
        self.relabel_button.changed.connect(self.relabel)
        self.refine_button.changed.connect(self.refine_clicks)
        self.clear_clicks_button.changed.connect(self.clear_clicks)
        self.click_sign.changed.connect(self._on_sign)
        self.save_button.changed.connect(self.save_mask)
        self.project.changed.connect(self._on_project)
        self.next_button.changed.connect(self.next_case)
        self.approve_button.changed.connect(self.approve_case)
        self._worklist: Any = None
        self._train_worker: Any = None
        self.train_button.changed.connect(self.train_on_corrections)
        self.train_cancel.changed.connect(self._on_train_cancel)
        self._case: Any = None  # (case name, image layer, labels layer) opened by Next case
        self.labels.changed.connect(self._bind_layer)
        self.label_id.changed.connect(self._on_label_id)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)

        from qtpy.QtCore import QTimer

        self._timer = QTimer()
        self._timer.setInterval(int(autosave_ms))
        self._timer.timeout.connect(self.autosave)
        self._timer.start()
        self._recount_timer = QTimer()
        self._recount_timer.setSingleShot(True)
        self._recount_timer.setInterval(250)
        self._recount_timer.timeout.connect(self._check_recount)
        # the plot goes under the training progress bar (magicgui wraps each labelled widget
        # in a row: find that row in the dock's layout)
        row = self.train_info.native
        while row.parentWidget() is not None and row.parentWidget() is not self.native:
            row = row.parentWidget()
        layout = self.native.layout()
        layout.insertWidget(layout.indexOf(row) + 1, self.train_plot)
        for table in (self.table, self.cases_table):
            from qtpy.QtWidgets import QHeaderView

            table.native.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self._on_layers_changed()
        for layer in list(viewer.layers):
            self._offer_recovery(layer)

    # ------------------------------------------------------------------ layers

    def _labels_choices(self, _w: Any = None) -> list:
        from napari.layers import Labels

        return [lyr for lyr in self._viewer.layers if isinstance(lyr, Labels)]

    def _on_layers_changed(self, event: Any = None) -> None:
        self.labels.reset_choices()
        self.image.reset_choices()
        choices = self._labels_choices()
        if event is not None and getattr(event, "type", "") == "inserted":
            layer = event.value
            if layer in choices:
                self.labels.value = layer
            else:
                self._offer_recovery(layer)
        if self.labels.value is None and choices:
            self.labels.value = choices[-1]
        if event is not None and getattr(event, "type", "") == "removed":
            self._state.pop(id(event.value), None)
        if self._bound is not None and self._bound not in choices:
            self._unbind()
        if self.labels.value is not None and self._bound is not self.labels.value:
            self._bind_layer()

    def _source_image(self, layer: Any) -> Any:
        for img in self._image_choices():
            same_grid = img.data.shape[-layer.ndim :] == layer.data.shape
            if img.name + "_seg" == layer.name and same_grid:
                return img
        return find_source_layer(self._viewer, layer.data, layer_state(layer))

    def _unbind(self) -> None:
        layer = self._bound
        if layer is None:
            return
        for ev, cb in (
            (layer.events.paint, self._on_paint),
            (layer.events.data, self._on_data),
            (layer.events.set_data, self._on_set_data),
            (layer.events.selected_label, self._on_selected_label),
        ):
            try:
                ev.disconnect(cb)
            except (TypeError, RuntimeError, ValueError):
                pass
        self._bound = None

    def _bind_layer(self, _v: Any = None) -> None:
        layer = self.labels.value
        if layer is self._bound:
            return
        self._unbind()
        if layer is None:
            return
        self._bound = layer
        src = self._source_image(layer)
        if src is not None:
            self.image.value = src
        st = self._layer_state(layer)
        if st["prediction"] is None and self._has_model_output(layer):
            st["prediction"] = np.array(layer.data, copy=True)
        layer.events.paint.connect(self._on_paint)
        layer.events.data.connect(self._on_data)
        layer.events.set_data.connect(self._on_set_data)
        layer.events.selected_label.connect(self._on_selected_label)
        self.label_id.value = max(1, int(layer.selected_label))
        self._recount()
        current = self._current_model()  # fine-tune the model that made this mask by default
        if current is not None:
            self.model.reset_choices()
            if current in [c[1] for c in self._model_choices()]:
                self.model.value = current
        self.status.value = f"Correcting {layer.name}."

    def _layer_state(self, layer: Any) -> dict[str, Any]:
        key = id(layer)
        if key not in self._state:
            self._state[key] = {
                "prediction": None,
                "counts": None,
                "signature": None,
                "edit_seconds": 0.0,
                "last_edit": None,
                "tools": [],
                "dirty": False,
                "unsaved": False,
                "edits": 0,
            }
        return self._state[key]

    @staticmethod
    def _has_model_output(layer: Any) -> bool:
        return bool(((layer.metadata or {}).get(META_KEY) or {}).get("provenance"))

    def _on_selected_label(self, _e: Any = None) -> None:
        layer = self._bound
        if layer is not None and int(layer.selected_label) >= 1:
            self.label_id.value = int(layer.selected_label)

    def _on_label_id(self, value: int) -> None:
        layer = self._bound
        if layer is not None and int(layer.selected_label) != int(value):
            layer.selected_label = int(value)

    # ------------------------------------------------------------------ counts

    def _signature(self, layer: Any) -> tuple:
        """What changes when napari's undo/redo changes the data (they emit no paint event).

        Fast path: the lengths of napari's undo/redo queues (private attributes, read with
        ``getattr`` so a napari without them still works). Fallback: the per-class voxel
        counts, recomputed (a bincount, about 0.1 s per 50 M voxels, debounced): an undo
        that leaves every class count unchanged then goes unnoticed by the editing clock.
        """
        undo = getattr(layer, "_undo_history", None)
        redo = getattr(layer, "_redo_history", None)
        if undo is not None and redo is not None:
            return (id(layer.data), len(undo), len(redo))
        return (id(layer.data), C.class_counts(layer.data).tobytes())

    def _recount(self) -> None:
        layer = self._bound
        if layer is None:
            return
        st = self._layer_state(layer)
        st["counts"] = C.class_counts(layer.data)
        st["signature"] = self._signature(layer)
        self._show_counts()

    def _on_paint(self, event: Any) -> None:
        layer = self._bound
        if layer is None:
            return
        st = self._layer_state(layer)
        counts = st["counts"]
        for atom in event.value or []:
            if counts is None:
                break
            if isinstance(atom, tuple) and len(atom) == 3:
                _idx, old, new = atom
                counts = C.update_counts(counts, old, new)
            else:  # napari's _MaskedPaintAtom: (slice_key, mask, old_values, new_value)
                old = np.asarray(atom.old_values)
                new = np.full(old.shape, atom.new_value, dtype=np.int64)
                counts = C.update_counts(counts, old, new)
        st["counts"] = counts
        st["signature"] = self._signature(layer)
        self._mark_edited(st)
        self._show_counts()

    def _mark_edited(self, st: dict) -> None:
        now = time.monotonic()
        if st["last_edit"] is not None:
            st["edit_seconds"] += min(now - st["last_edit"], 30.0)  # idle time does not count
        st["last_edit"] = now
        st["dirty"] = True  # not autosaved yet
        st["unsaved"] = True  # not saved as a version yet
        st["edits"] += 1

    def _on_data(self, _e: Any = None) -> None:
        """The whole array was replaced (e.g. Segment ran again): a new prediction."""
        layer = self._bound
        if layer is None:
            return
        st = self._layer_state(layer)
        if self._has_model_output(layer):
            st["prediction"] = np.array(layer.data, copy=True)
        self._recount()

    def _on_set_data(self, _e: Any = None) -> None:
        self._recount_timer.start()  # undo/redo change the data without a paint event

    def _check_recount(self) -> None:
        layer = self._bound
        if layer is None:
            return
        st = self._layer_state(layer)
        if st["signature"] != self._signature(layer):
            self._recount()
            self._mark_edited(st)

    def class_names(self) -> dict[int, str]:
        layer = self._bound
        names = dict((layer.metadata or {}).get("class_names") or {}) if layer is not None else {}
        return {int(k): str(v) for k, v in names.items()}

    def volumes(self) -> dict[int, dict[str, Any]]:
        """``{class: {"voxels", "mm3"}}`` of the bound layer (what the table shows)."""
        layer = self._bound
        if layer is None:
            return {}
        st = self._layer_state(layer)
        return C.class_volumes(layer.data, layer_spacing(layer), counts=st["counts"])

    def _show_counts(self) -> None:
        names = self.class_names()
        rows = []
        vol3d = self._bound is not None and self._bound.ndim == 3
        for c, v in self.volumes().items():
            size = v["mm3"] / 1000.0 if (v["mm3"] is not None and vol3d) else None
            rows.append([c, names.get(c, ""), v["voxels"], "" if size is None else f"{size:.2f}"])
        self.table.value = {"data": rows, "index": list(range(len(rows))), "columns": TABLE_COLUMNS}

    # ------------------------------------------------------------------ tools

    def _target(self) -> tuple[Any, int] | None:
        from napari.utils.notifications import show_error

        layer = self._bound
        if layer is None:
            show_error("Choose a Labels layer to correct.")
            return None
        if isinstance(layer.data, list) or getattr(layer, "multiscale", False):
            show_error("Correction tools work on single-resolution Labels layers.")
            return None
        return layer, int(self.label_id.value)

    def _slice_axis(self, layer: Any) -> int:
        """The layer axis the user scrolls through (the slider), 0 in a 3D view."""
        dims = self._viewer.dims
        if dims.ndisplay != 2 or layer.ndim < 3:
            return 0
        world_axis = dims.order[-3] if len(dims.order) >= 3 else 0
        return int(max(0, world_axis - (dims.ndim - layer.ndim)))

    def apply_edit(self, name: str, edit: C.Edit) -> int:
        """Write an edit into the bound layer as one undo step; returns voxels changed."""
        layer = self._bound
        if edit.n_changed == 0:
            self.status.value = f"{name}: nothing to change."
            return 0
        with layer.block_history():
            layer.data_setitem(edit.indices, edit.values)
        st = self._layer_state(layer)
        st["tools"].append(name)
        self.status.value = f"{name}: {edit.n_changed} voxels changed (Ctrl+Z undoes)."
        return edit.n_changed

    def _run_tool(self, name: str, fn: Any) -> int:
        from napari.utils.notifications import show_error

        target = self._target()
        if target is None:
            return 0
        layer, label = target
        try:
            t0 = time.perf_counter()
            edit = fn(np.asarray(layer.data), label, layer)
            dt = time.perf_counter() - t0
        except (ValueError, MemoryError) as e:
            show_error(f"{name} failed: {e}")
            self.status.value = f"{name} failed: {e}"
            return 0
        n = self.apply_edit(name, edit)
        if n:
            self.status.value += f" {dt * 1000:.0f} ms."
        return n

    def keep_largest(self, _v: Any = None) -> int:
        return self._run_tool(
            "Keep largest component", lambda a, c, lyr: C.keep_largest_component(a, c)
        )

    def remove_islands(self, _v: Any = None) -> int:
        return self._run_tool(
            "Remove islands",
            lambda a, c, lyr: C.remove_islands(
                a, c, min_mm3=float(self.min_size.value), spacing=layer_spacing(lyr)
            ),
        )

    def fill_holes(self, _v: Any = None) -> int:
        mode = "2d" if self.fill_mode.value == FILL_MODES[1] else "3d"
        return self._run_tool(
            "Fill holes",
            lambda a, c, lyr: C.fill_holes(a, c, mode=mode, axis=self._slice_axis(lyr)),
        )

    def interpolate(self, _v: Any = None) -> int:
        return self._run_tool(
            "Interpolate between slices",
            lambda a, c, lyr: C.interpolate_slices(
                a, c, axis=self._slice_axis(lyr), spacing=layer_spacing(lyr)
            ),
        )

    def grow_shrink(self, sign: int = 1) -> int:
        m = float(self.margin.value) * (1 if sign > 0 else -1)
        return self._run_tool(
            "Grow" if sign > 0 else "Shrink",
            lambda a, c, lyr: C.grow_shrink(a, c, m, layer_spacing(lyr)),
        )

    def relabel(self, _v: Any = None) -> int:
        to = int(self.to_label.value)
        return self._run_tool("Relabel", lambda a, c, lyr: C.relabel(a, {c: to}))

    # ------------------------------------------------------------------ clicks

    def clicks_layer(self, create: bool = True) -> Any:
        """The Points layer of positive/negative clicks for the bound Labels layer."""
        layer = self._bound
        if layer is None:
            return None
        name = f"{layer.name} clicks"
        if name in self._viewer.layers:
            return self._viewer.layers[name]
        if not create:
            return None
        sign = self.click_sign.value
        pts = self._viewer.add_points(
            np.zeros((0, layer.ndim)),
            name=name,
            ndim=layer.ndim,
            affine=layer.affine.affine_matrix,
            features={"sign": np.array([], dtype=object)},
            face_color=SIGN_COLORS[sign],
            border_color="white",
            size=4 * float(min(layer_spacing(layer))),
        )
        pts.feature_defaults = {"sign": sign}
        pts.current_face_color = SIGN_COLORS[sign]
        pts.bind_key("t", lambda _l: self.toggle_sign(), overwrite=True)
        pts.bind_key("r", lambda _l: self.refine_clicks(), overwrite=True)
        pts.mode = "add"
        self._viewer.layers.selection.active = pts
        return pts

    def toggle_sign(self) -> str:
        """Switch between positive and negative clicks (shortcut T on the clicks layer)."""
        self.click_sign.value = SIGNS[1] if self.click_sign.value == SIGNS[0] else SIGNS[0]
        return str(self.click_sign.value)

    def _on_sign(self, value: str) -> None:
        pts = self.clicks_layer(create=False)
        if pts is not None:
            pts.feature_defaults = {"sign": value}
            pts.current_face_color = SIGN_COLORS[value]
        self.status.value = f"Next clicks are {value} (T toggles, R refines)."

    def clear_clicks(self, _v: Any = None) -> None:
        pts = self.clicks_layer(create=False)
        if pts is not None and len(pts.data):
            pts.data = np.zeros((0, pts.ndim))

    def refine_clicks(self, _v: Any = None) -> int:
        """Re-segment the class around the clicks, as one undo step.

        ``Click model``: the random walker (model-free, follows intensity edges, 2D or 3D) or
        the learned click model (2D, in the slice of each click); see docs/clicks.md for
        which wins where.
        """
        from napari.utils.notifications import show_error

        from napari_medseg.core.correct.refine import refine_with_clicks

        target = self._target()
        if target is None:
            return 0
        layer = target[0]
        pts = self.clicks_layer(create=True)
        if pts is None or not len(pts.data):
            self.status.value = "Add clicks first: positive on what is missing, negative on errors."
            return 0
        img_layer = self.image.value
        if img_layer is None:
            show_error("Choose the image the labels were drawn on: clicks need its intensities.")
            return 0
        img = np.asarray(img_layer.data)
        if getattr(img_layer, "rgb", False):
            img = img[..., :3].mean(axis=-1)
        if img.shape != layer.data.shape:
            show_error("The image and the labels must share a grid to refine from clicks.")
            return 0
        signs = np.asarray(pts.features["sign"]).astype(str)
        coords = np.asarray(pts.data, float)
        method = str(self.click_method.value)
        mode = "3d" if self._viewer.dims.ndisplay == 3 and method == "random_walker" else "2d"
        # the intensities the reader sees (contrast limits); RGB: the full range. The learned
        # model normalises by itself, except for CT where the window is the meaningful range.
        ct = ((img_layer.metadata or {}).get(META_KEY) or {}).get("modality") == "CT"
        window = None if getattr(img_layer, "rgb", False) else tuple(img_layer.contrast_limits)
        if method == "learned" and not ct:
            window = None
        return self._run_tool(
            "Refine from clicks",
            lambda a, c, lyr: refine_with_clicks(
                img,
                a,
                c,
                coords[signs == "positive"],
                coords[signs == "negative"],
                layer_spacing(lyr),
                mode=mode,
                axis=self._slice_axis(lyr),
                window=window,
                method=method,
                reach_mm=float(self.reach.value),
            ),
        )

    # ------------------------------------------------------------------ saving

    def _source_path(self, layer: Any) -> str | None:
        for lyr in (self.image.value, layer):
            if lyr is None:
                continue
            p = ((lyr.metadata or {}).get(META_KEY) or {}).get("path")
            if p:
                return str(p)
        return None

    def _recovery_key(self, layer: Any) -> str:
        return self._source_path(layer) or f"unsaved:{layer.name}"

    def _labels_record(self, layer: Any) -> Any:
        attrs = layer_state(layer)
        if not (attrs.get("metadata") or {}).get(META_KEY) and self.image.value is not None:
            img = self.image.value
            meta = dict(attrs.get("metadata") or {})
            meta[META_KEY] = img.metadata.get(META_KEY)
            if meta[META_KEY]:
                attrs = {**attrs, "metadata": meta}
        rec = layer_to_record(np.asarray(layer.data), attrs, name=layer.name)
        rec.modality = "label"
        return rec

    def _default_dir(self, layer: Any) -> Path:
        """Beside the source image when that folder is writable, else Documents/napari-medseg."""
        import os

        import platformdirs

        package = Path(__file__).resolve().parents[1]
        src = self._source_path(layer)
        if src:
            folder = Path(src).parent if Path(src).is_file() else Path(src)
            if os.access(folder, os.W_OK) and package not in folder.resolve().parents:
                return folder
        out = Path(platformdirs.user_documents_dir()) / "napari-medseg"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def save_mask(self, _v: Any = None) -> Path | None:
        """Save the bound layer as the next version with provenance; returns the file."""
        from napari.utils.notifications import show_error, show_info

        from napari_medseg.core.correct.mask_store import (
            build_provenance,
            clear_recovery,
            save_mask_version,
        )
        from napari_medseg.errors import MedsegError

        target = self._target()
        if target is None:
            return None
        layer, _ = target
        st = self._layer_state(layer)
        folder = (
            Path(str(self.save_dir.value or ""))
            if str(self.save_dir.value or "") not in ("", ".")
            else self._default_dir(layer)
        )
        try:
            rec = self._labels_record(layer)
            pred = st["prediction"]
            seg_prov = ((layer.metadata or {}).get(META_KEY) or {}).get("provenance") or {}
            prov = build_provenance(
                source_path=self._source_path(layer),
                corrected=np.asarray(layer.data),
                prediction=pred if pred is not None and pred.shape == layer.data.shape else None,
                segmentation=seg_prov,
                spacing=layer_spacing(layer),
                class_names=self.class_names(),
                editing_seconds=st["edit_seconds"],
                tools=st["tools"],
                parameters={"layer": layer.name},
            )
            case = self._active_case(layer)
            if case is not None:
                path = self._worklist.save_corrected(case, rec, prov)
                self._show_cases()
            else:
                path = save_mask_version(rec, folder, prov, name=_safe_name(layer.name))
        except (MedsegError, OSError, ValueError) as e:
            show_error(str(e))
            self.status.value = f"Not saved: {e}"
            return None
        clear_recovery(self._recovery_key(layer))
        st["dirty"] = st["unsaved"] = False
        self.status.value = f"Saved {path.name} in {path.parent}."
        show_info(f"Saved {path}")
        return path

    # ------------------------------------------------------------------ autosave / recovery

    def autosave(self) -> Path | None:
        """Autosave the bound layer when it changed since the last autosave (timer slot)."""
        from napari_medseg.core.correct.mask_store import Autosaver

        layer = self._bound
        if layer is None:
            return None
        st = self._layer_state(layer)
        if not st["dirty"]:
            return None
        meta = {
            "layer": layer.name,
            "affine": np.asarray(layer.affine.affine_matrix).tolist(),
            "metadata": {META_KEY: (layer.metadata or {}).get(META_KEY)},
            "class_names": self.class_names(),
            "edits": st["edits"],
        }
        try:
            path = Autosaver(self._recovery_key(layer)).save(layer.data, meta)
        except OSError as e:
            self.status.value = f"Autosave failed: {e}"
            return None
        st["dirty"] = False
        return path

    def _offer_recovery(self, layer: Any) -> None:
        from napari.layers import Image

        from napari_medseg.core.correct.mask_store import find_recovery

        if not isinstance(layer, Image):
            return
        path = ((layer.metadata or {}).get(META_KEY) or {}).get("path")
        if not path:
            return
        rec = find_recovery(path)
        if rec is None:
            return
        shape = tuple(layer.data.shape)
        if getattr(layer, "rgb", False):
            shape = shape[:-1]
        if tuple(rec.labels.shape) != shape[-rec.labels.ndim :]:
            return
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.saved_at))
        if not self._ask_restore(f"Unsaved corrections of {layer.name} from {when} were found."):
            return
        name = rec.meta.get("layer") or f"{layer.name}_seg"
        meta = dict(rec.meta.get("metadata") or {})
        if not meta.get(META_KEY):
            meta[META_KEY] = layer.metadata.get(META_KEY)
        if rec.meta.get("class_names"):
            meta["class_names"] = {int(k): v for k, v in rec.meta["class_names"].items()}
        new = self._viewer.add_labels(
            rec.labels,
            name=name,
            affine=np.asarray(rec.meta.get("affine") or layer.affine.affine_matrix),
            metadata=meta,
            opacity=0.5,
        )
        self.labels.value = new
        self._layer_state(new)["dirty"] = True  # still unsaved
        self.status.value = f"Restored unsaved corrections of {layer.name} ({when})."

    def _ask_restore(self, message: str) -> bool:
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self.native, "Restore unsaved corrections?", message + "\n\nRestore them?"
        )
        return answer == QMessageBox.StandardButton.Yes

    # ------------------------------------------------------------------ worklist

    def _on_project(self, _v: Any = None) -> None:
        value = str(self.project.value or "")
        if value in ("", "."):
            return
        self.open_worklist(value)

    def open_worklist(self, folder: str | Path) -> bool:
        """Use a worklist project folder (images/, predictions/, corrected/, status.json)."""
        from napari.utils.notifications import show_error

        from napari_medseg.core.correct.worklist import Worklist, WorklistError

        try:
            self._worklist = Worklist(folder)
        except WorklistError as e:
            show_error(str(e))
            self.status.value = str(e)
            return False
        self._show_cases()
        counts = self._worklist.summary()
        self.status.value = ", ".join(f"{n} {s}" for s, n in counts.items()) + "."
        return True

    def _show_cases(self) -> None:
        if self._worklist is None:
            return
        rows = [[c.name, c.status, len(c.corrected)] for c in self._worklist.cases()]
        self.cases_table.value = {
            "data": rows,
            "index": list(range(len(rows))),
            "columns": CASE_COLUMNS,
        }

    def _active_case(self, layer: Any) -> str | None:
        if self._worklist is None or self._case is None:
            return None
        name, _img, lab = self._case
        return name if lab is layer else None

    def next_case(self, _v: Any = None) -> str | None:
        """Open the next case that is still to do, with its newest mask; returns its name."""
        from napari.utils.notifications import show_error, show_info

        if self._worklist is None:
            show_error("Choose a worklist folder first.")
            return None
        after = self._case[0] if self._case else None
        case = self._worklist.next_case(after=after)
        if case is None:
            show_info("No case left to do in this worklist.")
            self.status.value = "All cases are done."
            return None
        if self._case is not None:
            _, img, lab = self._case
            if lab is self._bound:
                self.autosave()  # unsaved edits stay recoverable
            for lyr in (lab, img):
                if lyr in self._viewer.layers:
                    self._viewer.layers.remove(lyr)
            self._case = None
        try:
            img, lab = self._open_case(case)
        except Exception as e:  # noqa: BLE001 - a broken case file: one sentence
            show_error(f"Could not open case {case.name}: {e}")
            self.status.value = f"Could not open case {case.name}: {e}"
            return None
        self._case = (case.name, img, lab)
        self._show_cases()
        self.status.value = f"Case {case.name} ({case.status})."
        return case.name

    def _open_case(self, case: Any) -> tuple[Any, Any]:
        from napari_medseg.io import read_image
        from napari_medseg.io.geometry import record_to_layer_data

        (img,) = self._viewer.open(str(case.image), plugin="napari-medseg")[:1]
        name = f"{img.name}_seg"
        if name in self._viewer.layers:  # restored from an autosave just now
            lab = self._viewer.layers[name]
        else:
            src = case.latest
            if src is not None:
                (rec,) = read_image(src)
                rec.modality = "label"
                rec.data = np.asarray(rec.data)
                if rec.data.dtype.kind == "f":
                    rec.data = rec.data.astype(np.int32)
                rec.name = name
                data, kwargs, _ = record_to_layer_data(rec, "labels")
            else:
                shape = img.data.shape[:-1] if getattr(img, "rgb", False) else img.data.shape
                data = np.zeros(shape, np.uint8)
                kwargs = {"affine": img.affine.affine_matrix, "metadata": {}}
            meta = dict(kwargs["metadata"])
            meta[META_KEY] = dict(img.metadata.get(META_KEY) or {})
            prov = _provenance_beside(case.prediction)
            if prov:
                meta[META_KEY]["provenance"] = prov
            lab = self._viewer.add_labels(
                data, name=name, affine=kwargs["affine"], metadata=meta, opacity=0.5
            )
        st = self._layer_state(lab)
        if case.prediction is not None:
            (pred,) = read_image(case.prediction)
            perm = (lab.metadata.get(META_KEY) or {}).get("layer_axes")
            arr = np.asarray(pred.data)
            st["prediction"] = arr.transpose(perm) if perm and len(perm) == arr.ndim else arr
        self.labels.value = lab
        return img, lab

    def approve_case(self, _v: Any = None) -> None:
        """Mark the open case approved (save its mask first)."""
        from napari.utils.notifications import show_error

        if self._worklist is None or self._case is None:
            show_error("Open a case with Next case first.")
            return
        name, _img, lab = self._case
        if self._layer_state(lab)["unsaved"] or not self._worklist.case(name).corrected:
            if self.save_mask() is None:
                return
        self._worklist.set_status(name, "approved")
        self._show_cases()
        self.status.value = f"Case {name} approved."

    # ------------------------------------------------------------------ fine-tuning

    def _model_choices(self, _w: Any = None) -> list[tuple[str, str]]:
        from napari_medseg.models.registry import list_models

        out = []
        for card in list_models():
            src = card.get("source")
            if card.get("task", "segmentation") != "segmentation":
                continue  # detectors and click models are not fine-tuned on masks
            if src and (Path(src) / "model.json").is_file():
                parent = f", from {card['parent']}" if card.get("parent") else ""
                out.append((f"{card['name']} v{card.get('version', '?')}{parent}", str(src)))
        return out

    def _current_model(self) -> str | None:
        """The model that made the bound layer, when it is a fine-tunable folder."""
        layer = self._bound
        prov = ((layer.metadata or {}).get(META_KEY) or {}).get("provenance") if layer else None
        src = ((prov or {}).get("model") or {}).get("source")
        if src and (Path(src) / "model.json").is_file():
            return str(src)
        return None

    def train_on_corrections(self, _v: Any = None) -> None:
        """Fine-tune the chosen model on the worklist's corrected cases in the background."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        from napari_medseg.training.from_corrections import finetune_from_corrections

        if self._worklist is None:
            show_error("Open a worklist with corrected cases first.")
            return
        self.model.reset_choices()
        current = self._current_model()
        if current and current in [c[1] for c in self._model_choices()]:
            self.model.value = current
        init = self.model.value
        if not init:
            show_error("Choose the model to fine-tune (a model folder).")
            return
        self.train_plot.clear()
        worker = create_worker(
            finetune_from_corrections,
            self._worklist,
            init,
            time_budget=float(self.train_minutes.value) * 60.0,
            hold_out=bool(self.hold_out.value),
            device="auto",
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(self._on_train_progress)
        worker.returned.connect(self._on_trained)
        worker.errored.connect(self._on_train_error)
        worker.finished.connect(self._on_train_finished)
        self._train_worker = worker
        self.train_button.enabled = False
        self.train_cancel.enabled = True
        self.train_progress.value = 0
        self.train_info.value = "starting..."
        worker.start()

    def _on_train_progress(self, p: Any) -> None:
        if p.total:
            self.train_progress.max = max(int(p.total), 1)
            self.train_progress.value = min(int(p.done), int(p.total))
        info = p.info or {}
        loss, dice, phase = info.get("loss"), info.get("val_dice"), info.get("phase")
        if phase == "epoch":  # one point per epoch: the held-out Dice just measured
            if isinstance(dice, (int, float)):
                self.train_plot.add_score(float(dice))
        elif isinstance(loss, (int, float)):
            self.train_plot.add(float(loss))
        text = p.message
        if isinstance(dice, (int, float)):
            text += f"  (val Dice {float(dice):.2f})"
        self.train_info.value = text

    def _on_trained(self, result: Any) -> None:
        dice = result.best_val_dice
        ba = (result.card.metrics or {}).get("before_after")
        score = f" held-out Dice {dice:.3f}" if isinstance(dice, float) else ""
        if ba:
            m = ba["mean_dice"]
            score += f"; held-out cases before {m['before']:.3f} -> after {m['after']:.3f}"
        self.train_progress.value = self.train_progress.max
        self.status.value = f"New model {result.card.name} (from {result.card.parent}).{score}"
        self.model.reset_choices()

    def _on_train_error(self, err: Exception) -> None:
        from napari.utils.notifications import show_error

        self.status.value = f"Training failed: {err}"
        show_error(str(err))

    def _on_train_cancel(self, _v: Any = None) -> None:
        if self._train_worker is not None:
            self._train_worker.quit()
            self.train_info.value = "cancelling..."

    def _on_train_finished(self) -> None:
        w = self._train_worker
        if w is not None and getattr(w, "abort_requested", False):
            self.status.value = "Training cancelled; no model was written."
            self.train_progress.value = 0
        self._train_worker = None
        self.train_button.enabled = True
        self.train_cancel.enabled = False


def _provenance_beside(path: Path | None) -> dict:
    """The provenance JSON the CLI writes beside a mask (``STEM.provenance.json``), if any."""
    import json

    if path is None:
        return {}
    from napari_medseg._files import split_ext

    stem, _ = split_ext(path)
    p = path.with_name(f"{stem}.provenance.json")
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except (OSError, ValueError):
        return {}


def _safe_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "mask"
