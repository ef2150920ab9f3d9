"""Noise2Void / N2V2: the blind-spot U-Net, its self-supervised training on the noisy image and
prediction over the image (:mod:`napari_medseg.core.denoise.denoising` drives it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import torch


N2V_METHODS = ("n2v2", "n2v")


#: Seconds of training by default: a 512x512 image takes about two minutes on 2 CPU cores.
DEFAULT_TIME_BUDGET = 90.0


#: Smallest size (pixels) along each axis the N2V network accepts.
MIN_SIZE = 8


ARCH = "N2VUNet"


@dataclass
class TrainedDenoiser:
    """A blind-spot network with what it needs to run on another image.

    Attributes
    ----------
    network : torch.nn.Module
        Maps ``(B, C, *patch)`` z-scored intensities to the same shape.
    dims : int
        2 (images, or volumes slice by slice) or 3.
    channels : int
        Input/output channels (1, or 3 for RGB).
    variant : str
        ``"n2v"`` or ``"n2v2"``.
    patch_size : list of int
        Training patch (pixels per axis).
    training : dict
        Steps, seconds, last loss, mask fraction, source images.
    """

    network: Any
    dims: int
    channels: int
    variant: str
    patch_size: list[int]
    training: dict = field(default_factory=dict)
    modality: str = "unknown"
    losses: list[float] = field(default_factory=list)


#: the N2V U-Net class, built on first use (torch is imported only then)
_N2VUNET: Any = None


def _n2v_unet_class() -> Any:
    """The N2V U-Net class, built lazily so that importing this module does not import torch."""
    global _N2VUNET
    if _N2VUNET is not None:
        return _N2VUNET
    import torch
    from torch import nn

    def conv(dims: int) -> Any:
        return nn.Conv2d if dims == 2 else nn.Conv3d

    def norm(dims: int) -> Any:
        return nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d

    class Block(nn.Sequential):
        def __init__(self, dims: int, cin: int, cout: int) -> None:
            super().__init__(
                conv(dims)(cin, cout, 3, padding=1),
                norm(dims)(cout),
                nn.ReLU(inplace=True),
                conv(dims)(cout, cout, 3, padding=1),
                norm(dims)(cout),
                nn.ReLU(inplace=True),
            )

    class MaxBlurPool(nn.Module):
        """Max-pool with stride 1, then a [1, 2, 1] blur with stride 2 (N2V2)."""

        def __init__(self, dims: int, channels: int) -> None:
            super().__init__()
            self.dims = dims
            k1 = torch.tensor([1.0, 2.0, 1.0])
            k = k1[:, None] * k1[None, :] if dims == 2 else k1[:, None, None] * k1[None, :, None]
            if dims == 3:
                k = k * k1[None, None, :]
            k = k / k.sum()
            self.register_buffer("kernel", k[None, None].repeat(channels, *([1] * (dims + 1))))
            self.channels = channels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import torch.nn.functional as F

            if self.dims == 2:
                x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), mode="replicate"), 2, stride=1)
                x = F.pad(x, (1, 1, 1, 1), mode="replicate")
                return F.conv2d(x, self.kernel, stride=2, groups=self.channels)
            x = F.max_pool3d(F.pad(x, (0, 1, 0, 1, 0, 1), mode="replicate"), 2, stride=1)
            x = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
            return F.conv3d(x, self.kernel, stride=2, groups=self.channels)

    class N2VUNet(nn.Module):
        """U-Net of ``depth`` poolings for blind-spot denoising.

        Input and output ``(B, channels, *spatial)``; every spatial size must be a multiple of
        ``2**depth``. ``n2v2=True``: max-blur pooling and no skip connection at full
        resolution (Höck et al. 2022). No residual connection: adding the input back would
        pass each pixel's own noise through the blind spot at prediction time.
        """

        def __init__(
            self,
            dims: int = 2,
            channels: int = 1,
            features: int = 32,
            depth: int = 2,
            n2v2: bool = True,
        ) -> None:
            super().__init__()
            self.dims, self.depth, self.n2v2 = dims, depth, n2v2
            f = [features * 2**i for i in range(depth + 1)]
            self.down = nn.ModuleList()
            self.pools = nn.ModuleList()
            cin = channels
            for i in range(depth):
                self.down.append(Block(dims, cin, f[i]))
                self.pools.append(
                    MaxBlurPool(dims, f[i])
                    if n2v2
                    else (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(2)
                )
                cin = f[i]
            self.bottom = Block(dims, f[depth - 1], f[depth])
            self.up = nn.ModuleList()
            self.dec = nn.ModuleList()
            for i in reversed(range(depth)):
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                skip = 0 if (n2v2 and i == 0) else f[i]
                self.dec.append(Block(dims, f[i + 1] + skip, f[i]))
            self.head = conv(dims)(f[0], channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            h = x
            for block, pool in zip(self.down, self.pools):
                h = block(h)
                skips.append(h)
                h = pool(h)
            h = self.bottom(h)
            for k, (up, dec) in enumerate(zip(self.up, self.dec)):
                i = self.depth - 1 - k
                h = up(h)
                if not (self.n2v2 and i == 0):
                    h = torch.cat([h, skips[i]], dim=1)
                h = dec(h)
            return self.head(h)

    _N2VUNET = N2VUNet
    return N2VUNet


def build_n2v_network(
    dims: int, channels: int, features: int = 32, depth: int = 2, n2v2: bool = True
) -> Any:
    """A fresh N2V U-Net (see the module docstring); ``torch.nn.Module``."""
    return _n2v_unet_class()(
        dims=int(dims),
        channels=int(channels),
        features=int(features),
        depth=int(depth),
        n2v2=bool(n2v2),
    )


def _zscore_stats(a: np.ndarray, channel_axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per channel (shape (C,)), from a strided sample."""
    if channel_axis is None:
        x = a.reshape(1, -1)
    else:
        x = np.moveaxis(a, channel_axis, 0).reshape(a.shape[channel_axis], -1)
    step = max(1, x.shape[1] // 2_000_000)
    x = x[:, ::step].astype(np.float64)
    mean = x.mean(axis=1)
    std = x.std(axis=1)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def blind_spot_batch(
    x: torch.Tensor,
    mask_fraction: float,
    variant: str,
    gen: torch.Generator,
    radius: int = 2,
    blind_radius: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a few pixels of each patch for blind-spot training.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, *patch)`` patches (2 or 3 spatial axes).
    mask_fraction : float
        Fraction of pixels to mask, on a stratified grid (one per cell of ``1/fraction`` pixels).
    variant : {"n2v", "n2v2"}
        Replacement: a random neighbour within ``radius`` (N2V) or the median of the
        neighbourhood without the centre (N2V2). All channels of a pixel are masked together.
    gen : torch.Generator
        Random source (CPU).
    blind_radius : int
        0: classic single-pixel blind spot. ``b > 0``: the ``(2b+1)`` block around each
        masked pixel is hidden too (for noise correlated between neighbouring pixels, e.g.
        interpolated or reconstructed MR); replacements then come from ``radius + b`` away and
        masked pixels keep ``b + 2`` pixels from the patch border.

    Returns
    -------
    masked : torch.Tensor
        ``x`` with the chosen pixels replaced.
    mask : torch.Tensor
        ``(B, 1, *patch)`` float, 1 at the masked pixels.
    """
    import torch

    B, C, *P = x.shape
    d = len(P)
    cell = max(1, round((1.0 / mask_fraction) ** (1.0 / d)))
    grids = [torch.arange(0, p, cell) for p in P]
    starts = torch.stack(torch.meshgrid(*grids, indexing="ij"), dim=-1).reshape(-1, d)  # (N, d)
    N = starts.shape[0]
    off = torch.stack(
        [torch.randint(0, cell, (B, N), generator=gen) for _ in range(d)], dim=-1
    )  # (B, N, d)
    pos = (starts[None] + off).clamp(max=torch.tensor(P) - 1)  # (B, N, d)
    if blind_radius > 0:
        edge = int(blind_radius) + 2
        pos = torch.minimum(pos.clamp(min=edge), torch.tensor(P) - 1 - edge)
        radius = radius + int(blind_radius)
    pos = pos.to(x.device)
    lim = torch.tensor(P, device=x.device) - 1
    flat_strides = torch.tensor(
        [int(np.prod(P[i + 1 :])) for i in range(d)], device=x.device, dtype=torch.long
    )
    xf = x.reshape(B, C, -1)
    centre = (pos * flat_strides).sum(-1)  # (B, N)
    bidx = torch.arange(B, device=x.device)[:, None].expand(B, N)
    if variant == "n2v2":
        rng = torch.arange(-radius, radius + 1)
        offs = torch.stack(torch.meshgrid(*([rng] * d), indexing="ij"), dim=-1).reshape(-1, d)
        offs = offs[offs.abs().amax(-1) > blind_radius].to(x.device)  # without the centre
        nb = pos[:, :, None, :] + offs[None, None]
        nb = torch.where(nb < 0, -nb, nb)  # reflect at the border: never onto the centre
        nb = torch.where(nb > lim, 2 * lim - nb, nb)
        nbf = (nb * flat_strides).sum(-1)  # (B, N, K)
        K = nbf.shape[-1]
        vals = xf[bidx[..., None].expand(B, N, K), :, nbf]  # (B, N, K, C)
        repl = vals.median(dim=2).values  # (B, N, C)
    else:
        o = torch.randint(-radius, radius + 1, (B, N, d), generator=gen).to(x.device)
        zero = (o == 0).all(-1)
        while bool(zero.any()):  # never copy the pixel onto itself
            o[zero] = torch.randint(-radius, radius + 1, (int(zero.sum()), d), generator=gen).to(
                x.device
            )
            zero = (o == 0).all(-1)
        nb = pos + o
        nb = torch.where(nb < 0, -nb, nb)
        nb = torch.where(nb > lim, 2 * lim - nb, nb)
        # a neighbour clamped back onto the centre (at the border): step inwards instead
        same = (nb == pos).all(-1)
        if bool(same.any()):
            nb[same] = torch.where(pos[same] > 0, pos[same] - 1, pos[same] + 1)
        nbf = (nb * flat_strides).sum(-1)
        repl = xf[bidx, :, nbf]  # (B, N, C)
    masked = xf.clone()
    if blind_radius > 0:
        # structured blind spot: hide the pixel's neighbours too (noise correlated over
        # ``blind_radius`` pixels), each replaced by a pixel from outside the hidden block
        b = int(blind_radius)
        rng = torch.arange(-b, b + 1)
        block = torch.stack(torch.meshgrid(*([rng] * d), indexing="ij"), dim=-1).reshape(-1, d)
        for o in block.to(x.device):
            r = torch.randint(-(b + 2), b + 3, (B, N, d), generator=gen).to(x.device)
            inside = r.abs().amax(-1) <= b
            while bool(inside.any()):
                r[inside] = torch.randint(
                    -(b + 2), b + 3, (int(inside.sum()), d), generator=gen
                ).to(x.device)
                inside = r.abs().amax(-1) <= b
            tgt = torch.minimum((pos + o).clamp(min=0), lim)
            src = torch.minimum((pos + r).clamp(min=0), lim)
            masked[bidx, :, (tgt * flat_strides).sum(-1)] = xf[
                bidx, :, (src * flat_strides).sum(-1)
            ]
        if variant == "n2v":
            repl = masked[bidx, :, centre]
    masked[bidx, :, centre] = repl
    mask = torch.zeros((B, 1, xf.shape[-1]), device=x.device, dtype=x.dtype)
    mask[bidx, 0, centre] = 1.0
    return masked.reshape(x.shape), mask.reshape((B, 1, *P))


def _training_views(
    arrays: Sequence[np.ndarray], dims: int, slice_axis: int | None, channel_axis: int | None
) -> list[np.ndarray]:
    """Each array as ``(C, *spatial)`` float32 samples of ``dims`` spatial axes (slices split)."""
    out = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float32)
        a = a[None] if channel_axis is None else np.moveaxis(a, channel_axis, 0)
        if slice_axis is not None and a.ndim == 4:
            a = np.moveaxis(a, slice_axis + 1, 1)  # (C, S, *plane)
            out.extend(np.ascontiguousarray(a[:, i]) for i in range(a.shape[1]))
        else:
            out.append(np.ascontiguousarray(a))
    return out


def _patch_size(samples: Sequence[np.ndarray], dims: int, want: int) -> list[int]:
    """The largest patch <= ``want`` (multiple of 4) that fits every sample."""
    mins = np.min([s.shape[1:] for s in samples], axis=0)
    return [max(MIN_SIZE, min(want, int(m) // 4 * 4)) for m in mins]


def train_n2v(
    images: Sequence[np.ndarray],
    *,
    variant: str = "n2v2",
    dims: int = 2,
    slice_axis: int | None = None,
    channel_axis: int | None = None,
    time_budget: float = DEFAULT_TIME_BUDGET,
    max_steps: int | None = None,
    patch_size: int | None = None,
    batch_size: int | None = None,
    features: int = 16,
    mask_fraction: float = 0.05,
    blind_radius: int = 0,
    learning_rate: float = 2e-3,
    device: Any = "auto",
    seed: int = 0,
    modality: str = "unknown",
    init: TrainedDenoiser | None = None,
) -> Generator[Progress, None, TrainedDenoiser]:
    """Train a blind-spot network on noisy images; yields after every step.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        Noisy images, finite values, each ``(*spatial[, C])`` with ``C`` at ``channel_axis``;
        2D ``(row, col)`` or 3D in file axis order. They are z-scored each with its own mean
        and standard deviation (per channel).
    variant : {"n2v2", "n2v"}
        Masking and network variant (module docstring).
    dims : {2, 3}
        Network dimensionality; ``dims=2`` on volumes trains on slices along ``slice_axis``.
    slice_axis : int, optional
        Spatial axis the 2D network runs across for volumes.
    channel_axis : int, optional
        Channel axis of the arrays (RGB: ``-1`` or the last index).
    time_budget : float
        Seconds of training (wall clock); the learning rate decays on a cosine over it.
    max_steps : int, optional
        Stop after this many steps even if time is left.
    patch_size : int, optional
        Patch edge in pixels (default 64 in 2D, 32 in 3D, shrunk to fit the image).
    batch_size : int, optional
        Patches per step (default 8 in 2D, 2 in 3D).
    features : int
        Channels of the first U-Net level (16 keeps a CPU step near 0.1 s).
    mask_fraction : float
        Fraction of pixels masked per patch (N2V's paper: 0.002; higher gives a stronger
        training signal per step, which short CPU budgets need).
    blind_radius : int
        Hide the ``(2b+1)`` neighbourhood of each masked pixel too (structured blind spot),
        meant for noise correlated between neighbours (the fMRI frames' noise correlates
        0.26/0.41 between adjacent voxels); at a 30 s budget it did not help there
        (docs/denoising.md), so the default is 0.
    learning_rate : float
        Adam learning rate at the start of the cosine.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    seed : int
        Seeds patch sampling, masking and the weights.
    init : TrainedDenoiser, optional
        Continue training this network (fine-tune) instead of a fresh one.

    Yields
    ------
    Progress
        ``done``/``total`` in tenths of a second of the budget (or steps with ``max_steps``
        and no budget); ``info = {"loss", "step", "elapsed"}``.

    Returns
    -------
    TrainedDenoiser
    """
    import torch

    from napari_medseg.core.engine.windows import resolve_device

    if variant not in N2V_METHODS:
        raise MedsegError(f"unknown blind-spot variant {variant!r}; use n2v or n2v2")
    if not images:
        raise MedsegError("no images to train the denoiser on")
    dev = resolve_device(device)
    samples = _training_views(images, dims, slice_axis, channel_axis)
    channels = int(samples[0].shape[0])
    if any(s.shape[0] != channels for s in samples):
        raise MedsegError("the training images do not all have the same number of channels")
    if any(s.ndim - 1 != dims for s in samples):
        raise MedsegError(f"the training images do not all fit a {dims}D network")
    normed = []
    shp = (-1, *([1] * dims))
    for s in samples:
        mean, std = _zscore_stats(s, 0)
        normed.append(torch.from_numpy((s - mean.reshape(shp)) / std.reshape(shp)))
    want = int(patch_size or (64 if dims == 2 else 32))
    patch = _patch_size(samples, dims, want)
    if init is not None:
        patch = [min(p, q) for p, q in zip(patch, init.patch_size)] or patch
    bsz = int(batch_size or (8 if dims == 2 else 2))

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if init is not None:
        if init.dims != dims or init.channels != channels:
            raise MedsegError(
                f"the denoiser to fine-tune is {init.dims}D with {init.channels} channel(s), "
                f"the images need {dims}D with {channels}"
            )
        net = init.network
    else:
        net = build_n2v_network(dims, channels, features=features, n2v2=(variant == "n2v2"))
    net.to(dev).train()
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    weights = np.array([s[0].size for s in samples], dtype=float)
    weights /= weights.sum()
    rs = np.random.default_rng(seed)
    losses: list[float] = []
    budget = float(time_budget) if time_budget and time_budget > 0 else math.inf
    if budget == math.inf and not max_steps:
        raise MedsegError("give the denoiser a time budget (seconds) or a number of steps")
    total = int(budget * 10) if budget < math.inf else int(max_steps or 0)
    t0 = time.perf_counter()
    step = 0
    # On a busy CPU, torch's threads wait for each other at every operation; a small network
    # then trains many times faster on one thread (measured 0.035 s vs 2.7 s per step on 2
    # shared cores under load). Steps 2-4 run on the default threads, 5-7 on one thread,
    # and the faster setting is kept; the process setting is restored at the end.
    orig_threads = torch.get_num_threads()
    tune = dev.type == "cpu" and orig_threads > 1
    step_times: dict[int, list[float]] = {orig_threads: [], 1: []}
    chosen_threads = orig_threads
    yield Progress(0, total, f"training {variant.upper()} on {len(samples)} image(s)")
    try:
        while True:
            t_step = time.perf_counter()
            elapsed = t_step - t0
            frac = max(elapsed / budget, (step / max_steps) if max_steps else 0.0)
            if frac >= 1.0:
                break
            lr = learning_rate * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
            for g in opt.param_groups:
                g["lr"] = lr
            batch = []
            picks = rs.choice(len(normed), size=bsz, p=weights)
            for k in picks:
                s = normed[k]
                sl = [slice(None)]
                for ax, p in enumerate(patch):
                    n = s.shape[ax + 1]
                    st = int(rs.integers(0, n - p + 1))
                    sl.append(slice(st, st + p))
                crop = s[tuple(sl)]
                # augment: flips and in-plane 90 degree turns of the last two axes
                for ax in range(1, dims + 1):
                    if rs.random() < 0.5:
                        crop = torch.flip(crop, (ax,))
                if patch[-1] == patch[-2] and rs.random() < 0.5:
                    crop = torch.rot90(crop, 1, (dims - 1, dims))
                batch.append(crop)
            x = torch.stack(batch).to(dev)
            masked, mask = blind_spot_batch(
                x, mask_fraction, variant, gen, blind_radius=blind_radius
            )
            pred = net(masked)
            loss = (((pred - x) ** 2) * mask).sum() / (mask.sum() * channels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise MedsegError(
                    "denoiser training diverged (the loss became NaN); try a lower learning rate"
                )
            losses.append(lv)
            if tune:
                dt = time.perf_counter() - t_step
                if 2 <= step <= 4:
                    step_times[orig_threads].append(dt)
                elif 5 <= step <= 7:
                    step_times[1].append(dt)
                if step == 4:
                    torch.set_num_threads(1)
                elif step == 7:
                    one = float(np.median(step_times[1]))
                    many = float(np.median(step_times[orig_threads]))
                    chosen_threads = 1 if one < 0.8 * many else orig_threads
                    torch.set_num_threads(chosen_threads)
                    tune = False
            elapsed = time.perf_counter() - t0
            done = int(min(elapsed, budget) * 10) if budget < math.inf else step
            yield Progress(
                min(done, total),
                total,
                f"training {variant.upper()}: step {step}, loss {lv:.4f}, "
                f"{elapsed:.0f}/{budget:.0f} s"
                if budget < math.inf
                else f"training {variant.upper()}: step {step}/{max_steps}, loss {lv:.4f}",
                {"loss": lv, "step": step, "elapsed": elapsed},
            )
    finally:
        net.eval()
        torch.set_num_threads(orig_threads)
    yield Progress(total, total, f"trained {variant.upper()}: {step} steps")
    tail = losses[-50:]
    return TrainedDenoiser(
        network=net,
        dims=dims,
        channels=channels,
        variant=variant,
        patch_size=list(patch),
        modality=modality,
        losses=losses,
        training={
            "method": variant,
            "steps": step,
            "seconds": round(time.perf_counter() - t0, 2),
            "time_budget": None if budget == math.inf else budget,
            "max_steps": max_steps,
            "batch_size": bsz,
            "mask_fraction": mask_fraction,
            "blind_radius": blind_radius,
            "learning_rate": learning_rate,
            "final_loss": float(np.mean(tail)) if tail else None,
            "n_images": len(images),
            "n_samples": len(samples),
            "seed": seed,
            "cpu_threads": chosen_threads if dev.type == "cpu" else None,
            "losses_every_10": [round(v, 5) for v in losses[::10]],
            **({"fine_tuned": True} if init is not None else {}),
        },
    )


def predict_n2v(
    model: TrainedDenoiser,
    image: np.ndarray,
    *,
    slice_axis: int | None = None,
    channel_axis: int | None = None,
    device: Any = "auto",
    tile: int | None = None,
    batch_size: int = 4,
    tta: bool = False,
    precision: str = "auto",
    report: dict | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """Run a trained blind-spot network over an image with the tiled engine.

    Parameters
    ----------
    model : TrainedDenoiser
    image : numpy.ndarray
        Finite float image ``(*spatial[, C])`` (file axis order); z-scored with its own
        statistics for the network and scaled back afterwards.
    slice_axis : int, optional
        For a 2D network on a volume: the spatial axis it runs across.
    channel_axis : int, optional
    device : str
    tile : int, optional
        Window edge (default 256 in 2D, 64 in 3D; a multiple of 4).
    batch_size : int
        Windows per forward pass.
    tta : bool
        Test-time augmentation: average the predictions of the 8 rotations/flips of the
        network's plane (2D networks) or the 8 combinations of axis flips (3D networks); each
        is mapped back before averaging. 8x the prediction time; +0.1 to +0.35 dB on the real
        pairs in docs/denoising.md.
    precision : {"auto", "fp32", "bf16", "fp16"}
        :func:`napari_medseg.core.engine.fastpath.prepare_network` (``auto``: a reduced
        precision only where the device runs it natively and its values agree with fp32).
    report : dict, optional
        Filled with what the fast path chose (precision, memory format, threads...).

    Returns
    -------
    numpy.ndarray
        float32, same shape as ``image``.
    """
    import torch

    from napari_medseg.core.engine.windows import resolve_device, slicewise, sliding_window

    dev = resolve_device(device)
    a = np.asarray(image, dtype=np.float32)
    a = a[None] if channel_axis is None else np.moveaxis(a, channel_axis, 0)  # (C, *spatial)
    if a.shape[0] != model.channels:
        raise MedsegError(
            f"the denoiser expects {model.channels} channel(s) but the image has {a.shape[0]}"
        )
    nsp = a.ndim - 1
    if model.dims == 3 and nsp == 2:
        raise MedsegError("this denoiser is 3D and cannot run on a 2D image; use a 2D denoiser")
    mean, std = _zscore_stats(a, 0)
    shp = (-1, *([1] * nsp))
    x = (a - mean.reshape(shp)) / std.reshape(shp)
    from napari_medseg.core.engine.fastpath import prepare_network

    net, fast = prepare_network(model.network, dev, precision, guard="values")
    edge = int(tile or (256 if model.dims == 2 else 64))
    if model.dims == 2 and nsp == 3:
        sa = 2 if slice_axis is None else int(slice_axis)
        x = np.moveaxis(x, sa + 1, -1)  # (C, *plane, S)
        predictor = slicewise(net)
        batch_size = max(batch_size, 8)
    else:
        sa = None
        predictor = net
    threads = (model.training or {}).get("cpu_threads")
    orig_threads = torch.get_num_threads()
    if dev.type == "cpu" and threads and threads < orig_threads:
        torch.set_num_threads(int(threads))  # what training measured faster on this CPU
    views = tta_views(model.dims) if tta else [(lambda a: a, lambda a: a)]
    out = None
    try:
        for k, (fwd, back) in enumerate(views):
            xv = np.ascontiguousarray(fwd(x))
            # windows of this view's shape (rotations swap the plane's axes); depth 1 across
            # the slices for a 2D network on a volume
            roi = [_round4(min(edge, n)) for n in xv.shape[1:]]
            if sa is not None:
                roi[-1] = 1
            y = yield from sliding_window(
                torch.from_numpy(xv),
                predictor,
                roi,
                overlap=0.25,
                batch_size=batch_size,
                device=dev,
                activation=None,
                amp=False,
                pad_value=0.0,
            )
            yv = back(y.detach().cpu().numpy())
            out = yv if out is None else out + yv
            if tta:
                yield Progress(k + 1, len(views), f"prediction {k + 1}/{len(views)} (rotations)")
    finally:
        torch.set_num_threads(orig_threads)
    out = np.ascontiguousarray(out / len(views), dtype=np.float32)
    if report is not None:
        report.update(fast.as_dict())
    if sa is not None:
        out = np.moveaxis(out, -1, sa + 1)
    out = out * std.reshape(shp) + mean.reshape(shp)
    return out[0] if channel_axis is None else np.moveaxis(out, 0, channel_axis)


def tta_views(dims: int) -> list[tuple[Any, Any]]:
    """(forward, backward) pairs on ``(C, *spatial)`` arrays: the test-time augmentations.

    2D networks: the 8 rotations/flips of axes 1-2 (the plane; a trailing slice axis rides
    along). 3D networks: flips of every subset of the three spatial axes.
    """
    views: list[tuple[Any, Any]] = []
    if dims == 2:
        for k in range(4):
            for flip in (False, True):

                def fwd(a: np.ndarray, k: int = k, flip: bool = flip) -> np.ndarray:
                    a = np.rot90(a, k, axes=(1, 2))
                    return a[:, :, ::-1] if flip else a

                def back(a: np.ndarray, k: int = k, flip: bool = flip) -> np.ndarray:
                    a = a[:, :, ::-1] if flip else a
                    return np.rot90(a, -k, axes=(1, 2))

                views.append((fwd, back))
        return views
    for code in range(8):
        axes = tuple(1 + i for i in range(3) if code >> i & 1)

        def flip(a: np.ndarray, axes: tuple = axes) -> np.ndarray:
            return np.flip(a, axes) if axes else a

        views.append((flip, flip))
    return views


def _round4(n: int) -> int:
    return max(MIN_SIZE, int(math.ceil(n / 4) * 4))
