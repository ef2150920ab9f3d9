"""Detect dock with thousands of objects: cost of one score-threshold step in a real viewer.

Run under Xvfb: ``xvfb-run -a python benchmarks/bench_detect_layers.py [--n 3025]``.

A grid of N square objects with random scores is given to the Detect dock as a model result
(no network: this measures the layers, not the model). Then the score threshold is stepped by
0.01 up and down, as a user dragging the slider, and each step is timed two ways in the same
process:

* ``rebuild``: the Points and Shapes layers rebuilt from the model's table (what the dock
  does after a new result);
* ``shown``: the dock's filter update, which sets the Points layer's ``shown`` mask (hidden
  objects stay in the layer) and adds/removes only the box outlines that crossed the
  threshold (and is debounced, so a fast drag costs one update at the end). Before the
  ``shown`` mask, this step added and removed the points themselves.

Prints median and max milliseconds per step and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3025, help="number of objects (a square grid)")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    import napari

    from napari_medseg.core.detect.instances import measure_instances
    from napari_medseg.core.detect.result import DetectionResult
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.progress import run_sync
    from napari_medseg.widgets.detect import DetectWidget

    side = int(np.ceil(np.sqrt(a.n)))
    inst = np.zeros((side * 6, side * 6), np.int32)
    k = 0
    for y in range(side):
        for x in range(side):
            if k < a.n:
                k += 1
                inst[y * 6 : y * 6 + 4, x * 6 : x * 6 + 4] = k
    rng = np.random.default_rng(0)
    score = rng.uniform(0, 1, k + 1)[inst]
    aff = np.eye(3)
    table = run_sync(measure_instances(inst, aff, "pixel", score_map=score))
    result = DetectionResult(table=table, instances=inst, affine=aff, space="pixel")

    viewer = napari.Viewer(show=True)
    image = viewer.add_image(inst.astype(np.float32), name="grid")
    w = DetectWidget(viewer)
    viewer.window.add_dock_widget(w, name="Detect")
    w.threshold.value = 0.5
    record = ImageRecord(data=inst, affine=aff, space="pixel", name="grid")
    t0 = time.perf_counter()
    w._on_result(image, record, result)
    first = time.perf_counter() - t0
    app = napari.qt.get_qapp()
    cuts = [0.5 + 0.01 * (i % 10) * (1 if (i // 10) % 2 == 0 else -1) for i in range(a.steps)]

    def timed(rebuild: bool) -> list[float]:
        out = []
        for c in cuts:
            with w.threshold.changed.blocked():
                w.threshold.value = round(c, 2)
            t = time.perf_counter()
            w._refresh(rebuild=rebuild)
            app.processEvents()
            out.append((time.perf_counter() - t) * 1000)
        return out

    inc = timed(False)
    reb = timed(True)
    shown = int(viewer.layers["grid_detections"].shown.sum())
    print(f"objects: {k}; shown at the last threshold: {shown}")
    print(f"first build after a result: {first * 1000:.0f} ms")
    print(f"rebuild per step:     median {np.median(reb):.0f} ms, max {max(reb):.0f} ms")
    print(f"shown mask per step:  median {np.median(inc):.0f} ms, max {max(inc):.0f} ms")
    print(f"ratio (rebuild / shown mask, median): {np.median(reb) / np.median(inc):.1f}x")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
