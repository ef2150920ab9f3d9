"""Denoising engine on real crops: classical filters, N2V/N2V2, geometry, bad input, models."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from napari_medseg.core.denoise.classical import CLASSICAL_METHODS, psnr
from napari_medseg.core.denoise.denoising import denoise
from napari_medseg.core.denoise.n2v import blind_spot_batch, train_n2v
from napari_medseg.core.denoise.store import load_denoiser, save_denoiser
from napari_medseg.errors import MedsegError
from napari_medseg.io import read_image
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import Progress, run_sync
from tests.conftest import data_path

RNG = np.random.default_rng(0)


def _nuclei_crop(shape=(67, 73), peak=6.0, seed=0):
    """A real DSB nuclei crop (clean) and the same with Poisson-Gaussian noise (float32)."""
    img = np.asarray(read_image(data_path("microscopy/dsb2018_nuclei/image.tif"))[0].data)
    clean = img[100 : 100 + shape[0], 150 : 150 + shape[1]].astype(np.float32)
    rs = np.random.default_rng(seed)
    top = float(clean.max())
    noisy = rs.poisson(clean / top * peak) / peak + rs.normal(0, 0.05, clean.shape)
    return clean, (noisy * top).astype(np.float32)


def _rec2d(arr, name="crop", modality="microscopy", rgb=False):
    aff = np.array([[0.5, 0, 10.0], [0, 0.5, 20.0], [0, 0, 1]])
    return ImageRecord(data=arr, affine=aff, space="pixel", modality=modality, name=name, rgb=rgb)


@pytest.mark.parametrize("method", CLASSICAL_METHODS)
def test_classical_methods_reduce_noise_and_keep_dtype_range(method):
    clean, noisy = _nuclei_crop()
    u16 = np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)
    rec = _rec2d(u16)
    res = run_sync(denoise(rec, method))
    assert res.data.shape == u16.shape and res.data.dtype == np.uint16
    assert res.data.min() >= u16.min() and res.data.max() <= u16.max()
    np.testing.assert_array_equal(res.affine, rec.affine)
    assert res.provenance["noise_sigma"] > 0
    assert psnr(clean, res.data) > psnr(clean, u16) + 1.0, method


def test_blind_spot_masks_replace_pixels_by_neighbours():
    import torch

    x = torch.rand(2, 1, 20, 21, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    for variant in ("n2v", "n2v2"):
        for blind_radius in (0, 1):
            masked, mask = blind_spot_batch(x, 0.05, variant, g, blind_radius=blind_radius)
            m = mask.bool()
            n = int(m.sum())
            assert 0.02 * x.numel() < n < 0.08 * x.numel()
            # every masked pixel changed (its own value is hidden)
            assert bool((masked[m] != x[m]).all()), (variant, blind_radius)
            if blind_radius == 0:  # ... and nothing else did
                assert torch.equal(masked[~m], x[~m])
            else:  # the 3x3 block around each masked pixel is hidden too
                changed = (masked != x).float()
                around = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1)
                assert float((changed * around).sum()) > 5 * n
            if variant == "n2v" and blind_radius == 0:
                # the replacement is one of the pixel's neighbours within 2 pixels
                b, _, r, c = (int(v) for v in torch.nonzero(m)[0])
                win = x[b, 0, max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3]
                assert bool((win == masked[b, 0, r, c]).any())


def test_n2v2_trains_with_live_loss_and_denoises_a_real_crop():
    clean, noisy = _nuclei_crop((96, 90))
    rec = _rec2d(noisy)
    seen: list[Progress] = []
    t0 = time.perf_counter()
    # 40 steps (about 2 s on an idle CPU); the 20 s budget only caps a very loaded machine
    res = run_sync(
        denoise(
            rec, "n2v2", time_budget=20.0, max_steps=40, device="cpu", features=8, patch_size=32
        ),
        seen.append,
    )
    took = time.perf_counter() - t0
    losses = [p.info["loss"] for p in seen if "loss" in p.info]
    assert len(losses) >= 5 and all(np.isfinite(losses))
    assert took < 20.0 + 5.0  # budget + prediction + one step
    assert res.data.shape == noisy.shape and res.data.dtype == np.float32
    assert res.model is not None and res.model.training["steps"] == len(losses)
    # a few seconds of training already beat the noisy input clearly
    assert psnr(clean, res.data) > psnr(clean, noisy) + 2.0


def test_training_stops_when_the_generator_is_closed():
    _, noisy = _nuclei_crop((64, 64))
    gen = train_n2v([noisy], time_budget=60.0, device="cpu", features=8)
    steps = 0
    for p in gen:
        if "loss" in p.info:
            steps += 1
        if steps == 2:
            t0 = time.perf_counter()
            gen.close()
            break
    assert time.perf_counter() - t0 < 1.0


def test_3d_volume_awkward_size_float64_keeps_geometry():
    rec = read_image(data_path("mri/brain_t1_aseg/t1.nii.gz"))[0]
    vol = np.asarray(rec.data)[60:93, 80:114, 100:135].astype(np.float64)  # 33x34x35, 1 mm
    sub = ImageRecord(data=vol, affine=rec.affine, space="RAS", modality="MR", name="t1")
    res = run_sync(
        denoise(sub, "n2v", max_steps=3, time_budget=0, device="cpu", features=4, patch_size=16)
    )
    assert res.data.shape == (33, 34, 35) and res.data.dtype == np.float64
    assert res.provenance["network"]["dims"] == 3
    np.testing.assert_array_equal(res.affine, rec.affine)
    assert vol.min() <= res.data.min() and res.data.max() <= vol.max()
    # classical on the same volume
    tv = run_sync(denoise(sub, "tv"))
    assert tv.data.shape == vol.shape and tv.data.dtype == np.float64


def test_thick_slice_ct_runs_slice_by_slice():
    rec = read_image(data_path("ct/spleen/image.nii.gz"))[0]  # 0.8 x 0.8 x 5 mm
    vol = np.asarray(rec.data)[40:73, 50:84, 5:12]
    sub = ImageRecord(data=vol, affine=rec.affine, space="RAS", modality="CT", name="ct")
    res = run_sync(denoise(sub, "n2v2", max_steps=2, time_budget=0, device="cpu", features=4))
    assert res.provenance["network"]["dims"] == 2
    assert res.provenance["network"]["slice_axis"] == 2
    assert res.data.shape == vol.shape


def test_4d_needs_the_frame_axis_and_then_denoises_each_frame():
    rec = read_image(data_path("denoising/fmri_30frames.nii.gz"))[0]
    arr = np.asarray(rec.data)[20:41, 20:43, :, :4]  # 21x23x6 x 4 frames, int16
    sub = ImageRecord(data=arr, affine=rec.affine, space="RAS", modality="MR", name="fmri")
    with pytest.raises(MedsegError, match=r"4 frames along axis 3.*--axis 3"):
        run_sync(denoise(sub, "tv"))
    with pytest.raises(MedsegError, match="spatial or colour"):
        run_sync(denoise(sub, "tv", axis=1))
    res = run_sync(
        denoise(sub, "n2v2", axis=3, max_steps=2, time_budget=0, device="cpu", features=4)
    )
    assert res.data.shape == arr.shape and res.data.dtype == np.int16
    assert res.provenance["frames"] == 4
    assert res.model.training["n_images"] == 4  # one network for all frames
    wav = run_sync(denoise(sub, "wavelet", axis=-1))
    assert wav.data.shape == arr.shape
    assert not np.array_equal(wav.data[..., 0], arr[..., 0])


def test_rgb_pathology_uint8():
    img = np.asarray(read_image(data_path("pathology/he_tile_tcia.jpg"))[0].data)
    crop = img[:40, :50]
    rec = _rec2d(crop, modality="pathology", rgb=True)
    for method in ("wavelet", "nlmeans", "bilateral"):
        res = run_sync(denoise(rec, method))
        assert res.data.shape == (40, 50, 3) and res.data.dtype == np.uint8
    res = run_sync(denoise(rec, "n2v2", max_steps=2, time_budget=0, device="cpu", features=4))
    assert res.data.shape == (40, 50, 3) and res.data.dtype == np.uint8
    assert res.model.channels == 3


def test_bad_input_constant_nan_and_too_small():
    with pytest.raises(MedsegError, match="constant"):
        run_sync(denoise(_rec2d(np.full((30, 31), 7, np.int16)), "nlmeans"))
    with pytest.raises(MedsegError, match="no finite value"):
        run_sync(denoise(_rec2d(np.full((30, 31), np.nan, np.float32)), "tv"))
    with pytest.raises(MedsegError, match="too small"):
        run_sync(denoise(_rec2d(RNG.random((6, 40)).astype(np.float32)), "n2v2"))
    with pytest.raises(MedsegError, match="unknown denoising method"):
        run_sync(denoise(_rec2d(RNG.random((16, 16)).astype(np.float32)), "magic"))
    # small images still work with classical methods
    small = run_sync(denoise(_rec2d(RNG.random((6, 7)).astype(np.float32)), "tv"))
    assert small.data.shape == (6, 7)
    # NaNs: filled for the computation, put back where they were
    _, noisy = _nuclei_crop((40, 41))
    noisy[3:5, 7:9] = np.nan
    res = run_sync(denoise(_rec2d(noisy), "nlmeans"))
    assert np.isnan(res.data[3:5, 7:9]).all()
    assert np.isfinite(res.data).sum() == noisy.size - 4
    assert "NaN" in res.provenance["notes"][0]


def test_saved_denoiser_is_a_model_folder_and_reusable(tmp_path):
    _, noisy = _nuclei_crop((64, 72), seed=1)
    _, other = _nuclei_crop((50, 61), seed=2)
    res = run_sync(
        denoise(_rec2d(noisy), "n2v2", max_steps=3, time_budget=0, device="cpu", features=4)
    )
    folder = save_denoiser(tmp_path / "my_denoiser", res.model)
    card = json.loads((folder / "model.json").read_text())
    assert card["task"] == "denoising" and card["dims"] == 2 and card["in_channels"] == 1
    assert len(card["sha256"]) == 64 and (folder / "weights.safetensors").is_file()
    assert card["training"]["steps"] == 3
    loaded = load_denoiser(folder)
    a = run_sync(denoise(_rec2d(other), model=loaded, device="cpu"))
    b = run_sync(denoise(_rec2d(other), model=str(folder), device="cpu"))
    c = run_sync(denoise(_rec2d(other), model=res.model, device="cpu"))
    np.testing.assert_allclose(a.data, c.data, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.provenance["network"]["reused"] is True
    # a damaged weights file is refused with a sentence
    w = folder / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(MedsegError, match="sha256"):
        load_denoiser(folder)
