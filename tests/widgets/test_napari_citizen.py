"""A good napari citizen, in a real viewer (Xvfb): reader claims, Points/Shapes writers, the
display convention with orientation letters and mm units, the plugin's own Segment dock."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medseg.io.napari_io import sample_path
from tests.conftest import data_path

pytestmark = pytest.mark.gui


def _reader_plugins(path) -> set[str]:
    """Plugins whose manifest claims ``path`` (what napari's reader-choice dialog lists)."""
    from npe2 import PluginManager

    return {r.plugin_name for r in PluginManager.instance().iter_compatible_readers([str(path)])}


@pytest.fixture
def settings_dir(tmp_path, monkeypatch):
    folder = tmp_path / "config"
    monkeypatch.setenv("MEDSEG_CONFIG_DIR", str(folder))
    return folder


def test_plain_png_and_jpeg_open_without_a_reader_choice(make_napari_viewer, tmp_path):
    """Plain pictures are napari's: one reader claims them, so napari asks nothing."""
    from PIL import Image

    from napari_medseg.io.napari_io import get_reader

    rgb = np.asarray(Image.open(sample_path("he_tile.jpg")))
    png = tmp_path / "tile.png"
    Image.fromarray(rgb).save(png)
    viewer = make_napari_viewer()
    for path in (png, sample_path("he_tile.jpg")):
        assert "napari-medseg" not in _reader_plugins(path)
        assert get_reader(str(path)) is None
        (layer,) = viewer.open(str(path))  # would raise MultipleReaderError with two readers
        assert layer.rgb and layer.data.shape == rgb.shape
    # a plain 2D TIFF without pixel size is declined; a slide format is claimed
    plain = tmp_path / "plain.tif"
    import tifffile

    tifffile.imwrite(plain, rgb[..., 0])
    assert get_reader(str(plain)) is None
    assert "napari-medseg" in _reader_plugins(tmp_path / "slide.scn")
    assert "napari-medseg" in _reader_plugins(tmp_path / "slide.btf")


def test_dicom_folder_opens_with_ours_other_folders_are_declined(make_napari_viewer, tmp_path):
    from napari_medseg.io.napari_io import get_reader

    dicom = data_path("ct/totalseg_small/dicom")
    assert get_reader(str(dicom)) is not None
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "notes.txt").write_text("not an image")
    assert get_reader(str(tmp_path / "pictures")) is None
    assert get_reader(str(tmp_path / "other.zarr")) is None  # not a folder we wrote
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(dicom), plugin="napari-medseg")
    assert layer.metadata["medseg"]["modality"] == "CT"
    assert tuple(str(u) for u in layer.units) == ("millimeter",) * 3


def _same_world_points(a, b, atol=1e-4):
    wa = np.array([a.data_to_world(p) for p in a.data[a.shown]])
    wb = np.array([b.data_to_world(p) for p in b.data])
    np.testing.assert_allclose(wb, wa, atol=atol)


def test_points_save_as_csv_in_world_mm_and_reopen_on_the_scan(make_napari_viewer, tmp_path):
    """Points on the PSR-oriented MR (file axes differ from layer axes): CSV with RAS mm,
    reopened by File > Open they lie on the same world points; hidden points are not saved."""
    import pandas as pd

    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-medseg", "mri")
    pts = np.array([[10.0, 20.0, 30.0], [40.0, 5.0, 17.0], [3.0, 3.0, 3.0]])
    layer = viewer.add_points(
        pts,
        name="landmarks",
        affine=image.affine.affine_matrix,
        metadata={"medseg": dict(image.metadata["medseg"])},
        features=pd.DataFrame({"class": ["C2", "C3", "C4"], "score": [1.0, 0.9, 0.2]}),
    )
    layer.shown = np.array([True, True, False])
    viewer.layers.selection = {layer}
    out = tmp_path / "landmarks.csv"
    assert viewer.layers.save(str(out), selected=True, plugin="napari-medseg") == [str(out)]
    table = pd.read_csv(out)
    assert list(table["class"]) == ["C2", "C3"]  # the hidden point is not saved
    # world columns are RAS mm: the image's file affine maps the file indices to them
    aff = np.asarray(image.metadata["medseg"]["affine"])
    ijk = table[["z", "y", "x"]].to_numpy(float)
    ras = ijk @ aff[:3, :3].T + aff[:3, 3]
    np.testing.assert_allclose(table[["world_x", "world_y", "world_z"]].to_numpy(), ras, atol=1e-4)
    (again,) = viewer.open(str(out), plugin="napari-medseg")
    assert type(again).__name__ == "Points" and len(again.data) == 2
    assert list(again.features["class"]) == ["C2", "C3"]
    _same_world_points(layer, again)
    # a Points layer made by hand (no metadata, napari world = (S, A, R) mm) round-trips too
    hand = viewer.add_points(np.array([[1.5, -20.0, 7.25]]), name="hand")
    viewer.layers.selection = {hand}
    out2 = tmp_path / "hand.csv"
    viewer.layers.save(str(out2), selected=True, plugin="napari-medseg")
    (hand2,) = viewer.open(str(out2), plugin="napari-medseg")
    _same_world_points(hand, hand2)


def test_points_and_shapes_save_as_qupath_geojson_and_reopen(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "pathology")
    points = viewer.add_points(np.array([[10.0, 20.0], [150.5, 300.25]]), name="cells")
    viewer.layers.selection = {points}
    out = tmp_path / "cells.geojson"
    viewer.layers.save(str(out), selected=True, plugin="napari-medseg")
    doc = json.loads(out.read_text())
    assert [f["geometry"]["type"] for f in doc["features"]] == ["Point", "Point"]
    # QuPath's corner convention: pixel (row, col) covers [col, col + 1] x [row, row + 1]
    assert doc["features"][1]["geometry"]["coordinates"] == pytest.approx([300.75, 151.0])
    (again,) = viewer.open(str(out), plugin="napari-medseg")
    np.testing.assert_allclose(again.data, points.data, atol=1e-6)

    rect = np.array([[10.0, 20.0], [10.0, 60.0], [30.0, 60.0], [30.0, 20.0]])
    tri = np.array([[100.0, 100.0], [140.0, 100.0], [120.0, 160.0]])
    shapes = viewer.add_shapes([rect, tri], shape_type=["rectangle", "polygon"], name="regions")
    viewer.layers.selection = {shapes}
    out = tmp_path / "regions.geojson"
    viewer.layers.save(str(out), selected=True, plugin="napari-medseg")
    doc = json.loads(out.read_text())
    rings = [np.asarray(f["geometry"]["coordinates"][0]) for f in doc["features"]]
    assert [f["geometry"]["type"] for f in doc["features"]] == ["Polygon", "Polygon"]
    np.testing.assert_allclose(rings[0][:-1], rect[:, ::-1] + 0.5)  # [x, y], corner convention
    np.testing.assert_allclose(rings[1][0], rings[1][-1])  # closed ring
    (centres,) = viewer.open(str(out), plugin="napari-medseg")
    np.testing.assert_allclose(centres.data, [rect.mean(axis=0), tri.mean(axis=0)], atol=1e-6)
    out_csv = tmp_path / "regions.csv"
    viewer.layers.save(str(out_csv), selected=True, plugin="napari-medseg")
    (from_csv,) = viewer.open(str(out_csv), plugin="napari-medseg")
    np.testing.assert_allclose(from_csv.data, centres.data, atol=1e-6)


def test_display_convention_is_a_remembered_choice_with_letters_and_mm(
    make_napari_viewer, settings_dir
):
    from napari_medseg.widgets._layers import cursor_text, orientation_letters

    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    assert dock.display.value == "radiological"  # the default, shown in the dock
    (ct,) = viewer.open_sample("napari-medseg", "ct")
    assert tuple(str(o) for o in viewer.scene.camera.orientation2d) == ("up", "left")
    # axial slice, radiological: patient's right on the screen's left, anterior up
    assert orientation_letters(viewer) == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    overlays = viewer.canvas.overlays
    assert overlays["medseg_left"].visible and overlays["medseg_left"].text == "R"
    assert overlays.scale_bar.visible
    assert tuple(str(u) for u in viewer.layers.units) == ("millimeter",) * 3
    # a layer drawn over the scan by hand gets the scan's mm (no mixed-units scale bar)
    viewer.add_points(ndim=3, name="by hand")
    assert tuple(str(u) for u in viewer.layers.units) == ("millimeter",) * 3
    # the cursor's RAS position and the CT value in HU
    idx = (13, 80, 90)
    world = ct.data_to_world(idx)
    viewer.dims.set_point(0, world[0])  # the slider on that slice, as under a real cursor
    text = cursor_text(viewer, world)
    r = world[2]
    assert f"{'R' if r >= 0 else 'L'} {abs(r):.1f}" in text and "mm" in text
    assert f"{float(ct.data[idx]):.4g} HU" in text

    dock.display.value = "neurological"
    assert tuple(str(o) for o in viewer.scene.camera.orientation2d) == ("up", "right")
    assert orientation_letters(viewer)["left"] == "L"
    assert json.loads((settings_dir / "settings.json").read_text()) == {
        "view_convention": "neurological"
    }
    # a coronal view (S up): superior on top, left/right as chosen
    viewer.dims.order = (1, 0, 2)
    assert orientation_letters(viewer) == {"top": "S", "bottom": "I", "left": "L", "right": "R"}
    viewer.dims.ndisplay = 3
    assert orientation_letters(viewer) == {} and not overlays["medseg_top"].visible

    # the next session remembers the choice
    viewer2 = make_napari_viewer()
    _, dock2 = viewer2.window.add_plugin_dock_widget("napari-medseg", "Segment")
    assert dock2.display.value == "neurological"
    viewer2.open_sample("napari-medseg", "mri")
    assert tuple(str(o) for o in viewer2.camera.orientation2d) == ("up", "right")


def test_view_command_docks_the_plugins_own_segment_widget(make_napari_viewer, monkeypatch):
    """`napari-medseg view` builds its dock with add_plugin_dock_widget: the Plugins menu finds
    the same dock instead of adding a second one."""
    import napari

    from napari_medseg.widgets import launch as launch_mod
    from napari_medseg.widgets.segment import SegmentWidget

    viewers = []
    monkeypatch.setattr(
        napari, "Viewer", lambda **kw: viewers.append(make_napari_viewer()) or viewers[-1]
    )
    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    assert launch_mod.launch(sample="mri", model="mr_spinalcord_3d", device="cpu") == 0
    (viewer,) = viewers
    docks = [w for w in viewer.window.dock_widgets.values() if isinstance(w, SegmentWidget)]
    assert len(docks) == 1 and docks[0].model.value == "mr_spinalcord_3d"
    _, again = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    assert again is docks[0]
    assert viewer.layers[0].metadata["medseg"]["modality"] == "MR"
