"""Run / Cancel / progress plumbing shared by the docks.

A dock makes one :class:`JobRunner` per kind of job (Run, Train, ...), each with its own
buttons, progress bar and status line, and calls :meth:`JobRunner.start` with a compute
generator (docs/ARCHITECTURE.md, the generator protocol). The generator runs in a napari thread
worker: each :class:`~napari_medseg.progress.Progress` it yields moves the bar and the status
line, Cancel (``worker.quit()``) stops it between two yields, and an error ends in one sentence
(:func:`report_error`) in the dock and a napari notification, never a traceback or a frozen
viewer. Two runners in one dock run two jobs side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from napari_medseg.progress import Progress

__all__ = ["ImageInput", "JobRunner", "report_error"]


def report_error(status: Any, err: BaseException | str, prefix: str = "Failed") -> None:
    """Tell the user what went wrong in one sentence: ``"<prefix>: <err>"`` in the dock's
    ``status`` Label and the error in a napari notification."""
    from napari.utils.notifications import show_error

    text = str(err) or type(err).__name__
    status.value = f"{prefix}: {text}"
    show_error(text)


def _drive(gen: Any) -> Any:
    """Worker body: run a generator made in the GUI thread and return its result."""
    result = yield from gen
    return result


class JobRunner:
    """Runs one compute generator at a time in a napari thread worker for one set of controls.

    Parameters
    ----------
    buttons : sequence of widgets
        Disabled while a job runs (Run, Run on current view, ...).
    cancel_button : widget
        Enabled while a job runs; pressing it calls :meth:`cancel`.
    progress : magicgui ProgressBar
        ``done / total`` of the last Progress (``max`` set to ``total``), or percent with
        ``percent=True``; left as it is for a Progress with ``total == 0`` (busy).
    status : magicgui Label
        Shows each Progress message, the error sentence and the cancel messages.
    percent : bool
        Keep the bar at 0-100 and show ``100 * done / total``.
    on_error : callable, optional
        Called first with a job's exception; returning True means the dock handled it (e.g.
        asked to trust a bundle and started again), else :func:`report_error` tells the user.
    error_prefix, starting, cancelling, cancelled : str
        The status texts of a failure (``"<error_prefix>: <error>"``), of a start, while
        cancelling, and after a cancelled job ended.
    keeps_partial : bool
        A cancelled job keeps what it did (a slide's finished tiles): the bar stays where it
        stopped instead of going back to 0.

    Attributes
    ----------
    worker : GeneratorWorker or None
        The running worker (None when idle).
    """

    def __init__(
        self,
        buttons: Sequence[Any],
        cancel_button: Any,
        progress: Any,
        status: Any,
        *,
        percent: bool = False,
        on_error: Callable[[BaseException], bool] | None = None,
        error_prefix: str = "Failed",
        starting: str = "starting...",
        cancelling: str = "cancelling...",
        cancelled: str = "Cancelled; nothing was changed.",
        keeps_partial: bool = False,
    ) -> None:
        self.buttons = list(buttons)
        self.cancel_button = cancel_button
        self.progress = progress
        self.status = status
        self.percent = percent
        self.on_error = on_error
        self.error_prefix = error_prefix
        self.starting = starting
        self.cancelling = cancelling
        self.cancelled = cancelled
        self.keeps_partial = keeps_partial
        self.worker: Any = None
        cancel_button.enabled = False
        cancel_button.changed.connect(self.cancel)

    @property
    def running(self) -> bool:
        """True while a job runs."""
        return self.worker is not None

    def start(
        self,
        job: Callable[..., Any],
        *args: Any,
        on_result: Callable[[Any], Any],
        on_progress: Callable[[Progress], Any] | None = None,
        on_finished: Callable[[bool], Any] | None = None,
    ) -> Any:
        """Run ``job(*args)``, a progress generator, in a worker.

        Parameters
        ----------
        job : callable
            Returns a generator yielding :class:`~napari_medseg.progress.Progress` and
            returning the result.
        *args
            Passed to ``job``.
        on_result : callable
            Gets the result (in the GUI thread).
        on_progress : callable, optional
            Gets each Progress after the bar and status moved (live figures, growing layers).
        on_finished : callable, optional
            Called last when the job ended for any reason, with True when it was cancelled.

        Returns
        -------
        GeneratorWorker or None
            The started worker; None (nothing started) while another job runs.
        """
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return None
        gen = job(*args)  # made here, so that it can be closed here (see below)
        worker = create_worker(
            _drive,
            gen,
            _start_thread=False,
            _ignore_errors=True,  # told to the user by report_error, not re-raised
        )
        worker.yielded.connect(lambda p: self._on_progress(p, on_progress))
        worker.returned.connect(on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(lambda: self._on_finished(worker, on_finished))
        # napari's worker stops a cancelled generator without closing it: close it once the
        # worker is done, so the job's clean-up (``finally``: temporary files, partial
        # downloads) runs now rather than whenever the generator is garbage-collected
        worker.finished.connect(gen.close)
        self.worker = worker
        for b in self.buttons:
            b.enabled = False
        self.cancel_button.enabled = True
        self.progress.value = 0
        self.status.value = self.starting
        worker.start()
        return worker

    def cancel(self, _v: Any = None) -> None:
        """Ask the running job to stop at its next yield."""
        if self.worker is not None:
            self.worker.quit()
            self.status.value = self.cancelling

    def detach(self) -> None:
        """Forget the running worker: its later signals are ignored and a new job can start
        (a dock restarting a refused run, e.g. after the user trusted a bundle)."""
        self.worker = None

    def _on_progress(self, p: Progress, then: Callable[[Progress], Any] | None) -> None:
        if p.total:
            if self.percent:
                self.progress.value = int(100 * min(p.done, p.total) / p.total)
            else:
                self.progress.max = p.total
                self.progress.value = min(p.done, p.total)
        self.status.value = p.message
        if then is not None:
            then(p)

    def _on_error(self, err: BaseException) -> None:
        if self.on_error is not None and self.on_error(err):
            return
        report_error(self.status, err, self.error_prefix)

    def _on_finished(self, worker: Any, then: Callable[[bool], Any] | None) -> None:
        if worker is not self.worker:
            return  # a superseded run (detached)
        cancelled = bool(getattr(worker, "abort_requested", False))
        if cancelled:
            self.status.value = self.cancelled
            if not self.keeps_partial:
                self.progress.value = 0
        self.worker = None
        for b in self.buttons:
            b.enabled = True
        self.cancel_button.enabled = False
        if then is not None:
            then(cancelled)


class ImageInput:
    """Mixin for docks with an ``image`` ComboBox of the viewer's Image layers.

    The dock sets ``self._viewer`` and ``self.image = ComboBox(choices=self._image_choices)``,
    then calls :meth:`_follow_layers`: the choices follow the layer list and an empty choice
    takes the active image (or the newest). :meth:`_chosen_record` is the Run button's first
    step: the chosen layer and its :class:`~napari_medseg.io.record.ImageRecord`, or a
    one-sentence error shown to the user and ``None``.
    """

    _viewer: Any
    status: Any

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
            report_error(self.status, e)
            return None
