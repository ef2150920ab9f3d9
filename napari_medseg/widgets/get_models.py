"""The Segment dock's **Get models...** dialog: pull a model from where it lives.

Thin (docs/ARCHITECTURE.md): it reads a source (a MONAI Model Zoo bundle name, a TotalSegmentator
task, a URL or a file), runs :func:`napari_medseg.models.pull.pull_model` in a napari worker with
a progress bar and a Cancel that stops the download between two chunks (nothing half-made is
left), and tells the Segment dock to offer the installed model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, Container, Label, LineEdit, ProgressBar, PushButton

from napari_medseg.widgets._task import JobRunner

#: Suggestions offered in the source box (any other bundle name, URL or path can be typed).
SUGGESTED_SOURCES = (
    "spleen_ct_segmentation",
    "wholeBody_ct_segmentation",
    "multi_organ_segmentation",
    "prostate_mri_anatomy",
    "pancreas_ct_dints_segmentation",
    "brats_mri_segmentation",
    "total_fast",
    "total",
    "total_mr_fast",
    "body",
    "lung_vessels",
)


def _drive(gen: Any) -> Any:
    """Worker job: run ``gen`` (created in the GUI thread, so the dock can close it)."""
    result = yield from gen
    return result


class GetModelsWidget(Container):
    """Source, optional name and sha256, Run / Cancel, progress; calls ``on_installed``."""

    def __init__(self, on_installed: Callable[[list], Any] | None = None) -> None:
        super().__init__(labels=True)
        self._on_installed = on_installed
        self.source = ComboBox(
            label="Source", choices=list(SUGGESTED_SOURCES), value="spleen_ct_segmentation"
        )
        self.source.native.setEditable(True)
        self.source.tooltip = (
            "A MONAI Model Zoo bundle name, a TotalSegmentator task (its nnU-Net v2 weights), "
            "an http(s) URL, or a local .zip/.tar.gz/folder of a model"
        )
        self.name = LineEdit(label="Name (optional)", value="")
        self.sha256 = LineEdit(label="sha256 (optional)", value="")
        self.overwrite = CheckBox(text="Replace an installed model of that name", value=False)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self.status = Label(
            label="", value="Choose or type a source, then press Run to download and install it."
        )
        self.extend(
            [
                self.source,
                self.name,
                self.sha256,
                self.overwrite,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.status,
            ]
        )
        self.job = JobRunner([self.run_button], self.cancel_button, self.progress, self.status)
        self.run_button.changed.connect(self._on_run)
        self.installed: list = []

    def source_text(self) -> str:
        """What the user chose or typed in the source box."""
        return str(self.source.native.currentText()).strip()

    def set_source(self, text: str) -> None:
        """Type ``text`` into the source box (also used by tests)."""
        self.source.native.setEditText(text)

    def _on_run(self, _v: Any = None) -> None:
        source = self.source_text()
        if not source:
            self.status.value = "Choose or type a source first."
            return
        from napari_medseg.models.pull import pull_model

        gen = pull_model(
            source,
            name=self.name.value.strip() or None,
            sha256=self.sha256.value.strip() or None,
            overwrite=bool(self.overwrite.value),
        )
        # the runner closes the job when it ends, so a Cancel removes the partial download now
        self.job.start(_drive, gen, on_result=self._on_result)

    def _on_result(self, models: list) -> None:
        self.installed = list(models)
        names = ", ".join(m.name for m in models)
        self.status.value = f"Installed {names}."
        self.progress.value = self.progress.max
        if self._on_installed is not None:
            self._on_installed(models)
