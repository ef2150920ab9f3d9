"""Segment dock > Get models...: pull a model from a local HTTP server, then run it."""

from __future__ import annotations

import pytest

from napari_medseg.models.registry import builtin_models_dir
from tests.http_server import LocalServer, zip_folder

pytestmark = pytest.mark.gui


@pytest.fixture
def server():
    s = LocalServer()
    yield s
    s.close()


def _dock(viewer):
    from napari_medseg.widgets.segment import GET_MODELS, SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    assert widget.get_button.text == GET_MODELS
    return widget


def test_get_models_installs_and_offers_the_model(
    make_napari_viewer, qtbot, server, tmp_path, monkeypatch
):
    models = tmp_path / "models"
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(models))
    server.files["/zoo/lab_nuclei.zip"] = zip_folder(
        builtin_models_dir() / "fluo_nuclei_2d", "lab_nuclei"
    )
    viewer = make_napari_viewer()
    dock = _dock(viewer)
    dock.get_button.clicked.emit()  # what a click on "Get models..." does
    get = dock.get_models_widget
    assert get is not None and get.native.isVisible()
    get.set_source(f"{server.url}/zoo/lab_nuclei.zip")
    get.run_button.clicked.emit()
    qtbot.waitUntil(lambda: get.job.worker is None and bool(get.installed), timeout=30000)
    assert [m.name for m in get.installed] == ["lab_nuclei"]
    assert (models / "lab_nuclei" / "model.json").is_file()
    assert "Installed lab_nuclei" in get.status.value
    # the Segment dock offers it and has chosen it
    assert dock.model.value == "lab_nuclei"

    # run it on the sample nuclei image: a Labels layer appears
    (image,) = viewer.open_sample("napari-medseg", "nuclei")
    dock.image.value = image
    dock.run_button.clicked.emit()
    qtbot.waitUntil(
        lambda: dock.job.worker is None and f"{image.name}_seg" in viewer.layers, timeout=60000
    )
    assert viewer.layers[f"{image.name}_seg"].data.max() >= 1


def test_get_models_cancel_leaves_nothing(make_napari_viewer, qtbot, server, tmp_path, monkeypatch):
    models = tmp_path / "models"
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(models))
    body = zip_folder(builtin_models_dir() / "ct_spleen_3d", "slow_model")
    server.files["/slow.zip"] = body
    server.slow.add("/slow.zip")  # 4 kB every 50 ms: about 20 s for this archive
    viewer = make_napari_viewer()
    dock = _dock(viewer)
    dock.get_button.clicked.emit()
    get = dock.get_models_widget
    get.set_source(f"{server.url}/slow.zip")
    get.run_button.clicked.emit()
    qtbot.waitUntil(lambda: get.status.value.startswith("downloading"), timeout=15000)
    get.cancel_button.clicked.emit()
    qtbot.waitUntil(lambda: get.job.worker is None, timeout=5000)
    assert get.installed == []
    assert "Cancelled" in get.status.value
    assert not models.exists() or list(models.iterdir()) == []
