"""Train-on-corrections panel: fine-tune a segmentation model on the worklist's corrected cases.

The training is :func:`napari_medseg.training.from_corrections.finetune_from_corrections`, a
generator run by the docks' :class:`~napari_medseg.widgets._task.JobRunner` (thread worker,
progress bar, Cancel between two steps, one-sentence errors) with a live loss/Dice plot; the new
model is written beside its parent as the next version.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
)

from napari_medseg.widgets._plot import TrainingPlot
from napari_medseg.widgets._task import JobRunner
from napari_medseg.widgets.correct.session import model_provenance

if TYPE_CHECKING:
    from napari_medseg.widgets.correct.dock import CorrectWidget


class TrainPanel(Container):
    """``Model to fine-tune``, training minutes, hold-out, Train / Cancel, progress and plot.

    Parameters
    ----------
    dock : CorrectWidget
        Gives the open worklist (its corrected cases are the training data), the layer whose
        model is fine-tuned by default and the status line.
    """

    def __init__(self, dock: CorrectWidget) -> None:
        super().__init__(labels=True)
        self.margins = (0, 0, 0, 0)
        self._dock = dock
        self.model = ComboBox(label="Model to fine-tune", choices=self.model_choices)
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
        self.extend(
            [
                self.model,
                self.train_minutes,
                self.hold_out,
                self.train_button,
                self.train_cancel,
                self.train_progress,
                self.train_info,
            ]
        )
        self.native.layout().addWidget(self.train_plot)  # under the progress bar
        self.job = JobRunner(
            [self.train_button],
            self.train_cancel,
            self.train_progress,
            self.train_info,
            on_error=self._on_error,
            error_prefix="Training failed",
            cancelled="Training cancelled; no model was written.",
        )
        self.train_button.changed.connect(self.train_on_corrections)

    def model_choices(self, _w: Any = None) -> list[tuple[str, str]]:
        """Installed segmentation model folders (detectors and click models are not tuned)."""
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

    def current_model(self, layer: Any) -> str | None:
        """The model that made ``layer``, when it is a fine-tunable folder."""
        src = ((model_provenance(layer) or {}).get("model") or {}).get("source")
        if src and (Path(src) / "model.json").is_file():
            return str(src)
        return None

    def follow_layer(self, layer: Any) -> None:
        """Choose the model that made ``layer`` (fine-tune it by default)."""
        current = self.current_model(layer)
        if current is not None:
            self.model.reset_choices()
            if current in [c[1] for c in self.model_choices()]:
                self.model.value = current

    def train_on_corrections(self, _v: Any = None) -> None:
        """Fine-tune the chosen model on the worklist's corrected cases in the background."""
        from napari.utils.notifications import show_error

        from napari_medseg.training.from_corrections import finetune_from_corrections

        worklist = self._dock.cases.worklist
        if worklist is None:
            show_error("Open a worklist with corrected cases first.")
            return
        self.model.reset_choices()
        if self._dock.bound is not None:
            self.follow_layer(self._dock.bound)
        init = self.model.value
        if not init:
            show_error("Choose the model to fine-tune (a model folder).")
            return
        self.train_plot.clear()
        job = functools.partial(
            finetune_from_corrections,
            time_budget=float(self.train_minutes.value) * 60.0,
            hold_out=bool(self.hold_out.value),
            device="auto",
        )
        self.job.start(
            job,
            worklist,
            init,
            on_result=self._on_trained,
            on_progress=self._on_progress,
            on_finished=self._on_finished,
        )

    def _on_progress(self, p: Any) -> None:
        """After the runner moved the bar: the plot, and the held-out Dice beside the message."""
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
        self._dock.status.value = (
            f"New model {result.card.name} (from {result.card.parent}).{score}"
        )
        self.model.reset_choices()

    def _on_error(self, err: BaseException) -> bool:
        self._dock.status.value = f"Training failed: {err}"
        return False  # the runner also says it in the training line and a notification

    def _on_finished(self, cancelled: bool) -> None:
        if cancelled:
            self._dock.status.value = self.job.cancelled
