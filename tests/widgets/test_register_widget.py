"""The Register dock in a real viewer: choose fixed and moving, press Run, get layers on the
fixed image's geometry, quality views, Cancel, and a clear sentence for bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_medseg.io import read_image
from napari_medseg.io.geometry import record_to_layer_data
from napari_medseg.io.record import ImageRecord
from tests.conftest import data_path

pytestmark = pytest.mark.gui

MT = "registration/mt_pair/"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The test machine's 2 cores are shared: one torch thread avoids OpenMP contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _add(viewer, rec, kind="image"):
    data, kwargs, _ = record_to_layer_data(rec, kind)
    if kind == "labels":
        return viewer.add_labels(data, **{k: v for k, v in kwargs.items() if k != "rgb"})
    return viewer.add_image(data, **kwargs)


def _widget(viewer):
    from napari_medseg.widgets.register import RegisterWidget

    widget = RegisterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Register")
    return widget


def test_run_puts_results_on_the_fixed_geometry(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    fixed = _add(viewer, read_image(data_path(MT + "mt0.nii.gz"))[0])
    moving = _add(viewer, read_image(data_path(MT + "mt1.nii.gz"))[0])
    labels = _add(viewer, read_image(data_path(MT + "mt1_seg.nii.gz"))[0], "labels")
    # a moving landmark at a voxel centre; it should come back near the same voxel
    pt_world = np.asarray(moving.data_to_world((2, 20, 20)))
    points = viewer.add_points([pt_world], name="landmarks")
    widget = _widget(viewer)
    assert widget.fixed.value is fixed and widget.moving.value is moving
    widget.labels.value = labels
    widget.points.value = points
    widget.iterations.value = 20
    seen = []
    widget.run_button.native.click()
    widget.job.worker.yielded.connect(seen.append)
    assert widget.cancel_button.enabled
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=60_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert "before" in widget.status.value and "after" in widget.status.value
    assert any("loss" in p.info for p in seen) and widget.loss.value
    warped = viewer.layers["mt1_registered"]
    assert warped.data.shape == fixed.data.shape
    np.testing.assert_allclose(warped.affine.affine_matrix, fixed.affine.affine_matrix)
    lab = viewer.layers["mt1_seg_registered"]
    assert type(lab).__name__ == "Labels" and lab.data.shape == fixed.data.shape
    np.testing.assert_allclose(lab.affine.affine_matrix, fixed.affine.affine_matrix)
    fseg = np.asarray(labels.data) > 0  # moving labels
    assert 0.5 < (np.asarray(lab.data) > 0).sum() / fseg.sum() < 2.0
    moved = viewer.layers["landmarks_registered"].data[0]
    assert np.linalg.norm(moved - pt_world) < 5.0  # same scanner session: small motion
    for name in ("mt1_jacobian", "mt1_deformation_mm"):
        assert viewer.layers[name].data.shape == fixed.data.shape
    # quality views: checkerboard layer and blend slider
    widget.checkerboard.value = True
    board = viewer.layers["checkerboard"]
    assert board.data.shape == fixed.data.shape
    assert float(board.data.min()) >= 0.0 and float(board.data.max()) <= 1.0
    widget.blend.value = 0.8
    assert warped.opacity == pytest.approx(0.8)
    widget.checkerboard.value = False
    assert not board.visible
    # the outputs are not offered as new fixed/moving inputs
    assert warped not in widget.fixed.choices


def test_cancel_stops_within_a_second(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _add(viewer, read_image(data_path(MT + "mt0.nii.gz"))[0])
    _add(viewer, read_image(data_path(MT + "mt1.nii.gz"))[0])
    widget = _widget(viewer)
    widget.iterations.value = 50_000
    seen = []
    widget.run_button.native.click()
    widget.job.worker.yielded.connect(seen.append)
    qtbot.waitUntil(lambda: any(p.total and p.done >= 2 for p in seen), timeout=60_000)
    t0 = time.perf_counter()
    widget.cancel_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=5_000)
    assert time.perf_counter() - t0 < 1.0
    assert seen[-1].done < seen[-1].total
    assert "mt1_registered" not in viewer.layers
    assert "Cancelled" in widget.status.value and widget.run_button.enabled


def test_2d_with_3d_says_so(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _add(viewer, read_image(data_path(MT + "mt0.nii.gz"))[0])
    flat = ImageRecord(
        data=np.zeros((30, 40), np.float32), affine=np.eye(3), space="pixel", name="flat"
    )
    _add(viewer, flat)
    widget = _widget(viewer)
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=30_000)
    assert widget.status.value.startswith("Failed")
    assert "same dimensionality" in widget.status.value
    assert len(viewer.layers) == 2
