"""The Correct & Train dock in a real viewer: tools are one undo step, saves are versioned."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medseg.core.correct import edits as C
from tests.conftest import data_path

pytestmark = pytest.mark.gui

PROV = {"model": {"name": "ct_spleen_3d", "weights_sha256": "cd" * 32}, "parameters": {}}


@pytest.fixture(autouse=True)
def _recovery_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_RECOVERY_DIR", str(tmp_path / "recovery"))


def _setup(viewer, tmp_path):
    """Sample CT + its real manual spleen mask as a model-output Labels layer."""
    from napari_medseg.io import read_image
    from napari_medseg.widgets._layers import labels_layer_data, record_from_layer
    from napari_medseg.widgets.correct import CorrectWidget

    (image,) = viewer.open_sample("napari-medseg", "ct")
    record = record_from_layer(image)
    (lab,) = read_image(data_path("ct/spleen/label.nii.gz"))
    labels = np.asarray(lab.data).astype(np.uint8)
    assert labels.shape == record.spatial_shape
    meta = {"provenance": PROV, "class_names": {0: "background", 1: "spleen"}}
    name = f"{image.name}_seg"
    data, kwargs = labels_layer_data(image, labels, record, name, meta)
    layer = viewer.add_labels(data, name=name, affine=kwargs["affine"], metadata=kwargs["metadata"])
    widget = CorrectWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Correct & Train")
    widget.saving.save_dir.value = str(tmp_path)
    assert widget.labels.value is layer and widget.image.value is image
    return image, layer, widget


def _spoil(layer):
    """Islands far from the organ and a hole inside it, written as one undo step."""
    data = np.asarray(layer.data)
    new = data.copy()
    new[2:4, 5:8, 5:8] = 1  # island (layer axes S, A, R)
    new[20, 150:152, 10:12] = 1  # another
    zs, ys, xs = np.nonzero(data == 1)
    k = int(np.median(zs))
    cy, cx = int(np.median(ys[zs == k])), int(np.median(xs[zs == k]))
    new[k, cy - 2 : cy + 2, cx - 2 : cx + 2] = 0  # hole
    idx = np.nonzero(new != data)
    with layer.block_history():
        layer.data_setitem(idx, new[idx])
    return new


def test_each_tool_is_one_undo_step(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, layer, w = _setup(viewer, tmp_path)
    spoiled = _spoil(layer)
    np.testing.assert_array_equal(layer.data, spoiled)
    from napari_medseg.widgets.correct import layer_spacing

    spacing = layer_spacing(layer)
    np.testing.assert_allclose(sorted(spacing), [0.7949, 0.7949, 5.0], atol=1e-3)
    w.tools.margin.value = 2.0
    w.tools.min_size.value = 100.0
    expected = {
        w.tools.largest_button: C.keep_largest_component(spoiled, 1),
        w.tools.islands_button: C.remove_islands(spoiled, 1, min_mm3=100.0, spacing=spacing),
        w.tools.fill_button: C.fill_holes(spoiled, 1, mode="3d"),
        w.tools.grow_button: C.grow_shrink(spoiled, 1, 2.0, spacing),
        w.tools.shrink_button: C.grow_shrink(spoiled, 1, -2.0, spacing),
        w.tools.relabel_button: C.relabel(spoiled, {1: 2}),
    }
    for button, edit in expected.items():
        n_hist = len(layer._undo_history)
        button.native.click()  # as a user pressing the button
        assert edit.n_changed > 0, button.text
        np.testing.assert_array_equal(layer.data, edit.apply(spoiled), err_msg=button.text)
        assert len(layer._undo_history) == n_hist + 1  # exactly one undo step
        layer.undo()  # Ctrl+Z
        np.testing.assert_array_equal(layer.data, spoiled, err_msg=button.text)
    # interpolation between slices drawn by hand (every 3rd slice of the real mask)
    drawn = spoiled.copy()
    drawn[np.arange(drawn.shape[0]) % 3 != 0] = 0
    layer.data = drawn.copy()
    viewer.dims.ndisplay = 2
    assert w.slice_axis(layer) == 0
    w.tools.interp_button.native.click()
    filled = np.asarray(layer.data)
    gap = np.arange(drawn.shape[0]) % 3 != 0
    a, b = filled[gap] == 1, C.keep_largest_component(spoiled, 1).apply(spoiled)[gap] == 1
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8
    layer.undo()
    np.testing.assert_array_equal(layer.data, drawn)


def test_volume_table_follows_edits_and_undo(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    _, layer, w = _setup(viewer, tmp_path)
    # only segmentation models can be fine-tuned on masks (not detectors or click models)
    names = [label for label, _ in w.training.model_choices()]
    assert names and not any("det_2d" in n or "click_refine" in n for n in names)
    n0 = int((np.asarray(layer.data) == 1).sum())
    vols = w.volumes()
    assert vols[1]["voxels"] == n0
    assert vols[1]["mm3"] == pytest.approx(n0 * 0.7949219**2 * 5.0, rel=1e-4)
    assert w.table.data[0][:3] == [1, "spleen", n0]
    w.label_id.value = 1
    w.tools.grow_button.native.click()
    n1 = w.volumes()[1]["voxels"]
    assert n1 == int((np.asarray(layer.data) == 1).sum()) > n0
    layer.undo()
    qtbot.waitUntil(lambda: w.volumes()[1]["voxels"] == n0, timeout=5000)
    assert w.table.data[0][2] == n0
    # a brush stroke with napari's own painting (a masked paint atom in the history)
    layer.brush_size = 5
    layer.selected_label = 3
    assert w.label_id.value == 3
    zs = np.nonzero(np.asarray(layer.data).reshape(layer.data.shape[0], -1).any(axis=1))[0]
    layer.paint((int(zs[0]), 80, 80), 3)
    data = np.asarray(layer.data)
    assert w.volumes()[3]["voxels"] == int((data == 3).sum()) > 0
    assert w.volumes()[1]["voxels"] == int((data == 1).sum())
    assert [row[0] for row in w.table.data] == [1, 3]


def test_edit_signature_falls_back_to_class_counts(make_napari_viewer, tmp_path):
    """Undo/redo detection does not depend on napari's private history queues."""
    from types import SimpleNamespace

    from napari_medseg.widgets.correct.session import edit_signature

    viewer = make_napari_viewer()
    _, layer, _w = _setup(viewer, tmp_path)
    assert edit_signature(layer) == edit_signature(layer)
    data = np.zeros((4, 9, 9), np.uint8)
    fake = SimpleNamespace(data=data)  # a layer-like object without _undo_history
    before = edit_signature(fake)
    assert edit_signature(fake) == before
    data[1, 2:4, 2:4] = 2  # what an undo/redo does: change voxels in place, no event
    assert edit_signature(fake) != before


def test_save_twice_gives_two_versions_with_provenance(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    image, layer, w = _setup(viewer, tmp_path)
    w.saving.save_button.native.click()
    _spoil(layer)
    w.tools.largest_button.native.click()
    w.saving.save_button.native.click()
    stem = "CT_abdomen_seg"
    v1, v2 = tmp_path / f"{stem}.v001.nii.gz", tmp_path / f"{stem}.v002.nii.gz"
    assert v1.exists() and v2.exists()
    p1 = json.loads((tmp_path / f"{stem}.v001.provenance.json").read_text())
    p2 = json.loads((tmp_path / f"{stem}.v002.provenance.json").read_text())
    assert p1["model"]["weights_sha256"] == "cd" * 32
    assert p1["classes"]["1"]["dice"] == 1.0 and p1["classes"]["1"]["added"] == 0
    assert p2["classes"]["1"]["removed"] == 16  # the hole
    assert p2["classes"]["1"]["dice"] < 1.0
    assert p2["editing"]["tools"] == ["Keep largest component"]
    assert p2["source_image"]["sha256"] and p2["previous_version"] == v1.name
    # the saved file lies on the scan's grid
    from napari_medseg.io import read_image

    (back,) = read_image(v2)
    (src,) = read_image(image.metadata["medseg"]["path"])
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-4)
    assert back.shape == src.shape


def test_autosave_then_reopen_offers_restore(make_napari_viewer, tmp_path, monkeypatch):
    from napari_medseg.core.correct.mask_store import find_recovery

    viewer = make_napari_viewer()
    image, layer, w = _setup(viewer, tmp_path)
    assert w.autosave() == []  # nothing edited yet: nothing written
    spoiled = _spoil(layer)
    assert len(w.autosave()) == 1
    assert find_recovery(image.metadata["medseg"]["path"], layer.name) is not None
    # napari dies; later the image is opened again with the dock open
    viewer.layers.clear()
    asked = []
    monkeypatch.setattr(
        type(w.recovery), "ask_restore", lambda self, msg: asked.append(msg) or True
    )
    viewer.open_sample("napari-medseg", "ct")
    assert asked and "Unsaved corrections" in asked[0]
    restored = viewer.layers["CT abdomen_seg"]
    np.testing.assert_array_equal(restored.data, spoiled)
    np.testing.assert_allclose(restored.affine.affine_matrix, layer.affine.affine_matrix)
    # saving clears the recovery file
    assert w.labels.value is restored
    w.saving.save_button.native.click()
    assert find_recovery(image.metadata["medseg"]["path"], restored.name) is None


def test_every_edited_layer_is_autosaved_and_recovered_per_layer(
    make_napari_viewer, tmp_path, monkeypatch
):
    """Edit A, switch to B and edit it: both autosaved; saving B keeps A's autosave."""
    from napari_medseg.core.correct.mask_store import find_recoveries, find_recovery

    viewer = make_napari_viewer()
    image, a, w = _setup(viewer, tmp_path)
    src = image.metadata["medseg"]["path"]
    spoiled = _spoil(a)  # edits of A, the layer the dock is on
    b = viewer.add_labels(np.zeros(a.data.shape, np.uint8), name="liver", affine=a.affine)
    assert w.labels.value is b and w.bound is b and w.image.value is image  # dock follows B
    zs = np.nonzero(spoiled.reshape(spoiled.shape[0], -1).any(axis=1))[0]
    b.brush_size = 7
    b.paint((int(zs[0]), 100, 100), 4)  # a brush stroke on B
    painted_b = np.array(b.data, copy=True)
    assert (painted_b == 4).sum() > 0
    a.data_setitem((np.array([1]), np.array([1]), np.array([1])), 2)  # A edited while on B
    spoiled[1, 1, 1] = 2
    assert len(w.autosave()) == 2  # both edited layers, not only the one in the dock
    assert sorted(r.layer for r in find_recoveries(src)) == ["CT abdomen_seg", "liver"]
    np.testing.assert_array_equal(find_recovery(src, a.name).labels, spoiled)
    np.testing.assert_array_equal(find_recovery(src, "liver").labels, painted_b)
    w.saving.save_button.native.click()  # saves B, the layer in the dock
    assert (tmp_path / "liver.v001.nii.gz").is_file()
    assert find_recovery(src, "liver") is None
    kept = find_recovery(src, a.name)  # A is unsaved: its autosave stays
    assert kept is not None
    np.testing.assert_array_equal(kept.labels, spoiled)
    assert w.autosave() == []  # nothing changed since
    # napari dies; the image is opened again: A (only A) is offered back, under its name
    viewer.layers.clear()
    asked = []
    monkeypatch.setattr(
        type(w.recovery), "ask_restore", lambda self, msg: asked.append(msg) or True
    )
    viewer.open_sample("napari-medseg", "ct")
    assert len(asked) == 1 and "CT abdomen_seg" in asked[0] and "liver" not in asked[0]
    assert [lyr.name for lyr in viewer.layers] == ["CT abdomen", "CT abdomen_seg"]
    np.testing.assert_array_equal(viewer.layers["CT abdomen_seg"].data, spoiled)


def test_mask_is_fsynced_before_its_autosave_is_deleted(make_napari_viewer, tmp_path, monkeypatch):
    import os
    from pathlib import Path

    from napari_medseg.core.correct.mask_store import recovery_path

    viewer = make_napari_viewer()
    image, layer, w = _setup(viewer, tmp_path)
    _spoil(layer)
    (auto,) = w.autosave()
    assert auto == recovery_path(image.metadata["medseg"]["path"], layer.name)
    events = []
    real_fsync, real_unlink = os.fsync, Path.unlink

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def unlink(self, *a, **k):
        events.append(("unlink", str(self)))
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "unlink", unlink)
    w.saving.save_button.native.click()
    monkeypatch.undo()
    mask = tmp_path / "CT_abdomen_seg.v001.nii.gz"
    assert mask.is_file() and not auto.exists()
    gone = events.index(("unlink", str(auto)))
    assert ("fsync", mask.stat().st_ino) in events[:gone]  # the mask's bytes are on disk
    assert ("fsync", tmp_path.stat().st_ino) in events[:gone]  # and its name


def test_worklist_next_case_save_and_approve(make_napari_viewer, tmp_path):
    from napari_medseg.core.correct.worklist import Worklist
    from napari_medseg.widgets.correct import CorrectWidget

    sc = "mri/spinal_cord/"
    wl = Worklist.create(
        tmp_path / "proj",
        [data_path(sc + "t2.nii.gz"), data_path(sc + "t1w.nii.gz")],
        {
            "t2": data_path(sc + "t2_seg-manual.nii.gz"),
            "t1w": data_path(sc + "t1w_seg-manual.nii.gz"),
        },
    )
    viewer = make_napari_viewer()
    w = CorrectWidget(viewer)
    viewer.window.add_dock_widget(w, name="Correct & Train")
    w.cases.project.value = str(wl.folder)
    assert w.cases.cases_table.data[0] == ["t1w", "to do", 0]
    w.cases.next_button.native.click()
    assert w.cases.current[0] == "t1w"
    img, lab = viewer.layers["t1w"], viewer.layers["t1w_seg"]
    assert w.labels.value is lab and w.image.value is img
    assert lab.data.shape == img.data.shape
    pred = w.edits(lab).prediction
    np.testing.assert_array_equal(pred, lab.data)  # the prediction, in layer axis order
    w.label_id.value = 1
    w.tools.margin.value = 1.0
    w.tools.grow_button.native.click()
    w.saving.save_button.native.click()
    case = wl.case("t1w")
    assert case.status == "corrected" and [p.name for p in case.corrected] == ["t1w.v001.nii.gz"]
    path = case.corrected[0]
    info = json.loads(path.with_name("t1w.v001.provenance.json").read_text())
    assert info["classes"]["1"]["added"] > 0 and info["classes"]["1"]["removed"] == 0
    assert w.cases.cases_table.data[0] == ["t1w", "corrected", 1]
    w.cases.approve_button.native.click()
    assert wl.case("t1w").status == "approved"
    w.cases.next_button.native.click()
    assert w.cases.current[0] == "t2"
    assert "t1w" not in viewer.layers and "t1w_seg" not in viewer.layers
    assert [lyr.name for lyr in viewer.layers] == ["t2", "t2_seg"]
    w.cases.next_button.native.click()  # no other case left to do: t2 stays open
    assert w.cases.current[0] == "t2" and "done" in w.status.value


def test_status_not_saved_after_mask_saved_is_said(make_napari_viewer, tmp_path):
    """The mask is saved but the worklist status cannot be written: the dock says exactly that."""
    from napari_medseg.core.correct.mask_store import find_recovery
    from napari_medseg.core.correct.worklist import Worklist
    from napari_medseg.widgets.correct import CorrectWidget

    sc = "mri/spinal_cord/"
    wl = Worklist.create(
        tmp_path / "proj",
        [data_path(sc + "t2.nii.gz")],
        {"t2": data_path(sc + "t2_seg-manual.nii.gz")},
    )
    viewer = make_napari_viewer()
    w = CorrectWidget(viewer)
    viewer.window.add_dock_widget(w, name="Correct & Train")
    w.cases.project.value = str(wl.folder)
    w.cases.next_button.native.click()
    lab = viewer.layers["t2_seg"]
    w.tools.grow_button.native.click()
    assert len(w.autosave()) == 1
    src = str(wl.folder / "images" / "t2.nii.gz")
    assert find_recovery(src, "t2_seg") is not None
    wl.lock_path.mkdir()  # status.json cannot be locked, so it cannot be written
    w.saving.save_button.native.click()
    saved = wl.folder / "corrected" / "t2.v001.nii.gz"
    assert saved.is_file()
    assert w.status.value.startswith("Saved t2.v001.nii.gz in "), w.status.value
    assert "the case status was not updated" in w.status.value
    assert "Not saved" not in w.status.value
    assert find_recovery(src, "t2_seg") is None  # the mask is safe on disk
    assert not w.edits(lab).unsaved
    assert w.cases.cases_table.data[0] == ["t2", "to do", 1]


def test_clicks_refine_as_one_undo_step_with_shortcuts(make_napari_viewer, tmp_path):
    from app_model.types import KeyBinding

    viewer = make_napari_viewer()
    _, layer, w = _setup(viewer, tmp_path)
    assert w.clicks.click_method.value == "random_walker"  # the default: best on CT/MR (clicks.md)
    truth = np.array(layer.data, copy=True)
    zs = np.nonzero(truth.reshape(truth.shape[0], -1).any(axis=1))[0]
    k = int(zs[len(zs) // 2])  # layer axis 0 is the slider (S)
    cut = truth.copy()
    ys = np.nonzero(truth[k] == 1)[0]
    cut[k][int(np.median(ys)) :] = 0  # the model missed half the spleen in this slice
    layer.data = cut.copy()  # (napari edits the array it is given in place)
    pts = w.clicks.clicks_layer()
    assert pts.ndim == 3 and KeyBinding.from_str("T") in pts.keymap
    assert KeyBinding.from_str("R") in pts.keymap
    from napari_medseg.core.correct.refine import simulate_click

    assert w.clicks.toggle_sign() == "negative" and pts.feature_defaults["sign"][0] == "negative"
    w.clicks.toggle_sign()
    for _ in range(3):  # three rounds: click where the mask is most wrong, press Refine
        cur = np.array(layer.data, copy=True)
        c = simulate_click(truth[k : k + 1] == 1, cur[k : k + 1] == 1)
        assert c is not None
        if (w.clicks.click_sign.value == "positive") != c[1]:
            w.clicks.toggle_sign()
        click = c[0].astype(float)
        click[0] = k
        pts.add(click)  # placed as the user would place it
        n_hist = len(layer._undo_history)
        w.clicks.refine_button.native.click()
        assert "voxels changed" in w.status.value
        assert len(layer._undo_history) == n_hist + 1  # one undo step per refinement
    assert "positive" in list(pts.features["sign"])
    out = np.array(layer.data, copy=True)

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    # measured: 0.658 -> 0.80 after three clicks (model-free random walker on CT)
    assert dice(out[k] == 1, truth[k] == 1) > dice(cut[k] == 1, truth[k] == 1) + 0.08
    others = np.arange(out.shape[0]) != k
    np.testing.assert_array_equal(out[others], cut[others])
    layer.undo()
    np.testing.assert_array_equal(layer.data, cur)  # Ctrl+Z takes back the last refinement
    w.clicks.clear_clicks()
    assert len(pts.data) == 0


def test_learned_click_model_from_the_dock_on_held_out_nuclei(make_napari_viewer, tmp_path):
    """The learned click model, chosen in the dock, on a DSB crop it never saw in training."""
    import tifffile

    from napari_medseg.core.correct.refine import simulate_click
    from napari_medseg.widgets.correct import CorrectWidget

    img = tifffile.imread(data_path("microscopy/dsb2018_nuclei/image.tif"))[5:122, 260:361]
    truth = tifffile.imread(data_path("microscopy/dsb2018_nuclei/mask.tif"))[5:122, 260:361] > 0
    start = truth.copy()
    from scipy import ndimage as ndi

    lab, n = ndi.label(truth)
    start[np.isin(lab, np.arange(1, n + 1, 2))] = False  # the model missed every other nucleus
    viewer = make_napari_viewer()
    image = viewer.add_image(img, name="nuclei")
    layer = viewer.add_labels(start.astype(np.uint8), name="nuclei_seg")
    w = CorrectWidget(viewer)
    viewer.window.add_dock_widget(w, name="Correct & Train")
    w.saving.save_dir.value = str(tmp_path)
    assert w.labels.value is layer and w.image.value is image
    w.clicks.click_method.value = "learned"
    w.label_id.value = 1
    pts = w.clicks.clicks_layer(create=True)
    for _ in range(3):
        c = simulate_click(truth, np.asarray(layer.data) == 1)
        if (w.clicks.click_sign.value == "positive") != c[1]:
            w.clicks.toggle_sign()
        pts.add(c[0].astype(float))
        w.clicks.refine_button.native.click()
        assert "voxels changed" in w.status.value, w.status.value

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    before, after = dice(start, truth), dice(np.asarray(layer.data) == 1, truth)
    print(f"learned clicks in the dock: Dice {before:.3f} -> {after:.3f}")
    assert after > before + 0.05
    # the reach set in the dock bounds the change: nothing farther than 6 px from the click
    w.clicks.clear_clicks()
    w.clicks.click_method.value = "random_walker"
    w.clicks.reach.value = 6.0
    cur = np.asarray(layer.data).copy()
    c = simulate_click(truth, cur == 1)
    if (w.clicks.click_sign.value == "positive") != c[1]:
        w.clicks.toggle_sign()
    pts.add(c[0].astype(float))
    w.clicks.refine_button.native.click()
    changed = np.argwhere(np.asarray(layer.data) != cur)
    assert len(changed) and np.hypot(*(changed - c[0]).T).max() <= 6.0 + 1e-6


def test_train_on_corrections_in_background_and_cancel(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    import time

    from napari_medseg.models.card import ModelCard
    from napari_medseg.widgets.correct import CorrectWidget
    from tests.training.test_from_corrections import corrected_worklist, tiny_cord_model

    models = tmp_path / "models"
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(models))
    parent = tiny_cord_model(models / "tiny_cord")
    wl = corrected_worklist(tmp_path / "proj", names=("t2", "t1w"))
    viewer = make_napari_viewer()
    w = CorrectWidget(viewer)
    viewer.window.add_dock_widget(w, name="Correct & Train")
    w.cases.project.value = str(wl.folder)
    w.training.model.reset_choices()
    w.training.model.value = str(parent)
    # Cancel: stops between two steps, writes no model
    w.training.train_minutes.value = 5.0
    w.training.train_button.native.click()
    assert w.training.train_cancel.enabled and not w.training.train_button.enabled
    qtbot.waitUntil(
        lambda: (
            "iteration" in w.training.train_info.value
            or "loss" in w.training.train_info.value
            or "epoch" in w.training.train_info.value
        ),
        timeout=60_000,
    )
    t0 = time.perf_counter()
    w.training.train_cancel.native.click()
    qtbot.waitUntil(lambda: w.training.job.worker is None, timeout=10_000)
    assert time.perf_counter() - t0 < 2.0
    assert "cancelled" in w.status.value
    assert sorted(p.name for p in models.iterdir()) == ["tiny_cord"]
    # a short run writes a new version beside the parent
    w.training.train_minutes.value = 0.06
    w.training.train_button.native.click()
    qtbot.waitUntil(lambda: w.training.job.worker is None, timeout=120_000)
    assert w.status.value.startswith("New model"), w.status.value
    new = [p for p in models.iterdir() if p.name != "tiny_cord"]
    assert len(new) == 1 and ModelCard.load(new[0]).parent == "tiny_cord@1"
    assert "loss" in w.training.train_info.value or "saving" in w.training.train_info.value
    # the live plot got the per-step losses and one held-out Dice per epoch, and draws them
    # (a loaded 2-core machine fits one step in 3.6 s: the warm-up and validation take the rest)
    assert len(w.training.train_plot.values) >= 1
    assert w.training.train_plot.scores and all(
        0.0 <= s <= 1.0 for _, s in w.training.train_plot.scores
    )
    w.training.train_plot.repaint()
    assert str(new[0]) in [c[1] for c in w.training.model_choices()]


_NAPARI_CHILD = """
import sys, time
import numpy as np
import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication
from napari_medseg.widgets.correct import CorrectWidget

viewer = napari.Viewer(show=False)
(image,) = viewer.open_sample("napari-medseg", "ct")
layers = [
    viewer.add_labels(
        np.zeros(image.data.shape, np.uint8), name=name,
        affine=image.affine.affine_matrix, metadata={"medseg": image.metadata["medseg"]},
    )
    for name in ("CT abdomen_seg", "CT abdomen_liver")
]
w = CorrectWidget(viewer, autosave_ms=500)
assert w.bound is layers[1]  # the dock is on the second layer; the first is edited too
n = [0]

def edit():  # one brush stroke every 20 ms on each layer: the next 50 voxels become 1 / 2
    idx = np.unravel_index(np.arange(n[0] * 50, n[0] * 50 + 50), layers[0].data.shape)
    for value, layer in enumerate(layers, start=1):
        layer.data_setitem(idx, value)
    n[0] += 1

def autosave():
    if len(w.autosave()) == 2:
        print(f"saved {n[0]} {time.time():.3f}", flush=True)

w.recovery.timer.timeout.disconnect()
w.recovery.timer.timeout.connect(autosave)
timer = QTimer()
timer.timeout.connect(edit)
timer.start(20)
QApplication.instance().exec()
"""


def test_kill_9_napari_mid_edit_loses_at_most_one_autosave(tmp_path):
    """A real napari process with the dock, painting two Labels layers of one scan (only one
    of them chosen in the dock), autosaving every 0.5 s, killed -9: both are recoverable."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from napari_medseg.core.correct.mask_store import find_recoveries, find_recovery
    from napari_medseg.io.napari_io import sample_ct

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "MEDSEG_RECOVERY_DIR": str(tmp_path / "rec")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _NAPARI_CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen = []
    try:
        while len(seen) < 3:
            line = proc.stdout.readline()
            if not line:
                proc.kill()
                raise AssertionError(
                    "the napari process died before autosaving: " + proc.stderr.read()[-3000:]
                )
            seen.append(line.split())
        time.sleep(0.3)  # mid-interval, while painting
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    source = sample_ct()[0][1]["metadata"]["medseg"]["path"]
    root = tmp_path / "rec"
    assert sorted(r.layer for r in find_recoveries(source, root=root)) == [
        "CT abdomen_liver",
        "CT abdomen_seg",
    ]
    for value, name in enumerate(("CT abdomen_seg", "CT abdomen_liver"), start=1):
        r = find_recovery(source, name, root=root)
        assert r is not None and r.meta["layer"] == name
        strokes = int(r.meta["edits"])
        assert strokes >= int(seen[-1][1])
        flat = r.labels.reshape(-1)
        assert (flat[: strokes * 50] == value).all() and not flat[strokes * 50 :].any()
        assert killed_at - r.saved_at <= 0.5 + 0.5  # one interval (+ slack for a busy machine)


def test_segment_again_keeps_brush_edits_and_replaces_as_one_undo_step(
    make_napari_viewer, qtbot, tmp_path
):
    """Run Segment, run it again (one undo step), edit, run again: the edits are kept."""
    from napari_medseg.widgets.correct import CorrectWidget
    from napari_medseg.widgets.segment import SegmentWidget
    from tests.helpers import save_tiny_model

    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "ct")
    seg = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment")
    w = CorrectWidget(viewer)
    viewer.window.add_dock_widget(w, name="Correct & Train")
    model_a = str(save_tiny_model(tmp_path / "tiny_a", seed=0, patch=(32, 32, 8)))
    model_b = str(save_tiny_model(tmp_path / "tiny_b", seed=1, patch=(32, 32, 8)))
    seg.add_model_path(model_b)
    seg.add_model_path(model_a)
    seg.overlap.value = 0.0  # fewer windows: a quick run

    def run():
        seg.run_button.native.click()
        assert not seg.run_button.enabled  # running
        qtbot.waitUntil(lambda: seg.run_button.enabled, timeout=120_000)
        assert seg.status.value.startswith("Done"), seg.status.value

    run()
    layer = viewer.layers["CT abdomen_seg"]
    first = np.array(layer.data, copy=True)
    assert w.bound is layer and not w.edits(layer).unsaved
    # again, another model: a different result, written into the unedited layer as one undo step
    seg.model.value = model_b
    run()
    assert viewer.layers["CT abdomen_seg"] is layer and len(viewer.layers) == 2
    second = np.array(layer.data, copy=True)
    assert (second != first).any()
    assert len(layer._undo_history) == 1
    st = w.edits(layer)
    assert not st.unsaved and st.edits == 0  # a model run, not a correction
    np.testing.assert_array_equal(st.prediction, second)
    layer.undo()  # Ctrl+Z: the first result is back
    np.testing.assert_array_equal(layer.data, first)
    layer.redo()
    # the user corrects the mask with the brush, then presses Run again
    layer.brush_size = 9
    layer.paint((int(layer.data.shape[0]) // 2, 60, 60), 3)
    edited = np.array(layer.data, copy=True)
    assert (edited != second).any() and w.edits(layer).unsaved
    seg.model.value = model_a
    run()
    np.testing.assert_array_equal(viewer.layers["CT abdomen_seg"].data, edited)  # untouched
    new = viewer.layers[-1]
    assert new is not layer and new.name.startswith("CT abdomen_seg")
    np.testing.assert_array_equal(new.data, first)  # the same model as run 1
    assert "Kept your edited CT abdomen_seg" in seg.status.value and new.name in seg.status.value


def test_lazy_multiscale_labels_are_left_alone(make_napari_viewer, tmp_path):
    """A whole-slide result (multiscale, lazy) is neither copied, counted nor autosaved."""
    import dask.array as da

    from napari_medseg.widgets.correct import CorrectWidget

    viewer = make_napari_viewer()
    w = CorrectWidget(viewer)
    viewer.window.add_dock_widget(w, name="Correct & Train")
    levels = [
        da.ones((4096, 4096), dtype=np.uint8, chunks=512),
        da.ones((2048, 2048), dtype=np.uint8),
    ]
    meta = {"medseg": {"provenance": PROV}}
    layer = viewer.add_labels(levels, multiscale=True, name="slide_seg", metadata=meta)
    assert w.bound is layer
    assert "cannot be corrected here" in w.status.value
    assert w.volumes() == {} and list(w.table.data) == []
    assert layer not in w.watched_layers() and w.edits(layer).prediction is None
    assert w.autosave() == []
    w.tools.largest_button.native.click()  # says why, changes nothing
    assert "single-resolution" in w.status.value or "cannot be corrected" in w.status.value
