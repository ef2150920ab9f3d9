"""Noise model, variance-stabilising transform and the ``auto`` denoiser on real and known noise."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.denoise.classical import calibrate, psnr
from napari_medseg.core.denoise.denoising import denoise
from napari_medseg.core.denoise.noise import (
    NoiseModel,
    estimate_noise_model,
    gat_forward,
    gat_inverse,
)
from napari_medseg.errors import MedsegError
from napari_medseg.io import read_image
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import run_sync
from tests.conftest import data_path


def _ramp(shape=(192, 192), lo=2.0, hi=60.0):
    """A smooth ramp of expected photon counts (no edges: every pixel measures the noise)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return lo + (hi - lo) * (yy + xx) / (shape[0] + shape[1] - 2)


def _camera(signal, gain=3.0, read=4.0, offset=0.0, seed=0):
    rs = np.random.default_rng(seed)
    return gain * rs.poisson(signal) + offset + rs.normal(0.0, read, signal.shape)


def test_poisson_gaussian_gain_and_floor_recovered_from_one_image():
    img = _camera(_ramp(), gain=3.0, read=4.0)
    m = estimate_noise_model(img)
    assert m.gain == pytest.approx(3.0, rel=0.1), m.summary()
    assert m.floor == pytest.approx(16.0, abs=8.0), m.summary()
    assert m.signal_dependent and m.correlated_axes() == []
    # constant-variance noise: no gain, the variance is the floor
    flat = _ramp() * 3.0 + np.random.default_rng(1).normal(0, 5.0, (192, 192))
    g = estimate_noise_model(flat)
    assert g.gain < 0.3 and g.floor == pytest.approx(25.0, rel=0.2) and not g.signal_dependent


def test_background_region_fixes_offset_and_read_noise():
    sig = _ramp()
    sig[:40, :40] = 0.0  # no signal in the corner
    img = _camera(sig, gain=2.0, read=3.0, offset=100.0)
    bg = np.zeros(img.shape, dtype=bool)
    bg[:40, :40] = True
    m = estimate_noise_model(img, bg)
    assert m.source == "background region"
    assert m.offset == pytest.approx(100.0, abs=0.5) and m.read_noise == pytest.approx(3.0, rel=0.1)
    assert m.gain == pytest.approx(2.0, rel=0.15), m.summary()
    with pytest.raises(MedsegError, match="fewer than 30"):
        estimate_noise_model(img, np.zeros(img.shape, dtype=bool))
    with pytest.raises(MedsegError, match="shape"):
        estimate_noise_model(img, bg[:10])


def test_correlated_noise_is_detected_along_its_axis():
    rs = np.random.default_rng(2)
    white = rs.normal(0, 1, (200, 201))
    smeared = 50 + 5 * (white[:, 1:] + white[:, :-1])  # neighbours along axis 1 share noise
    assert estimate_noise_model(50 + 5 * white).correlated_axes() == []
    m = estimate_noise_model(smeared)
    assert m.correlated_axes() == [1], m.correlation


def test_anscombe_stabilises_variance_and_inverse_is_unbiased_at_low_counts():
    rs = np.random.default_rng(3)
    m = NoiseModel(gain=1.0, floor=0.0, bins=[[1.0, 1.0, 1.0]])
    for lam in (2.0, 5.0, 20.0):
        z = rs.poisson(lam, 200_000).astype(np.float64)
        d = gat_forward(z, m)
        assert d.std() == pytest.approx(1.0, abs=0.12), lam
        # the exact unbiased inverse of the *mean* transformed value returns the count
        back = float(gat_inverse(np.array([d.mean()]), m)[0])
        algebraic = (d.mean() / 2) ** 2 - 3 / 8
        assert back == pytest.approx(lam, rel=0.03), lam
        if lam <= 5:
            assert abs(algebraic - lam) > 3 * abs(back - lam)  # the plain inverse is biased


def test_real_w2s_frame_gain_matches_the_400_frame_mean():
    """The gain estimated from one real frame equals the one measured against its mean."""
    noisy = np.asarray(
        read_image(data_path("denoising/real_pairs/w2s_010_0_noisy.tif"))[0].data, np.float64
    )
    mean = np.asarray(
        read_image(data_path("denoising/real_pairs/w2s_010_0_mean400.tif"))[0].data, np.float64
    )
    a = np.stack([mean.ravel(), np.ones(mean.size)], 1)
    (s, o), *_ = np.linalg.lstsq(a, noisy.ravel(), rcond=None)
    expected = s * mean + o  # the frame is on another intensity scale than the mean
    resid = noisy - expected
    keep = (noisy > 0) & (noisy < 255)
    lv = np.polyfit(expected[keep], resid[keep] ** 2, 1)[0]  # variance slope: the true gain
    m = estimate_noise_model(noisy)
    assert m.gain == pytest.approx(lv, rel=0.15), (m.summary(), lv)
    assert m.correlated_axes() == []


def test_calibrated_gaussian_beats_a_fixed_width_on_real_noise():
    noisy = np.asarray(
        read_image(data_path("denoising/real_pairs/fmd_R1_noisy.png"))[0].data, np.float32
    )
    ref = np.asarray(
        read_image(data_path("denoising/real_pairs/fmd_R1_mean50.png"))[0].data, np.float64
    )
    run = run_sync(denoise(ImageRecord(data=noisy, affine=np.eye(3), space="pixel"), "gaussian"))
    width = run.provenance["classical"]["parameter"]
    assert 0.5 <= width <= 1.25  # measured best: 0.75 px (docs/denoising.md)
    from scipy import ndimage as ndi

    fixed = ndi.gaussian_filter(noisy, 1.5)
    assert psnr(ref, run.data, 255) > psnr(ref, fixed, 255) + 0.5
    v = gat_forward(noisy, estimate_noise_model(noisy))
    p, loss = calibrate(v, "tv", 1.0, None, None)
    assert p > 0 and loss > 0


def test_auto_uses_filters_only_on_correlated_noise_and_network_otherwise():
    rs = np.random.default_rng(4)
    img = np.asarray(
        read_image(data_path("microscopy/dsb2018_nuclei/image.tif"))[0].data, np.float64
    )[100:164, 150:214]
    white = rs.normal(0, 1, (64, 65))
    corr = img + 8 * (white[:, 1:] + white[:, :-1])
    r = run_sync(denoise(ImageRecord(data=corr, affine=np.eye(3), space="pixel"), max_steps=3))
    assert (
        r.provenance["auto"]["network"] is False and "correlated" in r.provenance["auto"]["reason"]
    )
    assert r.model is None and "mean of" in r.provenance["classical"]
    clean = img / img.max() * 20
    noisy = rs.poisson(clean).astype(np.float32)
    r = run_sync(
        denoise(
            ImageRecord(data=noisy, affine=np.eye(3), space="pixel"),
            max_steps=3,
            time_budget=60,
            device="cpu",
        )
    )
    net = r.provenance["network"]
    assert r.provenance["auto"]["network"] and net["blend_with_classical"] and net["tta"]
    assert net["vst"] and net["training"]["steps"] == 3
    assert r.data.shape == noisy.shape and r.data.dtype == noisy.dtype
