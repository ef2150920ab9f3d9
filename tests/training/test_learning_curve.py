"""The case building of ``benchmarks/bench_learning_curve.py`` on the real data (no training).

Checks what the learning-curve numbers rest on: the crop counts, that no evaluation case is
ever in the training pool (and, for the cord, that pool slices are far from evaluation slices
in scanner mm), binary masks, and that the cord slices keep image and mask together in the
orientation of the scan (compared with nibabel's own reorientation of the files); and the
click-correction helper of ``--corrections clicks`` (simulated clicks, 2D random walker) on one
real tile.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))

pytestmark = pytest.mark.skipif(
    not (DATA / "microscopy/dsb2018_nuclei/image.tif").exists()
    or not (DATA / "mri/spinal_cord/t2.nii.gz").exists(),
    reason=f"real test data (DSB nuclei, spinal cord MRI) not found under {DATA} (set MEDSEG_DATA)",
)


@pytest.fixture(scope="module")
def bench():
    path = REPO / "benchmarks" / "bench_learning_curve.py"
    spec = importlib.util.spec_from_file_location("bench_learning_curve", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass needs the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cord(bench):
    return bench.cord_slices(DATA)


def test_nuclei_tiles_and_split(bench, tmp_path):
    import tifffile

    from napari_medseg.training.dataset import list_cases, load_case

    ds = bench.nuclei_dataset(DATA, tmp_path)
    cases = list_cases(ds)
    names = [c for c, _, _ in cases]
    assert len(names) == 16
    ev, pool = bench.nuclei_split(names)
    assert len(ev) == 3 and len(pool) == 13
    assert not set(ev) & set(pool) and set(ev) | set(pool) == set(names)
    # the evaluation tiles are exactly those the built-in model never trained on
    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.registry import resolve_model

    card = ModelCard.load(resolve_model("fluo_nuclei_2d"))
    assert set(ev) == set(card.training["val_cases"])
    assert not set(ev) & set(card.training["train_cases"])
    image = tifffile.imread(str(DATA / "microscopy/dsb2018_nuclei/image.tif"))
    mask = tifffile.imread(str(DATA / "microscopy/dsb2018_nuclei/mask.tif"))
    n_fg = 0
    for name, imgs, lab in cases:
        case = load_case(name, imgs, lab)
        assert case.image.shape == (1, 128, 128) and case.label.shape == (128, 128)
        assert set(np.unique(case.label)) <= {0, 1}
        r, c = int(name[5:8]), int(name[10:13])  # dsb_r<row>_c<col>
        np.testing.assert_array_equal(case.image[0], image[r : r + 128, c : c + 128])
        np.testing.assert_array_equal(case.label, mask[r : r + 128, c : c + 128] > 0)
        n_fg += int(case.label.sum())
    assert n_fg == int((mask > 0).sum())  # the 16 tiles cover the image exactly


def test_cord_slices_split(cord):
    ev, pool = cord
    assert len(ev) == 12 and len(pool) == 8
    for contrast in ("t2", "t1w"):
        assert sum(c.contrast == contrast for c in ev) == 6
        assert sum(c.contrast == contrast for c in pool) == 4
    assert not {c.name for c in ev} & {c.name for c in pool}
    assert len({c.name for c in ev + pool}) == 20
    # same subject in two contrasts: no pool slice near any evaluation slice, in scanner mm
    gap = min(abs(a.world_s_mm - b.world_s_mm) for a in ev for b in pool)
    assert gap >= 6.0
    for c in ev + pool:
        assert c.image.shape == c.label.shape and c.image.dtype == np.float32
        assert set(np.unique(c.label)) == {0, 1}
        assert 40 <= c.label.sum() <= 120  # a cord cross-section of about 7 x 10 mm at 1 mm


def test_cord_slices_orientation_matches_nibabel(cord):
    import nibabel as nib

    ev, pool = cord
    for contrast in ("t2", "t1w"):
        img = nib.as_closest_canonical(nib.load(str(DATA / f"mri/spinal_cord/{contrast}.nii.gz")))
        lab = nib.as_closest_canonical(
            nib.load(str(DATA / f"mri/spinal_cord/{contrast}_seg-manual.nii.gz"))
        )
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        vi, vl = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        for c in (s for s in ev + pool if s.contrast == contrast):
            np.testing.assert_array_equal(c.image, vi[:, :, c.k].astype(np.float32))
            np.testing.assert_array_equal(c.label, vl[:, :, c.k] > 0)
            assert c.world_s_mm == pytest.approx((img.affine @ [0, 0, c.k, 1])[2], abs=1e-3)
    # the cord is a T2-dark, T1-bright tube inside bright CSF (T2): image and mask belong together
    t2 = [c for c in ev if c.contrast == "t2"]
    ring_brighter = []
    from scipy import ndimage as ndi

    for c in t2:
        m = c.label > 0
        ring = ndi.binary_dilation(m, iterations=3) & ~m
        ring_brighter.append(c.image[ring].mean() > c.image[m].mean())
    assert all(ring_brighter)


def test_written_dataset_subset_and_order(bench, cord, tmp_path):
    from napari_medseg.training.dataset import load_dataset

    ev, pool = cord
    ds = bench.write_2d_dataset(ev + pool, tmp_path / "cord", "cord", "MR", "spinal_cord", "")
    loaded = load_dataset(ds)
    assert loaded.dims == 2 and loaded.labels == {0: "background", 1: "spinal_cord"}
    by_name = {c.name: c for c in loaded.cases}
    for c in ev + pool:
        np.testing.assert_array_equal(by_name[c.name].image[0], c.image)
        np.testing.assert_array_equal(by_name[c.name].label, c.label)
    names = [c.name for c in pool]
    orders = [bench.corrected_order(names, s) for s in range(3)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert len({tuple(o[:4]) for o in orders}) == 3  # the repeats correct different cases
    sub = bench.subset_dataset(ds, orders[0][:2], tmp_path / "sub")
    assert sorted(c.name for c in load_dataset(sub).cases) == sorted(orders[0][:2])
    assert not set(orders[0][:4]) & {c.name for c in ev}


def test_classical_baseline_scores(bench, tmp_path):
    ds = bench.nuclei_dataset(DATA, tmp_path)
    out = bench.evaluate_classical(ds, ["dsb_r000_c256"])
    assert 0.6 < out["dice"] <= 1.0  # Otsu separates bright nuclei well on fluorescence


def test_click_correction_improves_and_is_deterministic(bench, tmp_path):
    """The realistic-correction mode: a start with half the nuclei missing, 5 simulated clicks
    of the 2D random walker (no training). Closer to the truth, same result twice."""
    import tifffile

    from napari_medseg.training.clicks import imperfect_mask
    from napari_medseg.training.dataset import load_dataset

    ds = bench.nuclei_dataset(DATA, tmp_path)
    name = "dsb_r000_c256"  # a tile fluo_nuclei_2d held out
    ip, lp = bench.case_files(ds, name)
    image, truth = tifffile.imread(str(ip)), tifffile.imread(str(lp)) > 0
    start = imperfect_mask(truth, "missing", 0.5)  # deterministic: every other nucleus dropped
    mask, info = bench.click_correction(image, truth, start, n_clicks=5)
    assert mask.shape == truth.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert len(info["dice"]) == 6 and len(info["clicks"]) == 5
    assert info["dice"][0] == pytest.approx(bench._dice(start, truth))
    assert info["dice"][-1] == pytest.approx(bench._dice(mask, truth))
    assert info["dice"][-1] > info["dice"][0] + 0.1  # 0.589 -> 0.882 when written
    # the first click lands on a missing nucleus: positive, inside the truth, outside the start
    r, c, positive = info["clicks"][0]
    assert positive and truth[r, c] and not start[r, c]
    again, info2 = bench.click_correction(image, truth, start, n_clicks=5)
    np.testing.assert_array_equal(again, mask)
    assert info2["clicks"] == info["clicks"]
    # a less exact user (random points deep inside the error): reproducible for a seed
    a, ia = bench.click_correction(image, truth, start, 5, rng=np.random.default_rng(3))
    b, ib = bench.click_correction(image, truth, start, 5, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert ia["clicks"] == ib["clicks"] and ia["dice"][-1] > ia["dice"][0]
    # the saved correction, not the ground truth, is what the training set then holds
    sub = bench.corrected_dataset(ds, {name: mask}, tmp_path / "corrected")
    (case,) = load_dataset(sub).cases
    np.testing.assert_array_equal(case.label, mask)
    np.testing.assert_array_equal(case.image[0], image)
    assert lp.exists() and (tifffile.imread(str(lp)) > 0).sum() == truth.sum()  # source intact
