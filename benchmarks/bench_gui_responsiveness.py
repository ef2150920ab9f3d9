"""Responsiveness: a 10 ms QTimer heartbeat in napari's GUI thread while Segment runs.

Opens napari (run under Xvfb: ``xvfb-run -a python benchmarks/bench_gui_responsiveness.py``)
with the sample CT, or a larger real CT with ``--big`` (the MSD spleen crop resampled to
0.5 mm, 261x264x260), docks the Segment widget, presses Run as a user would, and records
the gaps between heartbeat ticks until the result is on screen. Reports max and p99 gap in
milliseconds for the whole run, and separately for the part in the worker (before the result
is turned into a layer in the GUI thread). The reference is the same heartbeat with the
viewer idle for the same time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ct_spleen_3d")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--warm", action="store_true", help="measure a second run (imports done)")
    a = ap.parse_args()
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_medseg.widgets.segment import SegmentWidget

    viewer = napari.Viewer(show=True)
    if a.big:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_segment_e2e import make_input

        path = make_input(Path(tempfile.mkdtemp()))
        viewer.open(str(path), plugin="napari-medseg")
    else:
        viewer.open_sample("napari-medseg", "ct")
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.value = a.model

    def measure(duration: float | None, run: bool) -> tuple[np.ndarray, float, float]:
        ticks.clear()
        timer.start()
        t0 = time.perf_counter()
        t_result = None
        if run:
            widget.returned_at = None
            widget.run_button.native.click()
            w = widget._worker
            w.returned.connect(lambda *_: setattr(widget, "returned_at", time.perf_counter()))
            while widget._worker is not None:
                QApplication.processEvents()
                time.sleep(0.001)
            t_result = widget.returned_at
        else:
            while time.perf_counter() - t0 < duration:
                QApplication.processEvents()
                time.sleep(0.001)
        timer.stop()
        gaps = np.diff(np.array(ticks)) * 1000
        return gaps, time.perf_counter() - t0, (t_result or time.perf_counter())

    t_dock = time.perf_counter()
    while widget.warming_up():  # torch/MONAI import in the background after docking
        QApplication.processEvents()
        time.sleep(0.005)
    timer.stop()
    warm_gaps = np.diff(np.array(ticks)) * 1000
    print(f"background warm-up after docking: {time.perf_counter() - t_dock:.1f} s")
    for _ in range(20):
        QApplication.processEvents()
    if a.warm:
        measure(None, True)  # first run imports torch/MONAI and loads the model
    gaps_run, secs, t_result = measure(None, True)
    worker_gaps = np.diff(np.array([t for t in ticks if t <= t_result])) * 1000
    gaps_idle, _, _ = measure(secs, False)
    shape = viewer.layers[0].data.shape
    seg = [lyr for lyr in viewer.layers if type(lyr).__name__ == "Labels"]
    print(f"image {shape}, model {a.model}, status: {widget.status.value}")
    print(
        f"Run -> editable mask: {secs:.2f} s (press Run until the Labels layer "
        f"{seg[-1].name if seg else '?'} is in the viewer, "
        f"editable: {bool(seg and seg[-1].editable)})"
    )
    print("| heartbeat (10 ms) | ticks | max gap (ms) | p99 gap (ms) |")
    print("|---|---|---|---|")
    for label, g in [
        ("idle viewer (reference)", gaps_idle),
        ("dock just opened: torch/MONAI import in the background", warm_gaps),
        ("while the model runs (worker)", worker_gaps),
        ("whole run incl. adding the layer", gaps_run),
    ]:
        print(f"| {label} | {len(g)} | {g.max():.0f} | {np.percentile(g, 99):.0f} |")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
