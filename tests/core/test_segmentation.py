"""The segmentation pipeline end to end: real CT/MR crops, tiny networks, geometry, errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medseg.core.segment.segment import SegmentationResult, segment
from napari_medseg.errors import MedsegError
from napari_medseg.io.record import ImageRecord
from napari_medseg.models.card import ModelCard, sha256_file
from napari_medseg.models.networks import LoadedModel, build_network, save_model
from napari_medseg.models.registry import load_model
from napari_medseg.progress import run_sync
from tests.helpers import tiny_unet_card

DATA = Path(
    os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not (DATA / "README.md").is_file(), reason=f"real test data not found at {DATA}"
)

CLASSES = [{"id": 0, "name": "background"}, {"id": 1, "name": "spleen", "color": "#e6194b"}]


def _crop(rel: str, sl: tuple[slice, ...], modality: str = "CT") -> ImageRecord:
    """A real crop with the affine moved to the crop's first voxel."""
    img = nib.load(str(DATA / rel))
    data = np.asarray(img.dataobj)[sl].astype(np.float32)
    shift = np.eye(4)
    shift[:3, 3] = [s.start or 0 for s in sl]
    return ImageRecord(data=data, affine=img.affine @ shift, modality=modality, name=Path(rel).name)


def _tiny_card(**kw) -> ModelCard:
    return tiny_unet_card(**{"classes": CLASSES, **kw})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    card = _tiny_card()
    net = build_network(card)
    assert sum(p.numel() for p in net.parameters()) < 5000
    folder = save_model(tmp_path_factory.mktemp("models") / "tiny_ct", card, net)
    return load_model(folder)


class Threshold(torch.nn.Module):
    """A 'network' whose answer is known: class 1 where the normalised input is above 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.cat([0.5 - x[:, :1], x[:, :1] - 0.5], 1) * 50.0


def _threshold_model(dims=3, spacing=None, patch=(16, 16, 8)) -> LoadedModel:
    card = _tiny_card(name="threshold", dims=dims, spacing=spacing, patch_size=list(patch))
    return LoadedModel(card=card, network=Threshold(), source="test", kind="test")


@needs_data
def test_segment_real_ct_crop(tiny_model):
    rec = _crop("ct/spleen/image.nii.gz", (slice(40, 73), slice(50, 84), slice(3, 24)))
    assert rec.spatial_shape == (33, 34, 21)
    reports = []
    gen = segment(rec, tiny_model, device="cpu", return_probabilities=True)
    res = run_sync(gen, reports.append)
    assert isinstance(res, SegmentationResult)
    assert res.labels.shape == rec.spatial_shape
    assert res.labels.dtype == np.uint8
    assert res.probabilities.shape == (2, *rec.spatial_shape)
    assert res.probabilities.dtype == np.float32
    np.testing.assert_allclose(res.probabilities.sum(0), 1.0, atol=1e-4)
    assert (res.labels == res.probabilities.argmax(0)).mean() > 0.999
    np.testing.assert_array_equal(res.affine, rec.affine)
    assert res.class_names == {0: "background", 1: "spleen"}
    assert res.class_colors[1] == "#e6194b"
    prov = res.provenance
    for key in ("model", "parameters", "versions", "device", "elapsed_s", "timestamp", "input"):
        assert key in prov
    for key in ("name", "version", "source", "weights_sha256"):
        assert key in prov["model"]
    for key in ("torch", "monai", "napari-medseg", "python"):
        assert key in prov["versions"]
    weights = Path(tiny_model.source) / tiny_model.card.weights
    assert prov["model"]["weights_sha256"] == sha256_file(weights) == tiny_model.card.sha256
    assert prov["device"] == "cpu"
    assert prov["parameters"]["label_resampling"] == "linear"
    done = [p.done for p in reports if p.total]
    assert done == sorted(done) and reports[-1].done == reports[-1].total


@needs_data
@pytest.mark.parametrize(
    "rel, sl",
    [
        ("ct/spleen/image.nii.gz", (slice(60, 110), slice(40, 90), slice(0, 26))),  # RAS
        ("ct/totalseg_small/mr.nii.gz", (slice(20, 70), slice(10, 60), slice(0, 20))),  # LPS
        ("mri/spinal_cord/t2.nii.gz", (slice(0, 60), slice(0, 40), slice(10, 45))),  # PSR
    ],
)
def test_known_answer_lands_on_the_source_voxels(rel, sl):
    """Threshold 'network': labels must equal the thresholded source image, in file order."""
    rec = _crop(rel, sl)
    data = np.asarray(rec.data)
    lo, hi = np.percentile(data, [5, 95])
    card_norm = {"scheme": "ct", "window": [float(lo), float(hi)]}
    expect = ((data - lo) / (hi - lo)) > 0.5
    model = _threshold_model()
    model.card.normalization = card_norm
    res = run_sync(segment(rec, model, device="cpu", batch_size=8))
    assert res.labels.shape == rec.spatial_shape
    assert (res.labels.astype(bool) == expect).mean() > 0.9999  # exact up to x == 0.5 ties
    # with resampling to 1.5 mm on the way: still on the right voxels
    model2 = _threshold_model(spacing=[1.5, 1.5, 1.5])
    model2.card.normalization = card_norm
    res2 = run_sync(segment(rec, model2, device="cpu", batch_size=8))
    assert res2.labels.shape == rec.spatial_shape
    a = res2.labels.astype(bool)

    def dice(b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    d = dice(expect)
    assert d > 0.8
    for ax in range(3):  # a one-voxel geometry error along any axis would score better
        for step in (-1, 1):
            assert d > dice(np.roll(expect, step, axis=ax))


@needs_data
def test_2d_model_on_volume_slice_by_slice():
    rec = _crop("ct/spleen/image.nii.gz", (slice(30, 97), slice(20, 70), slice(0, 26)))
    card = _tiny_card(name="t2d", dims=2, spacing=None, patch_size=[32, 24])
    model = LoadedModel(card=card, network=_Threshold2D(), source="test")
    res = run_sync(segment(rec, model, device="cpu"))
    x = np.clip((np.asarray(rec.data) + 160) / 400, 0, 1)
    np.testing.assert_array_equal(res.labels.astype(bool), x > 0.5)
    assert model.network.shapes and all(len(s) == 4 for s in model.network.shapes)


class _Threshold2D(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return torch.cat([0.5 - x[:, :1], x[:, :1] - 0.5], 1) * 50.0


@needs_data
def test_postprocessing_and_class_ids(tiny_model):
    rec = _crop("ct/spleen/image.nii.gz", (slice(60, 110), slice(40, 90), slice(0, 26)))
    model = _threshold_model()
    model.card.classes = [{"id": 0, "name": "background"}, {"id": 7, "name": "bright"}]
    model.card.normalization = {"scheme": "ct", "window": [0, 200]}
    raw = run_sync(segment(rec, model, device="cpu", postprocessing={}))
    assert set(np.unique(raw.labels)) <= {0, 7}
    from scipy import ndimage as ndi

    n_raw = ndi.label(raw.labels == 7)[1]
    clean = run_sync(
        segment(rec, model, device="cpu", postprocessing={"keep_largest_component": True})
    )
    assert n_raw > 1
    assert ndi.label(clean.labels == 7)[1] == 1
    assert clean.provenance["parameters"]["postprocessing"] == {"keep_largest_component": True}


def test_errors_are_sentences(tiny_model):
    rgb = ImageRecord(
        data=np.zeros((20, 30, 3), np.uint8), affine=np.eye(3), space="pixel", rgb=True
    )
    with pytest.raises(MedsegError, match="3D model and cannot run on the 2D image"):
        run_sync(segment(rgb, tiny_model, device="cpu"))
    model2d = _threshold_model(dims=2, patch=(16, 16))
    with pytest.raises(MedsegError, match=r"expects 1 input channel.*3 RGB channels"):
        run_sync(segment(rgb, model2d, device="cpu"))
    four_d = ImageRecord(data=np.zeros((10, 10, 10, 2), np.float32), affine=np.eye(4))
    with pytest.raises(MedsegError, match="expects 1 input channel"):
        run_sync(segment(four_d, tiny_model, device="cpu"))
    empty = ImageRecord(data=np.zeros((0, 10, 10), np.float32), affine=np.eye(4))
    with pytest.raises(MedsegError, match="empty"):
        run_sync(segment(empty, tiny_model, device="cpu"))
    det = _threshold_model()
    det.card.task = "detection"
    with pytest.raises(MedsegError, match="is a model for detection, not segmentation"):
        run_sync(segment(ImageRecord(np.zeros((8, 8, 8)), np.eye(4)), det, device="cpu"))


def test_nan_is_replaced_and_reported():
    data = np.random.default_rng(0).normal(size=(33, 34, 35)).astype(np.float32) * 100
    data[5, 6, 7] = np.nan
    rec = ImageRecord(data=data, affine=np.diag([0.8, 0.8, 2.0, 1.0]))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = run_sync(segment(rec, _threshold_model(), device="cpu"))
    assert any("NaN/Inf" in str(m.message) for m in w)
    assert any("NaN/Inf" in n for n in res.provenance["notes"])
    assert res.labels.shape == (33, 34, 35)
    assert res.labels[5, 6, 7] == 0  # replaced by the minimum -> below the window


def test_cancel_by_closing_the_generator():
    rec = ImageRecord(data=np.zeros((64, 64, 40), np.float32), affine=np.eye(4))
    model = _threshold_model()
    gen = segment(rec, model, device="cpu", batch_size=1)
    for _ in range(5):
        next(gen)
    calls = model.network.calls
    assert 1 <= calls <= 4
    gen.close()
    assert model.network.calls == calls
    with pytest.raises(StopIteration):
        next(gen)


@needs_data
def test_2d_model_on_real_2d_images():
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    nuclei = tifffile.imread(DATA / "microscopy/dsb2018_nuclei/image.tif")[100:137, 200:250]
    rec = ImageRecord(data=nuclei, affine=np.eye(3), space="pixel", modality="microscopy")
    card = _tiny_card(name="n2d", dims=2, spacing=None, patch_size=[16, 16])
    card.normalization = {"scheme": "percentile", "lower": 1, "upper": 99}
    res = run_sync(segment(rec, LoadedModel(card=card, network=_Threshold2D()), device="cpu"))
    assert res.labels.shape == (37, 50)
    lo, hi = np.percentile(nuclei, [1, 99])
    expect = np.clip((nuclei - lo) / (hi - lo), 0, 1) > 0.5
    assert (res.labels.astype(bool) == expect).mean() > 0.999

    rgb = np.asarray(Image.open(DATA / "pathology/he_tile_tcia.jpg").convert("RGB"))[:45, :70]
    rec = ImageRecord(data=rgb, affine=np.eye(3), space="pixel", rgb=True)
    card = _tiny_card(name="rgb2d", dims=2, in_channels=3, spacing=None, patch_size=[32, 32])
    card.normalization = {"scheme": "rgb"}
    res = run_sync(segment(rec, LoadedModel(card=card, network=_Threshold2D()), device="cpu"))
    assert res.labels.shape == (45, 70)
    np.testing.assert_array_equal(res.labels.astype(bool), rgb[..., 0] / 255.0 > 0.5)


def test_too_large_for_memory_is_one_sentence(tiny_model, monkeypatch):
    from napari_medseg.core.segment import segment as seg_mod

    rec = ImageRecord(data=np.zeros((64, 64, 32), np.int16), affine=np.eye(4), modality="CT")
    need = seg_mod.estimate_memory(rec, tiny_model)
    assert need > 64 * 64 * 32 * 4  # at least the float32 input
    monkeypatch.setattr(seg_mod, "available_memory", lambda: need // 2)
    gen = segment(rec, tiny_model, device="cpu")
    with pytest.raises(MedsegError, match=r"needs about .* GB of memory"):
        next(gen)
    monkeypatch.setattr(seg_mod, "available_memory", lambda: need * 4)
    result = run_sync(segment(rec, tiny_model, device="cpu"))
    assert result.labels.shape == rec.spatial_shape


class _NestedSigmoidNet(torch.nn.Module):
    """Two nested 'sigmoid' channels from HU: soft tissue (> -100 HU) and dense (> 100 HU)."""

    def forward(self, x):  # x is the CT window scaled to [0, 1] over [-160, 240] HU
        hu = x * 400.0 - 160.0
        return torch.cat([(hu + 100.0) / 5.0, (hu - 100.0) / 5.0], dim=1)


def test_sigmoid_channels_become_nested_labels():
    img = nib.load(str(DATA / "ct/spleen/image.nii.gz")) if DATA.exists() else None
    if img is None:
        pytest.skip("real data not found")
    arr = np.asarray(img.dataobj, dtype=np.float32)[30:90, 40:100, 5:15]
    rec = ImageRecord(data=arr, affine=img.affine, modality="CT")
    card = tiny_unet_card(
        "nested",
        spacing=None,
        classes=[{"id": 0, "name": "body"}, {"id": 1, "name": "dense"}],
        postprocessing={"activation": "sigmoid", "threshold": 0.5},
    )
    model = LoadedModel(card=card, network=_NestedSigmoidNet())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bundle output keys are not "unknown steps"
        res = run_sync(segment(rec, model, device="cpu"))
    body = np.clip(arr, -160, 240) > -100
    assert 0 < body.mean() < 1
    dense = np.clip(arr, -160, 240) > 100
    assert res.class_names == {0: "background", 1: "body", 2: "dense"}
    np.testing.assert_array_equal(res.labels == 2, dense)  # the smaller region painted last
    np.testing.assert_array_equal(res.labels == 1, body & ~dense)


class _SharpLogits2D(torch.nn.Module):
    """Logits ``(0, 40 * (red - 0.45))``: large, so softmax saturates and interpolating
    probabilities draws other boundaries than interpolating the logits."""

    def forward(self, x):
        d = 40.0 * (x[:, :1] - 0.45)
        return torch.cat([torch.zeros_like(d), d], 1)


@needs_data
def test_bundle_resize_and_its_inverse_on_raw_outputs_as_monai():
    """A MONAI bundle that reads a JPEG columns first, resizes it, and whose Invertd resizes
    the logits back before the argmax (endoscopic_tool_segmentation), against torch."""
    from PIL import Image

    F = torch.nn.functional
    rgb = np.asarray(Image.open(DATA / "pathology/he_tile_tcia.jpg").convert("RGB"))
    rec = ImageRecord(data=rgb, affine=np.eye(3), space="pixel", rgb=True)
    # what MONAI computes: (x, y) layout, Resize, network, Resize back, argmax
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 1, 0)[None]
    logits = _SharpLogits2D()(F.interpolate(x, size=(96, 64), mode="bilinear"))
    back = F.interpolate(logits, size=x.shape[2:], mode="bilinear")
    want_raw = back[0].argmax(0).numpy().T
    soft = F.interpolate(torch.softmax(logits, 1), size=x.shape[2:], mode="bilinear")
    want_soft = soft[0].argmax(0).numpy().T
    assert 0.2 < want_raw.mean() < 0.8 and (want_raw != want_soft).sum() > 100

    for raw, want in ((True, want_raw), (False, want_soft)):
        card = _tiny_card(name="resized", dims=2, in_channels=3, spacing=None, patch_size=[96, 64])
        card.normalization = {
            "scheme": "rgb",
            "resize": {"spatial_size": [96, 64], "size_mode": "all"},
            "raster_axes": "xy",
        }
        card.extra = {"blend_raw_outputs": True, "blend_mode": "constant"}
        card.postprocessing = {"argmax": True, "label_resampling": "linear"}
        if raw:
            card.postprocessing["resample_raw_outputs"] = True
        model = LoadedModel(card=card, network=_SharpLogits2D())
        res = run_sync(segment(rec, model, device="cpu", fast_path=False))
        assert res.labels.shape == rgb.shape[:2]
        assert (res.labels != want).sum() <= 5, (raw, int((res.labels != want).sum()))


@needs_data
def test_whole_image_runs_the_network_once_on_the_whole_image():
    """A bundle with SimpleInferer: one forward pass on the whole image (image-wide InstanceNorm
    statistics), not windows of the card's patch size."""
    from monai.networks.nets import UNet

    rec = _crop("ct/spleen/image.nii.gz", (slice(20, 100), slice(30, 94), slice(2, 18)))
    torch.manual_seed(0)
    net = UNet(3, 1, 3, (4, 8, 16), (2, 2), num_res_units=1, norm="instance").eval()
    card = _tiny_card(
        name="whole",
        spacing=None,
        patch_size=[32, 32, 16],
        classes=[*CLASSES, {"id": 2, "name": "other", "color": "#3cb44b"}],
    )
    card.normalization = {"scheme": "ct", "window": [-160.0, 240.0]}
    card.extra = {"blend_raw_outputs": True, "blend_mode": "constant", "whole_image": True}
    x = np.clip((rec.data + 160.0) / 400.0, 0.0, 1.0).astype(np.float32)  # RAS already
    with torch.no_grad():
        want = net(torch.from_numpy(x)[None, None])[0].argmax(0).numpy()
    assert len(np.unique(want)) == 3

    model = LoadedModel(card=card, network=net)
    res = run_sync(segment(rec, model, device="cpu"))
    assert res.provenance["parameters"]["roi_size"] == list(rec.shape)
    assert (res.labels != want).sum() <= 5
    card.extra["whole_image"] = False  # windows of 32x32x16: other InstanceNorm statistics
    windows = run_sync(segment(rec, model, device="cpu")).labels
    assert (windows != want).mean() > 0.01
