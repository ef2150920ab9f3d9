"""Run / Cancel / progress plumbing shared by the task docks (Segment, Detect, Register, Denoise).

A dock mixes in :class:`WorkerControls`, owns widgets named ``run_button``, ``cancel_button``,
``progress`` and ``status``, and calls :meth:`start_worker` with a compute generator (DESIGN.md
rule 2). The generator runs in a napari thread worker: each :class:`Progress` it yields moves
the bar, Cancel (``worker.quit()``) stops it between two yields, and errors end in one sentence
in the dock and a napari notification, never a traceback or a frozen viewer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from napari_medseg.progress import Progress


class WorkerControls:
    """Mixin for docks that run one compute generator at a time."""

    _worker: Any = None

    def start_worker(self, job: Callable[..., Any], *args: Any, on_result: Callable) -> Any:
        """Run ``job(*args)`` (a progress generator) in a worker; ``on_result`` gets its result."""
        from napari.qt.threading import create_worker

        worker = create_worker(
            job,
            *args,
            _start_thread=False,
            _ignore_errors=True,  # shown to the user by _on_error, not re-raised
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(lambda: self._on_finished(worker))
        self._worker = worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.value = 0
        self.status.value = "starting..."
        worker.start()
        return worker

    def _on_progress(self, p: Progress) -> None:
        if p.total:
            self.progress.max = p.total
            self.progress.value = min(p.done, p.total)
        self._show_info(p)
        self.status.value = p.message

    def _show_info(self, p: Progress) -> None:
        """Docks with live figures (loss, ...) override this."""

    def _on_cancel(self, _v: Any = None) -> None:
        if self._worker is not None:
            self._worker.quit()
            self.status.value = "cancelling..."

    def _on_finished(self, worker: Any = None) -> None:
        if worker is not None and worker is not self._worker:
            return  # a superseded run (e.g. restarted after trusting a bundle)
        if self._worker is not None and getattr(self._worker, "abort_requested", False):
            self.status.value = "Cancelled; nothing was changed."
            self.progress.value = 0
        self._worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    def _on_error(self, err: Exception) -> None:
        from napari.utils.notifications import show_error

        self.status.value = f"Failed: {err}"
        show_error(str(err))


class ImageInput:
    """Mixin for docks with an ``image`` ComboBox of the viewer's Image layers.

    The dock sets ``self._viewer`` and ``self.image = ComboBox(choices=self._image_choices)``,
    then calls :meth:`_follow_layers`: the choices follow the layer list and an empty choice
    takes the active image (or the newest). :meth:`_chosen_record` is the Run button's first
    step: the chosen layer and its :class:`~napari_medseg.io.record.ImageRecord`, or a
    one-sentence error shown to the user and ``None``.
    """

    _viewer: Any

    def _image_choices(self, _w: Any = None) -> list:
        from napari.layers import Image

        return [lyr for lyr in self._viewer.layers if isinstance(lyr, Image)]

    def _follow_layers(self) -> None:
        self._viewer.layers.events.inserted.connect(self._on_layers_changed)
        self._viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()

    def _on_layers_changed(self, event: Any = None) -> None:
        self.image.reset_choices()
        choices = self._image_choices()
        if self.image.value is None and choices:
            active = self._viewer.layers.selection.active
            self.image.value = active if active in choices else choices[-1]

    def _chosen_record(self, what: str) -> tuple[Any, Any] | None:
        """``(layer, record)`` of the chosen image, or None after telling the user why."""
        from napari.utils.notifications import show_error

        from napari_medseg.widgets._layers import record_from_layer

        layer = self.image.value
        if layer is None:
            show_error(f"Choose an image layer to {what}.")
            return None
        try:
            return layer, record_from_layer(layer)
        except Exception as e:  # noqa: BLE001 - shown to the user as one sentence
            self._on_error(e)
            return None
