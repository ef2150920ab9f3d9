"""Sliding-window engine: exact reconstruction, cancellation, progress, TTA, OOM handling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_medseg.core.engine.windows import (  # noqa: E402
    importance_map,
    plan_windows,
    resolve_device,
    sliding_window,
)
from napari_medseg.errors import MedsegError  # noqa: E402
from napari_medseg.progress import run_sync  # noqa: E402


def _run(gen):
    return run_sync(gen)


class Counting:
    """Identity-like predictor (channel k+1 = -channel k) that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.batches: list[int] = []

    def __call__(self, x):
        self.calls += 1
        self.batches.append(int(x.shape[0]))
        return torch.cat([x, -x], dim=1)


@pytest.mark.parametrize(
    "shape, roi",
    [
        ((2, 33, 34, 35), (16, 16, 16)),
        ((1, 37, 50), (16, 20)),
        ((1, 10, 12, 5), (16, 16, 8)),  # smaller than the window: padding
        ((1, 20, 7), (8, 16)),  # mixed: larger on one axis, smaller on the other
    ],
)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_identity_reconstruction(shape, roi, overlap, mode):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    pred = Counting()
    out = _run(
        sliding_window(x, pred, roi, overlap=overlap, batch_size=3, mode=mode, activation=None)
    )
    c = shape[0]
    assert tuple(out.shape) == (2 * c, *shape[1:])
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[:c].numpy(), x, atol=1e-5)
    np.testing.assert_allclose(out[c:].numpy(), -x, atol=1e-5)
    n_win = len(plan_windows([max(s, r) for s, r in zip(shape[1:], roi)], roi, overlap))
    assert sum(pred.batches) == n_win
    assert max(pred.batches) <= 3


def test_softmax_blend_is_pointwise_softmax():
    x = np.random.default_rng(1).normal(size=(1, 33, 34, 35)).astype(np.float32)
    out = _run(sliding_window(x, lambda t: torch.cat([t, 2 * t], 1), (16, 16, 16)))
    expect = torch.softmax(torch.cat([torch.from_numpy(x), 2 * torch.from_numpy(x)], 0), 0)
    np.testing.assert_allclose(out.numpy(), expect.numpy(), atol=1e-5)
    np.testing.assert_allclose(out.sum(0).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_batch_size_does_not_change_result(batch_size):
    x = torch.randn(1, 33, 34, 35, generator=torch.Generator().manual_seed(2))
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    ref = _run(sliding_window(x, conv, (16, 16, 16), batch_size=1))
    out = _run(sliding_window(x, conv, (16, 16, 16), batch_size=batch_size))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_matches_monai_with_constant_blend():
    from monai.inferers import sliding_window_inference

    x = torch.randn(1, 1, 33, 34, 35, generator=torch.Generator().manual_seed(3))
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    with torch.no_grad():
        ref = sliding_window_inference(x, (16, 16, 16), 4, conv, overlap=0.5, mode="constant")
    out = _run(sliding_window(x[0], conv, (16, 16, 16), mode="constant", activation=None))
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)


def test_close_mid_way_stops_the_work():
    x = torch.zeros(1, 64, 64, 32)
    pred = Counting()
    gen = sliding_window(x, pred, (16, 16, 16), overlap=0.5, batch_size=2)
    seen = [next(gen), next(gen)]
    assert pred.calls == 2
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)
    assert pred.calls == 2
    assert seen[-1].done == 4 and seen[-1].total > 100


def test_progress_monotone_and_complete():
    x = torch.zeros(1, 33, 34, 35)
    reports = []
    run_sync(sliding_window(x, Counting(), (16, 16, 16), batch_size=3), reports.append)
    done = [p.done for p in reports]
    assert done == sorted(done)
    assert reports[-1].done == reports[-1].total == len(plan_windows((33, 34, 35), (16,) * 3))
    assert len({p.total for p in reports}) == 1


def _symmetric_conv(nd: int, asym: bool = False):
    conv = (torch.nn.Conv3d if nd == 3 else torch.nn.Conv2d)(1, 2, 3, padding=1, bias=True)
    with torch.no_grad():
        k = torch.rand(2, 1, *([3] * nd), generator=torch.Generator().manual_seed(4))
        for d in range(2, 2 + nd):
            k = k + torch.flip(k, [d])  # symmetric under every flip
        if asym:
            k[0, ..., 0] += 3.0  # channel 0 only: softmax sees the asymmetry
        conv.weight.copy_(k)
    return conv


@pytest.mark.parametrize(
    "nd, shape, roi", [(3, (1, 33, 34, 35), (16, 16, 16)), (2, (1, 37, 50), (16, 20))]
)
def test_tta_with_flip_equivariant_predictor_equals_plain(nd, shape, roi):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    conv = _symmetric_conv(nd)
    calls = {"n": 0}

    def pred(t):
        calls["n"] += 1
        return conv(t)

    plain = _run(sliding_window(x, pred, roi, batch_size=64))
    n_plain = calls["n"]
    tta = _run(sliding_window(x, pred, roi, batch_size=64, tta_flips=True))
    assert calls["n"] - n_plain == n_plain * 2**nd  # 8x in 3D, 4x in 2D
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=1e-5)
    # and TTA really flips: a predictor that is not flip-equivariant gives another answer
    asym = _symmetric_conv(nd, asym=True)
    a0 = _run(sliding_window(x, asym, roi, batch_size=64))
    a1 = _run(sliding_window(x, asym, roi, batch_size=64, tta_flips=True))
    assert (a0 - a1).abs().max() > 1e-3


def test_oom_halves_batch_and_says_so():
    x = torch.randn(1, 33, 34, 35, generator=torch.Generator().manual_seed(6))
    seen = []

    def pred(t):
        seen.append(t.shape[0])
        if t.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.cat([t, -t], 1)

    reports = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = run_sync(
            sliding_window(x, pred, (16, 16, 16), batch_size=4, activation=None), reports.append
        )
    np.testing.assert_allclose(out[0].numpy(), x[0].numpy(), atol=1e-5)
    assert seen[:3] == [4, 2, 1]
    assert any("batch size reduced to 1" in p.message for p in reports)
    assert any("out of GPU memory" in str(m.message) for m in w)


def test_oom_on_cpu_at_batch_one_is_a_clear_error():
    def pred(t):
        raise torch.cuda.OutOfMemoryError("simulated")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MedsegError, match="out of memory"):
            _run(sliding_window(torch.zeros(1, 20, 20), pred, (8, 8), batch_size=2))


def test_importance_map_symmetric_and_positive():
    from monai.data.utils import compute_importance_map

    torch.testing.assert_close(
        importance_map((96, 96, 16)), compute_importance_map((96, 96, 16), mode="gaussian")
    )
    w = importance_map((16, 20, 7))
    assert w.shape == (16, 20, 7)
    assert 0.9 < float(w.max()) <= 1.0
    assert float(w.min()) == pytest.approx(1e-3)
    for d in range(3):
        torch.testing.assert_close(w, torch.flip(w, [d]))


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(MedsegError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedsegError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_bad_window_dimension_is_an_error():
    with pytest.raises(MedsegError):
        _run(sliding_window(torch.zeros(1, 8, 8, 8), lambda t: t, (4, 4)))


def test_window_plan_is_lazy_and_equals_the_product_of_axis_starts():
    import itertools
    import tracemalloc

    plan = plan_windows((33, 34, 35), (16, 16, 16), 0.5)
    starts = [[0, 8, 16, 17], [0, 8, 16, 18], [0, 8, 16, 19]]
    want = [tuple(slice(s, s + 16) for s in st) for st in itertools.product(*starts)]
    assert len(plan) == len(want) and list(plan) == want
    assert plan[5] == want[5] and plan[-1] == want[-1] and plan[3:9] == want[3:9]
    with pytest.raises(IndexError):
        plan[len(want)]
    tracemalloc.start()
    big = plan_windows((170, 170, 30), (8, 8, 2), 0.75)  # 194,996 windows
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(big) == 194_996 and peak < 1_000_000  # not listed up front (as a list: 47 MB)
    assert big[-1] == (slice(162, 170), slice(162, 170), slice(28, 30))
