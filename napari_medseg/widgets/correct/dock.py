"""The "Correct & Train" dock: composes the panels and keeps each Labels layer's editing state.

Thin (docs/ARCHITECTURE.md rule 3): the maths is in :mod:`napari_medseg.core.correct` and the
panels are one module each: :mod:`.tools` (edits), :mod:`.clicks`, :mod:`.versions` (save),
:mod:`.cases` (worklist), :mod:`.training` (train on corrections), plus :mod:`.recovery`
(autosave of every edited layer, restore after a crash).

The dock itself holds what the panels share: the Labels layer chosen for correction (``bound``),
its source image, one :class:`~napari_medseg.widgets.correct.session.LayerEdits` per Labels
layer of the viewer (every one is watched for edits, not only the chosen one, so every edited
layer is autosaved) and the class volume table of the chosen layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, SpinBox, Table

from napari_medseg.core.correct import edits as C
from napari_medseg.io.geometry import META_KEY
from napari_medseg.widgets._layers import find_source_layer, layer_state
from napari_medseg.widgets._task import ImageInput
from napari_medseg.widgets.correct.cases import WorklistPanel
from napari_medseg.widgets.correct.clicks import ClicksPanel
from napari_medseg.widgets.correct.recovery import AUTOSAVE_MS, RecoveryKeeper
from napari_medseg.widgets.correct.session import (
    LayerEdits,
    class_names,
    edit_signature,
    layer_spacing,
    model_provenance,
)
from napari_medseg.widgets.correct.tools import ToolsPanel
from napari_medseg.widgets.correct.training import TrainPanel
from napari_medseg.widgets.correct.versions import SavePanel

if TYPE_CHECKING:
    import napari

TABLE_COLUMNS = ["class", "name", "voxels", "mL"]


def in_memory(layer: Any) -> bool:
    """True for a single-resolution Labels layer whose data is a numpy array (editable here)."""
    return isinstance(layer.data, np.ndarray) and not getattr(layer, "multiscale", False)


class CorrectWidget(ImageInput, Container):
    """Dock widget: correct a Labels layer, see class volumes, save versions, recover edits.

    Attributes
    ----------
    tools, clicks, saving, cases, training : Container
        The panels (:class:`ToolsPanel`, :class:`ClicksPanel`, :class:`SavePanel`,
        :class:`WorklistPanel`, :class:`TrainPanel`), top to bottom.
    recovery : RecoveryKeeper
        Autosave timer and restore offer.
    bound : napari.layers.Labels or None
        The Labels layer being corrected (chosen in ``labels``).
    """

    def __init__(self, viewer: napari.viewer.Viewer, autosave_ms: int = AUTOSAVE_MS) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self.bound: Any = None
        self._edits: dict[int, tuple[Any, LayerEdits]] = {}  # id(layer) -> (layer, state)
        self._watched: dict[int, list[tuple[Any, Any]]] = {}  # id(layer) -> (emitter, slot)
        self._pending: dict[int, Any] = {}  # layers whose undo/redo is to be checked
        self.labels = ComboBox(label="Labels", choices=self._labels_choices, nullable=True)
        self.image = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        self.label_id = SpinBox(label="Class", value=1, min=1, max=65535)
        self.tools = ToolsPanel(self)
        self.clicks = ClicksPanel(self)
        self.table = Table(value={"data": [], "index": [], "columns": TABLE_COLUMNS})
        self.saving = SavePanel(self)
        self.cases = WorklistPanel(self)
        self.training = TrainPanel(self)
        self.status = Label(label="", value="Choose a Labels layer to correct.")
        self.extend(
            [
                self.labels,
                self.image,
                self.label_id,
                self.tools,
                self.clicks,
                self.table,
                self.saving,
                self.cases,
                self.training,
                self.status,
            ]
        )
        self.recovery = RecoveryKeeper(self, autosave_ms)
        self.labels.changed.connect(self._bind_layer)
        self.label_id.changed.connect(self._on_label_id)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)

        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QHeaderView

        self._recount_timer = QTimer()
        self._recount_timer.setSingleShot(True)
        self._recount_timer.setInterval(250)
        self._recount_timer.timeout.connect(self._check_pending)
        for table in (self.table, self.cases.cases_table):
            table.native.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        for layer in self._labels_choices():
            self._watch(layer)
        self._on_layers_changed()
        for layer in list(viewer.layers):
            self.recovery.offer(layer)

    # ------------------------------------------------------------------ what panels use

    @property
    def viewer(self) -> napari.viewer.Viewer:
        return self._viewer

    def edits(self, layer: Any) -> LayerEdits:
        """The editing state of a Labels layer (created on first use)."""
        key = id(layer)
        entry = self._edits.get(key)
        if entry is None or entry[0] is not layer:
            entry = (layer, LayerEdits())
            self._edits[key] = entry
        return entry[1]

    def watched_layers(self) -> list[Any]:
        """Every Labels layer whose edits are tracked (all of the viewer's)."""
        return [layer for layer, _ in self._edits.values() if id(layer) in self._watched]

    def target(self) -> tuple[Any, int] | None:
        """``(layer, class id)`` to edit, or None after telling the user why not."""
        from napari.utils.notifications import show_error

        layer = self.bound
        if layer is None:
            show_error("Choose a Labels layer to correct.")
            return None
        if isinstance(layer.data, list) or getattr(layer, "multiscale", False):
            show_error("Correction tools work on single-resolution Labels layers.")
            return None
        return layer, int(self.label_id.value)

    def slice_axis(self, layer: Any) -> int:
        """The layer axis the user scrolls through (the slider), 0 in a 3D view."""
        dims = self._viewer.dims
        if dims.ndisplay != 2 or layer.ndim < 3:
            return 0
        world_axis = dims.order[-3] if len(dims.order) >= 3 else 0
        return int(max(0, world_axis - (dims.ndim - layer.ndim)))

    def source_image(self, layer: Any) -> Any:
        """The Image layer ``layer`` was drawn on (``<image>_seg`` by name, else same grid)."""
        for img in self._image_choices():
            same_grid = img.data.shape[-layer.ndim :] == layer.data.shape
            if img.name + "_seg" == layer.name and same_grid:
                return img
        return find_source_layer(self._viewer, layer.data, layer_state(layer))

    def source_path(self, layer: Any) -> str | None:
        """The file of the image ``layer`` was drawn on (or the layer's own), if known."""
        img = self.image.value if layer is self.bound else self.source_image(layer)
        for lyr in (img, layer):
            if lyr is None:
                continue
            p = ((lyr.metadata or {}).get(META_KEY) or {}).get("path")
            if p:
                return str(p)
        return None

    def class_names(self) -> dict[int, str]:
        """``{class id: name}`` of the bound layer."""
        return class_names(self.bound)

    def volumes(self) -> dict[int, dict[str, Any]]:
        """``{class: {"voxels", "mm3"}}`` of the bound layer (what the table shows)."""
        layer = self.bound
        if layer is None or not in_memory(layer):
            return {}
        st = self.edits(layer)
        return C.class_volumes(layer.data, layer_spacing(layer), counts=st.counts)

    def autosave(self) -> list:
        """Autosave every edited layer now (see :meth:`RecoveryKeeper.autosave`)."""
        return self.recovery.autosave()

    # ------------------------------------------------------------------ layers

    def _labels_choices(self, _w: Any = None) -> list:
        from napari.layers import Labels

        return [lyr for lyr in self._viewer.layers if isinstance(lyr, Labels)]

    def _on_layers_changed(self, event: Any = None) -> None:
        self.labels.reset_choices()
        self.image.reset_choices()
        choices = self._labels_choices()
        kind = getattr(event, "type", "") if event is not None else ""
        if kind == "inserted":
            layer = event.value
            if layer in choices:
                self._watch(layer)
                self.labels.value = layer
            else:
                self.recovery.offer(layer)
        if kind == "removed":
            self._forget(event.value)
        if self.labels.value is None and choices:
            self.labels.value = choices[-1]
        if self.bound is not None and self.bound not in choices:
            self.bound = None
        if self.labels.value is not None and self.bound is not self.labels.value:
            self._bind_layer()

    def _watch(self, layer: Any) -> None:
        """Track ``layer``'s edits (brush, tools, undo/redo, whole-array replacement).

        Lazy or multiscale layers (a whole slide's result) are not tracked: copying, counting
        or autosaving them would read the whole slide into memory.
        """
        if id(layer) in self._watched or not in_memory(layer):
            return
        st = self.edits(layer)
        if st.prediction is None and model_provenance(layer):
            self._take_prediction(layer, st)
        slots = [
            (layer.events.paint, lambda e, lyr=layer: self._on_paint(lyr, e)),
            (layer.events.data, lambda e, lyr=layer: self._on_data(lyr)),
            (layer.events.set_data, lambda e, lyr=layer: self._on_set_data(lyr)),
            (layer.events.selected_label, lambda e, lyr=layer: self._on_selected_label(lyr)),
        ]
        for emitter, slot in slots:
            emitter.connect(slot)
        self._watched[id(layer)] = slots

    def _forget(self, layer: Any) -> None:
        """A layer left the viewer: autosave its unsaved edits, then stop tracking it."""
        if id(layer) in self._watched:
            self.recovery.autosave_layer(layer)  # removed by mistake: still recoverable
        for emitter, slot in self._watched.pop(id(layer), []):
            try:
                emitter.disconnect(slot)
            except (TypeError, RuntimeError, ValueError):
                pass
        self._edits.pop(id(layer), None)
        self._pending.pop(id(layer), None)

    def _bind_layer(self, _v: Any = None) -> None:
        layer = self.labels.value
        if layer is self.bound:
            return
        self.bound = layer
        if layer is None:
            return
        self._watch(layer)
        src = self.source_image(layer)
        if src is not None:
            self.image.value = src
        self.label_id.value = max(1, int(layer.selected_label))
        if not in_memory(layer):
            self.table.value = {"data": [], "index": [], "columns": TABLE_COLUMNS}
            self.status.value = (
                f"{layer.name} is a lazy or multiscale layer: it cannot be corrected here."
            )
            return
        self._recount(layer)
        self.training.follow_layer(layer)  # fine-tune the model that made this mask by default
        self.status.value = f"Correcting {layer.name}."

    def _on_selected_label(self, layer: Any) -> None:
        if layer is self.bound and int(layer.selected_label) >= 1:
            self.label_id.value = int(layer.selected_label)

    def _on_label_id(self, value: int) -> None:
        layer = self.bound
        if layer is not None and int(layer.selected_label) != int(value):
            layer.selected_label = int(value)

    # ------------------------------------------------------------------ edits and counts

    @staticmethod
    def _take_prediction(layer: Any, st: LayerEdits) -> None:
        st.prediction = np.array(layer.data, copy=True)
        st.provenance = model_provenance(layer)

    def _recount(self, layer: Any) -> None:
        st = self.edits(layer)
        st.counts = C.class_counts(layer.data)
        st.signature = edit_signature(layer)
        if layer is self.bound:
            self._show_counts()

    def _on_paint(self, layer: Any, event: Any) -> None:
        st = self.edits(layer)
        prov = model_provenance(layer)
        if prov and prov != st.provenance:
            # a new model run written into this layer (Segment again, one undo step): a new
            # prediction, not an edit of the user
            self._take_prediction(layer, st)
            self._recount(layer)
            return
        counts = st.counts
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
        st.counts = counts
        st.signature = edit_signature(layer)
        st.mark_edited()
        if layer is self.bound:
            self._show_counts()

    def _on_data(self, layer: Any) -> None:
        """The whole array was replaced (e.g. by a script): a new prediction if from a model."""
        st = self.edits(layer)
        if model_provenance(layer):
            self._take_prediction(layer, st)
        self._recount(layer)

    def _on_set_data(self, layer: Any) -> None:
        self._pending[id(layer)] = layer
        self._recount_timer.start()  # undo/redo change the data without a paint event

    def _check_pending(self) -> None:
        pending, self._pending = list(self._pending.values()), {}
        for layer in pending:
            if id(layer) not in self._watched:
                continue
            st = self.edits(layer)
            if st.signature != edit_signature(layer):
                self._recount(layer)
                st.mark_edited()

    def _show_counts(self) -> None:
        names = self.class_names()
        rows = []
        vol3d = self.bound is not None and self.bound.ndim == 3
        for c, v in self.volumes().items():
            size = v["mm3"] / 1000.0 if (v["mm3"] is not None and vol3d) else None
            rows.append([c, names.get(c, ""), v["voxels"], "" if size is None else f"{size:.2f}"])
        self.table.value = {"data": rows, "index": list(range(len(rows))), "columns": TABLE_COLUMNS}
