"""Learned click refinement (built-in ``click_refine_2d``) on real held-out crops.

Covers the click-map encoding, Dice gains on held-out data the model never saw, the
"a click only changes what is within reach" guarantee, clear errors for bad models, and a tiny
training run that lowers its loss.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from napari_medseg.core.correct.refine import (
    click_maps,
    click_model_input,
    load_click_model,
    refine_with_clicks,
    simulate_session,
)
from napari_medseg.errors import MedsegError
from napari_medseg.models.registry import builtin_models_dir
from napari_medseg.training.clicks import (
    DSB_HELD_OUT,
    ClickCase,
    imperfect_mask,
    train_clicks,
)
from tests.conftest import data_path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def nuclei_held_out():
    """A held-out DSB tile (r000_c256), cropped to an awkward 117x101."""
    import tifffile

    img = tifffile.imread(str(data_path("microscopy/dsb2018_nuclei/image.tif")))
    mask = tifffile.imread(str(data_path("microscopy/dsb2018_nuclei/mask.tif")))
    return img[5:122, 260:361].astype(np.float32), mask[5:122, 260:361] > 0


@pytest.fixture(scope="module")
def cord_t2():
    """The held-out T2 spinal-cord MRI (PSR, 1 mm), a 33x34x35 crop around the cord."""
    import nibabel as nib

    img = np.asarray(nib.load(str(data_path("mri/spinal_cord/t2.nii.gz"))).dataobj)
    seg = np.asarray(nib.load(str(data_path("mri/spinal_cord/t2_seg-manual.nii.gz"))).dataobj)
    box = (slice(14, 47), slice(10, 44), slice(8, 43))
    return img[box].astype(np.float32), (seg[box] > 0).astype(np.uint8)


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_click_maps_encode_clicks_as_gaussians():
    m = click_maps((33, 34), positive=[(10, 20), (30, 3)], negative=[(5.5, 7)], sigma=2.0)
    assert m.shape == (2, 33, 34) and m.dtype == np.float32
    assert m[0, 10, 20] == pytest.approx(1.0) and m[0, 30, 3] == pytest.approx(1.0)
    assert m[0, 11, 20] == pytest.approx(np.exp(-1 / 8), rel=1e-5)
    assert m[0, 10, 22] == pytest.approx(np.exp(-4 / 8), rel=1e-5)
    assert m[1, 5, 7] == pytest.approx(np.exp(-0.25 / 8), rel=1e-5)  # fractional click
    assert m[0].max() <= 1.0 and m[0, 0, 0] < 1e-6 and m[1, 30, 30] < 1e-6
    empty = click_maps((33, 34))
    assert not empty.any()
    x = click_model_input(np.full((33, 34), 0.5), np.eye(33, 34, dtype=bool), [(10, 20)], [])
    assert x.shape == (4, 33, 34)
    assert x[0].max() == 0.5 and x[1, 3, 3] == 1 and x[1, 3, 4] == 0
    assert np.array_equal(x[2], m[0] * 0 + click_maps((33, 34), [(10, 20)])[0])
    assert not x[3].any()


def test_builtin_card_is_demo_grade_and_holds_out_the_nuclei_tiles():
    folder = builtin_models_dir() / "click_refine_2d"
    card = json.loads((folder / "model.json").read_text())
    assert (folder / card["weights"]).stat().st_size < 2_000_000
    assert card["in_channels"] == 4 and card["dims"] == 2
    assert card["extra"]["interactive"] == "clicks"
    assert "demo" in card["description"]
    held = card["metrics"]["held_out_clicks"]
    assert {"nuclei", "spinal cord"} <= set(held)
    fluo = json.loads((builtin_models_dir() / "fluo_nuclei_2d" / "model.json").read_text())
    assert sorted(fluo["training"]["val_cases"]) == sorted(DSB_HELD_OUT)


def test_learned_clicks_improve_a_held_out_nuclei_crop(nuclei_held_out):
    img, truth = nuclei_held_out
    model = load_click_model()
    start = imperfect_mask(truth, "missing", 0.5)
    dice, secs = simulate_session(img, truth, start, 3, method="learned", model=model)
    print(f"nuclei held-out crop: Dice {dice}, s/click {np.round(secs, 3)}")
    assert dice[0] < 0.8
    assert dice[3] > dice[0] + 0.05  # measured: see docs/clicks.md
    grown = imperfect_mask(truth, "grown", 2)
    dice_g, _ = simulate_session(img, truth, grown, 3, method="learned", model=model)
    assert dice_g[3] > dice_g[0] + 0.005


def test_learned_clicks_improve_held_out_cord_slices(cord_t2):
    img, lab = cord_t2
    model = load_click_model()
    gains = []
    for k in (5, 15, 25):  # axial slices (axis 1 is S in PSR)
        sl_img, truth = img[:, k], lab[:, k] == 1
        start = imperfect_mask(truth, "shrunk", 2)
        dice, _ = simulate_session(sl_img, truth, start, 3, method="learned", model=model)
        gains.append(dice[3] - dice[0])
    print("cord held-out gains after 3 clicks", np.round(gains, 3))
    assert np.mean(gains) > 0.05


def test_learned_refinement_keeps_the_reach_guarantee(cord_t2):
    img, lab = cord_t2
    model = load_click_model()
    k = 17
    sp = (1.0, 1.0, 1.0)
    cur = lab.copy()
    cur[:, k] = 0  # the structure is missing in slice k (axis 1)
    cur[0:3, k, 0:3] = 2  # another class there stays
    rows, cols = np.nonzero(lab[:, k] == 1)
    click = np.array([rows.mean(), k, cols.mean()])
    reach = 6.0
    t0 = time.perf_counter()
    e = refine_with_clicks(
        img, cur, 1, [click], [], sp, axis=1, method="learned", model=model, reach=reach
    )
    print(f"learned refine of a 33x35 slice: {1000 * (time.perf_counter() - t0):.0f} ms")
    out = e.apply(cur)
    assert e.n_changed > 10
    changed = out != cur
    assert not changed[:, :k].any() and not changed[:, k + 1 :].any()  # only the click's slice
    assert (out[changed] == 1).all() and (cur[changed] == 0).all()  # a positive click only adds
    idx = np.argwhere(changed)
    assert (np.linalg.norm(idx - click, axis=1) <= reach + 1e-6).all()
    assert (out[0:3, k, 0:3] == 2).all()
    assert _dice(out[:, k] == 1, lab[:, k] == 1) > 0.5
    # a negative click on a false region only removes, within reach
    cur2 = lab.copy()
    cur2[20:30, k, 0:8] = 1  # a false blob away from the cord
    neg = np.array([25.0, k, 3.0])
    e2 = refine_with_clicks(
        img, cur2, 1, [], [neg], sp, axis=1, method="learned", model=model, reach=reach
    )
    out2 = e2.apply(cur2)
    ch2 = out2 != cur2
    assert ch2.any() and (out2[ch2] == 0).all() and (cur2[ch2] == 1).all()
    assert (np.linalg.norm(np.argwhere(ch2) - neg, axis=1) <= reach + 1e-6).all()
    assert (out2[lab == 1] == 1).all()  # the true cord further away is untouched


def test_bad_models_and_methods_fail_with_one_clear_sentence(cord_t2):
    img, lab = cord_t2
    with pytest.raises(MedsegError, match="no model named"):
        load_click_model("no_such_click_model")
    with pytest.raises(MedsegError, match="not a click-refinement model"):
        load_click_model("fluo_nuclei_2d")
    with pytest.raises(MedsegError, match="registry name"):
        load_click_model(42)
    click = [[16.0, 17.0, 17.0]]
    with pytest.raises(MedsegError, match="unknown refinement method"):
        refine_with_clicks(img, lab, 1, click, method="magic")
    with pytest.raises(MedsegError, match="2D slices"):
        refine_with_clicks(img, lab, 1, click, method="learned", mode="3d")
    with pytest.raises(MedsegError, match="not a click-refinement model"):
        refine_with_clicks(img, lab, 1, click, method="learned", model="ct_spleen_3d")
    with pytest.raises(MedsegError, match="2D image and mask"):
        click_model_input(np.zeros((5, 6)), np.zeros((5, 7), bool))


def test_tiny_training_lowers_the_loss_and_writes_a_loadable_model(tmp_path, nuclei_held_out):
    import tifffile

    img = tifffile.imread(str(data_path("microscopy/dsb2018_nuclei/image.tif")))
    mask = tifffile.imread(str(data_path("microscopy/dsb2018_nuclei/mask.tif"))) > 0
    cases = [
        ClickCase("a", img[300:345, 10:57].astype(np.float32), mask[300:345, 10:57], "nuclei"),
        ClickCase("b", img[400:441, 100:150].astype(np.float32), mask[400:441, 100:150], "nuclei"),
    ]
    h_img, h_truth = nuclei_held_out
    held = [ClickCase("held", h_img[:40, :45], h_truth[:40, :45], "nuclei")]
    t0 = time.monotonic()
    gen = train_clicks(
        cases,
        tmp_path / "tiny_clicks",
        held_out=held,
        time_budget=None,
        max_iterations=60,
        patch=32,
        batch_size=6,
        max_clicks=2,
        channels=(8, 16),
        num_res_units=0,
        lr=1e-2,
    )
    from napari_medseg.progress import run_sync

    res = run_sync(gen)
    print(f"tiny training: {time.monotonic() - t0:.1f} s")
    losses = np.array(res.losses)
    assert len(losses) == 60
    assert losses[-15:].mean() < losses[:15].mean() - 0.05
    assert res.card.metrics["held_out_clicks"]["nuclei"]["n_sessions"] >= 3
    loaded = load_click_model(tmp_path / "tiny_clicks")
    assert loaded.card.extra["interactive"] == "clicks"
    e = refine_with_clicks(
        h_img, h_truth.astype(np.uint8), 1, [(20, 20)], method="learned", model=loaded
    )
    assert e.n_changed >= 0
