"""The "Denoise" dock widget: pick an image and a method, press Run, get ``<image>_denoised``.

Thin (docs/ARCHITECTURE.md rule 3): it reads its inputs, runs
:func:`napari_medseg.core.denoise.denoising.denoise`
in a napari worker (progress bar, live training loss, Cancel via ``worker.quit()``, which stops
the generator between two training steps) and turns the result into an Image layer on the
source image's geometry with the source's contrast limits and colormap. The estimated noise
model (gain, read noise or variance at zero, correlation) is shown under "Noise model";
"Background" picks a Shapes rectangle or Labels region without signal that fixes the camera
offset and read noise, and "Estimate noise" shows the model without running. "Show denoised"
is the before/after toggle; "Save denoiser..." writes the network just trained as a model
folder, and "Use saved denoiser..." offers a model folder in the method list (no training).
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
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
)

from napari_medseg.core.denoise.denoising import DEFAULT_TIME_BUDGET, METHODS, N2V_METHODS
from napari_medseg.progress import Progress
from napari_medseg.widgets._plot import TrainingPlot
from napari_medseg.widgets._task import ImageInput, JobRunner, report_error

if TYPE_CHECKING:
    import napari

METHOD_LABELS = {
    "auto": "Auto: N2V2 + calibrated filters (best measured)",
    "n2v2": "N2V2 (self-supervised, trains on this image)",
    "n2v": "Noise2Void (self-supervised, trains on this image)",
    "gaussian": "Gaussian, self-calibrated (instant)",
    "tv": "Total variation, self-calibrated (instant)",
    "nlmeans": "Non-local means (instant)",
    "bilateral": "Bilateral (instant)",
    "wavelet": "Wavelet BayesShrink (instant)",
}
MODEL_PREFIX = "model:"


def _denoise_job(record: Any, options: dict) -> Any:
    """Worker generator: denoise, yielding :class:`Progress`."""
    from napari_medseg.core.denoise.denoising import denoise

    result = yield from denoise(record, **options)
    return result


def _frame_count(record: Any) -> int:
    """Frames along the one non-spatial, non-RGB axis (1 when there is none)."""
    extra = [
        s
        for i, s in enumerate(record.shape)
        if i >= record.spatial_ndim and not (record.rgb and i == len(record.shape) - 1)
    ]
    return int(np.prod(extra)) if extra else 1


class DenoiseWidget(ImageInput, Container):
    """Dock widget: image, method, training budget, Run / Cancel, loss plot, before/after."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._models: dict[str, str] = {}
        self._t0 = 0.0
        self.last_result: Any = None
        self.image = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        self.method = ComboBox(label="Method", choices=self._method_choices, value="auto")
        self.budget = FloatSpinBox(
            label="Training (s)", value=DEFAULT_TIME_BUDGET, min=1.0, max=36000.0, step=10.0
        )
        self.frames = CheckBox(text="Denoise each frame (time series)", value=False)
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.region = ComboBox(
            label="Background", choices=self._region_choices, nullable=True, value=None
        )
        self.region.tooltip = (
            "Optional: a Shapes rectangle or Labels region without signal. Its mean and spread "
            "fix the camera offset and read noise of the noise model. Empty: estimate from the "
            "whole image."
        )
        self.noise_button = PushButton(text="Estimate noise")
        self.noise_label = Label(label="Noise model", value="(not estimated yet)")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self.status = Label(label="", value="Choose an image and a method, then press Run.")
        self.show_denoised = CheckBox(text="Show denoised (before/after)", value=True)
        self.save_button = PushButton(text="Save denoiser...", enabled=False)
        self.load_button = PushButton(text="Use saved denoiser...")
        self.extend(
            [
                self.image,
                self.method,
                self.load_button,
                self.budget,
                self.frames,
                self.device,
                self.region,
                self.noise_button,
                self.noise_label,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.status,
                self.show_denoised,
                self.save_button,
            ]
        )
        self.loss_plot = TrainingPlot()
        self.native.layout().addWidget(self.loss_plot)
        self.job = JobRunner([self.run_button], self.cancel_button, self.progress, self.status)
        self.run_button.changed.connect(self._on_run)
        self.show_denoised.changed.connect(self._on_toggle)
        self.save_button.changed.connect(self._on_save_clicked)
        self.load_button.changed.connect(self._on_load_clicked)
        self.method.changed.connect(self._on_method)
        self.noise_button.changed.connect(self._on_estimate_noise)
        self._follow_layers()
        self._on_method()

    # ------------------------------------------------------------------ choices

    def _image_choices(self, _w: Any = None) -> list:
        from napari.layers import Image

        return [
            lyr
            for lyr in self._viewer.layers
            if isinstance(lyr, Image) and not lyr.name.endswith("_denoised")
        ]

    def _region_choices(self, _w: Any = None) -> list:
        from napari.layers import Labels, Shapes

        return [lyr for lyr in self._viewer.layers if isinstance(lyr, (Shapes, Labels))]

    def _on_layers_changed(self, event: Any = None) -> None:
        super()._on_layers_changed(event)
        if hasattr(self, "region"):
            self.region.reset_choices()

    def _method_choices(self, _w: Any = None) -> list[tuple[str, str]]:
        out = [(METHOD_LABELS[m], m) for m in METHODS]
        out += [
            (f"{label} (saved denoiser)", MODEL_PREFIX + p) for label, p in self._models.items()
        ]
        return out

    def _on_method(self, _v: Any = None) -> None:
        self.budget.enabled = self.method.value in (*N2V_METHODS, "auto")

    def add_model_path(self, path: str | Path) -> None:
        """Offer a saved denoiser (model folder) in the method list and select it."""
        from napari_medseg.core.denoise.store import load_denoiser

        load_denoiser(path)  # fail now, with a clear sentence, if it is not a denoiser
        label = Path(path).name
        self._models[label] = str(path)
        self.method.reset_choices()
        self.method.value = MODEL_PREFIX + str(path)

    def _on_load_clicked(self, _v: Any = None) -> None:
        from napari.utils.notifications import show_error
        from qtpy.QtWidgets import QFileDialog

        path = QFileDialog.getExistingDirectory(self.native, "Choose a denoiser model folder")
        if path:
            try:
                self.add_model_path(path)
            except Exception as e:  # noqa: BLE001 - shown to the user as one sentence
                show_error(str(e))

    # ------------------------------------------------------------------ run

    def background_mask(self, record: Any) -> Any:
        """The chosen background region on ``record``'s spatial grid, or None."""
        from napari_medseg.widgets._layers import region_mask

        if self.region.value is None:
            return None
        return region_mask(self.region.value, self.image.value, record)

    def estimate_noise(self) -> Any:
        """Estimate and show the noise model of the chosen image (first frame); returns it."""
        from napari_medseg.core.denoise.denoising import noise_model_of

        chosen = self._chosen_record("estimate its noise")
        if chosen is None:
            return None
        _layer, record = chosen
        data = np.asarray(record.data, dtype=np.float32)
        cax = len(record.shape) - 1 if record.rgb else None
        extra = [
            i for i in range(record.spatial_ndim, len(record.shape)) if i != cax
        ]  # frames: the first one
        if extra:
            data = np.take(data, 0, axis=extra[0])
            if cax is not None:
                cax -= 1
        model = noise_model_of(data, cax, None, self.background_mask(record))
        self._show_noise(model.summary(), model.source)
        return model

    def _show_noise(self, summary: str, source: str) -> None:
        # three short lines keep the dock narrow: gain and floor, correlation, where from
        lines = summary.replace(", correlation", "\ncorrelation")
        self.noise_label.value = f"{lines}\n(from {source})"

    def _on_estimate_noise(self, _v: Any = None) -> None:
        try:
            self.estimate_noise()
        except Exception as e:  # noqa: BLE001 - shown to the user as one sentence
            report_error(self.status, e)

    def _options(self, record: Any) -> dict:
        opts: dict[str, Any] = {"device": self.device.value}
        bg = self.background_mask(record)
        if bg is not None:
            opts["background"] = bg
        m = str(self.method.value)
        if m.startswith(MODEL_PREFIX):
            opts["model"] = m[len(MODEL_PREFIX) :]
        else:
            opts["method"] = m
            opts["time_budget"] = float(self.budget.value)
        if self.frames.value and _frame_count(record) > 1:
            opts["axis"] = record.spatial_ndim
        return opts

    def _on_run(self, _v: Any = None) -> None:
        chosen = self._chosen_record("denoise")
        if chosen is None:
            return
        layer, record = chosen
        n = _frame_count(record)
        if n > 1 and not self.frames.value:
            msg = (
                f"{layer.name} is a time series of {n} frames: tick 'Denoise each frame' to "
                "denoise every frame (one network is trained on all of them)."
            )
            report_error(self.status, msg)
            return
        try:
            options = self._options(record)
        except Exception as e:  # noqa: BLE001 - shown to the user as one sentence
            report_error(self.status, e)
            return
        self._t0 = time.perf_counter()
        self.loss_plot.clear()
        self.job.start(
            _denoise_job,
            record,
            options,
            on_result=lambda result: self._on_result(layer, record, result),
            on_progress=self._show_loss,
        )

    def _show_loss(self, p: Progress) -> None:
        if "loss" in p.info:
            self.loss_plot.add(float(p.info["loss"]))

    def _on_result(self, source_layer: Any, record: Any, result: Any) -> None:
        from napari_medseg.io.geometry import META_KEY, record_to_layer_data
        from napari_medseg.io.record import ImageRecord

        name = f"{source_layer.name}_denoised"
        rec = ImageRecord(
            data=result.data,
            affine=record.affine,
            space=record.space,
            modality=record.modality,
            name=name,
            path=None,
            rgb=record.rgb,
            metadata=record.metadata,
        )
        data, kwargs, _ = record_to_layer_data(rec, "image")
        kwargs["metadata"][META_KEY]["provenance"] = result.provenance
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            layer.data = data
            layer.affine = kwargs["affine"]
            layer.metadata = kwargs["metadata"]
        else:
            extra = {}
            if not record.rgb:
                extra["colormap"] = source_layer.colormap
            layer = self._viewer.add_image(
                data,
                name=name,
                affine=kwargs["affine"],
                metadata=kwargs["metadata"],
                rgb=record.rgb,
                blending=source_layer.blending,
                **extra,
            )
        if not record.rgb:
            layer.contrast_limits_range = source_layer.contrast_limits_range
            layer.contrast_limits = source_layer.contrast_limits
        layer.visible = bool(self.show_denoised.value)
        self.last_result = result
        self.save_button.enabled = result.model is not None
        secs = time.perf_counter() - self._t0
        self.progress.value = self.progress.max
        prov = result.provenance
        if "noise_model_summary" in prov:
            self._show_noise(
                prov["noise_model_summary"], prov.get("noise_model", {}).get("source", "image")
            )
        detail = ""
        if result.model is not None and not prov.get("network", {}).get("reused"):
            tr = result.model.training
            detail = f" {tr.get('steps')} training steps, final loss {tr.get('final_loss'):.4g}."
        elif "noise_sigma" in prov:
            detail = f" Estimated noise sigma {prov['noise_sigma']:.4g}."
        notes = " ".join(prov.get("notes", []))
        self.status.value = f"Done in {secs:.1f} s ({result.method}).{detail} {notes}".strip()

    # ------------------------------------------------------------------ before/after, save

    def _output_layer(self) -> Any:
        layer = self.image.value
        if layer is None:
            return None
        name = f"{layer.name}_denoised"
        return self._viewer.layers[name] if name in self._viewer.layers else None

    def _on_toggle(self, _v: Any = None) -> None:
        out = self._output_layer()
        if out is not None:
            out.visible = bool(self.show_denoised.value)

    def save_model(self, folder: str | Path) -> Path:
        """Save the denoiser trained by the last run as a model folder."""
        from napari_medseg.core.denoise.store import save_denoiser
        from napari_medseg.errors import MedsegError

        if self.last_result is None or self.last_result.model is None:
            raise MedsegError("Train a Noise2Void denoiser first (Run with N2V or N2V2).")
        path = save_denoiser(folder, self.last_result.model)
        self.status.value = f"Saved denoiser to {path}."
        return path

    def _on_save_clicked(self, _v: Any = None) -> None:
        from napari.utils.notifications import show_error
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self.native, "Save denoiser as a model folder")
        if path:
            try:
                self.save_model(path)
            except Exception as e:  # noqa: BLE001 - shown to the user as one sentence
                show_error(str(e))
