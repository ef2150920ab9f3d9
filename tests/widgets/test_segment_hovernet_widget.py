"""The Segment dock with MONAI's HoVerNet nuclei bundle: Run gives nucleus types and instances."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import data_path
from tests.models.test_bundles import BUNDLES, _copy

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not BUNDLES.is_dir(), reason=f"MONAI bundle configs not at {BUNDLES}"),
]


def test_hovernet_bundle_gives_nuclei_layers(make_napari_viewer, qtbot, tmp_path):
    import torch
    from PIL import Image

    from napari_medseg.models.loaders.bundle import load_bundle
    from napari_medseg.widgets.segment import SegmentWidget
    from tests.models.test_bundle_fidelity_hovernet import _balance

    # a real H&E crop that one 256-pixel window covers after HoVerNet's 46-pixel padding
    tile = np.asarray(Image.open(data_path("pathology/he_tile_tcia.jpg")).convert("RGB"))
    crop = np.ascontiguousarray(tile[40:190, 60:210])
    png = tmp_path / "he.png"
    Image.fromarray(crop).save(png)
    bundle = _copy("pathology_nuclei_segmentation_classification", tmp_path)
    cfg = bundle / "configs" / "inference.json"
    conf = json.loads(cfg.read_text())
    for t in conf["postprocessing"]["transforms"]:
        if t["_target_"] == "HoVerNetInstanceMapPostProcessingd":
            t["marker_threshold"] = 0.6  # random weights: see test_bundle_fidelity_hovernet
    cfg.write_text(json.dumps(conf))
    torch.manual_seed(0)
    state = load_bundle(bundle, weights="random").network.state_dict()
    _balance(bundle, state, png)
    torch.save(state, bundle / "models" / "model.pt")

    viewer = make_napari_viewer()
    image = viewer.add_image(crop, rgb=True, name="H&E")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.add_model_path(str(bundle))
    widget.image.value = image
    widget.run_button.native.click()  # as a user pressing Run
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=120_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    types, nuclei = viewer.layers["H&E_seg"], viewer.layers["H&E_nuclei"]
    assert types.data.shape == nuclei.data.shape == crop.shape[:2]
    ids = np.unique(nuclei.data)
    assert len(ids) > 5, "random weights still give some nuclei"
    # every nucleus has one type, and typed pixels lie on nuclei
    assert not ((np.asarray(types.data) > 0) & (np.asarray(nuclei.data) == 0)).any()
    table = nuclei.features
    assert sorted(table["index"]) == sorted(int(i) for i in ids)
    assert "nuclei" in widget.status.value
    prov = nuclei.metadata["medseg"]["provenance"]
    assert prov["nuclei"] == len(ids) - 1 and prov["parameters"]["pipeline"].startswith("HoVerNet")
