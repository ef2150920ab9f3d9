"""The settings of a training run (:class:`TrainOptions`) and how their defaults are resolved.

One dataclass serves the dataset trainers :func:`napari_medseg.training.segment.train`,
:func:`napari_medseg.training.detect.train_detection` and
:func:`napari_medseg.training.from_corrections.finetune_from_corrections`, the ``napari-medseg
train`` command and the Correct & Train dock. A trainer takes ``options`` and, as a shortcut,
the same settings as keywords (``train(ds, out, time_budget=60, seed=1)`` is
``train(ds, out, TrainOptions(time_budget=60, seed=1))``); :meth:`TrainOptions.merged` does that
and names a misspelt setting.

The functions below resolve what a setting left at ``None`` means for a given card and dataset
(learning rate, batch size, licence) and prepare the card of a fine-tuning run (a child of the
parent model's card). They are shared by the trainers so both read the same rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.models.card import ModelCard
from napari_medseg.training.augment import default_augmentation
from napari_medseg.training.dataset import DatasetError

__all__ = [
    "TrainOptions",
    "bump_version",
    "check_init_fits",
    "dataset_license",
    "default_batch_size",
    "fit_patch",
    "make_child",
]


@dataclass
class TrainOptions:
    """Settings of a segmentation or box-detector training run.

    Attributes
    ----------
    dims : {2, 3}, optional
        Must match the images (2D images -> 2, volumes -> 3); detected when None.
    init : path-like, optional
        A model folder to fine-tune: its card (architecture, spacing, normalisation, classes)
        and weights are reused; the new card gets ``parent = "name@version"`` and a bumped
        version.
    time_budget : float or None
        Seconds of training, validation included; checked between iterations. None (or
        infinity) needs ``max_epochs``.
    max_epochs : int, optional
        Also stop after this many epochs.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    val_fraction : float
        Share of cases (three or more cases) or of the slices/rows of each case (fewer) held
        out for validation; 0 trains on everything and keeps the last epoch.
    seed : int
        Seeds the split, the patch sampling, the augmentation and the network's initial weights:
        the same seed and settings give the same weights on the same machine.
    width : int
        First-level channels of the self-configured U-Net (doubles per level up to 4x).
    batch_size : int, optional
        Default: about 2 x 48^3 voxels (3D) or 8 x 128^2 pixels (2D) per batch, 2 to 16
        (:func:`default_batch_size`).
    patch_size : list of int, optional
        Override the planned patch (voxels, model axis order: R, A, S in 3D; rows, columns in
        2D); rounded up to fit the network's strides.
    name : str, optional
        Model name in the card (default: the output folder's name).
    lr : float, optional
        Initial AdamW learning rate with poly decay over the budget (default 3e-3, or 1e-3
        when fine-tuning from ``init``).
    iterations_per_epoch : int
        An epoch also ends after ``max(time_budget / 8, 1)`` seconds, so short runs validate
        often.
    voxel_budget : int, optional
        Largest patch in voxels for the planner.
    augment : dict, optional
        Overrides of :func:`napari_medseg.training.augment.default_augmentation` (e.g.
        ``{"flip_axes": [0]}``).
    license : str, optional
        Licence written in the card (default: the ``licence``/``license`` of dataset.json).
    spacing : list of float, optional
        Target spacing (3D, mm along R, A, S) instead of the planned median spacing.
    num_res_units : int, optional
        Residual units per U-Net level of a newly planned network (default: the planner's 2);
        a fine-tuned model keeps its parent's architecture.
    """

    dims: int | None = None
    init: str | Path | None = None
    time_budget: float | None = 600.0
    max_epochs: int | None = None
    device: str = "auto"
    val_fraction: float = 0.2
    seed: int = 0
    width: int = 16
    batch_size: int | None = None
    patch_size: list[int] | None = None
    name: str | None = None
    lr: float | None = None
    iterations_per_epoch: int = 50
    voxel_budget: int | None = None
    augment: dict | None = None
    license: str | None = None
    spacing: list[float] | None = None
    num_res_units: int | None = None

    @classmethod
    def merged(cls, options: TrainOptions | None, settings: dict[str, Any]) -> TrainOptions:
        """``options`` (or the defaults) with ``settings`` given as keywords replacing fields.

        Raises
        ------
        TypeError
            When a keyword is not a field (``"unknown training setting 'epochs'; the settings
            are ..."``).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(
                f"unknown training setting {unknown[0]!r}; the settings are "
                f"{', '.join(sorted(names))}"
            )
        return dataclasses.replace(options or cls(), **settings)

    def learning_rate(self) -> float:
        """``lr``, else 1e-3 when fine-tuning (``init``) and 3e-3 when training from scratch."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.init is not None else 3e-3

    def check_dims(self, ds: Any) -> None:
        """Raise :class:`~napari_medseg.training.dataset.DatasetError` when ``dims`` is set and
        the dataset (a :class:`~napari_medseg.training.dataset.TrainingDataset`) holds images of
        another dimension."""
        if self.dims is not None and self.dims != ds.dims:
            raise DatasetError(
                f"dims={self.dims} was asked but the dataset holds {ds.dims}D images."
            )

    def plan_card(self, ds: Any, fingerprint: Any, out_dir: str | Path) -> ModelCard:
        """The self-configured card of a new model (:func:`.fingerprint.plan`) with these
        settings: name (default: ``out_dir``'s name), width, voxel budget, patch size, spacing,
        residual units and licence."""
        from napari_medseg.training.fingerprint import plan

        card = plan(
            ds,
            fingerprint,
            name=self.name or Path(out_dir).name,
            width=self.width,
            voxel_budget=self.voxel_budget,
            patch_size=self.patch_size,
            spacing=self.spacing,
        )
        if self.num_res_units is not None:
            card.architecture["kwargs"]["num_res_units"] = int(self.num_res_units)
        card.license = dataset_license(ds, self.license)
        return card

    def batch_for(self, card: ModelCard, patch: list[int]) -> int:
        """``batch_size``, else :func:`default_batch_size` for the card and patch."""
        return self.batch_size if self.batch_size is not None else default_batch_size(card, patch)

    def augmentation_for(self, card: ModelCard) -> dict:
        """:func:`~napari_medseg.training.augment.default_augmentation` for the card's
        dimension and modality, updated with ``augment``."""
        aug = default_augmentation(card.dims, card.modality)
        aug.update(self.augment or {})
        return aug


def check_init_fits(card: ModelCard, ds: Any) -> None:
    """Raise when a model to fine-tune does not take the dataset's dimension or channels.

    Parameters
    ----------
    card : ModelCard
        The card of the model to fine-tune.
    ds : TrainingDataset
        The dataset (:class:`napari_medseg.training.dataset.TrainingDataset`).

    Raises
    ------
    MedsegError
        One sentence naming the model and what does not fit.
    """
    if card.dims != ds.dims:
        raise MedsegError(
            f"model {card.name!r} is {card.dims}D but the dataset holds {ds.dims}D images."
        )
    if card.in_channels != ds.in_channels:
        raise MedsegError(
            f"model {card.name!r} takes {card.in_channels} channel(s) but the dataset "
            f"images have {ds.in_channels}."
        )


def bump_version(version: str | None) -> str:
    """The next version: the last dotted number plus one (``"1.2"`` -> ``"1.3"``), or ``.1``
    appended when the last part is not a number."""
    parts = str(version or "1").split(".")
    try:
        parts[-1] = str(int(parts[-1]) + 1)
    except ValueError:
        parts.append("1")
    return ".".join(parts)


def make_child(card: ModelCard, name: str | None) -> None:
    """Turn a copied parent card, in place, into its fine-tuned child's: ``parent =
    "name@version"``, bumped version, the new ``name`` when given, no metrics or training."""
    card.parent = f"{card.name}@{card.version}"
    card.version = bump_version(card.version)
    if name:
        card.name = name
    card.metrics, card.training = {}, {}


def dataset_license(ds: Any, license: str | None) -> str:
    """``license``, else the ``licence``/``license`` of the dataset's dataset.json, else
    ``"unknown"``."""
    return license or str(ds.json.get("licence") or ds.json.get("license") or "unknown")


def default_batch_size(card: ModelCard, patch: list[int]) -> int:
    """Batch size for a patch: about 2 x 48^3 voxels (3D) or 8 x 128^2 pixels (2D), 2 to 16."""
    budget = 2 * 96**3 // 4 if card.dims == 3 else 8 * 128**2
    return int(np.clip(budget // int(np.prod(patch)), 2, 16))


def fit_patch(patch: list[int], card: ModelCard) -> list[int]:
    """``patch`` (voxels, model axis order) rounded up to a multiple of the network's total
    stride along each axis (``card.architecture["kwargs"]["strides"]``)."""
    strides = card.architecture.get("kwargs", {}).get("strides")
    if not strides:
        return [int(p) for p in patch]
    st = np.asarray(strides, dtype=int)
    st = st.reshape(len(strides), -1) if st.ndim == 2 else st[:, None].repeat(len(patch), 1)
    total = np.prod(st, axis=0)
    return [int(math.ceil(p / t) * t) for p, t in zip(patch, total)]
