"""A small live training plot for the docks, drawn with QPainter (no matplotlib needed).

One widget serves every dock that trains something (Denoise, Correct & Train): the training
loss per step on a log scale (left, blue, smoothed by a running mean because per-step losses
are noisy) and, when given, a validation score in [0, 1] per evaluation (right axis, orange
dots joined by a line, e.g. held-out Dice).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["TrainingPlot"]

LOSS_COLOR = QColor(90, 200, 250)
SCORE_COLOR = QColor(255, 170, 60)


def running_mean(values: list[float], n: int = 20) -> list[float]:
    """Running mean over the last ``n`` values (shorter at the start)."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return v.tolist()
    k = min(n, v.size)
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = (c[k:] - c[:-k]) / k
    return np.concatenate([v[: k - 1].cumsum() / np.arange(1, k), out]).tolist()


class TrainingPlot(QWidget):
    """Live plot of the training loss (log scale) and an optional score in [0, 1].

    Parameters
    ----------
    score_name : str
        Name of the second series shown on the right axis (e.g. ``"val Dice"``); empty for a
        loss-only plot.
    smooth : int
        Steps of the running mean applied to the loss curve (the text shows the last raw value).
    """

    def __init__(self, parent: Any = None, *, score_name: str = "", smooth: int = 20) -> None:
        super().__init__(parent)
        self.values: list[float] = []  # raw loss per step
        self.scores: list[tuple[int, float]] = []  # (step, score)
        self.score_name = score_name
        self.smooth = int(smooth)
        self.setMinimumHeight(80)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        tip = "training loss per step (log scale, running mean)"
        if score_name:
            tip += f"; {score_name} (right axis, 0 to 1)"
        self.setToolTip(tip)

    def clear(self) -> None:
        """Forget both series (a new run starts)."""
        self.values = []
        self.scores = []
        self.update()

    def add(self, value: float) -> None:
        """Append one loss value (non-finite or non-positive values are ignored: log scale)."""
        if math.isfinite(value) and value > 0:
            self.values.append(float(value))
            self.update()

    def add_score(self, value: float) -> None:
        """Append one score in [0, 1] at the current step."""
        if math.isfinite(value):
            self.scores.append((len(self.values), float(min(max(value, 0.0), 1.0))))
            self.update()

    def smoothed(self) -> list[float]:
        """The loss curve as drawn (running mean over ``smooth`` steps)."""
        return running_mean(self.values, self.smooth)

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor(30, 30, 35))
        top, bottom, left, right = 16, h - 4, 4, w - 4
        vals = self.smoothed()
        n = max(len(self.values), 1)

        def x_of(i: float) -> float:
            return left + (right - left) * i / max(n - 1, 1)

        text = []
        if len(vals) >= 2:
            lv = np.log10(np.asarray(vals))
            lo, hi = float(lv.min()), float(lv.max())
            span = hi - lo if hi > lo else 1.0
            pts = QPolygonF()
            for i, v in enumerate(lv):
                pts.append(QPointF(x_of(i), top + (bottom - top) * (1 - (v - lo) / span)))
            p.setPen(QPen(LOSS_COLOR, 1.5))
            p.drawPolyline(pts)
            text.append((LOSS_COLOR, f"loss {self.values[-1]:.4g} (step {len(self.values)})"))
        if self.scores:
            pts = QPolygonF()
            for step, s in self.scores:
                pts.append(QPointF(x_of(max(step - 1, 0)), top + (bottom - top) * (1 - s)))
            p.setPen(QPen(SCORE_COLOR, 1.5))
            if len(self.scores) >= 2:
                p.drawPolyline(pts)
            p.setBrush(SCORE_COLOR)
            for i in range(pts.size()):
                p.drawEllipse(pts.at(i), 2.5, 2.5)
            text.append((SCORE_COLOR, f"{self.score_name} {self.scores[-1][1]:.3f}"))
        if text:
            x = left
            for color, t in text:
                p.setPen(color)
                p.drawText(int(x), 12, t)
                x += p.fontMetrics().horizontalAdvance(t) + 12
        else:
            p.setPen(QColor(150, 150, 150))
            label = "training loss" + (f" and {self.score_name}" if self.score_name else "")
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, label)
        p.end()
