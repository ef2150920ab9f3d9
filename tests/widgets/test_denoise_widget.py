"""The Denoise dock in a real viewer: pick layer and method, press Run, get <image>_denoised."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import data_path

pytestmark = pytest.mark.gui


def _widget(viewer):
    from napari_medseg.widgets.denoise import DenoiseWidget

    widget = DenoiseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Denoise")
    return widget


def _run(widget, qtbot, timeout=60_000):
    widget.run_button.native.click()  # as a user pressing Run
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=timeout)


def test_classical_then_n2v2_with_live_loss_and_saved_model(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-medseg", "ct")
    image.contrast_limits = (-100.0, 200.0)
    widget = _widget(viewer)
    assert widget.image.value is image
    widget.method.value = "tv"
    assert not widget.budget.enabled
    _run(widget, qtbot)
    out = viewer.layers["CT abdomen_denoised"]
    assert widget.status.value.startswith("Done"), widget.status.value
    assert out.data.shape == image.data.shape and out.data.dtype == image.data.dtype
    np.testing.assert_allclose(out.affine.affine_matrix, image.affine.affine_matrix)
    assert tuple(out.contrast_limits) == (-100.0, 200.0)
    assert out.metadata["medseg"]["provenance"]["method"] == "tv"
    assert not np.array_equal(np.asarray(out.data), np.asarray(image.data))
    # before/after toggle
    widget.show_denoised.value = False
    assert not out.visible
    widget.show_denoised.value = True
    assert out.visible
    # N2V2 with a 5 s budget: live loss plot, same layer updated, model can be saved
    widget.method.value = "n2v2"
    widget.budget.value = 5.0
    assert widget.budget.enabled
    _run(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert len(widget.loss_plot.values) >= 2
    widget.loss_plot.repaint()  # the paint code runs with data
    assert [lyr.name for lyr in viewer.layers].count("CT abdomen_denoised") == 1
    assert viewer.layers["CT abdomen_denoised"].metadata["medseg"]["provenance"]["method"] == "n2v2"
    assert widget.save_button.enabled
    folder = widget.save_model(tmp_path / "ct_denoiser")
    assert (folder / "model.json").is_file()
    # the saved denoiser is offered as a method and runs without training
    widget.add_model_path(folder)
    _run(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    assert viewer.layers["CT abdomen_denoised"].metadata["medseg"]["provenance"]["network"][
        "reused"
    ]


def test_cancel_stops_training_and_changes_nothing(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "nuclei")
    widget = _widget(viewer)
    widget.method.value = "n2v2"
    widget.budget.value = 300.0
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: len(widget.loss_plot.values) >= 1, timeout=60_000)
    t0 = time.perf_counter()
    widget.cancel_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=10_000)
    assert time.perf_counter() - t0 < 1.0  # the bar: Cancel acts within a second
    assert "Cancelled" in widget.status.value
    assert len(viewer.layers) == 1
    assert widget.run_button.enabled


def test_time_series_asks_for_frames_then_denoises_each(make_napari_viewer, qtbot):
    from napari_medseg.io import read_image
    from napari_medseg.io.geometry import record_to_layer_data
    from napari_medseg.io.record import ImageRecord

    rec = read_image(data_path("denoising/fmri_30frames.nii.gz"))[0]
    small = ImageRecord(
        data=np.asarray(rec.data)[10:50, 12:45, :, :3],
        affine=rec.affine,
        space="RAS",
        modality="MR",
        name="fmri",
    )
    data, kwargs, _ = record_to_layer_data(small, "image")
    viewer = make_napari_viewer()
    layer = viewer.add_image(data, **kwargs)
    widget = _widget(viewer)
    widget.image.value = layer
    widget.method.value = "wavelet"
    widget.run_button.native.click()
    assert widget.status.value.startswith("Failed") and "3 frames" in widget.status.value
    assert widget.job.worker is None and len(viewer.layers) == 1
    widget.frames.value = True
    _run(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    out = viewer.layers["fmri_denoised"]
    assert out.data.shape == layer.data.shape
    np.testing.assert_allclose(out.affine.affine_matrix, layer.affine.affine_matrix)


def test_constant_image_fails_with_a_sentence(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.full((40, 41), 5, np.uint16), name="flat")
    widget = _widget(viewer)
    widget.method.value = "nlmeans"
    _run(widget, qtbot)
    assert widget.status.value.startswith("Failed") and "constant" in widget.status.value
    assert len(viewer.layers) == 1


def test_noise_model_from_a_drawn_background_rectangle(make_napari_viewer, qtbot):
    """The dock shows the noise model; a rectangle without signal fixes offset and read noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :128]
    signal = 20.0 + 200.0 * ((yy - 48) ** 2 + (xx - 80) ** 2 < 30**2)  # a bright disc
    gain, offset, read = 4.0, 100.0, 3.0
    img = gain * rng.poisson(signal / gain) + offset + rng.normal(0, read, signal.shape)
    viewer = make_napari_viewer()
    layer = viewer.add_image(img.astype(np.float32), name="camera")
    widget = _widget(viewer)
    assert widget.method.value == "auto" and widget.budget.enabled
    model = widget.estimate_noise()
    assert "from image" in widget.noise_label.value and "gain" in widget.noise_label.value
    assert 2.5 < model.gain < 6.0, model.summary()
    # the user draws a rectangle in the dark corner (rows 0-29, columns 0-39)
    shapes = viewer.add_shapes(
        [np.array([[0, 0], [0, 39], [29, 39], [29, 0]])], shape_type="rectangle", name="bg"
    )
    widget.region.value = shapes
    mask = widget.background_mask(widget._chosen_record("x")[1])
    assert mask.shape == img.shape and mask[:30, :40].all() and mask.sum() == 30 * 40
    model = widget.estimate_noise()
    assert "background region" in widget.noise_label.value
    assert model.offset == pytest.approx(img[:30, :40].mean())
    assert model.read_noise == pytest.approx(img[:30, :40].std())
    # Run (auto, short budget): the result's provenance holds the same model
    widget.budget.value = 3.0
    _run(widget, qtbot)
    assert widget.status.value.startswith("Done"), widget.status.value
    prov = viewer.layers["camera_denoised"].metadata["medseg"]["provenance"]
    assert prov["method"] == "auto" and prov["noise_model"]["source"] == "background region"
    assert "background region" in widget.noise_label.value
    assert layer.data.shape == viewer.layers["camera_denoised"].data.shape


def test_background_region_maps_to_file_axis_order_on_a_permuted_volume(make_napari_viewer):
    """A region drawn on a volume whose file axes napari shows transposed lands on file voxels."""
    from napari_medseg.io.geometry import record_to_layer_data
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.widgets._layers import region_mask

    # file axes (i, j, k) = (S, R, A) directions: napari shows them in another order
    aff = np.array([[0, 2.0, 0, 0], [0, 0, 1.5, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    rec = ImageRecord(
        data=np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14),
        affine=aff,
        space="RAS",
        name="vol",
    )
    data, kwargs, _ = record_to_layer_data(rec, "image")
    assert data.shape != rec.shape  # really transposed
    viewer = make_napari_viewer()
    image = viewer.add_image(data, **kwargs)
    lab = np.zeros(data.shape, dtype=np.uint8)
    lab[1:3, 2:5, 4:9] = 1
    labels = viewer.add_labels(lab, affine=kwargs["affine"], name="bg")
    mask = region_mask(labels, image, rec)
    assert mask.shape == rec.shape and mask.sum() == lab.sum()
    # the marked voxels hold the same values in the file array as in the layer
    np.testing.assert_array_equal(np.sort(rec.data[mask]), np.sort(data[lab > 0]))
    # a rectangle drawn on one displayed slice: that slice's box, in file order
    corners = np.array([[1, 2, 4], [1, 2, 8], [1, 4, 8], [1, 4, 4]], dtype=float)
    world = np.array([image.data_to_world(c) for c in corners])
    shapes = viewer.add_shapes([world], shape_type="rectangle", name="box")
    mask = region_mask(shapes, image, rec)
    box = np.zeros(data.shape, dtype=bool)
    box[1, 2:5, 4:9] = True
    np.testing.assert_array_equal(np.sort(rec.data[mask]), np.sort(data[box]))
