"""Worklist panel: a project folder of cases to correct, one after the other, and approve.

The folder and its ``status.json`` are :class:`napari_medseg.core.correct.worklist.Worklist`
(status updates are locked read-modify-writes, safe with several readers at once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import Container, FileEdit, PushButton, Table

from napari_medseg._files import split_ext
from napari_medseg.io.geometry import META_KEY

if TYPE_CHECKING:
    from napari_medseg.widgets.correct.dock import CorrectWidget

CASE_COLUMNS = ["case", "status", "versions"]


def provenance_beside(path: Path | None) -> dict:
    """The provenance JSON the CLI writes beside a mask, if any.

    ``NAME.provenance.json`` (the mask's whole name, since issue 13), else the older
    ``STEM.provenance.json``.
    """
    if path is None:
        return {}
    from napari_medseg._files import provenance_path

    stem, _ = split_ext(path.name)
    for p in (provenance_path(path), path.with_name(f"{stem}.provenance.json")):
        try:
            if p.exists():
                return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
    return {}


class WorklistPanel(Container):
    """``Worklist`` folder, ``Next case``, ``Approve case`` and the table of cases.

    Parameters
    ----------
    dock : CorrectWidget
        Gives the viewer, the layer choice, the layers' editing state, the save panel and the
        recovery keeper (unsaved edits of a case are autosaved before it is closed).

    Attributes
    ----------
    worklist : Worklist or None
        The open worklist.
    current : tuple or None
        ``(case name, image layer, labels layer)`` of the case opened by Next case.
    """

    def __init__(self, dock: CorrectWidget) -> None:
        super().__init__(labels=True)
        self.margins = (0, 0, 0, 0)
        self._dock = dock
        self.worklist: Any = None
        self.current: tuple[str, Any, Any] | None = None
        self.project = FileEdit(label="Worklist", mode="d", value="")
        self.next_button = PushButton(text="Next case")
        self.approve_button = PushButton(text="Approve case")
        self.cases_table = Table(value={"data": [], "index": [], "columns": CASE_COLUMNS})
        self.extend([self.project, self.next_button, self.approve_button, self.cases_table])
        self.project.changed.connect(self._on_project)
        self.next_button.changed.connect(self.next_case)
        self.approve_button.changed.connect(self.approve_case)

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
            self.worklist = Worklist(folder)
            self.show_cases()
            counts = self.worklist.summary()
        except WorklistError as e:
            show_error(str(e))
            self._dock.status.value = str(e)
            return False
        self._dock.status.value = ", ".join(f"{n} {s}" for s, n in counts.items()) + "."
        return True

    def show_cases(self) -> None:
        """Fill the table: case, status, number of saved versions."""
        if self.worklist is None:
            return
        rows = [[c.name, c.status, len(c.corrected)] for c in self.worklist.cases()]
        self.cases_table.value = {
            "data": rows,
            "index": list(range(len(rows))),
            "columns": CASE_COLUMNS,
        }

    def active_case(self, layer: Any) -> str | None:
        """The case name when ``layer`` is the labels of the case opened by Next case."""
        if self.worklist is None or self.current is None:
            return None
        name, _img, lab = self.current
        return name if lab is layer else None

    def next_case(self, _v: Any = None) -> str | None:
        """Open the next case that is still to do, with its newest mask; returns its name."""
        from napari.utils.notifications import show_error, show_info

        dock = self._dock
        if self.worklist is None:
            show_error("Choose a worklist folder first.")
            return None
        after = self.current[0] if self.current else None
        case = self.worklist.next_case(after=after)
        if case is None:
            show_info("No case left to do in this worklist.")
            dock.status.value = "All cases are done."
            return None
        if self.current is not None:
            _, img, lab = self.current
            dock.recovery.autosave_layer(lab)  # unsaved edits stay recoverable
            for lyr in (lab, img):
                if lyr in dock.viewer.layers:
                    dock.viewer.layers.remove(lyr)
            self.current = None
        try:
            img, lab = self._open_case(case)
        except Exception as e:  # noqa: BLE001 - a broken case file: one sentence
            show_error(f"Could not open case {case.name}: {e}")
            dock.status.value = f"Could not open case {case.name}: {e}"
            return None
        self.current = (case.name, img, lab)
        self.show_cases()
        dock.status.value = f"Case {case.name} ({case.status})."
        return case.name

    def _open_case(self, case: Any) -> tuple[Any, Any]:
        from napari_medseg.io import read_image
        from napari_medseg.io.geometry import record_to_layer_data

        viewer = self._dock.viewer
        (img,) = viewer.open(str(case.image), plugin="napari-medseg")[:1]
        name = f"{img.name}_seg"
        if name in viewer.layers:  # restored from an autosave just now
            lab = viewer.layers[name]
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
            prov = provenance_beside(case.prediction)
            if prov:
                meta[META_KEY]["provenance"] = prov
            lab = viewer.add_labels(
                data, name=name, affine=kwargs["affine"], metadata=meta, opacity=0.5
            )
        st = self._dock.edits(lab)
        if case.prediction is not None:
            (pred,) = read_image(case.prediction)
            perm = (lab.metadata.get(META_KEY) or {}).get("layer_axes")
            arr = np.asarray(pred.data)
            st.prediction = arr.transpose(perm) if perm and len(perm) == arr.ndim else arr
        self._dock.labels.value = lab
        return img, lab

    def approve_case(self, _v: Any = None) -> None:
        """Mark the open case approved (save its mask first when it has unsaved edits)."""
        from napari.utils.notifications import show_error

        from napari_medseg.core.correct.worklist import WorklistError

        dock = self._dock
        if self.worklist is None or self.current is None:
            show_error("Open a case with Next case first.")
            return
        name, _img, lab = self.current
        if dock.edits(lab).unsaved or not self.worklist.case(name).corrected:
            if dock.saving.save_mask() is None:
                return
        try:
            self.worklist.set_status(name, "approved")
        except (WorklistError, OSError) as e:
            show_error(f"Case {name} was not approved: {e}")
            dock.status.value = f"Case {name} was not approved: {e}"
            return
        self.show_cases()
        dock.status.value = f"Case {name} approved."
