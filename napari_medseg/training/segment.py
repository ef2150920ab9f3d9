"""Train or fine-tune a segmentation model from an nnU-Net-layout dataset.

:func:`train` is a progress generator (DESIGN.md rule 2): it yields
:class:`~napari_medseg.progress.Progress` at least once per training iteration and per
validation window (well under a second apart on a CPU) and returns a :class:`TrainResult`.
The recipe follows nnU-Net in small: self-configuration from a dataset fingerprint
(:mod:`.fingerprint`), resampling to the target spacing in RAS order, random patches with one
third centred on foreground, medical-image augmentation, Dice + cross-entropy loss, poly learning
rate (the loop is :class:`.loop.EpochLoop`), validation Dice with the inference engine's
Gaussian-weighted sliding window (:func:`napari_medseg.core.engine.windows.sliding_window`) on
held-out
data, and the best checkpoint by validation Dice written as a model folder (``model.json`` +
safetensors).

Validation is honest: with three or more cases whole cases are held out; with fewer cases a
contiguous block of slices (3D, along the S axis) or of rows (2D) of every case is held out and
never sampled for training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.models.card import ModelCard
from napari_medseg.progress import Progress
from napari_medseg.training.dataset import Case, DatasetError, TrainingDataset, iter_load_dataset
from napari_medseg.training.fingerprint import compute_fingerprint, plan
from napari_medseg.training.loop import EpochLoop, Validation, resolve_budget, training_block

FOREGROUND_FRACTION = 1.0 / 3.0


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    out_dir : pathlib.Path
        The model folder written (``model.json`` + ``weights.safetensors``).
    card : ModelCard
        The card saved there, with ``training`` and ``metrics`` filled in.
    best_val_dice : float or None
        Mean foreground validation Dice of the saved checkpoint (None without validation).
    history : list of dict
        One dict per epoch: ``epoch``, ``iterations``, ``loss``, ``val_dice`` (per class),
        ``val_dice_mean``, ``time``, ``lr``.
    """

    out_dir: Path
    card: ModelCard
    best_val_dice: float | None
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- preprocessing


def case_to_model_grid(case: Case, card: ModelCard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise a case and bring it onto the model's grid, exactly as inference does.

    The image goes through :func:`napari_medseg.core.engine.preprocess.to_model_grid` (normalisation
    on the source grid, exact reorientation to ``card.orientation`` with nibabel, linear
    resampling to ``card.spacing``), so training sees what the engine feeds the network. The
    label takes the same map as a one-hot float image followed by an argmax (nnU-Net's way
    of resampling segmentations); without resampling this is exact.

    Returns
    -------
    image : (C, *model_spatial) float32, normalised
    label : (*model_spatial) int64
    affine : voxel-to-world affine of the model grid
    """
    import torch

    from napari_medseg.core.engine.preprocess import to_model_grid
    from napari_medseg.io.record import ImageRecord

    data = np.moveaxis(case.image, 0, -1)
    if data.shape[-1] == 1:
        data = data[..., 0]
    rec = ImageRecord(
        data=data,
        affine=case.affine,
        space=case.space,
        name=case.name,
        rgb=case.rgb and data.ndim == case.dims + 1,
    )
    img, grid = to_model_grid(rec, card)
    lab = np.asarray(case.label, dtype=np.int64)
    if not grid.resampled:
        lab_t = torch.from_numpy(lab)[None]
        lab = grid._forward_orient(lab_t)[0].numpy()
    else:
        n = max(card.out_channels, int(lab.max()) + 1)
        best = None
        out = None
        for k in range(n):
            pk = grid.image_to_model(torch.from_numpy((lab == k).astype(np.float32))[None])[0]
            if best is None:
                best, out = pk, torch.zeros(pk.shape, dtype=torch.int64)
            else:
                better = pk > best
                best = torch.where(better, pk, best)
                out[better] = k
        lab = out.numpy()
    image = img.detach().cpu().numpy().astype(np.float32, copy=False)
    if tuple(image.shape[1:]) != tuple(lab.shape):
        raise DatasetError(f"case {case.name}: image and label grids differ after resampling.")
    return np.ascontiguousarray(image), np.ascontiguousarray(lab), grid.model_affine


def _preprocess(case: Case, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    image, label, _ = case_to_model_grid(case, card)
    return image, label


# --------------------------------------------------------------------------- split


@dataclass
class _Item:
    name: str
    image: np.ndarray  # (C, *sp) normalised, model grid
    label: np.ndarray  # (*sp) int64
    fg: dict = field(default_factory=dict)  # class -> (N, ndim) voxel coords (subsampled)
    #: validation only: score only slices [a, b) along ``axis`` (the rest is image context)
    score: tuple[int, int, int] | None = None

    def scored(self, arr: np.ndarray) -> np.ndarray:
        """The part of a ``(*sp)`` array that is scored."""
        if self.score is None:
            return arr
        axis, a, b = self.score
        sl = [slice(None)] * arr.ndim
        sl[axis] = slice(a, b)
        return arr[tuple(sl)]


def _block_split(
    name: str,
    image: np.ndarray,
    label: np.ndarray,
    axis: int,
    frac: float,
    min_train: int,
    context: int = 0,
) -> tuple[list[_Item], _Item, tuple[int, int]]:
    """Hold out a contiguous block along ``axis``; train on the rest.

    The block holds at least half the foreground any block of its length could hold, and among
    such positions the one leaving the longest contiguous training piece is taken (so training
    patches are not mostly padding). The validation item carries up to ``context`` slices of
    image on each side so the network sees the block as it sees training patches; only the
    block's own voxels are scored, and no voxel of the block is ever in a training item.
    """
    n = label.shape[axis]
    length = int(min(max(1, round(frac * n)), n - 1))
    per_slice = np.count_nonzero(np.moveaxis(label, axis, 0).reshape(n, -1), axis=1)
    fg_in = np.array([per_slice[s : s + length].sum() for s in range(n - length + 1)])
    ok = np.nonzero(fg_in >= 0.5 * fg_in.max())[0]
    piece = np.maximum(ok, n - (ok + length))
    start = int(ok[int(np.argmax(piece))])
    stop = start + length
    sl = [slice(None)] * label.ndim

    def take(a: int, b: int, off: int = 0) -> tuple:
        s = list(sl)
        s[axis] = slice(a, b)
        return tuple([slice(None)] * off + s)

    c0, c1 = max(0, start - context), min(n, stop + context)
    val = _Item(
        f"{name}[{start}:{stop}]",
        image[take(c0, c1, 1)],
        label[take(c0, c1)],
        score=(axis, start - c0, stop - c0),
    )
    train = []
    for a, b in ((0, start), (stop, n)):
        if b - a >= min_train:
            train.append(_Item(f"{name}[{a}:{b}]", image[take(a, b, 1)], label[take(a, b)]))
    return train, val, (start, stop)


def split_items(
    names: list[str],
    data: list[tuple[np.ndarray, np.ndarray]],
    dims: int,
    val_fraction: float,
    seed: int,
    patch: list[int],
) -> tuple[list[_Item], list[_Item], dict]:
    """Split preprocessed cases into training and validation items.

    Three or more cases: whole cases are held out (at least one, ``val_fraction`` of them).
    Fewer: a contiguous block (``val_fraction`` of the slices along S for 3D, of the rows for
    2D) of each case, placed on the foreground centre, is held out.

    Returns
    -------
    train, val : lists of items
    info : dict
        ``held_out`` (text), ``train_cases``, ``val_cases`` and, for block splits, ``blocks``.
    """
    if val_fraction <= 0:
        items = [_Item(n, im, lb) for n, (im, lb) in zip(names, data)]
        return (
            items,
            [],
            {"held_out": "nothing (no validation)", "train_cases": names, "val_cases": []},
        )
    if len(names) >= 3:
        rng = np.random.default_rng(seed)
        n_val = int(min(len(names) - 1, max(1, round(val_fraction * len(names)))))
        order = rng.permutation(len(names))
        val_idx = set(int(i) for i in order[:n_val])
        train = [_Item(names[i], *data[i]) for i in range(len(names)) if i not in val_idx]
        val = [_Item(names[i], *data[i]) for i in sorted(val_idx)]
        return (
            train,
            val,
            {
                "held_out": "held-out cases",
                "train_cases": [t.name for t in train],
                "val_cases": [v.name for v in val],
            },
        )
    axis = 2 if dims == 3 else 0
    what = "slices along S" if dims == 3 else "rows"
    train, val, blocks = [], [], {}
    for n, (im, lb) in zip(names, data):
        if lb.shape[axis] < 2:
            raise DatasetError(
                f"case {n} has a single slice along the split axis; add cases for validation."
            )
        t, v, b = _block_split(
            n, im, lb, axis, val_fraction, max(2, patch[axis] // 4), context=patch[axis] // 2
        )
        train.extend(t)
        val.append(v)
        blocks[n] = list(b)
    if not train:
        raise DatasetError("the cases are too small to hold out a validation block; add cases.")
    single = "the single case" if len(names) == 1 else "each case"
    return (
        train,
        val,
        {
            "held_out": f"held-out slices of {single}: a contiguous block of {what} "
            f"({100 * val_fraction:.0f}%) on the model grid, never sampled for training (the "
            "neighbouring slices' image, not labels, is given as context and not scored)",
            "train_cases": names,
            "val_cases": names,
            "blocks": blocks,
            "block_axis": what,
        },
    )


# --------------------------------------------------------------------------- sampling


def _pad_to(item: _Item, patch: list[int]) -> None:
    sp = item.label.shape
    pads = [max(0, p - s) for p, s in zip(patch, sp)]
    if any(pads):
        pw = [(q // 2, q - q // 2) for q in pads]
        item.image = np.pad(item.image, [(0, 0), *pw], mode="constant")
        item.label = np.pad(item.label, pw, mode="constant")


def _index_foreground(item: _Item, rng: np.random.Generator, max_per_class: int = 20000) -> None:
    for k in np.unique(item.label):
        if k == 0:
            continue
        coords = np.argwhere(item.label == k)
        if len(coords) > max_per_class:
            coords = coords[rng.choice(len(coords), max_per_class, replace=False)]
        item.fg[int(k)] = coords


def _sample_batch(
    items: list[_Item], patch: list[int], batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random patches; a third centred (with jitter) on a random foreground voxel."""
    xs, ys = [], []
    fg_items = [it for it in items if it.fg]
    for b in range(batch):
        force = fg_items and (b % 3 == 2 if batch >= 3 else rng.random() < FOREGROUND_FRACTION)
        it = fg_items[rng.integers(len(fg_items))] if force else items[rng.integers(len(items))]
        shape = it.label.shape
        if force:
            k = list(it.fg)[rng.integers(len(it.fg))]
            c = it.fg[k][rng.integers(len(it.fg[k]))]
            start = [
                int(np.clip(ci - p // 2 + rng.integers(-(p // 4), p // 4 + 1), 0, s - p))
                for ci, p, s in zip(c, patch, shape)
            ]
        else:
            start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, shape)]
        sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
        xs.append(it.image[(slice(None), *sl)])
        ys.append(it.label[sl])
    return np.stack(xs), np.stack(ys)[:, None]


# --------------------------------------------------------------------------- augmentation


def default_augmentation(dims: int, modality: str = "") -> dict:
    """Augmentation settings suited to the kind of image.

    2D (microscopy, pathology): flips along both axes and 90° rotations (no preferred
    orientation). 3D (CT/MR in RAS): no flips or 90° rotations by default, because anatomy is
    not symmetric (the spleen is on the left); small rotations about S and scaling instead.
    All: intensity scale/shift, gamma, Gaussian noise.
    """
    if dims == 2:
        return {
            "flip_axes": [0, 1],
            "rot90": True,
            "affine_p": 0.3,
            "rotate_deg": 180.0,
            "scale": [0.8, 1.25],
            "intensity_p": 0.3,
            "gamma_p": 0.3,
            "noise_p": 0.15,
        }
    return {
        "flip_axes": [],
        "rot90": False,
        "affine_p": 0.25,
        "rotate_deg": 15.0,
        "scale": [0.85, 1.2],
        "intensity_p": 0.3,
        "gamma_p": 0.3,
        "noise_p": 0.15,
    }


def _augment(x: Any, y: Any, aug: dict, gen: Any) -> tuple[Any, Any]:
    """Augment a batch in place of torch tensors ``x (B, C, *sp)`` and ``y (B, 1, *sp)``."""
    import torch
    import torch.nn.functional as F

    def rnd() -> float:
        return float(torch.rand(1, generator=gen))

    dims = x.ndim - 2
    for a in aug.get("flip_axes", []):
        if rnd() < 0.5:
            x, y = x.flip(a + 2), y.flip(a + 2)
    if aug.get("rot90") and x.shape[2] == x.shape[3] and rnd() < 0.5:
        k = int(torch.randint(1, 4, (1,), generator=gen))
        x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (2, 3))
    if rnd() < aug.get("affine_p", 0.0):
        lo, hi = aug.get("scale", [1.0, 1.0])
        s = lo + (hi - lo) * rnd()
        ang = math.radians(aug.get("rotate_deg", 0.0)) * (2 * rnd() - 1)
        cos, sin = math.cos(ang) / s, math.sin(ang) / s
        B = x.shape[0]
        if dims == 2:
            theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)
        else:
            # grid_sample's (x, y, z) are the last, middle, first array axes: (S, A, R) here,
            # so a rotation about S mixes the y and z rows (A and R)
            theta = torch.tensor(
                [[1 / s, 0, 0, 0], [0, cos, -sin, 0], [0, sin, cos, 0]], dtype=x.dtype
            )
        theta = theta[None].expand(B, -1, -1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = F.grid_sample(
            y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        ).long()
    for b in range(x.shape[0]):
        if rnd() < aug.get("intensity_p", 0.0):
            x[b] = x[b] * (0.75 + 0.5 * rnd()) + 0.2 * (2 * rnd() - 1) * x[b].std()
        if rnd() < aug.get("gamma_p", 0.0):
            g = 0.7 + 0.8 * rnd()
            mn, mx = x[b].min(), x[b].max()
            rng_ = (mx - mn).clamp_min(1e-6)
            x[b] = ((x[b] - mn) / rng_).pow(g) * rng_ + mn
        if rnd() < aug.get("noise_p", 0.0):
            x[b] = x[b] + torch.randn(x[b].shape, generator=gen) * 0.1 * rnd() * x[b].std()
    return x.contiguous(), y.contiguous()


# --------------------------------------------------------------------------- validation


def dice_per_class(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> dict[int, tuple[int, int]]:
    """Per foreground class: ``(2 * intersection, |pred| + |gt|)`` for pooling over volumes."""
    out = {}
    for k in range(1, n_classes):
        p, g = pred == k, gt == k
        out[k] = (2 * int(np.count_nonzero(p & g)), int(p.sum() + g.sum()))
    return out


# --------------------------------------------------------------------------- helpers


def _bump_version(v: str | None) -> str:
    parts = str(v or "1").split(".")
    try:
        parts[-1] = str(int(parts[-1]) + 1)
    except ValueError:
        parts.append("1")
    return ".".join(parts)


def _check_init_fits(card: ModelCard, ds: TrainingDataset) -> None:
    """Raise when a model to fine-tune does not take the dataset's dimension or channels."""
    if card.dims != ds.dims:
        raise MedsegError(
            f"model {card.name!r} is {card.dims}D but the dataset holds {ds.dims}D images."
        )
    if card.in_channels != ds.in_channels:
        raise MedsegError(
            f"model {card.name!r} takes {card.in_channels} channel(s) but the dataset "
            f"images have {ds.in_channels}."
        )


def _make_child(card: ModelCard, name: str | None) -> None:
    """Turn a copied parent card into its fine-tuned child's (parent, bumped version, name)."""
    card.parent = f"{card.name}@{card.version}"
    card.version = _bump_version(card.version)
    if name:
        card.name = name
    card.metrics, card.training = {}, {}


def _dataset_license(ds: TrainingDataset, license: str | None) -> str:
    """``license``, else the ``licence``/``license`` of dataset.json, else ``"unknown"``."""
    return license or str(ds.json.get("licence") or ds.json.get("license") or "unknown")


def _default_batch_size(card: ModelCard, patch: list[int]) -> int:
    """Batch size for a patch: about 2 x 48^3 voxels (3D) or 8 x 128^2 pixels (2D), 2 to 16."""
    budget = 2 * 96**3 // 4 if card.dims == 3 else 8 * 128**2
    return int(np.clip(budget // int(np.prod(patch)), 2, 16))


def _fit_patch(patch: list[int], card: ModelCard) -> list[int]:
    strides = card.architecture.get("kwargs", {}).get("strides")
    if not strides:
        return [int(p) for p in patch]
    st = np.asarray(strides, dtype=int)
    st = st.reshape(len(strides), -1) if st.ndim == 2 else st[:, None].repeat(len(patch), 1)
    total = np.prod(st, axis=0)
    return [int(math.ceil(p / t) * t) for p, t in zip(patch, total)]


# --------------------------------------------------------------------------- train


def train(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    dims: int | None = None,
    init: str | Path | None = None,
    time_budget: float | None = 600.0,
    max_epochs: int | None = None,
    device: str = "auto",
    val_fraction: float = 0.2,
    seed: int = 0,
    width: int = 16,
    batch_size: int | None = None,
    patch_size: list[int] | None = None,
    name: str | None = None,
    lr: float | None = None,
    iterations_per_epoch: int = 50,
    voxel_budget: int | None = None,
    augment: dict | None = None,
    license: str | None = None,
    spacing: list[float] | None = None,
) -> Generator[Progress, None, TrainResult]:
    """Train (or fine-tune) a segmentation model on an nnU-Net-layout dataset.

    Parameters
    ----------
    dataset_dir : path-like
        ``imagesTr/``, ``labelsTr/`` and optional ``dataset.json`` (see :mod:`.dataset`).
    out_dir : path-like
        Model folder to write (created). Its name is the model name unless ``name`` is given.
    dims : {2, 3}, optional
        Must match the images (2D images -> 2, volumes -> 3); detected when None.
    init : path-like, optional
        A model folder to fine-tune: its card (architecture, spacing, normalisation, classes)
        and weights are reused; the new card gets ``parent = "name@version"`` and a bumped version.
    time_budget : float or None
        Seconds of training (validation included); checked between iterations. None (or
        infinity) needs ``max_epochs``.
    max_epochs : int, optional
        Also stop after this many epochs.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    val_fraction : float
        Share of cases (>= 3 cases) or of slices/rows of each case (fewer) held out.
    seed : int
    width : int
        First-level channels of the self-configured U-Net (doubles per level up to 4x).
    batch_size, patch_size : optional
        Override the planned batch and patch (patch in model axis order).
    name : str, optional
    lr : float, optional
        Initial AdamW learning rate, poly decay over the budget (default 3e-3, or 1e-3 when
        fine-tuning from ``init``).
    iterations_per_epoch : int
        An epoch also ends after ``max(time_budget / 8, 1)`` seconds, so short runs validate often.
    voxel_budget : int, optional
        Largest patch in voxels for the planner.
    augment : dict, optional
        Overrides of :func:`default_augmentation` (e.g. ``{"flip_axes": [0]}``).
    license : str, optional
        Licence written in the card (default: the dataset.json ``licence``/``license``).
    spacing : list of float, optional
        Target spacing (3D, mm along R, A, S) instead of the planned median spacing.

    Yields
    ------
    Progress
        ``info = {"epoch", "iteration", "loss", "val_dice", "phase"}``; ``done/total`` in seconds
        of the time budget (or iterations when only ``max_epochs`` bounds the run).

    Returns
    -------
    TrainResult
    """
    out_dir = Path(out_dir)
    time_budget = resolve_budget(time_budget, max_epochs, "train")
    if lr is None:
        lr = 1e-3 if init is not None else 3e-3
    yield Progress(0, 0, "reading the dataset")
    loader = iter_load_dataset(dataset_dir)
    while True:
        try:
            i, n, case_name = next(loader)
        except StopIteration as stop:
            ds: TrainingDataset = stop.value
            break
        yield Progress(0, 0, f"reading {case_name} ({i + 1}/{n})")
    if not ds.cases:
        raise DatasetError(f"dataset {Path(dataset_dir).name} has no cases.")
    if dims is not None and dims != ds.dims:
        raise DatasetError(f"dims={dims} was asked but the dataset holds {ds.dims}D images.")
    yield Progress(0, 0, "dataset fingerprint")
    fp = compute_fingerprint(ds, seed=seed)
    yield Progress(0, 0, "loading torch")
    import torch

    yield Progress(0, 0, "loading MONAI")
    from monai.losses import DiceCELoss

    from napari_medseg.core.engine.windows import resolve_device, sliding_window
    from napari_medseg.models.networks import build_network, load_model_folder, save_model

    yield Progress(0, 0, "planning")
    parent_net = None
    if init is not None:
        loaded = load_model_folder(init)
        card = copy.deepcopy(loaded.card)
        if card.task != "segmentation":
            raise MedsegError(f"model {card.name!r} is a model for {card.task}, not segmentation.")
        _check_init_fits(card, ds)
        if card.out_channels != len(ds.labels):
            raise MedsegError(
                f"model {card.name!r} predicts {card.out_channels} classes but the dataset has "
                f"{len(ds.labels)} labels; fine-tuning keeps the classes."
            )
        _make_child(card, name)
        if patch_size is not None:
            card.patch_size = _fit_patch(list(patch_size), card)
        parent_net = loaded.network
    else:
        card = plan(
            ds,
            fp,
            name=name or out_dir.name,
            width=width,
            voxel_budget=voxel_budget,
            patch_size=patch_size,
            spacing=spacing,
        )
        card.license = _dataset_license(ds, license)
    patch = [int(p) for p in card.patch_size]
    if batch_size is None:
        batch_size = _default_batch_size(card, patch)
    aug = default_augmentation(card.dims, card.modality)
    aug.update(augment or {})

    # preprocessing
    data, names = [], []
    for i, c in enumerate(ds.cases):
        yield Progress(0, 0, f"preprocessing {c.name} ({i + 1}/{len(ds.cases)})")
        data.append(_preprocess(c, card))
        names.append(c.name)
    train_items, val_items, split = split_items(names, data, card.dims, val_fraction, seed, patch)
    rng = np.random.default_rng(seed)
    for it in train_items:
        _pad_to(it, patch)
        _index_foreground(it, rng)

    yield Progress(0, 0, "building the network")
    dev = resolve_device(device)  # clear error when cuda/mps is asked for but absent
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = parent_net if parent_net is not None else build_network(card)
    net = net.to(dev).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    yield Progress(0, 0, "setting up the optimiser")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=3e-5)
    yield Progress(0, 0, "first iteration (warm-up)")
    n_classes = card.out_channels
    fg_names = {int(c["id"]): str(c["name"]) for c in card.classes if int(c["id"]) != 0}
    loop = EpochLoop(lr, time_budget, max_epochs, iterations_per_epoch, "val_dice", "val Dice")

    def sample() -> tuple[Any, Any]:
        xs, ys = _sample_batch(train_items, patch, batch_size, rng)
        return _augment(torch.from_numpy(xs), torch.from_numpy(ys), aug, gen)

    def batch_loss(batch: tuple[Any, Any]) -> Any:
        x, y = batch
        return loss_fn(net(x.to(dev)), y.to(dev))

    def validate() -> Generator[Progress, None, Validation]:
        net.eval()
        pooled = {k: [0, 0] for k in fg_names}
        per_case = {}
        for v in val_items:
            g = sliding_window(
                v.image,
                net,
                patch,
                overlap=card.overlap or 0.5,
                batch_size=1,
                device=dev,
                amp=False,
            )
            while True:
                try:
                    next(g)
                except StopIteration as s:
                    probs = s.value
                    break
                yield loop.progress(f"validating {v.name}", None, "validation")
            pred = probs.argmax(0).cpu().numpy()
            d = dice_per_class(v.scored(pred), v.scored(v.label), n_classes)
            per_case[v.name] = {}
            for k, (num, den) in d.items():
                pooled[k][0] += num
                pooled[k][1] += den
                per_case[v.name][fg_names[k]] = round(num / den, 4) if den else None
        per_class = {fg_names[k]: (num / den if den else None) for k, (num, den) in pooled.items()}
        vals = [v for v in per_class.values() if v is not None]
        mean = float(np.mean(vals)) if vals else 0.0
        rounded = {k: (round(v, 4) if v is not None else None) for k, v in per_class.items()}
        return Validation(
            {"val_dice": rounded, "val_dice_mean": round(mean, 4)},
            mean,
            details=(rounded, per_case),
        )

    net = yield from loop.run(net, opt, sample, batch_loss, validate if val_items else None)
    history = loop.history
    card.training = training_block(
        loop,
        dataset_dir,
        ds,
        split,
        head={},
        patch_size=patch,
        batch_size=batch_size,
        loss="DiceCELoss(to_onehot_y=True, softmax=True)",
        sampling={"foreground_oversampling": round(FOREGROUND_FRACTION, 3)},
        augmentations=aug,
        seed=seed,
        device=dev,
        init=init,
    )
    best_mean = None if loop.best is None else loop.best.score
    if loop.best is not None:
        best_per_class, best_per_case = loop.best.details
        grid = "the model grid (card spacing, RAS axes)" if card.dims == 3 else "the image pixels"
        card.metrics = {
            "val_dice": best_per_class,
            "val_dice_mean": round(float(best_mean), 4),
            "val_dice_mean_last_epoch": history[-1].get("val_dice_mean"),
            "held_out": split["held_out"],
            "val_cases": split["val_cases"],
            "val_dice_per_case": best_per_case,
            "computed_on": f"{grid}; Dice pooled over the held-out data; the saved checkpoint "
            "is the best epoch by this Dice, so the figure is slightly optimistic (see "
            "val_dice_mean_last_epoch)",
        }
    else:
        card.metrics = {"held_out": split["held_out"]}
    yield loop.progress("saving the model", None, "save")
    save_model(out_dir, card, net)
    return TrainResult(out_dir=out_dir, card=card, best_val_dice=best_mean, history=history)
