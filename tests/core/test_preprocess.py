"""Normalisation and the file grid <-> model grid map, on real files in RAS, LPS and PSR."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from napari_medseg.core.engine.preprocess import normalize, slice_axis_of, to_model_grid  # noqa: E402
from napari_medseg.errors import MedsegError  # noqa: E402
from napari_medseg.io.record import ImageRecord  # noqa: E402
from napari_medseg.models.card import ModelCard  # noqa: E402

DATA = Path(
    os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not (DATA / "README.md").is_file(), reason=f"real test data not found at {DATA}"
)

# (image, label, expected file orientation, model spacing in mm)
CASES = [
    ("ct/spleen/image.nii.gz", "ct/spleen/label.nii.gz", "RAS", [1.5, 1.5, 2.0]),
    ("ct/totalseg_small/mr.nii.gz", "ct/totalseg_small/seg_mr.nii.gz", "LPS", [2.0, 2.0, 2.5]),
    ("mri/spinal_cord/t2.nii.gz", "mri/spinal_cord/t2_seg-manual.nii.gz", "PSR", [0.8, 0.8, 0.8]),
]


def _record(rel: str, dtype=np.float32) -> ImageRecord:
    img = nib.load(str(DATA / rel))
    return ImageRecord(
        data=np.asarray(img.dataobj).astype(dtype), affine=img.affine, modality="CT", name=rel
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = []
    for k in np.union1d(np.unique(a), np.unique(b)):
        if k == 0:
            continue
        x, y = a == k, b == k
        scores.append(2.0 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


def _card(spacing, dims=3, orientation="RAS", **kw) -> ModelCard:
    return ModelCard(name="t", dims=dims, spacing=spacing, orientation=orientation, **kw)


def _model_to_source_index(grid, j: np.ndarray) -> np.ndarray:
    """Source voxel index (continuous) of model voxels ``j`` (N, 3), through the affines."""
    hom = np.c_[j, np.ones(len(j))]
    world = hom @ grid.model_affine.T
    return (world @ np.linalg.inv(grid.source_affine).T)[:, :3]


@needs_data
@pytest.mark.parametrize("img_rel, lab_rel, codes, spacing", CASES)
def test_labels_round_trip_real_files(img_rel, lab_rel, codes, spacing):
    rec = _record(img_rel)
    assert rec.orientation == codes
    lab = np.asarray(nib.load(str(DATA / lab_rel)).dataobj).astype(np.uint8)
    classes = np.unique(lab)
    onehot = np.stack([lab == k for k in classes], axis=-1).astype(np.float32)
    lab_rec = ImageRecord(data=onehot, affine=rec.affine)
    card = _card(spacing)
    probs, grid = to_model_grid(lab_rec, card)
    _, grid_img = to_model_grid(rec, card)
    assert grid.model_shape == grid_img.model_shape
    assert nib.aff2axcodes(grid.model_affine) == ("R", "A", "S")
    np.testing.assert_allclose(
        np.abs(np.diag(grid.model_affine)[:3]), spacing, rtol=0.05
    )  # effective spacing within rounding of the card's
    model_lab = probs.argmax(0).numpy().astype(np.uint8)
    back_nearest = classes[grid.labels_to_source(model_lab)]
    back_linear = classes[grid.argmax_to_source(probs)]
    assert back_nearest.shape == back_linear.shape == lab.shape == rec.spatial_shape
    assert _dice(back_nearest, lab) >= 0.90
    assert _dice(back_linear, lab) >= 0.95
    # interpolating all probabilities back then argmax == the per-class running argmax
    full = grid.probs_to_source(probs)
    assert full.shape == (len(classes), *lab.shape)
    agree = (classes[full.argmax(0)] == back_linear).mean()
    assert agree > 0.9999


@needs_data
@pytest.mark.parametrize("img_rel, lab_rel, codes, spacing", CASES)
def test_no_resampling_is_exact(img_rel, lab_rel, codes, spacing):
    lab = np.asarray(nib.load(str(DATA / lab_rel)).dataobj).astype(np.uint8)
    rec = _record(img_rel)
    lab_rec = ImageRecord(data=lab.astype(np.float32), affine=rec.affine)
    model, grid = to_model_grid(lab_rec, _card(None))
    assert not grid.resampled
    assert grid.reoriented == (codes != "RAS")
    assert nib.aff2axcodes(grid.model_affine) == ("R", "A", "S")
    back = grid.labels_to_source(model[0].numpy().astype(np.uint8))
    np.testing.assert_array_equal(back, lab)
    probs = torch.stack([model[0], 1 - model[0]])
    np.testing.assert_array_equal(grid.probs_to_source(probs)[0], lab.astype(np.float32))
    # geometry through the affines: model voxel j holds the source voxel at the same place
    rng = np.random.default_rng(0)
    j = np.stack([rng.integers(0, n, 200) for n in grid.model_shape], axis=1)
    src = _model_to_source_index(grid, j)
    np.testing.assert_allclose(src, np.round(src), atol=1e-4)
    si = np.round(src).astype(int)
    np.testing.assert_array_equal(model[0].numpy()[tuple(j.T)], lab[tuple(si.T)].astype(np.float32))


@needs_data
@pytest.mark.parametrize("img_rel, lab_rel, codes, spacing", CASES)
def test_resampling_lands_where_the_affine_says(img_rel, lab_rel, codes, spacing):
    """The model grid's affine is right: its voxels hold trilinear samples of the source."""
    from scipy.ndimage import map_coordinates

    rec = _record(img_rel)
    model, grid = to_model_grid(rec, _card(spacing))
    rng = np.random.default_rng(1)
    j = np.stack([rng.integers(0, n, 400) for n in grid.model_shape], axis=1)
    src = _model_to_source_index(grid, j)
    inside = np.all((src >= 0) & (src <= np.asarray(rec.spatial_shape) - 1), axis=1)
    expect = map_coordinates(np.asarray(rec.data), src[inside].T, order=1)
    got = model[0].numpy()[tuple(j[inside].T)]
    scale = float(np.ptp(np.asarray(rec.data)))
    np.testing.assert_allclose(got, expect, atol=1e-4 * scale)


@needs_data
def test_2d_model_on_volume_runs_along_slice_axis():
    rec = _record("ct/spleen/image.nii.gz")
    assert slice_axis_of(rec) == 2
    card = _card([1.6, 1.6], dims=2, patch_size=[64, 64])
    model, grid = to_model_grid(rec, card)
    assert grid.slice_axis == 2
    # MONAI Spacing's grid: round((n - 1) * spacing / target + 1) voxels, slice axis untouched
    assert tuple(model.shape) == (1, 82, 83, 26)
    np.testing.assert_allclose(grid.model_spacing[:2], [1.6, 1.6])
    back = grid.labels_to_source(np.zeros(grid.model_shape, np.uint8))
    assert back.shape == rec.spatial_shape
    # PSR cord: 1 mm iso, ties -> the last file axis
    t2 = _record("mri/spinal_cord/t2.nii.gz")
    m2, g2 = to_model_grid(t2, _card(None, dims=2))
    assert g2.slice_axis == 2 and tuple(m2.shape[1:]) == t2.spatial_shape


@needs_data
def test_rgb_pathology_tile_goes_channels_first():
    from PIL import Image

    rgb = np.asarray(Image.open(DATA / "pathology" / "he_tile_tcia.jpg").convert("RGB"))
    rec = ImageRecord(data=rgb, affine=np.eye(3), space="pixel", rgb=True)
    card = _card(None, dims=2, in_channels=3, normalization={"scheme": "rgb"})
    model, grid = to_model_grid(rec, card)
    assert tuple(model.shape) == (3, *rgb.shape[:2])
    np.testing.assert_allclose(model[1].numpy(), rgb[..., 1] / 255.0, atol=1e-6)
    assert grid.labels_to_source(np.ones(rgb.shape[:2], np.uint8)).shape == rgb.shape[:2]


@needs_data
@pytest.mark.parametrize(
    "size, align_corners", [([736, 480], False), ([201, 333], False), ([736, 480], True)]
)
def test_resize_and_raster_axes_match_monai(size, align_corners):
    """A MONAI bundle's LoadImage + Resize on a 300x500 JPEG, and Invertd's resize back."""
    from monai.transforms import EnsureChannelFirst, LoadImage, Resize
    from PIL import Image

    path = DATA / "pathology" / "he_tile_tcia.jpg"
    monai_img = EnsureChannelFirst(channel_dim=-1)(LoadImage(image_only=True)(str(path)))
    assert tuple(monai_img.shape) == (3, 500, 300)  # MONAI's (x, y): columns first
    expected = Resize(size, mode="bilinear", align_corners=align_corners)(monai_img)
    rgb = np.asarray(Image.open(path))
    rec = ImageRecord(data=rgb, affine=np.eye(3), space="pixel", rgb=True)
    spec = {"spatial_size": size, "size_mode": "all"}
    if align_corners:
        spec["align_corners"] = True
    norm = {"scheme": "none", "resize": spec, "raster_axes": "xy"}
    card = _card(None, dims=2, in_channels=3, normalization=norm)
    model, grid = to_model_grid(rec, card)
    assert tuple(model.shape) == (3, *size) and grid.resampled
    np.testing.assert_allclose(model.numpy(), np.asarray(expected), rtol=1e-4, atol=1e-3)

    # back to the file's (row, col) grid as Invertd does: the same resize to the old size,
    # bilinear for scores, nearest for labels (nearest_interp)
    scores = torch.rand(2, *size, generator=torch.Generator().manual_seed(0))
    orig = tuple(monai_img.shape[1:])
    back = Resize(orig, mode="bilinear", align_corners=align_corners)(scores)
    np.testing.assert_allclose(
        grid.probs_to_source(scores), np.asarray(back).transpose(0, 2, 1), atol=1e-5
    )
    labels = (scores[:1] > 0.5).to(torch.uint8)
    near = np.asarray(Resize(orig, mode="nearest")(labels.float()))[0].T.astype(np.uint8)
    assert np.array_equal(grid.labels_to_source(labels[0].numpy()), near)


def test_resize_grid_sizes_as_monai():
    from monai.transforms import Resize

    from napari_medseg.core.engine.preprocess import resize_grid

    x = torch.zeros(1, 33, 50, 7)
    for spec in (
        {"spatial_size": [16, -1, 9]},
        {"spatial_size": 40, "size_mode": "longest"},
        {"spatial_size": [64, 64, 64], "align_corners": True},
    ):
        monai_shape = tuple(Resize(**spec, mode="trilinear")(x).shape[1:])
        assert resize_grid((33, 50, 7), spec)[0] == monai_shape
    with pytest.raises(MedsegError, match="2 spatial axes"):
        resize_grid((33, 50), {"spatial_size": [1, 2, 3]})


def test_ct_window():
    x = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]], dtype=np.float32)
    out = normalize(x, {"scheme": "ct", "window": [-160, 240]}, channel_axis=0)
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-6)
    assert out.dtype == np.float32


@needs_data
def test_zscore_foreground_on_real_mr():
    mr = np.asarray(nib.load(str(DATA / "ct/totalseg_small/mr.nii.gz")).dataobj)[None]
    out = normalize(mr, {"scheme": "zscore", "foreground_only": True})
    fg = mr[0] > np.percentile(mr, 1.0)
    assert abs(float(out[0][fg].mean())) < 0.02
    assert abs(float(out[0][fg].std()) - 1.0) < 0.02
    assert out[0][~fg].max() < out[0][fg].min() + 1e-6  # background stays below the body


def test_percentile_and_none_and_unknown():
    x = np.arange(1000, dtype=np.int16).reshape(1, 10, 100)
    out = normalize(x, {"scheme": "percentile", "lower": 1, "upper": 99})
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(normalize(x, {"scheme": "none"}), x.astype(np.float32))
    with pytest.raises(MedsegError, match="unknown intensity normalisation"):
        normalize(x, {"scheme": "magic"})


def test_nan_and_inf_are_replaced_with_a_warning():
    x = np.array([[np.nan, 1.0, np.inf, -2.0, -np.inf]], dtype=np.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = normalize(x, {"scheme": "none"})
    assert any("3 NaN/Inf" in str(m.message) for m in w)
    np.testing.assert_array_equal(out, [[-2.0, 1.0, -2.0, -2.0, -2.0]])
    assert np.isfinite(out).all()


def test_to_model_grid_awkward_size_and_nan():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(33, 34, 35)).astype(np.float32)
    data[3, 4, 5] = np.nan
    aff = np.diag([-0.7, 0.9, 2.5, 1.0])
    rec = ImageRecord(data=data, affine=aff)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model, grid = to_model_grid(rec, _card([1.0, 1.0, 1.0]))
    assert grid.info["nonfinite_replaced"] == 1
    assert torch.isfinite(model).all()
    assert grid.model_shape == (23, 31, 86)  # round((n - 1) * s / t + 1), MONAI Spacing
    assert grid.labels_to_source(np.zeros(grid.model_shape, np.uint8)).shape == (33, 34, 35)
