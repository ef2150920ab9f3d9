"""Correction tools panel: keep largest, remove islands, fill holes, interpolate, grow/shrink,
relabel.

Each tool computes an :class:`~napari_medseg.core.correct.edits.Edit` on the Labels layer's data
(the maths is in :mod:`napari_medseg.core.correct.edits`) and writes only the changed voxels with
``layer.data_setitem`` inside ``layer.block_history()``: one entry in napari's labels history, so
one Ctrl+Z undoes it, exactly like a brush stroke.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, PushButton, SpinBox

from napari_medseg.core.correct import edits as C
from napari_medseg.widgets.correct.session import layer_spacing

if TYPE_CHECKING:
    from napari_medseg.widgets.correct.dock import CorrectWidget

FILL_MODES = ["3D", "2D slices"]

#: A tool: ``fn(data, class id, layer) -> Edit`` on the layer's data (layer axis order).
ToolFn = Callable[[np.ndarray, int, Any], C.Edit]


class ToolsPanel(Container):
    """Buttons that edit the dock's Labels layer, each as one undo step.

    Parameters
    ----------
    dock : CorrectWidget
        Gives the layer and class to edit (:meth:`CorrectWidget.target`), the slice axis, the
        layer's editing state and the status line.
    """

    def __init__(self, dock: CorrectWidget) -> None:
        super().__init__(labels=True)
        self.margins = (0, 0, 0, 0)
        self._dock = dock
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
        self.extend(
            [
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
            ]
        )
        self.largest_button.changed.connect(self.keep_largest)
        self.islands_button.changed.connect(self.remove_islands)
        self.fill_button.changed.connect(self.fill_holes)
        self.interp_button.changed.connect(self.interpolate)
        self.grow_button.changed.connect(lambda _=None: self.grow_shrink(+1))
        self.shrink_button.changed.connect(lambda _=None: self.grow_shrink(-1))
        self.relabel_button.changed.connect(self.relabel)

    def apply_edit(self, layer: Any, name: str, edit: C.Edit) -> int:
        """Write an edit into ``layer`` as one undo step; returns voxels changed."""
        if edit.n_changed == 0:
            self._dock.status.value = f"{name}: nothing to change."
            return 0
        with layer.block_history():
            layer.data_setitem(edit.indices, edit.values)
        self._dock.edits(layer).tools.append(name)
        self._dock.status.value = f"{name}: {edit.n_changed} voxels changed (Ctrl+Z undoes)."
        return edit.n_changed

    def run_tool(self, name: str, fn: ToolFn) -> int:
        """Compute ``fn`` on the dock's layer and class, apply it as one undo step."""
        from napari.utils.notifications import show_error

        target = self._dock.target()
        if target is None:
            return 0
        layer, label = target
        try:
            t0 = time.perf_counter()
            edit = fn(np.asarray(layer.data), label, layer)
            dt = time.perf_counter() - t0
        except (ValueError, MemoryError) as e:
            show_error(f"{name} failed: {e}")
            self._dock.status.value = f"{name} failed: {e}"
            return 0
        n = self.apply_edit(layer, name, edit)
        if n:
            self._dock.status.value += f" {dt * 1000:.0f} ms."
        return n

    def keep_largest(self, _v: Any = None) -> int:
        return self.run_tool(
            "Keep largest component", lambda a, c, lyr: C.keep_largest_component(a, c)
        )

    def remove_islands(self, _v: Any = None) -> int:
        return self.run_tool(
            "Remove islands",
            lambda a, c, lyr: C.remove_islands(
                a, c, min_mm3=float(self.min_size.value), spacing=layer_spacing(lyr)
            ),
        )

    def fill_holes(self, _v: Any = None) -> int:
        mode = "2d" if self.fill_mode.value == FILL_MODES[1] else "3d"
        return self.run_tool(
            "Fill holes",
            lambda a, c, lyr: C.fill_holes(a, c, mode=mode, axis=self._dock.slice_axis(lyr)),
        )

    def interpolate(self, _v: Any = None) -> int:
        return self.run_tool(
            "Interpolate between slices",
            lambda a, c, lyr: C.interpolate_slices(
                a, c, axis=self._dock.slice_axis(lyr), spacing=layer_spacing(lyr)
            ),
        )

    def grow_shrink(self, sign: int = 1) -> int:
        m = float(self.margin.value) * (1 if sign > 0 else -1)
        return self.run_tool(
            "Grow" if sign > 0 else "Shrink",
            lambda a, c, lyr: C.grow_shrink(a, c, m, layer_spacing(lyr)),
        )

    def relabel(self, _v: Any = None) -> int:
        to = int(self.to_label.value)
        return self.run_tool("Relabel", lambda a, c, lyr: C.relabel(a, {c: to}))
