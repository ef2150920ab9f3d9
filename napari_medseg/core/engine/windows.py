"""Sliding-window inference as a cancellable generator (docs/ARCHITECTURE.md rule 2).

The loop lives here (not in :func:`monai.inferers.sliding_window_inference`) so that it can
yield :class:`~napari_medseg.progress.Progress` after every batch of windows and be
cancelled between batches (``gen.close()``, ``worker.quit()``).

What is blended
---------------
Each window's network output is turned into **probabilities** (softmax over channels by
default, ``activation="softmax"``) *before* it is weighted and averaged, as nnU-Net does.
MONAI's ``sliding_window_inference`` averages whatever the predictor returns (usually logits);
averaging probabilities is the better-behaved choice when the windows disagree (a very
confident logit in one window cannot overrule several windows) and it is what flip TTA
averages too. The returned tensor is therefore a probability map ``(K, *spatial)`` that sums
to 1 over ``K`` (up to float error). ``activation=None`` blends the raw outputs instead.

Window layout
-------------
Windows start every ``int(roi * (1 - overlap))`` voxels along each axis (at least 1), the last
one is shifted back to end at the image border (MONAI's layout). Images smaller than the
window along an axis are padded symmetrically with ``pad_value`` (0: after intensity
normalisation this is the bottom of the window for CT, the mean for z-scored MR) and the
padding is cropped off the result. The Gaussian importance map is centred on the window centre
``(roi - 1) / 2`` (symmetric, so flips do not move it), with ``sigma = sigma_scale * roi`` and
weights below ``1e-3`` raised to ``1e-3``: the same map as MONAI 1.6's
``compute_importance_map``, so both blend identically.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "amp_dtype",
    "importance_map",
    "main_output",
    "plan_windows",
    "resolve_device",
    "sliding_window",
]


def slicewise(net: Any) -> Any:
    """Wrap a 2D network so the sliding window can run it on ``(B, C, H, W, 1)`` windows.

    A 2D model on a volume runs slice by slice: the volume's slice axis is last, the window
    depth along it is 1, and this wrapper drops and restores that axis.
    """
    import torch

    class SliceWise(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x[..., 0])[..., None]

    return SliceWise(net)


def resolve_device(name: str | Any = "auto") -> torch.device:
    """Turn ``"auto"|"cpu"|"cuda"|"cuda:N"|"mps"`` into a :class:`torch.device`.

    ``"auto"`` picks CUDA when available, then Apple MPS, else the CPU.

    Raises
    ------
    MedsegError
        When CUDA or MPS is asked for and this machine (or this torch build) has none.
    """
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    name = str(name or "auto").strip().lower()
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MedsegError(
                "device 'cuda' was requested but no CUDA GPU is available to this torch "
                f"build ({torch.__version__}); use --device cpu or auto"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MedsegError(
                f"device {name!r} was requested but only {torch.cuda.device_count()} CUDA "
                "GPU(s) are present"
            )
        return dev
    if name == "mps":
        if not mps_ok:
            raise MedsegError("device 'mps' was requested but Apple MPS is not available here")
        return torch.device("mps")
    raise MedsegError(f"unknown device {name!r}; use auto, cpu, cuda or mps")


def amp_dtype(device: torch.device, amp: bool | str = "auto") -> Any:
    """The autocast dtype for ``device`` (``None`` means no autocast).

    ``amp="auto"``: bfloat16 on CUDA (float16 where bf16 is unsupported), none elsewhere.
    ``amp=True``: like ``"auto"`` on CUDA, bfloat16 CPU autocast on the CPU.
    ``amp=False``: none.
    """
    import torch

    if amp is False or amp is None or amp == "none":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is True and device.type == "cpu":
        return torch.bfloat16
    return None


def plan_windows(
    spatial_shape: Sequence[int],
    roi_size: Sequence[int],
    overlap: float = 0.5,
    layout: Literal["monai", "nnunet"] = "monai",
) -> WindowPlan:
    """Window positions covering an (already padded) image.

    Parameters
    ----------
    spatial_shape : sequence of int
        Image size per spatial axis (each ``>= roi``).
    roi_size : sequence of int
        Window size per spatial axis.
    overlap : float
        Fraction in ``[0, 1)`` by which neighbouring windows overlap.
    layout : {"monai", "nnunet"}
        ``"monai"``: a start every ``int(roi * (1 - overlap))``, the last one moved back to the
        border. ``"nnunet"``: nnU-Net's ``compute_steps_for_sliding_window`` with step
        ``1 - overlap``: ``n = ceil((size - roi) / (roi * step)) + 1`` starts spread evenly
        (``round(i * (size - roi) / (n - 1))``, NumPy's round) from 0 to ``size - roi``. A
        window of size 1 (the slice axis of a 2D model on a volume) starts at every voxel.

    Returns
    -------
    WindowPlan
        One tuple of spatial slices per window, in C order (a lazy sequence).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    starts_per_axis = []
    for size, roi in zip(spatial_shape, roi_size):
        if size <= roi:
            starts_per_axis.append([0])
            continue
        if layout == "nnunet" and roi > 1:
            n = int(np.ceil((size - roi) / (roi * (1.0 - overlap)))) + 1
            actual = (size - roi) / (n - 1)
            starts_per_axis.append([int(np.round(actual * i)) for i in range(n)])
            continue
        step = max(1, int(roi * (1.0 - overlap)))
        n = math.ceil((size - roi) / step) + 1
        starts = sorted({min(i * step, size - roi) for i in range(n)})
        starts_per_axis.append(starts)
    return WindowPlan(starts_per_axis, roi_size)


class WindowPlan(Sequence):
    """The windows of :func:`plan_windows`, made on demand (as a list, 195k windows took 1.2 s
    and 47 MB before the first batch could run or be cancelled).

    Behaves as a read-only list of tuples of slices in C order (``len``, indexing, slicing,
    iteration).
    """

    def __init__(self, starts_per_axis: Sequence[Sequence[int]], roi_size: Sequence[int]):
        self._starts = [np.asarray(s, dtype=np.int64) for s in starts_per_axis]
        self._roi = tuple(int(r) for r in roi_size)
        self._shape = tuple(len(s) for s in self._starts)

    def __len__(self) -> int:
        return int(np.prod(self._shape))

    def _window(self, i: int) -> tuple[slice, ...]:
        idx = np.unravel_index(i, self._shape)
        return tuple(
            slice(int(st[k]), int(st[k]) + r) for st, k, r in zip(self._starts, idx, self._roi)
        )

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._window(k) for k in range(*i.indices(len(self)))]
        k = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= k < len(self):
            raise IndexError("window index out of range")
        return self._window(k)


def importance_map(
    roi_size: Sequence[int],
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    device: Any = "cpu",
) -> torch.Tensor:
    """Per-voxel blending weight of one window, shape ``roi_size``, float32, peak <= 1.

    ``mode="gaussian"``: separable Gaussian centred at ``(roi - 1) / 2`` with
    ``sigma = sigma_scale * roi`` voxels, clamped below at ``1e-3``; ``"constant"``: ones.
    """
    import torch

    if mode == "constant":
        return torch.ones(tuple(roi_size), dtype=torch.float32, device=device)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    scales = (
        [float(sigma_scale)] * len(roi_size)
        if np.isscalar(sigma_scale)
        else [float(s) for s in sigma_scale]  # type: ignore[union-attr]
    )
    w = torch.ones((), dtype=torch.float32, device=device)
    for r, sc in zip(roi_size, scales):
        x = torch.arange(r, dtype=torch.float32, device=device) - (r - 1) / 2.0
        sigma = max(sc * r, 1e-6)
        g = torch.exp(-0.5 * (x / sigma) ** 2)
        w = w[..., None] * g
    # MONAI's floor: tiny corner weights would let one window's border decide alone
    return w.clamp_(min=max(float(w.min()), 1e-3))


def _flip_sets(n_spatial: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """All subsets of spatial axes (as tensor dims of a ``(B, C, *spatial)`` batch), the empty
    one first; ``axes`` limits them to those spatial axes (0-based)."""
    dims = [2 + a for a in (range(n_spatial) if axes is None else sorted(set(axes)))]
    return [c for k in range(len(dims) + 1) for c in itertools.combinations(dims, k)]


def main_output(out: Any) -> Any:
    """The main output of a network's forward pass.

    Networks trained with deep supervision (nnU-Net, MONAI ``DynUNet``) may return a list or
    tuple of outputs, full resolution first; that first item is the prediction. A plain tensor
    is returned as it is.
    """
    if isinstance(out, (list, tuple)):
        return out[0]
    return out


def sliding_window(
    image: Any,
    predictor: Callable[[Any], Any],
    roi_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    mode: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 0.125,
    device: Any = "cpu",
    amp: bool | str = "auto",
    tta_flips: bool = False,
    out_dtype: Any = None,
    activation: Literal["softmax", "sigmoid"] | None = "softmax",
    pad_value: float = 0.0,
    padding_mode: str = "constant",
    layout: Literal["monai", "nnunet"] = "monai",
    weight_map: Any = None,
    flip_axes: Sequence[int] | None = None,
    acc_dtype: Any = None,
) -> Generator[Progress, None, torch.Tensor]:
    """Blend a network's predictions over overlapping windows; yields after every batch.

    Parameters
    ----------
    image : numpy.ndarray or torch.Tensor
        ``(C, *spatial)`` with 2 or 3 spatial axes, already normalised. It is moved to
        ``device`` as float32 (no copy when it already is).
    predictor : callable
        Maps a float tensor ``(B, C, *roi_size)`` on ``device`` to ``(B, K, *roi_size)``
        (logits). A ``torch.nn.Module`` is moved along when the engine falls back to the CPU;
        a plain function must cope with CPU inputs itself.
    roi_size : sequence of int
        Window size, one per spatial axis (voxels, same axis order as ``image``).
    overlap : float
        Fraction of a window shared with its neighbour, ``[0, 1)``.
    batch_size : int
        Windows per forward pass. Halved on CUDA out-of-memory, down to 1.
    mode : {"gaussian", "constant"}
        Blending weights within a window (see :func:`importance_map`).
    sigma_scale : float
        Gaussian sigma as a fraction of the window size.
    device : str or torch.device
        Where windows run and where the result is accumulated (float32).
    amp : bool or "auto"
        Autocast: ``"auto"`` = bf16 on CUDA (fp16 without bf16 support), none on CPU.
    tta_flips : bool
        Average over all flips of the spatial axes (each window is predicted flipped and
        flipped back). Costs ``2**n_spatial`` forward passes: 4x in 2D, 8x in 3D.
    out_dtype : torch.dtype, optional
        dtype of the returned map (default float32; accumulation is always float32).
    activation : {"softmax", "sigmoid", None}
        Applied to each window's output (in float32) before blending; see module docstring.
    pad_value : float
        Value used to pad images smaller than the window.
    padding_mode : {"constant", "replicate", "reflect", "circular"}
        How images smaller than the window are padded (MONAI's ``SlidingWindowInferer``
        ``padding_mode``); ``constant`` uses ``pad_value``.
    layout : {"monai", "nnunet"}
        Window placement (:func:`plan_windows`).
    weight_map : torch.Tensor, optional
        Blending weights of one window (shape ``roi_size``), instead of :func:`importance_map`
        (nnU-Net's own Gaussian, for example).
    flip_axes : sequence of int, optional
        With ``tta_flips``: the spatial axes (0-based) that may be flipped; every non-empty
        subset of them is predicted (nnU-Net's allowed mirroring axes). Default: all axes.
    acc_dtype : torch.dtype, optional
        dtype of the blending accumulators and of the final division (default float32).
        ``torch.float16`` reproduces nnU-Net's predictor, which accumulates weighted logits and
        weights in half precision (half the memory; near the image border, where the Gaussian
        weights are tiny, its rounding moves logits by up to ~0.5).

    Yields
    ------
    Progress
        ``done``/``total`` count forward passes (windows x flips); the message says when the
        batch was reduced or the work moved to the CPU after running out of GPU memory.

    Returns
    -------
    torch.Tensor
        ``(K, *spatial)`` blended probabilities (or blended raw outputs when
        ``activation=None``) on the device the work finished on, same spatial shape as
        ``image``.
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    out_dtype = out_dtype or torch.float32
    img = torch.as_tensor(image)
    if img.dtype != torch.float32:
        img = img.to(torch.float32)
    img = img.to(dev)
    n_sp = img.ndim - 1
    roi = tuple(int(r) for r in roi_size)
    if n_sp not in (2, 3) or len(roi) != n_sp:
        raise MedsegError(
            f"sliding window needs an image (C, *spatial) with 2 or 3 spatial axes and a window "
            f"of the same dimension; got image shape {tuple(img.shape)} and window {roi}"
        )
    if min(img.shape[1:]) < 1 or min(roi) < 1:
        raise MedsegError(f"the image {tuple(img.shape)} or window {roi} is empty")
    spatial = tuple(int(s) for s in img.shape[1:])
    batch_size = max(1, int(batch_size))

    # --- pad up to the window where the image is smaller (symmetric, like MONAI)
    pads = []  # (before, after) per spatial axis
    for s, r in zip(spatial, roi):
        extra = max(0, r - s)
        pads.append((extra // 2, extra - extra // 2))
    if any(a or b for a, b in pads):
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants last axis first
        if padding_mode == "constant":
            img = F.pad(img, flat, mode="constant", value=float(pad_value))
        else:  # torch pads these modes on batched input only
            img = F.pad(img[None], flat, mode=padding_mode)[0]
    padded = tuple(int(s) for s in img.shape[1:])

    windows = plan_windows(padded, roi, overlap, layout)
    flips = _flip_sets(n_sp, flip_axes) if tta_flips else [()]
    total = len(windows) * len(flips)
    if weight_map is not None:
        weight = torch.as_tensor(weight_map, dtype=torch.float32, device=dev)
    else:
        weight = importance_map(roi, mode, sigma_scale, dev)

    acc_dtype = acc_dtype or torch.float32
    acc: torch.Tensor | None = None  # (K, *padded) acc_dtype
    norm = torch.zeros((1, *padded), dtype=acc_dtype, device=dev)
    done = 0
    note = ""
    i = 0
    while i < len(windows):
        batch = windows[i : i + batch_size]
        partial = 0  # forward passes of this batch already reported (flip TTA)
        try:
            x = torch.stack([img[(slice(None), *w)] for w in batch])
            ac = amp_dtype(dev, amp)
            pred_sum = None
            for k, fl in enumerate(flips):
                xin = torch.flip(x, fl) if fl else x
                # no_grad (not inference_mode): the outputs are updated in place below
                with (
                    torch.no_grad(),
                    torch.autocast(dev.type, dtype=ac or torch.float32, enabled=ac is not None),
                ):
                    y = main_output(predictor(xin))
                y = y.float()
                if activation == "softmax":
                    y = torch.softmax(y, dim=1)
                elif activation == "sigmoid":
                    y = torch.sigmoid(y)
                if fl:
                    y = torch.flip(y, fl)
                pred_sum = y if pred_sum is None else pred_sum.add_(y)
                if k < len(flips) - 1:
                    done += len(batch)
                    partial += len(batch)
                    yield Progress(done, total, f"sliding window {done}/{total} (flip TTA)")
            assert pred_sum is not None
            if len(flips) > 1:
                pred_sum.div_(len(flips))
        except torch.cuda.OutOfMemoryError:
            # roll back the progress of a partly done TTA batch and retry smaller or on CPU
            done -= partial
            x = y = pred_sum = None  # noqa: F841 - free GPU memory before retrying
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if batch_size > 1:
                batch_size = max(1, batch_size // 2)
                note = f"out of GPU memory: batch size reduced to {batch_size}"
                warnings.warn(f"napari-medseg: {note}", RuntimeWarning, stacklevel=2)
                yield Progress(done, total, f"sliding window {done}/{total} ({note})")
                continue
            if dev.type == "cpu":
                raise MedsegError(
                    "the computer ran out of memory even with one window at a time; "
                    "use a smaller window or a smaller image"
                ) from None
            note = "out of GPU memory even with batch size 1: continuing on the CPU (slower)"
            warnings.warn(f"napari-medseg: {note}", RuntimeWarning, stacklevel=2)
            dev = torch.device("cpu")
            img, weight, norm = img.to(dev), weight.to(dev), norm.to(dev)
            if acc is not None:
                acc = acc.to(dev)
            if hasattr(predictor, "to"):
                predictor.to(dev)  # type: ignore[attr-defined]
            torch.cuda.empty_cache()
            yield Progress(done, total, f"sliding window {done}/{total} ({note})")
            continue

        if acc is None:
            acc = torch.zeros((pred_sum.shape[1], *padded), dtype=acc_dtype, device=dev)
        pred_sum.mul_(weight)
        for b, w in enumerate(batch):
            acc[(slice(None), *w)] += pred_sum[b]
            norm[(slice(None), *w)] += weight
        del pred_sum, x
        i += len(batch)
        done += len(batch)
        msg = f"sliding window {done}/{total}" + (f" ({note})" if note else "")
        yield Progress(done, total, msg)

    assert acc is not None
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial))
    acc = acc[(slice(None), *crop)]
    norm = norm[(slice(None), *crop)]
    acc.div_(norm)
    if any(a or b for a, b in pads):
        acc = acc.contiguous()
    if acc.dtype != out_dtype:
        acc = acc.to(out_dtype)
    return acc
