"""Train or fine-tune a segmentation model from an nnU-Net-layout dataset.

:func:`train` is a progress generator (docs/ARCHITECTURE.md rule 2): it yields
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
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.models.card import ModelCard
from napari_medseg.progress import Progress
from napari_medseg.training.augment import augment
from napari_medseg.training.dataset import Case, DatasetError, TrainingDataset, iter_load_dataset
from napari_medseg.training.fingerprint import compute_fingerprint
from napari_medseg.training.loop import EpochLoop, Validation, resolve_budget, training_block
from napari_medseg.training.options import TrainOptions, check_init_fits, fit_patch, make_child
from napari_medseg.training.patches import (
    FOREGROUND_FRACTION,
    index_foreground,
    pad_to,
    sample_batch,
    split_items,
)

__all__ = ["TrainResult", "case_to_model_grid", "dice_per_class", "train"]


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


# --------------------------------------------------------------------------- validation


def dice_per_class(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> dict[int, tuple[int, int]]:
    """Per foreground class: ``(2 * intersection, |pred| + |gt|)`` for pooling over volumes."""
    out = {}
    for k in range(1, n_classes):
        p, g = pred == k, gt == k
        out[k] = (2 * int(np.count_nonzero(p & g)), int(p.sum() + g.sum()))
    return out


# --------------------------------------------------------------------------- train


def train(
    dataset_dir: str | Path,
    out_dir: str | Path,
    options: TrainOptions | None = None,
    **settings: Any,
) -> Generator[Progress, None, TrainResult]:
    """Train (or fine-tune) a segmentation model on an nnU-Net-layout dataset.

    Parameters
    ----------
    dataset_dir : path-like
        ``imagesTr/``, ``labelsTr/`` and optional ``dataset.json`` (see :mod:`.dataset`).
    out_dir : path-like
        Model folder to write (created). Its name is the model name unless ``name`` is given.
    options : TrainOptions, optional
        The run's settings (default ``TrainOptions()``): budget, epochs, device, seed,
        fine-tuning ``init``, planner overrides, augmentation, licence.
    **settings
        :class:`TrainOptions` fields as keywords; they replace those of ``options``.

    Yields
    ------
    Progress
        ``info = {"epoch", "iteration", "loss", "val_dice", "phase"}``; ``done/total`` in seconds
        of the time budget (or iterations when only ``max_epochs`` bounds the run).

    Returns
    -------
    TrainResult
    """
    o = TrainOptions.merged(options, settings)
    out_dir = Path(out_dir)
    time_budget = resolve_budget(o.time_budget, o.max_epochs, "train")
    lr = o.learning_rate()
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
    o.check_dims(ds)
    yield Progress(0, 0, "dataset fingerprint")
    fp = compute_fingerprint(ds, seed=o.seed)
    yield Progress(0, 0, "loading torch")
    import torch

    yield Progress(0, 0, "loading MONAI")
    from monai.losses import DiceCELoss

    from napari_medseg.core.engine.windows import resolve_device, sliding_window
    from napari_medseg.models.loaders.folder import load_model_folder
    from napari_medseg.models.networks import build_network, save_model

    yield Progress(0, 0, "planning")
    parent_net = None
    if o.init is not None:
        loaded = load_model_folder(o.init)
        card = copy.deepcopy(loaded.card)
        if card.task != "segmentation":
            raise MedsegError(f"model {card.name!r} is a model for {card.task}, not segmentation.")
        check_init_fits(card, ds)
        if card.out_channels != len(ds.labels):
            raise MedsegError(
                f"model {card.name!r} predicts {card.out_channels} classes but the dataset has "
                f"{len(ds.labels)} labels; fine-tuning keeps the classes."
            )
        make_child(card, o.name)
        if o.patch_size is not None:
            card.patch_size = fit_patch(list(o.patch_size), card)
        parent_net = loaded.network
    else:
        card = o.plan_card(ds, fp, out_dir)
    patch = [int(p) for p in card.patch_size]
    batch_size = o.batch_for(card, patch)
    aug = o.augmentation_for(card)

    # preprocessing
    data, names = [], []
    for i, c in enumerate(ds.cases):
        yield Progress(0, 0, f"preprocessing {c.name} ({i + 1}/{len(ds.cases)})")
        image, label, _ = case_to_model_grid(c, card)
        data.append((image, label))
        names.append(c.name)
    train_items, val_items, split = split_items(
        names, data, card.dims, o.val_fraction, o.seed, patch
    )
    rng = np.random.default_rng(o.seed)
    for it in train_items:
        pad_to(it, patch)
        index_foreground(it, rng)

    yield Progress(0, 0, "building the network")
    dev = resolve_device(o.device)  # clear error when cuda/mps is asked for but absent
    torch.manual_seed(o.seed)
    gen = torch.Generator().manual_seed(o.seed)
    net = parent_net if parent_net is not None else build_network(card)
    net = net.to(dev).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    yield Progress(0, 0, "setting up the optimiser")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=3e-5)
    yield Progress(0, 0, "first iteration (warm-up)")
    n_classes = card.out_channels
    fg_names = {int(c["id"]): str(c["name"]) for c in card.classes if int(c["id"]) != 0}
    loop = EpochLoop(lr, time_budget, o.max_epochs, o.iterations_per_epoch, "val_dice", "val Dice")

    def sample() -> tuple[Any, Any]:
        xs, ys = sample_batch(train_items, patch, batch_size, rng)
        return augment(torch.from_numpy(xs), torch.from_numpy(ys), aug, gen)

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
        seed=o.seed,
        device=dev,
        init=o.init,
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
