"""The Segment dock in a real viewer: choose the layer, press Run, get a mask on the scan."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.helpers import save_tiny_model

pytestmark = pytest.mark.gui


def _tiny_ct_model(folder, patch=(32, 32, 8), spacing=(1.6, 1.6, 5.0)):
    return save_tiny_model(folder, patch=patch, spacing=spacing)


def _widget(viewer):
    from napari_medseg.widgets.segment import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    return widget


def test_run_makes_labels_on_the_scan_geometry(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-medseg", "ct")
    widget = _widget(viewer)
    widget.add_model_path(str(_tiny_ct_model(tmp_path / "tiny_ct")))
    assert widget.image.value is image
    widget.run_button.native.click()  # as a user pressing Run
    assert widget.cancel_button.enabled
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=60_000)
    labels = viewer.layers["CT abdomen_seg"]
    assert type(labels).__name__ == "Labels"
    assert labels.data.shape == image.data.shape
    np.testing.assert_allclose(labels.affine.affine_matrix, image.affine.affine_matrix)
    prov = labels.metadata["medseg"]["provenance"]
    assert prov["model"]["name"] == "tiny_ct" and len(prov["model"]["weights_sha256"]) == 64
    assert widget.status.value.startswith("Done")
    # running again updates the same layer instead of adding another; probabilities on request
    widget.probabilities.value = True
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=60_000)
    assert [lyr.name for lyr in viewer.layers].count("CT abdomen_seg") == 1
    prob = viewer.layers["CT abdomen_prob"]
    assert prob.data.shape == (1, *image.data.shape)  # one foreground class
    assert 0.0 <= float(prob.data.min()) and float(prob.data.max()) <= 1.0
    assert len(viewer.layers) == 3


def test_precision_setting_reaches_the_provenance(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "ct")
    widget = _widget(viewer)
    widget.add_model_path(str(_tiny_ct_model(tmp_path / "tiny_ct")))
    assert widget.precision.value == "auto"
    widget.precision.value = "fp32"
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=60_000)
    prov = viewer.layers["CT abdomen_seg"].metadata["medseg"]["provenance"]
    assert prov["fast_path"]["precision_requested"] == "fp32"
    assert prov["fast_path"]["precision"] == "fp32" and prov["parameters"]["precision"] == "fp32"
    assert prov["timings_s"]["network"] > 0


def test_cancel_stops_within_a_second_and_changes_nothing(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "ct")
    widget = _widget(viewer)
    # tiny patch + high overlap: hundreds of thousands of windows, a long run on a CPU
    widget.add_model_path(str(_tiny_ct_model(tmp_path / "slow", (8, 8, 2), None)))
    widget.overlap.value = 0.75
    seen = []
    widget.run_button.native.click()
    widget.job.worker.yielded.connect(lambda p: seen.append(p))
    qtbot.waitUntil(lambda: any(p.total and p.done >= 1 for p in seen), timeout=60_000)
    t0 = time.perf_counter()
    widget.cancel_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=5_000)
    assert time.perf_counter() - t0 < 1.0
    assert seen[-1].done < seen[-1].total  # it really stopped early
    assert "CT abdomen_seg" not in viewer.layers
    assert "Cancelled" in widget.status.value
    assert widget.run_button.enabled


def test_model_that_does_not_fit_says_so(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "pathology")  # 2D RGB into a 3D CT model
    widget = _widget(viewer)
    widget.add_model_path(str(_tiny_ct_model(tmp_path / "tiny_ct")))
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=30_000)
    assert widget.status.value.startswith("Failed")
    assert "3D" in widget.status.value or "2D" in widget.status.value
    assert len(viewer.layers) == 1


def test_more_channels_runs_a_two_channel_nnunet_folder_like_its_predictor(
    make_napari_viewer, qtbot, tmp_path
):
    """The user opens CASE_0000 and CASE_0001, picks the nnU-Net folder, adds the second
    channel under "More channels" and presses Run: the labels overlay the scan and equal
    nnUNetPredictor's on the same files (Dice >= 0.99 per class)."""
    from tests.models.nnunet_helpers import (
        agreement,
        model_folders,
        mr_channels,
        reference_labels,
    )

    folder = model_folders("mr")["3d_fullres"]
    images = mr_channels(tmp_path)
    viewer = make_napari_viewer()
    (c0,) = viewer.open(str(images[0]), plugin="napari-medseg")
    (c1,) = viewer.open(str(images[1]), plugin="napari-medseg")
    widget = _widget(viewer)
    widget.add_model_path(str(folder))
    widget.image.value = c0
    widget.tta.value = False
    # one channel for a two-channel model: a sentence, no layer
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=120_000)
    assert widget.status.value.startswith("Failed") and "channel" in widget.status.value
    assert len(viewer.layers) == 2
    widget.channels.value = [c1]
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=300_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    labels = viewer.layers[f"{c0.name}_seg"]
    assert labels.data.shape == c0.data.shape
    np.testing.assert_allclose(labels.affine.affine_matrix, c0.affine.affine_matrix)
    # back in the files' axis order (the layer shows them transposed)
    file_labels = np.asarray(labels.data).transpose(
        np.argsort(labels.metadata["medseg"]["layer_axes"])
    )
    ref = reference_labels(folder, images, [0], False)
    dice = agreement(ref, file_labels)
    assert len(dice) >= 2 and min(dice.values()) >= 0.99, dice
