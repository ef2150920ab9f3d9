"""The Segment dock with MONAI's NuClick bundle: points on nuclei, Run, one nucleus per point."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import data_path
from tests.models.test_bundles import BUNDLES

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not BUNDLES.is_dir(), reason=f"MONAI bundle configs not at {BUNDLES}"),
]


def test_nuclick_bundle_outlines_the_clicked_nuclei(make_napari_viewer, qtbot, tmp_path):
    from PIL import Image

    from napari_medseg.widgets.segment import SegmentWidget
    from tests.models.test_bundle_fidelity_nuclick import nuclei_clicks, nuclick_bundle

    # a real H&E crop just larger than one 128-pixel NuClick patch, clicks on its dark nuclei
    tile = np.asarray(Image.open(data_path("pathology/he_tile_tcia.jpg")).convert("RGB"))
    crop = np.ascontiguousarray(tile[40:190, 60:220])  # 150 rows x 160 columns
    png = tmp_path / "he.png"
    Image.fromarray(crop).save(png)
    clicks = nuclei_clicks(crop, 3)
    assert len(clicks) == 3
    bundle = nuclick_bundle(tmp_path, png, [[int(c), int(r)] for r, c in clicks])

    viewer = make_napari_viewer()
    # placed in the world (scale, translate) to check that the points are read in pixels
    image = viewer.add_image(crop, rgb=True, name="H&E", scale=(0.5, 0.5), translate=(10, -4))
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    assert widget.clicks.native.isHidden()  # shown for click models only
    widget.add_model_path(str(bundle))
    widget.image.value = image
    assert not widget.clicks.native.isHidden()

    widget.run_button.native.click()  # no points yet: the status says so, nothing runs
    assert widget.job.worker is None
    assert "Points layer" in widget.status.value and "Clicks" in widget.status.value

    world = clicks * 0.5 + np.array([10, -4])
    points = viewer.add_points(world, name="clicks")
    assert widget.clicks.value is points  # a new Points layer is taken as the clicks
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=120_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    nuclei = viewer.layers["H&E_nuclei"]
    assert nuclei.data.shape == crop.shape[:2]
    data = np.asarray(nuclei.data)
    for v in [(0, 0), (149, 159), (12, 80)]:  # the nuclei lie on the image
        np.testing.assert_allclose(nuclei.data_to_world(v), image.data_to_world(v))
    # the points were read as these pixel clicks: the same nuclei as the engine run on them
    from napari_medseg.core.segment.segment import segment
    from napari_medseg.io import read_image
    from napari_medseg.models.loaders.bundle import load_bundle
    from napari_medseg.progress import run_sync

    (record,) = read_image(png)
    expected = run_sync(segment(record, load_bundle(bundle), clicks=clicks)).instances
    assert np.array_equal(data, expected)
    assert set(np.unique(data)) == {0, 1, 2, 3}
    assert "3 nuclei" in widget.status.value
    seg = np.asarray(viewer.layers["H&E_seg"].data)
    assert np.array_equal(seg > 0, data > 0)
    prov = nuclei.metadata["medseg"]["provenance"]
    assert prov["clicks"] == 3 and prov["parameters"]["clicks_row_col"] == clicks.tolist()
