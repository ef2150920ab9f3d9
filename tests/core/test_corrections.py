"""Correction tools on real masks: exact against scipy references, spacing-aware, fast."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_medseg.core.correct import edits as C
from tests.conftest import data_path


def _load(rel: str) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    img = nib.load(str(data_path(rel)))
    return np.asarray(img.dataobj).astype(np.uint8), tuple(float(z) for z in img.header.get_zooms())


@pytest.fixture(scope="module")
def spleen() -> tuple[np.ndarray, tuple[float, ...]]:
    return _load("ct/spleen/label.nii.gz")  # 164x166x26, 0.795x0.795x5 mm


@pytest.fixture(scope="module")
def cord() -> tuple[np.ndarray, tuple[float, ...]]:
    return _load("mri/spinal_cord/t2_seg-manual.nii.gz")  # 60x55x52, 1 mm


def _with_islands(lab: np.ndarray, rng: np.random.Generator, n: int = 12) -> np.ndarray:
    out = lab.copy()
    placed = 0
    while placed < n:
        i, j, k = (int(rng.integers(0, s - 3)) for s in out.shape)
        box = (slice(i, i + 2), slice(j, j + 3), slice(k, k + 1 + placed % 2))
        grown = np.zeros(out.shape, bool)
        grown[box] = True
        if (ndi.binary_dilation(grown) & (out > 0)).any():
            continue  # must not touch anything
        out[box] = 1
        placed += 1
    return out


def test_keep_largest_component_matches_scipy(spleen):
    lab, _ = spleen
    noisy = _with_islands(lab, np.random.default_rng(0))
    assert ndi.label(noisy)[1] == 13
    e = C.keep_largest_component(noisy, 1)
    out = e.apply(noisy)
    cc, _ = ndi.label(noisy)
    ref = (cc == np.bincount(cc[cc > 0]).argmax()).astype(np.uint8)
    np.testing.assert_array_equal(out, ref)
    assert e.n_changed == int(noisy.sum() - ref.sum())
    assert noisy.sum() > ref.sum()  # input untouched by apply()


def test_remove_islands_is_spacing_aware(spleen):
    lab, spacing = spleen
    vox = float(np.prod(spacing))  # 3.16 mm^3
    noisy = _with_islands(lab, np.random.default_rng(1))  # islands of 6 and 12 voxels
    sizes = sorted(np.bincount(ndi.label(noisy)[0].ravel())[1:])
    assert sizes[:12] == [6] * 6 + [12] * 6
    # 7 voxels worth of mm^3: only the 6-voxel islands go
    out = C.remove_islands(noisy, 1, min_mm3=7 * vox, spacing=spacing).apply(noisy)
    assert sorted(np.bincount(ndi.label(out)[0].ravel())[1:])[:7] == [12] * 6 + [sizes[-1]]
    # 13 voxels: all islands go, the spleen stays whole
    out = C.remove_islands(noisy, 1, min_mm3=13 * vox, spacing=spacing).apply(noisy)
    np.testing.assert_array_equal(out, lab)
    out_v = C.remove_islands(noisy, 1, min_voxels=13).apply(noisy)
    np.testing.assert_array_equal(out_v, lab)
    with pytest.raises(ValueError):
        C.remove_islands(noisy, 1, min_mm3=5.0)


def test_fill_holes_3d_and_2d(spleen):
    lab, _ = spleen
    holed = lab.copy()
    zs = np.flatnonzero(lab.any(axis=(0, 1)))
    kmid = int(zs[len(zs) // 2])
    ci, cj = (round(c) for c in ndi.center_of_mass(lab[:, :, kmid]))
    holed[ci - 2 : ci + 2, cj - 2 : cj + 2, kmid - 1 : kmid + 2] = 0  # enclosed cavity
    holed[ci - 1, cj + 6, kmid] = 2  # another class inside a second hole: kept
    holed[ci - 2 : ci + 1, cj + 5 : cj + 8, kmid] = np.where(
        holed[ci - 2 : ci + 1, cj + 5 : cj + 8, kmid] == 2, 2, 0
    )
    ref = lab.copy()
    ref[ci - 1, cj + 6, kmid] = 2
    out = C.fill_holes(holed, 1).apply(holed)
    np.testing.assert_array_equal(out, ref)
    assert np.array_equal(
        C.fill_holes(holed, 1).apply(holed) == 1,
        ndi.binary_fill_holes(holed == 1) & (holed != 2),
    )
    # a tunnel along the slice axis: open in 3D, a hole in every 2D slice
    tunnel = lab.copy()
    tunnel[ci - 1 : ci + 2, cj - 1 : cj + 2, :] = 0
    assert C.fill_holes(tunnel, 1, mode="3d").n_changed == 0
    e2 = C.fill_holes(tunnel, 1, mode="2d", axis=2)
    filled = e2.apply(tunnel)
    ref2 = np.stack([ndi.binary_fill_holes(tunnel[:, :, k] == 1) for k in range(lab.shape[2])], 2)
    np.testing.assert_array_equal(filled == 1, ref2)
    assert e2.n_changed > 50  # most slices: the tunnel is a hole in the slice


def test_interpolate_between_slices_recovers_the_cord(cord):
    lab, spacing = cord
    axis = 2  # file axis k (S-I for this PSR-oriented volume is axis 0: use any axis)
    drawn = lab.copy()
    ks = np.flatnonzero(lab.any(axis=(0, 1)))
    keep = set(ks[::4].tolist()) | {int(ks[-1])}
    for k in ks:
        if int(k) not in keep:
            drawn[:, :, k] = 0
    e = C.interpolate_slices(drawn, 1, axis=axis, spacing=spacing)
    out = e.apply(drawn)
    for k in keep:  # the user's slices are never changed
        np.testing.assert_array_equal(out[:, :, k], drawn[:, :, k])
    gap = [int(k) for k in ks if int(k) not in keep]
    a, b = out[:, :, gap] == 1, lab[:, :, gap] == 1
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.85, dice
    assert not out[:, :, : ks[0]].any() and not out[:, :, ks[-1] + 1 :].any()
    # blending halfway between a disc and a shifted disc gives a disc in between
    m = np.zeros((5, 40, 40), np.uint8)
    yy, xx = np.mgrid[:40, :40]
    m[0][(yy - 10) ** 2 + (xx - 10) ** 2 <= 25] = 1
    m[4][(yy - 26) ** 2 + (xx - 26) ** 2 <= 25] = 1
    mid = C.interpolate_slices(m, 1, axis=0).apply(m)[2]
    cy, cx = ndi.center_of_mass(mid)
    assert abs(cy - 18) < 0.6 and abs(cx - 18) < 0.6
    assert abs(mid.sum() - m[0].sum()) <= 8
    # without alignment, two discs that do not overlap leave the gap empty
    assert C.interpolate_slices(m, 1, axis=0, align=False).n_changed == 0


@pytest.mark.parametrize("margin", [3.0, 6.0, -2.0, -5.5])
def test_grow_shrink_equals_anisotropic_edt(spleen, margin):
    lab, spacing = spleen  # 0.795 x 0.795 x 5 mm: 6 mm reaches one slice up and down
    two = lab.copy()
    two[:30] = np.where(two[:30] == 0, 2, two[:30])  # another class that growing must not eat
    e = C.grow_shrink(two, 1, margin, spacing)
    out = e.apply(two)
    m = two == 1
    tol = abs(margin) * (1 + 1e-6)
    if margin > 0:
        ref = m | ((ndi.distance_transform_edt(~m, sampling=spacing) <= tol) & (two == 0))
    else:
        ref = m & (ndi.distance_transform_edt(m, sampling=spacing) > tol)
    np.testing.assert_array_equal(out == 1, ref)
    np.testing.assert_array_equal(out == 2, two == 2)
    assert e.n_changed == int(np.count_nonzero(out != two)) > 0
    flat = np.ravel_multi_index(e.indices, two.shape)
    assert np.unique(flat).size == flat.size


def test_relabel_merge_and_volumes(cord):
    lab, spacing = cord
    three = lab.copy()
    mid = int(np.median(np.nonzero(lab)[1]))  # split the cord along its length
    upper = three[:, :mid]
    upper[upper == 1] = 3
    vols = C.class_volumes(three, spacing)
    assert set(vols) == {1, 3}
    assert vols[1]["voxels"] + vols[3]["voxels"] == int(lab.sum()) == 4275
    assert vols[1]["mm3"] == pytest.approx(vols[1]["voxels"] * np.prod(spacing))
    merged = C.relabel(three, {3: 1}).apply(three)
    np.testing.assert_array_equal(merged, lab)
    counts = C.class_counts(three)
    e = C.relabel(three, {1: 2})
    counts2 = C.update_counts(counts, three[e.indices], e.values)
    np.testing.assert_array_equal(counts2, C.class_counts(e.apply(three)))
    with pytest.raises(ValueError):
        C.relabel(three, {1: 300})
    assert C.relabel(three, {5: 1}).n_changed == 0


def test_cost_follows_the_structure_not_the_scan(cord):
    """A small structure in a 512x512x200 volume: every tool well under a second."""
    lab, _ = cord
    vol = np.zeros((200, 512, 512), np.uint8)
    vol[70:130, 200:255, 300:352] = lab[:, :, :52]
    vol[10, 10, 10] = 1  # one far island: the class box spans the whole scan
    spacing = (2.0, 0.8, 0.8)
    tools = {
        "keep_largest": lambda: C.keep_largest_component(vol, 1),
        "remove_islands": lambda: C.remove_islands(vol, 1, min_mm3=20, spacing=spacing),
        "fill_holes": lambda: C.fill_holes(vol, 1),
        "grow": lambda: C.grow_shrink(vol, 1, 3.0, spacing),
        "shrink": lambda: C.grow_shrink(vol, 1, -1.0, spacing),
    }
    for name, tool in tools.items():
        t0 = time.perf_counter()
        e = tool()
        dt = time.perf_counter() - t0
        assert dt < 1.0, (name, dt)
        assert e.n_changed >= 0
    assert C.keep_largest_component(vol, 1).n_changed == 1
