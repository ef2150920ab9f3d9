"""Regenerate the README's screenshots in a real napari window (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py [--out docs]

* ``docs/screenshot.png``: ``napari-medseg view`` with the sample CT, the built-in
  ``ct_spleen_3d`` model chosen and Run pressed, shown in the saved display convention
  (radiological unless changed) with orientation letters and the mm scale bar. The sample CT is
  one of that model's two TRAINING cases (no held-out scan can ship with the package): the
  picture shows the tool, not the model's accuracy.
* ``docs/screenshot_detect.png``: the Detect dock on the sample H&E tile with the classical
  haematoxylin detector (colour deconvolution + Otsu + watershed, no training: the tile is no
  training image for it), score threshold 0.5.
* ``docs/screenshot_denoise.png``: the Denoise dock on the sample nuclei image made low-light
  (a peak of 10 photons, Poisson sampled, seed 0), the default ``auto`` method with a 60 s
  budget, noisy and denoised side by side (grid view) and the estimated noise model.

The display convention is read from a throw-away settings folder, so the pictures do not
depend on the choices of whoever runs the script.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

SIZE = (1560, 940)


def segment_screenshot(path: Path) -> None:
    """The main window: sample CT, Segment dock, Run with ct_spleen_3d."""
    from napari_medseg.widgets.launch import launch

    launch(
        sample="ct", model="ct_spleen_3d", run=True, device="cpu", screenshot=str(path), size=SIZE
    )


def detect_screenshot(path: Path) -> None:
    """The Detect dock on the sample H&E tile with the classical haematoxylin detector."""
    import napari

    viewer = napari.Viewer(title="napari-medseg")
    viewer.window.resize(*SIZE)
    (image,) = viewer.open_sample("napari-medseg", "pathology")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Detect")
    widget.image.value = image
    widget.model.value = "classical-he"
    widget.threshold.value = 0.5
    widget.run_button.native.click()
    app = napari.qt.get_qapp()
    t0 = time.perf_counter()
    while not widget.run_button.enabled and time.perf_counter() - t0 < 300:
        app.processEvents()
    for _ in range(30):  # the debounced filter and the first draw
        app.processEvents()
        time.sleep(0.01)
    viewer.layers.selection.active = viewer.layers[f"{image.name}_detections"]
    viewer.reset_view()  # the whole tile in the canvas the dock leaves
    app.processEvents()
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()


def denoise_screenshot(path: Path) -> None:
    """The Denoise dock: the sample nuclei at 10 photons, auto, before/after in a grid."""
    import napari
    import numpy as np

    viewer = napari.Viewer(title="napari-medseg")
    viewer.window.resize(*SIZE)
    (nuclei,) = viewer.open_sample("napari-medseg", "nuclei")
    clean = np.asarray(nuclei.data, dtype=np.float64)
    rs = np.random.default_rng(0)
    noisy = (rs.poisson(clean / clean.max() * 10) / 10 * clean.max()).astype(np.float32)
    viewer.layers.remove(nuclei)
    image = viewer.add_image(
        noisy,
        name="nuclei_low_light",
        colormap="gray",
        contrast_limits=(0.0, float(np.percentile(noisy, 99.7))),
    )
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Denoise")
    widget.image.value = image
    widget.budget.value = 60.0
    widget.run_button.native.click()
    app = napari.qt.get_qapp()
    t0 = time.perf_counter()
    while widget.job.worker is not None and time.perf_counter() - t0 < 600:
        app.processEvents()
        time.sleep(0.05)
    viewer.grid.enabled = True
    viewer.reset_view()
    viewer.layers.selection.active = viewer.layers[f"{image.name}_denoised"]
    for _ in range(30):
        app.processEvents()
        time.sleep(0.01)
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cfg:
        os.environ["MEDSEG_CONFIG_DIR"] = cfg  # default display convention: radiological
        segment_screenshot(out / "screenshot.png")
        detect_screenshot(out / "screenshot_detect.png")
        denoise_screenshot(out / "screenshot_denoise.png")
    for name in ("screenshot.png", "screenshot_detect.png", "screenshot_denoise.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
