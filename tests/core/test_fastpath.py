"""The inference fast path (core/engine/fastpath.py): detection, folding, the fidelity guard,
and label fidelity against the network as loaded (fp32) on real scans."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from napari_medseg.core.engine import fastpath
from napari_medseg.core.engine.fastpath import (
    FIDELITY_MIN_DICE,
    bf16_support,
    cpu_flags,
    fold_batchnorm,
    prepare_network,
    resolve_precision,
)
from napari_medseg.errors import MedsegError
from tests.conftest import data_path


def _bundle_unet() -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")


def _scramble_bn(net: torch.nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


def dice_per_class(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for c in np.union1d(np.unique(a), np.unique(b)):
        x, y = a == c, b == c
        out[int(c)] = 2.0 * float((x & y).sum()) / float(x.sum() + y.sum())
    return out


# --------------------------------------------------------------------------- detection


def test_bf16_detection_follows_the_cpu_flags():
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    ok, why = bf16_support("cpu")
    assert ok is native
    assert torch.backends.cpu.get_cpu_capability() in why
    prec, reason = resolve_precision("cpu", "auto")
    assert prec == ("bf16" if native else "fp32")
    assert reason.startswith("auto")
    assert resolve_precision("cpu", "bf16")[0] == "bf16"  # asked for: run as asked
    if not native:
        assert "emulated" in resolve_precision("cpu", "bf16")[1]


def test_unknown_precision_is_one_sentence():
    with pytest.raises(MedsegError, match="unknown precision 'fp8'"):
        resolve_precision("cpu", "fp8")


# --------------------------------------------------------------------------- folding


def test_fold_batchnorm_keeps_outputs_and_leaves_the_model_alone():
    net = _bundle_unet().eval()
    _scramble_bn(net)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x)
        folded, n = fold_batchnorm(net)
        y = folded(x)
    # every BatchNorm of this UNet follows a convolution (4 of them transposed ones)
    assert n == n_bn == 17
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) == n_bn


def test_fold_batchnorm_skips_training_mode_and_instance_norm():
    net = _bundle_unet().train()
    assert fold_batchnorm(net) == (net, 0)
    from monai.networks.nets import UNet

    inorm = UNet(3, 1, 2, (8, 16), (2,), num_res_units=1, norm="instance").eval()
    assert fold_batchnorm(inorm) == (inorm, 0)


def test_prepared_network_outputs_ordinary_float_tensors():
    net = _bundle_unet().eval()
    fast, info = prepare_network(net, "cpu", "fp32")
    assert info.memory_format == "channels_last_3d" and info.batchnorm_folded == 17
    assert info.threads == torch.get_num_threads() and info.inference_mode
    y = fast(torch.rand(1, 1, 32, 32, 32))
    assert y.dtype == torch.float32 and y.is_contiguous() and not y.is_inference()
    y.add_(1.0)  # callers update outputs in place (sliding-window blending)
    with torch.no_grad():
        ref = net(torch.zeros(1, 1, 32, 32, 32))
    torch.testing.assert_close(fast(torch.zeros(1, 1, 32, 32, 32)), ref, rtol=1e-4, atol=1e-4)


class _JitIsinstanceSkip(torch.nn.Module):
    """Conv + BatchNorm, then a skip joined only when ``torch.jit.isinstance(skip, Tensor)``:
    what MONAI's ``UpCat`` (FlexibleUNet's decoder) does. ``torch.fx`` traces that test as
    False, so the traced copy drops the skip: a concatenation then fails (``"cat"``), an
    addition silently changes the outputs (``"add"``)."""

    def __init__(self, join: str) -> None:
        super().__init__()
        self.join = join
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(8 if join == "cat" else 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        skip = torch.tanh(y)
        if torch.jit.isinstance(skip, torch.Tensor):
            y = torch.cat([y, skip], dim=1) if self.join == "cat" else y + skip
        return self.head(y)


@pytest.mark.parametrize("join", ["cat", "add"])
def test_folding_that_changes_the_network_runs_it_unfolded(join):
    net = _JitIsinstanceSkip(join).eval()
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x)
    fast, info = prepare_network(net, "cpu", "fp32")
    assert info.batchnorm_folded == 1  # the trace folds it, and loses the skip
    y = fast(x)
    torch.testing.assert_close(y, ref)  # the first batch: the original network's output
    assert info.batchnorm_folded == 0 and info.memory_format == "contiguous"
    why = "it failed" if join == "cat" else "its outputs differ"
    assert any("folding changed" in n and why in n for n in info.notes), info.notes
    torch.testing.assert_close(fast(x[:1]), ref[:1])  # and every batch after it


def test_folding_that_keeps_the_outputs_is_kept():
    net = _bundle_unet().eval()
    _scramble_bn(net)
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    fast, info = prepare_network(net, "cpu", "fp32")
    with torch.no_grad():
        ref = net(x)
    torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-4)
    assert info.batchnorm_folded == 17 and not any("folding changed" in n for n in info.notes)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.net.modules())


# --------------------------------------------------------------------------- fidelity guard


class _NearTie(torch.nn.Module):
    """Two logits that differ by 1e-3 x (x - 0.5): class 1 where x > 0.5 in fp32; bf16 (8
    mantissa bits) rounds the difference away."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 1.001]).reshape(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -0.0005]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Separated(_NearTie):
    """Logits +-4 (x - 0.5): two well-separated classes; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-4.0, 4.0]).reshape(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([2.0, -2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x)


def _pretend_native_bf16(monkeypatch):
    monkeypatch.setattr(fastpath, "bf16_support", lambda device: (True, "pretend native bf16"))


def test_auto_precision_falls_back_to_fp32_when_labels_change(monkeypatch):
    _pretend_native_bf16(monkeypatch)
    net = _NearTie().eval()
    fast, info = prepare_network(net, "cpu", "auto")
    assert info.precision == "bf16" and info.fidelity == "pending"
    x = torch.rand(2, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="ran in fp32 instead"):
        y = fast(x)
    with torch.no_grad():
        ref = net(x)
    assert info.precision == "fp32" and "instead" in info.fidelity
    torch.testing.assert_close(y, ref)  # the fp32 result is what came back
    torch.testing.assert_close(fast(x), ref)  # and fp32 from then on
    # plain bf16 would indeed have changed the labels (the test can fail)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        low = net(x).float()
    assert (low.argmax(1) != ref.argmax(1)).float().mean() > 0.05


def test_auto_precision_keeps_bf16_when_labels_agree(monkeypatch):
    _pretend_native_bf16(monkeypatch)
    net = _Separated().eval()
    fast, info = prepare_network(net, "cpu", "auto")
    x = torch.rand(2, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    n = fastpath.FIDELITY_CHECK_BATCHES
    for _ in range(n + 2):
        fast(x)
    assert info.precision == "bf16" and "agrees" in info.fidelity
    assert net.calls == 2 * n + 2  # the first n batches also ran in fp32, then no more


def test_explicit_precision_is_not_second_guessed():
    fast, info = prepare_network(_NearTie().eval(), "cpu", "bf16")
    fast(torch.rand(1, 1, 8, 8, 8))
    assert info.precision == "bf16" and info.fidelity == "not needed"


# --------------------------------------------------------------------------- real scans


def _segment(record, model, **kw):
    from napari_medseg.core.segment.segment import segment
    from napari_medseg.progress import run_sync

    return run_sync(segment(record, model, device="cpu", **kw))


def _check_fidelity(record, model, precisions=("auto", "bf16")):
    ref = _segment(record, model, fast_path=False)
    assert ref.provenance["fast_path"]["precision"] == "fp32"
    classes = np.unique(ref.labels)
    assert len(classes) >= 2, "a fidelity check on a one-class result could not fail"
    for prec in precisions:
        res = _segment(record, model, precision=prec)
        fp = res.provenance["fast_path"]
        assert fp["precision_requested"] == prec
        d = dice_per_class(res.labels, ref.labels)
        assert min(d.values()) >= FIDELITY_MIN_DICE, (prec, fp, d)
    return ref, res


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("ct_spleen_3d", "ct/spleen/image.nii.gz"),
        ("mr_spinalcord_3d", "mri/spinal_cord/t2.nii.gz"),
        ("fluo_nuclei_2d", "microscopy/dsb2018_nuclei/image.tif"),
    ],
)
def test_builtin_models_keep_their_labels(name, image):
    from napari_medseg.io import read_image
    from napari_medseg.models.registry import load_model

    record = read_image(data_path(image))[0]
    _check_fidelity(record, load_model(name))


def _spleen_bundle(tmp_path, record):
    """The real spleen_ct_segmentation bundle config with random weights (seed 0), the last
    bias centred on this scan so that both classes occur (random weights alone give one)."""
    from napari_medseg.core.engine.preprocess import to_model_grid
    from napari_medseg.models.registry import load_model

    src = data_path("monai_bundles/spleen_ct_segmentation/configs")
    root = tmp_path / "spleen_ct_segmentation"
    shutil.copytree(src, root / "configs")
    (root / "models").mkdir()
    net = _bundle_unet()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    model = load_model(str(root), device="cpu")
    x, _ = to_model_grid(record, model.card)
    with torch.no_grad():
        y = model.network.eval()(torch.nn.functional.pad(x, (0, 0, 0, 8, 0, 8))[None])[0]
    shift = float(torch.quantile((y[1] - y[0]).flatten()[::5], 0.8))
    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.bias[1] -= shift
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return load_model(str(root), device="cpu")


def test_monai_bundle_network_keeps_its_labels(tmp_path):
    from napari_medseg.io import read_image

    record = read_image(data_path("ct/spleen/image.nii.gz"))[0]
    model = _spleen_bundle(tmp_path, record)
    ref, res = _check_fidelity(record, model)
    fp = res.provenance["fast_path"]
    assert fp["batchnorm_folded"] == 17 and fp["memory_format"] == "channels_last_3d"
    fg = float((ref.labels > 0).mean())
    assert 0.02 < fg < 0.98  # both classes really occur


def test_nnunet_folder_keeps_its_labels():
    """An nnU-Net v2 folder (nnunetv2's planner, random weights) through the fast path: the
    same labels as the network as loaded (Dice >= 0.99 per class) with ``auto``. Forced bf16 is
    not checked here: on this random-weight network, whose logits are near ties, it moved one
    class to Dice 0.975 (measured), which is why ``auto`` only keeps a reduced precision after
    the labels guard agrees."""
    from napari_medseg.io import read_image
    from napari_medseg.models.registry import load_model
    from tests.models.nnunet_helpers import model_folders

    folder = model_folders("ct")["3d_fullres"]
    record = read_image(data_path("ct/totalseg_small/ct.nii.gz"))[0]
    model = load_model(folder, folds=[0])
    ref, res = _check_fidelity(record, model, precisions=("auto",))
    assert ref.provenance["fast_path"]["inference_mode"] is False  # the reference as loaded
    fp = res.provenance["fast_path"]
    assert fp["device"] == "cpu" and fp["threads"] >= 1
    assert res.provenance["parameters"]["precision"] == fp["precision"]


# --------------------------------------------------------------------------- provenance, CLI


def test_provenance_and_verbose_cli_say_what_ran(tmp_path, capsys):
    from napari_medseg.cli import main

    image = data_path("ct/spleen/image.nii.gz")
    out = tmp_path / "seg.nii.gz"
    argv = ["segment", str(image), "-m", "ct_spleen_3d", "-o", str(out)]
    rc = main([*argv, "--precision", "fp32", "--verbose", "--quiet"])
    assert rc == 0
    prov = json.loads((tmp_path / "seg.nii.gz.provenance.json").read_text())
    fp = prov["fast_path"]
    assert fp["precision"] == "fp32" and fp["precision_requested"] == "fp32"
    assert fp["memory_format"] in ("contiguous", "channels_last_3d")
    assert fp["threads"] >= 1 and fp["device"] == "cpu"
    t = prov["timings_s"]
    for stage in ("read", "preprocess", "network", "resample_back", "postprocess", "write"):
        assert t[stage] >= 0.0
    assert t["network"] > 0.0 and t["file_total"] >= t["total"]
    err = capsys.readouterr().err
    assert "stages: read" in err and "network: fp32" in err
