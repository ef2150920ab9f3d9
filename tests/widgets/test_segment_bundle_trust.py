"""A MONAI bundle whose network needs a Python expression: napari asks, and runs it once trusted."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import data_path

pytestmark = pytest.mark.gui


def _tiny_untrusted_bundle(tmp_path):
    import torch
    from monai.networks.nets import UNet

    src = data_path("monai_bundles/spleen_ct_segmentation")
    dst = tmp_path / "tiny_spleen_bundle"
    shutil.copytree(src, dst)
    cfg_path = dst / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["network_def"] = {
        "_target_": "UNet",
        # a Python expression beyond plain arithmetic: needs the user's trust
        "spatial_dims": "$max(1, 3)",
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
    }
    cfg["inferer"]["roi_size"] = [32, 32, 16]
    cfg_path.write_text(json.dumps(cfg))
    (dst / "models").mkdir(exist_ok=True)
    net = UNet(3, 1, 2, (4, 8), (2,), num_res_units=0)
    torch.save(net.state_dict(), dst / "models" / "model.pt")
    return dst


def test_untrusted_bundle_asks_then_runs(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    from napari_medseg.widgets.segment import SegmentWidget

    bundle = _tiny_untrusted_bundle(tmp_path)
    asked = []

    def answer(*args, **kwargs):
        asked.append(args[2] if len(args) > 2 else "")
        return QMessageBox.StandardButton.Yes

    monkeypatch.setattr(QMessageBox, "question", answer)
    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-medseg", "ct")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model_path(str(bundle))
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: "CT abdomen_seg" in viewer.layers, timeout=60_000)
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=30_000)
    assert len(asked) == 1 and "$max(1, 3)" in asked[0]
    assert viewer.layers["CT abdomen_seg"].data.shape == image.data.shape
    assert widget.run_button.enabled


def test_untrusted_bundle_refused_changes_nothing(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    from napari_medseg.widgets.segment import SegmentWidget

    bundle = _tiny_untrusted_bundle(tmp_path)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "ct")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model_path(str(bundle))
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=30_000)
    assert "trust" in widget.status.value.lower()
    assert len(viewer.layers) == 1
