"""Train a learned click-refinement model (2D, DeepEdit style) from images with masks.

The model (:mod:`napari_medseg.core.correct.refine`, ``method="learned"``) sees four channels of a
2D
region, ``[image in [0, 1], current mask, positive-click map, negative-click map]``, and
predicts the structure there. Training simulates what a user does:

1. a random patch of a training slice (a third centred on the structure, as in
   :func:`napari_medseg.training.segment.train`), augmented the same way (flips, 90° turns,
   rotation/scaling, intensity, gamma, noise; here also intensity inversion, so one model
   serves bright and dark structures);
2. an imperfect starting mask made from the ground truth (:func:`imperfect_mask`: empty,
   shrunk, grown, shifted, objects missing, cut in half, a false blob);
3. one to ``max_clicks`` rounds: a click on the largest error (:func:`click_for`, the
   :func:`~napari_medseg.core.correct.refine.simulate_click` point or a random point deep inside
   that
   error), then the network's own prediction, held to the clicks' guarantee
   (:func:`~napari_medseg.core.correct.refine.apply_click_prediction`), becomes the next mask;
4. Dice + cross-entropy between the last round's prediction and the ground truth.

:func:`train_clicks` is a progress generator (docs/ARCHITECTURE.md rule 2) that returns a
:class:`ClickTrainResult`; :func:`evaluate_clicks` scores any method on held-out slices from
the same starting masks (used for the card and by ``benchmarks/bench_click_refine.py``), and
:func:`shared_data_cases` builds the training and held-out slices of the built-in model from
the real data folder.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.core.correct.refine import (
    apply_click_prediction,
    click_model_input,
    simulate_click,
    simulate_session,
    to_unit_range,
)
from napari_medseg.errors import MedsegError
from napari_medseg.models.card import ModelCard
from napari_medseg.progress import Progress
from napari_medseg.training.augment import augment, default_augmentation
from napari_medseg.training.loop import Schedule, resolve_budget
from napari_medseg.training.patches import Item, index_foreground, pad_to, sample_batch

__all__ = [
    "DSB_HELD_OUT",
    "EVAL_STARTS",
    "START_KINDS",
    "ClickCase",
    "ClickTrainResult",
    "click_for",
    "evaluate_clicks",
    "imperfect_mask",
    "random_start",
    "shared_data_cases",
    "slices_of",
    "train_clicks",
]

#: Kinds of imperfect starting masks (:func:`imperfect_mask`).
START_KINDS = ("empty", "shrunk", "grown", "shifted", "missing", "cut", "blob")
#: The fixed starting masks of the held-out evaluation: (kind, amount in pixels or fraction).
EVAL_STARTS: tuple[tuple[str, float], ...] = (
    ("missing", 0.5),
    ("shrunk", 2),
    ("grown", 2),
    ("shifted", 3),
    ("cut", 0),
)
#: DSB 2018 tiles (row, col of a 128x128 tile) that the built-in ``fluo_nuclei_2d`` holds out.
DSB_HELD_OUT = ("dsb_r000_c256", "dsb_r000_c384", "dsb_r256_c384")


@dataclass
class ClickCase:
    """One 2D training or evaluation slice.

    Attributes
    ----------
    name : str
    image : (rows, cols) array
        Raw intensities.
    truth : (rows, cols) bool array
        Ground-truth mask of the structure.
    group : str
        What it shows (e.g. ``"nuclei"``), for per-group scores.
    window : (low, high), optional
        Intensity window (CT); default: the 1st-99th percentiles.
    """

    name: str
    image: np.ndarray
    truth: np.ndarray
    group: str = ""
    window: tuple[float, float] | None = None


@dataclass
class ClickTrainResult:
    """What :func:`train_clicks` returns: the folder, its card and the loss history."""

    out_dir: Path
    card: ModelCard
    losses: list[float] = field(default_factory=list)
    held_out: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def slices_of(
    name: str,
    volume: np.ndarray,
    truth: np.ndarray,
    axes: Sequence[int] = (0, 1, 2),
    group: str = "",
    step: int = 1,
    window: tuple[float, float] | None = None,
    min_pixels: int = 4,
) -> list[ClickCase]:
    """2D slices of a volume along ``axes`` that show at least ``min_pixels`` of the structure.

    Parameters
    ----------
    volume, truth : 3D arrays on one grid (any axis order)
    axes : axes to slice along
    step : keep every ``step``-th such slice
    """
    out = []
    truth = np.asarray(truth, bool)
    for ax in axes:
        ks = [k for k in range(truth.shape[ax]) if np.take(truth, k, axis=ax).sum() >= min_pixels]
        for k in ks[::step]:
            out.append(
                ClickCase(
                    f"{name}[ax{ax}={k}]",
                    np.take(volume, k, axis=ax).astype(np.float32),
                    np.take(truth, k, axis=ax),
                    group,
                    window,
                )
            )
    return out


def shared_data_cases(data: str | Path) -> tuple[list[ClickCase], list[ClickCase]]:
    """Training and held-out slices of the built-in click model from ``../shared/data``.

    * DSB 2018 nuclei (MANUAL): the 512x512 image cut into 128x128 tiles like
      ``scripts/make_builtin_datasets.py``; :data:`DSB_HELD_OUT` (the tiles ``fluo_nuclei_2d``
      holds out) are held out, the other 13 train.
    * Spinal-cord MRI (MANUAL cord masks, one subject): the T1w volume trains (slices along all
      three axes showing the cord); the T2 contrast is held out (every third axial slice).
    * Spleen CT: TotalSegmentator's small CT (AUTO spleen label, 3 mm) trains (axial slices,
      window -160..240 HU); the MSD spleen CT (MANUAL) is held out (every other axial slice).
    * Training only, for variety: 16 other organs of that CT (AUTO, group "CT organs"), 16
      organs of TotalSegmentator's small MR (AUTO) and the pyradiomics brain-tumour and breast
      lesions (MANUAL) (group "MR"), and the MT pair's cord masks (AUTO, group "spinal cord").

    Returns
    -------
    train, held_out : lists of :class:`ClickCase`
    """
    import nibabel as nib
    import tifffile

    data = Path(data)
    train: list[ClickCase] = []
    held: list[ClickCase] = []
    img = tifffile.imread(str(data / "microscopy/dsb2018_nuclei/image.tif")).astype(np.float32)
    mask = tifffile.imread(str(data / "microscopy/dsb2018_nuclei/mask.tif")) > 0
    for r in range(0, img.shape[0] - 127, 128):
        for c in range(0, img.shape[1] - 127, 128):
            name = f"dsb_r{r:03d}_c{c:03d}"
            case = ClickCase(
                name, img[r : r + 128, c : c + 128], mask[r : r + 128, c : c + 128], "nuclei"
            )
            (held if name in DSB_HELD_OUT else train).append(case)

    def vol(rel: str) -> np.ndarray:
        return np.asarray(nib.load(str(data / rel)).dataobj)

    sc = "mri/spinal_cord/"
    train += slices_of(
        "sc_t1w",
        vol(sc + "t1w.nii.gz"),
        vol(sc + "t1w_seg-manual.nii.gz") > 0,
        (0, 1, 2),
        "spinal cord",
    )
    # t2 is stored PSR: axis 1 is S, so its slices are axial
    held += slices_of(
        "sc_t2",
        vol(sc + "t2.nii.gz"),
        vol(sc + "t2_seg-manual.nii.gz") > 0,
        (1,),
        "spinal cord",
        step=3,
    )
    ct_win = (-160.0, 240.0)
    train += slices_of(
        "totalseg_ct",
        vol("ct/totalseg_small/ct.nii.gz"),
        vol("ct/totalseg_small/seg.nii.gz") == 1,
        (2,),
        "CT organs",
        window=ct_win,
    )
    # more kinds of structure, so the model learns "the object under the click", not one organ
    ct, seg = vol("ct/totalseg_small/ct.nii.gz"), vol("ct/totalseg_small/seg.nii.gz")
    for k in (2, 3, 4, 5, 6, 11, 14, 18, 19, 20, 30, 31, 32, 86, 87, 117):
        train += slices_of(
            f"totalseg_ct_{k}",
            ct,
            seg == k,
            (2,),
            "CT organs",
            step=2,
            window=ct_win,
            min_pixels=20,
        )
    mr, seg_mr = vol("ct/totalseg_small/mr.nii.gz"), vol("ct/totalseg_small/seg_mr.nii.gz")
    for k in (1, 2, 3, 4, 5, 6, 7, 15, 19, 20, 21, 23, 24, 25, 46, 47):
        train += slices_of(f"totalseg_mr_{k}", mr, seg_mr == k, (2,), "MR", step=2, min_pixels=20)
    import SimpleITK as sitk

    nrrd = data / "mri/brain_tumour_nrrd"
    for n in ("brain1", "brain2", "breast1"):
        img_ = sitk.GetArrayFromImage(sitk.ReadImage(str(nrrd / f"{n}_image.nrrd")))
        lab_ = sitk.GetArrayFromImage(sitk.ReadImage(str(nrrd / f"{n}_label.nrrd"))) > 0
        train += slices_of(n, img_, lab_, (0,), "MR")
    for n in ("mt0", "mt1"):
        train += slices_of(
            f"sc_{n}",
            vol(f"registration/mt_pair/{n}.nii.gz"),
            vol(f"registration/mt_pair/{n}_seg.nii.gz") > 0,
            (2,),
            "spinal cord",
        )
    held += slices_of(
        "spleen_msd",
        vol("ct/spleen/image.nii.gz"),
        vol("ct/spleen/label.nii.gz") == 1,
        (2,),
        "spleen CT",
        step=2,
        window=ct_win,
        min_pixels=50,
    )
    return train, held


# --------------------------------------------------------------------------- simulation


def _disk(r: int) -> np.ndarray:
    g = np.arange(-r, r + 1)
    return (g[:, None] ** 2 + g[None, :] ** 2) <= r * r


def imperfect_mask(
    truth: np.ndarray, kind: str, amount: float = 2, rng: np.random.Generator | None = None
) -> np.ndarray:
    """A damaged copy of a 2D ground-truth mask, the kind of error a weak model makes.

    Parameters
    ----------
    truth : (rows, cols) bool array
    kind : one of :data:`START_KINDS`
        ``"empty"``; ``"shrunk"``/``"grown"`` by ``amount`` pixels; ``"shifted"`` by ``amount``
        pixels along both axes; ``"missing"``: a fraction ``amount`` of the objects dropped
        (a single object is dropped); ``"cut"``: the part past the middle row removed (with
        ``rng``: past a random line through the structure); ``"blob"``: a false disc of radius
        ``amount`` added far from the structure.
    rng : numpy.random.Generator, optional
        Random directions and choices; without it the result is deterministic.
    """
    from scipy import ndimage as ndi

    t = np.asarray(truth, bool)
    a = round(float(amount))
    if kind == "empty" or (not t.any() and kind != "blob"):
        return np.zeros_like(t)
    if kind == "shrunk":
        return ndi.binary_erosion(t, _disk(max(a, 1)), border_value=1) if a else t.copy()
    if kind == "grown":
        return ndi.binary_dilation(t, _disk(max(a, 1))) if a else t.copy()
    if kind == "shifted":
        d = [a, -a] if rng is None else [int(v) for v in rng.integers(-a, a + 1, 2)]
        return ndi.shift(t.astype(np.uint8), d, order=0, mode="constant") > 0
    if kind == "missing":
        lab, n = ndi.label(t)
        if n <= 1:
            return np.zeros_like(t)
        k = max(1, round(float(amount) * n))
        if rng is not None:
            drop = rng.choice(n, k, replace=False) + 1
        else:  # evenly spread over the objects (label order)
            drop = np.unique(np.linspace(1, n, k).round().astype(int))
        return t & ~np.isin(lab, drop)
    if kind == "cut":
        rows, cols = np.nonzero(t)
        if rng is None:
            return t & (np.arange(t.shape[0])[:, None] < np.median(rows))
        ang = rng.uniform(0, 2 * np.pi)
        i = rng.integers(len(rows))
        rr, cc = np.ogrid[: t.shape[0], : t.shape[1]]
        return t & ((rr - rows[i]) * np.cos(ang) + (cc - cols[i]) * np.sin(ang) < 0)
    if kind == "blob":
        d = ndi.distance_transform_edt(~t)
        if rng is None:
            i = int(np.argmax(d))
        else:
            far = np.flatnonzero(d > max(a, 1) * 2)
            i = int(rng.choice(far)) if far.size else int(np.argmax(d))
        c = np.unravel_index(i, t.shape)
        rr, cc = np.ogrid[: t.shape[0], : t.shape[1]]
        return t | ((rr - c[0]) ** 2 + (cc - c[1]) ** 2 <= max(a, 1) ** 2)
    raise MedsegError(f"unknown starting mask kind {kind!r}; use one of {', '.join(START_KINDS)}")


def random_start(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random imperfect starting mask (:func:`imperfect_mask` with a random kind and size);
    sometimes two damages combined."""
    kinds = ("empty", "shrunk", "grown", "shifted", "missing", "cut", "blob")
    p = np.array([0.1, 0.2, 0.2, 0.15, 0.15, 0.1, 0.1])
    k = str(rng.choice(kinds, p=p))
    amount = {"missing": rng.uniform(0.2, 0.8), "blob": rng.integers(3, 10)}.get(
        k, rng.integers(1, 6)
    )
    m = imperfect_mask(truth, k, float(amount), rng)
    if rng.random() < 0.25 and k not in ("empty",):
        k2 = str(rng.choice(("shrunk", "grown", "missing", "blob")))
        m = imperfect_mask(m, k2, float(rng.integers(1, 4) if k2 != "missing" else 0.4), rng)
    return m


def click_for(
    truth: np.ndarray, current: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, bool] | None:
    """The next simulated click: on the largest error; with ``rng``, half the time a random
    point at least half as deep inside that error as its deepest point (users are not exact).

    Returns ``(coordinates, positive)`` or None when the mask is already right.
    """
    c = simulate_click(truth, current)
    if c is None or rng is None or rng.random() < 0.5:
        return c
    from scipy import ndimage as ndi

    err = (truth & ~current) if c[1] else (current & ~truth)
    lab, _ = ndi.label(err)
    comp = lab == lab[tuple(c[0])]
    d = ndi.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
    cand = np.argwhere(d >= 0.5 * d.max())
    return cand[rng.integers(len(cand))], c[1]


# --------------------------------------------------------------------------- evaluation


def evaluate_clicks(
    cases: Sequence[ClickCase],
    starts: Sequence[tuple[str, float]] = EVAL_STARTS,
    n_clicks: int = 5,
    **refine_kwargs: Any,
) -> Generator[Progress, None, dict]:
    """Score a refinement method on 2D cases from fixed starting masks and simulated clicks.

    For every case and starting mask (:func:`imperfect_mask` without randomness), plays
    ``n_clicks`` clicks with :func:`napari_medseg.core.correct.refine.simulate_session`.

    Parameters
    ----------
    cases : held-out :class:`ClickCase` list
    starts : (kind, amount) pairs
    n_clicks : int
    **refine_kwargs
        Passed to :func:`~napari_medseg.core.correct.refine.refine_with_clicks` (``method``,
        ``model``, ``reach_mm``, ...); each case's ``window`` is added.

    Returns
    -------
    dict
        Per group: ``{"dice": [mean Dice after 0..n_clicks clicks], "n_sessions",
        "ms_per_click" (mean), "ms_max", "slices"}``. Starting masks equal to the truth
        (nothing to fix) are skipped.
    """
    groups: dict[str, dict] = {}
    total = len(cases) * len(starts)
    done = 0
    for case in cases:
        for kind, amount in starts:
            done += 1
            yield Progress(done, total, f"{case.group or case.name}: {kind} start")
            start = imperfect_mask(case.truth, kind, amount)
            if np.array_equal(start, case.truth):
                continue
            d, s = simulate_session(
                case.image, case.truth, start, n_clicks, window=case.window, **refine_kwargs
            )
            g = groups.setdefault(case.group, {"dice": [], "sec": [], "slices": set()})
            g["dice"].append(d)
            g["sec"] += s
            g["slices"].add(case.name)
    out = {}
    for name, g in groups.items():
        sec = np.asarray(g["sec"]) if g["sec"] else np.zeros(1)
        out[name] = {
            "dice": [round(float(v), 4) for v in np.mean(g["dice"], axis=0)],
            "n_sessions": len(g["dice"]),
            "slices": len(g["slices"]),
            "ms_per_click": round(float(sec.mean() * 1000), 1),
            "ms_max": round(float(sec.max() * 1000), 1),
        }
    return out


# --------------------------------------------------------------------------- training


def _card(
    name: str, patch: int, channels: Sequence[int], res_units: int, sigma: float
) -> ModelCard:
    return ModelCard(
        name=name,
        task="interactive",
        dims=2,
        modality="any",
        in_channels=4,
        classes=[
            {"id": 0, "name": "background"},
            {"id": 1, "name": "structure", "color": "#e6194b"},
        ],
        spacing=None,
        orientation="",
        patch_size=[patch, patch],
        normalization={
            "scheme": "percentile",
            "lower": 1.0,
            "upper": 99.0,
            "note": "of the region of interest, or the viewer's window (CT) when given",
        },
        architecture={
            "name": "UNet",
            "kwargs": {
                "spatial_dims": 2,
                "in_channels": 4,
                "out_channels": 2,
                "channels": list(channels),
                "strides": [2] * (len(channels) - 1),
                "kernel_size": 3,
                "up_kernel_size": 3,
                "num_res_units": res_units,
                "norm": "INSTANCE",
                "dropout": 0.0,
            },
        },
        extra={
            "interactive": "clicks",
            "input_channels": ["image (0-1)", "current mask", "positive clicks", "negative clicks"],
            "click_sigma_px": sigma,
            "used_by": "napari_medseg.core.correct.refine.refine_with_clicks(method='learned')",
        },
    )


def train_clicks(
    train_cases: Sequence[ClickCase],
    out_dir: str | Path,
    *,
    held_out: Sequence[ClickCase] = (),
    time_budget: float | None = 420.0,
    max_iterations: int | None = None,
    patch: int = 80,
    batch_size: int = 16,
    max_clicks: int = 5,
    channels: Sequence[int] = (16, 32, 64, 64),
    num_res_units: int = 1,
    sigma: float = 2.0,
    reach_px: float = 25.0,
    lr: float = 3e-3,
    invert_p: float = 0.4,
    balance_groups: bool = True,
    seed: int = 0,
    name: str | None = None,
    description: str = "",
    license: str = "unknown",
    training_info: dict | None = None,
) -> Generator[Progress, None, ClickTrainResult]:
    """Train a 2D click-refinement U-Net and write it as a model folder.

    Parameters
    ----------
    train_cases : list of :class:`ClickCase`
        2D slices (raw intensities + ground truth).
    out_dir : path-like
        Model folder to write (``model.json`` + ``weights.safetensors``).
    held_out : list of :class:`ClickCase`
        Scored after training with :func:`evaluate_clicks` (1, 3, 5 clicks); the scores go into
        the card's ``metrics``. Not used for choosing the checkpoint (the last one is saved).
    time_budget : float or None
        Seconds of training (the held-out scoring comes on top); None needs ``max_iterations``.
    max_iterations : int, optional
    patch : int
        Square training patch in pixels (a multiple of ``2 ** (len(channels) - 1)``).
    batch_size, max_clicks, lr, seed : training settings
    channels, num_res_units : the MONAI ``UNet`` size
    sigma : float
        Click Gaussian width in pixels (stored in the card).
    reach_px : float
        Reach of a click during the simulated rounds (pixels; ``refine_with_clicks``'
        ``reach_mm`` on 1 mm pixels).
    invert_p : float
        Probability of inverting a patch's intensities (bright and dark structures).
    balance_groups : bool
        Sample each :attr:`ClickCase.group` about equally often, whatever its slice count.
    name, description, license : written to the card.
    training_info : dict, optional
        Extra facts for the card's ``training`` (e.g. which data).

    Yields
    ------
    Progress
        Once per iteration (``info = {"iteration", "loss", "phase"}``) and per held-out case.

    Returns
    -------
    ClickTrainResult
    """
    import torch
    from monai.losses import DiceCELoss

    from napari_medseg.models.networks import LoadedModel, build_network, save_model

    out_dir = Path(out_dir)
    budget = resolve_budget(time_budget, max_iterations, "train_clicks", "max_iterations")
    if not train_cases:
        raise MedsegError("there are no training slices for the click model")
    stride = 2 ** (len(channels) - 1)
    if patch % stride:
        raise ValueError(f"patch {patch} must be a multiple of {stride}")
    card = _card(name or out_dir.name, patch, channels, num_res_units, sigma)
    rng = np.random.default_rng(seed)
    items = []
    for i, c in enumerate(train_cases):
        if i % 20 == 0:
            yield Progress(0, 0, f"preparing training slices ({i + 1}/{len(train_cases)})")
        it = Item(
            c.name,
            to_unit_range(c.image, c.window)[None].astype(np.float32),
            c.truth.astype(np.int64),
        )
        pad_to(it, [patch, patch])
        index_foreground(it, rng)
        items.append(it)
    if balance_groups:  # each group (nuclei, cord, ...) sampled about equally often
        counts = {c.group: 0 for c in train_cases}
        for c in train_cases:
            counts[c.group] += 1
        top = max(counts.values())
        items = [
            it
            for it, c in zip(items, train_cases)
            for _ in range(max(1, round(top / counts[c.group])))
        ]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = build_network(card).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=3e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    aug = default_augmentation(2)
    losses: list[float] = []
    sched = Schedule(lr, budget, max_iterations)
    total = max_iterations or 0

    while sched.fraction() < 0.999 and not (max_iterations and sched.iteration >= max_iterations):
        xs, ys = sample_batch(items, [patch, patch], batch_size, rng)
        x, y = augment(torch.from_numpy(xs), torch.from_numpy(ys), aug, gen)
        img = x[:, 0].numpy().copy()
        inv = rng.random(batch_size) < invert_p
        img[inv] = 1.0 - img[inv]
        gt = y[:, 0].numpy() > 0
        cur = [random_start(g, rng) for g in gt]
        pos: list[list] = [[] for _ in range(batch_size)]
        neg: list[list] = [[] for _ in range(batch_size)]
        rounds = int(rng.integers(1, max_clicks + 1))
        for r in range(rounds):
            for b in range(batch_size):
                c = click_for(gt[b], cur[b], rng)
                if c is None:  # nothing to fix: a confirming click on either side
                    inside = bool(gt[b].any() and rng.random() < 0.5)
                    cand = np.argwhere(gt[b] if inside else ~gt[b])
                    c = (cand[rng.integers(len(cand))], inside)
                (pos[b] if c[1] else neg[b]).append(np.asarray(c[0], float))
            if r < rounds - 1:
                with torch.no_grad():
                    xin = np.stack(
                        [
                            click_model_input(img[b], cur[b], pos[b], neg[b], sigma)
                            for b in range(batch_size)
                        ]
                    )
                    pred = net(torch.from_numpy(xin)).argmax(1).numpy() > 0
                cur = [
                    apply_click_prediction(
                        pred[b], cur[b], pos[b], neg[b], (1.0, 1.0), reach_px, 1.5
                    )
                    for b in range(batch_size)
                ]
        xin = np.stack(
            [click_model_input(img[b], cur[b], pos[b], neg[b], sigma) for b in range(batch_size)]
        )
        losses.append(
            sched.step(
                net,
                opt,
                lambda x=xin, t=gt: loss_fn(
                    net(torch.from_numpy(x)), torch.from_numpy(t[:, None].astype(np.int64))
                ),
            )
        )
        it_n = sched.iteration
        done, tot = (
            (it_n, total)
            if max_iterations and not math.isfinite(budget)
            else (int(sched.fraction() * budget), int(budget))
        )
        yield Progress(
            done,
            tot,
            f"iteration {it_n} ({rounds} clicks) loss {losses[-1]:.3f}",
            {"iteration": it_n, "loss": losses[-1], "phase": "train"},
        )
    train_time = sched.elapsed()
    net = net.eval()
    held: dict = {}
    if held_out:
        loaded = LoadedModel(card=card, network=net, source=str(out_dir))
        g = evaluate_clicks(held_out, method="learned", model=loaded)
        while True:
            try:
                p = next(g)
            except StopIteration as stop:
                held = stop.value
                break
            yield Progress(p.done, p.total, f"held-out scoring: {p.message}", {"phase": "eval"})
    k = max(1, len(losses) // 10)
    card.description = description or card.description
    card.license = license
    card.training = {
        **(training_info or {}),
        "train_slices": len(train_cases),
        "held_out_slices": len(held_out),
        "recipe": {
            "method": "DeepEdit-style simulated clicks: imperfect start (empty, shrunk, grown, "
            "shifted, objects missing, cut, false blob), 1 to max_clicks rounds of a click on "
            "the largest error, the network's own prediction as the next mask",
            "patch_size": [patch, patch],
            "batch_size": batch_size,
            "max_clicks": max_clicks,
            "click_sigma_px": sigma,
            "reach_px": reach_px,
            "optimizer": "AdamW",
            "lr": lr,
            "lr_schedule": "poly 0.9",
            "loss": "DiceCELoss(to_onehot_y=True, softmax=True)",
            "augmentations": {**aug, "invert_p": invert_p},
            "iterations": sched.iteration,
            "time_s": round(train_time, 1),
            "time_budget_s": budget if math.isfinite(budget) else None,
            "seed": seed,
            "device": "cpu",
            "loss_first": round(float(np.mean(losses[:k])), 4),
            "loss_last": round(float(np.mean(losses[-k:])), 4),
        },
    }
    card.metrics = (
        {
            "held_out_clicks": held,
            "computed_on": "held-out 2D slices, starting masks "
            + ", ".join(f"{k_} {a}" for k_, a in EVAL_STARTS)
            + "; Dice of the slice after 0..5 simulated clicks (simulate_click), mean over "
            "sessions; the last checkpoint is saved (no selection on these data)",
        }
        if held
        else {}
    )
    yield Progress(0, 0, "saving the model", {"phase": "save"})
    save_model(out_dir, card, net)
    return ClickTrainResult(out_dir=out_dir, card=card, losses=losses, held_out=held)
