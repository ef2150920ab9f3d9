"""Dataset fingerprint and self-configuration, nnU-Net style but small.

:func:`compute_fingerprint` measures a dataset (spacings, shapes, foreground intensities, class
sizes); :func:`plan` turns the fingerprint into a :class:`~napari_medseg.models.card.ModelCard`:
target spacing, patch size, intensity normalisation and a MONAI ``UNet`` configuration.

Axis conventions: 3D models work in RAS axis order (model axis 0 points to R, 1 to A, 2 to S,
``card.orientation == "RAS"``), so spacings, shapes and patch sizes here are in that order. 2D
models work on ``(row, col)`` pixels at the file's own resolution (``card.spacing`` is None).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from napari_medseg.models.card import PALETTE, ModelCard
from napari_medseg.training.dataset import Case, TrainingDataset

#: Default patch budget in voxels (3D) and pixels (2D) for CPU training.
VOXEL_BUDGET_3D = 96**3
VOXEL_BUDGET_2D = 256**2
#: Smallest feature map at the bottom of the U-Net (voxels per axis), as in nnU-Net.
MIN_FEATURE_MAP = 4
MAX_LEVELS = 5
ANISOTROPY_RATIO = 3.0


@dataclass
class Fingerprint:
    """What :func:`compute_fingerprint` measured.

    Attributes
    ----------
    dims : int
        2 or 3.
    spacings : list of list of float
        Per case, voxel size (mm) along the RAS axes (3D) or ``(row, col)`` pixel size (2D).
    shapes : list of list of int
        Per case, spatial shape along the same axes (before resampling).
    median_spacing : list of float
    target_spacing : list of float or None
        Spacing the model works at (None for 2D: native pixels).
    median_shape : list of int
        Median spatial shape after resampling to ``target_spacing``.
    channels : list of dict
        Per channel: ``mean``, ``std``, ``median``, ``p00_5``, ``p99_5``, ``min``, ``max`` of the
        foreground (label > 0) intensities, over all cases.
    class_voxels : dict of int to int
        Voxels per class over all cases.
    n_cases : int
    """

    dims: int
    spacings: list[list[float]]
    shapes: list[list[int]]
    median_spacing: list[float]
    target_spacing: list[float] | None
    median_shape: list[int]
    channels: list[dict]
    class_voxels: dict[int, int]
    n_cases: int
    anisotropic: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def ras_transform(affine: np.ndarray) -> tuple[list[int], list[bool]]:
    """How to bring file axes to RAS order: ``perm`` (file axis for each RAS axis) and flips.

    Parameters
    ----------
    affine : (4, 4) array
        Voxel-to-RAS affine.

    Returns
    -------
    perm : list of int
        ``perm[r]`` is the file axis that lies along RAS axis ``r``.
    flip : list of bool
        ``flip[r]``: that file axis increases towards L, P or I and must be reversed.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=float))
    perm = [0, 0, 0]
    flip = [False, False, False]
    for file_ax, (ras_ax, sign) in enumerate(ornt):
        perm[int(ras_ax)] = file_ax
        flip[int(ras_ax)] = bool(sign < 0)
    return perm, flip


def case_geometry(case: Case) -> tuple[list[float], list[int]]:
    """Spacing and shape of a case along the model axes (RAS for 3D, row/col for 2D)."""
    if case.dims == 3 and case.space == "RAS":
        perm, _ = ras_transform(case.affine)
        return [case.spacing[p] for p in perm], [int(case.label.shape[p]) for p in perm]
    return list(case.spacing), [int(s) for s in case.label.shape]


def channel_kind(name: str, rgb: bool = False) -> str:
    """Normalisation scheme for a ``dataset.json`` channel name.

    ``"CT"`` -> ``"ct"``; colour channels or ``"rgb"``/``"H&E"`` -> ``"rgb"``; ``"noNorm"`` ->
    ``"none"``; ``"rescale_to_0_1"``/``"percentile"``/``"fluorescence"``/``"microscopy"`` ->
    ``"percentile"``; anything else (MR contrasts...) -> ``"zscore"``.
    """
    n = name.strip().lower()
    if rgb or n in ("rgb", "r", "g", "b", "red", "green", "blue", "h&e", "he"):
        return "rgb"
    if n == "ct":
        return "ct"
    if n in ("nonorm", "none"):
        return "none"
    if n in ("rescale_to_0_1", "percentile", "fluorescence", "microscopy", "fluo"):
        return "percentile"
    return "zscore"


def compute_fingerprint(
    dataset: TrainingDataset, samples_per_case: int = 10000, seed: int = 0
) -> Fingerprint:
    """Measure spacing, shape, foreground intensities and class sizes of a dataset.

    Parameters
    ----------
    dataset : TrainingDataset
    samples_per_case : int
        Foreground voxels sampled per case for the intensity statistics (nnU-Net uses 10000).
    seed : int

    Returns
    -------
    Fingerprint
    """
    rng = np.random.default_rng(seed)
    cases = dataset.cases
    dims = dataset.dims
    spacings, shapes = [], []
    for c in cases:
        sp, sh = case_geometry(c)
        spacings.append(sp)
        shapes.append(sh)
    sp_arr = np.asarray(spacings, dtype=float)
    median_spacing = [float(v) for v in np.median(sp_arr, axis=0)]
    anisotropic = False
    if dims == 3:
        target = list(median_spacing)
        worst = int(np.argmax(target))
        others = [target[i] for i in range(3) if i != worst]
        if target[worst] > ANISOTROPY_RATIO * min(others):
            # nnU-Net: for very anisotropic data keep the coarse axis near its finer cases
            anisotropic = True
            target[worst] = float(max(np.percentile(sp_arr[:, worst], 10), max(others)))
        resampled = [
            [round(s * sp / t) for s, sp, t in zip(sh, spc, target)]
            for sh, spc in zip(shapes, spacings)
        ]
    else:
        target = None
        resampled = shapes
    median_shape = [int(v) for v in np.median(np.asarray(resampled, dtype=float), axis=0)]
    nch = int(cases[0].image.shape[0])
    channels = []
    for ch in range(nch):
        vals = []
        for c in cases:
            img = c.image[ch]
            fg = img[c.label > 0]
            if fg.size == 0:
                fg = img.ravel()
            if fg.size > samples_per_case:
                fg = rng.choice(fg, samples_per_case, replace=False)
            vals.append(fg.astype(np.float64))
        v = np.concatenate(vals)
        channels.append(
            {
                "mean": float(v.mean()),
                "std": float(v.std()),
                "median": float(np.median(v)),
                "p00_5": float(np.percentile(v, 0.5)),
                "p99_5": float(np.percentile(v, 99.5)),
                "min": float(v.min()),
                "max": float(v.max()),
            }
        )
    class_voxels: dict[int, int] = {}
    for c in cases:
        ids, counts = np.unique(c.label, return_counts=True)
        for i, n in zip(ids, counts):
            class_voxels[int(i)] = class_voxels.get(int(i), 0) + int(n)
    return Fingerprint(
        dims=dims,
        spacings=[[float(x) for x in s] for s in spacings],
        shapes=shapes,
        median_spacing=median_spacing,
        target_spacing=target,
        median_shape=median_shape,
        channels=channels,
        class_voxels=class_voxels,
        n_cases=len(cases),
        anisotropic=anisotropic,
    )


# --------------------------------------------------------------------------- planning


def plan_normalization(dataset: TrainingDataset, fp: Fingerprint) -> dict:
    """Card ``normalization`` block from the channel names and foreground statistics.

    ``"ct"``: window = foreground percentiles 0.5-99.5 (nnU-Net's CTNormalization clips to the
    same window; here the clipped values are scaled to [0, 1] as the card's ``ct`` scheme says).
    ``"rgb"``: per-channel mean/std of the images in [0, 1] (8-bit values / 255, as
    :func:`napari_medseg.core.engine.preprocess.normalize` scales them). ``"zscore"``: per image,
    over
    the body (foreground_only). ``"percentile"``: per image, 0.5-99.5 percentiles to [0, 1].
    """
    rgb = bool(dataset.cases and dataset.cases[0].rgb)
    kinds = [channel_kind(dataset.channel_names.get(i, ""), rgb) for i in range(len(fp.channels))]
    kind = kinds[0]
    if kind == "ct":
        st = fp.channels[0]
        return {"scheme": "ct", "window": [round(st["p00_5"], 1), round(st["p99_5"], 1)]}
    if kind == "rgb":
        scale = 255.0 if max(ch["max"] for ch in fp.channels) > 1.0 else 1.0
        means, stds = [], []
        for i in range(len(fp.channels)):
            all_vals = np.concatenate([c.image[i].ravel()[::7] for c in dataset.cases]) / scale
            means.append(round(float(all_vals.mean()), 4))
            stds.append(round(float(max(all_vals.std(), 1e-3)), 4))
        return {"scheme": "rgb", "mean": means, "std": stds}
    if kind == "percentile":
        return {"scheme": "percentile", "lower": 0.5, "upper": 99.5}
    if kind == "none":
        return {"scheme": "none"}
    return {"scheme": "zscore", "foreground_only": True}


def plan_patch_size(
    median_shape: list[int],
    spacing: list[float] | None,
    voxel_budget: int,
    min_size: int = 8,
) -> list[int]:
    """Patch size from the median shape, shrunk to fit ``voxel_budget`` (nnU-Net style).

    The axis with the largest physical extent relative to its share is shrunk first, so the
    patch stays roughly isotropic in mm. Divisibility is applied later by :func:`plan_network`.
    """
    sp = np.asarray(spacing if spacing is not None else [1.0] * len(median_shape), dtype=float)
    patch = np.maximum(np.asarray(median_shape, dtype=float), min_size)
    while np.prod(patch) > voxel_budget:
        extent = patch * sp
        extent[patch <= min_size] = -1
        ax = int(np.argmax(extent))
        if extent[ax] < 0:
            break
        patch[ax] = max(min_size, np.floor(patch[ax] * 0.9))
    return [int(v) for v in patch]


def plan_network(
    patch_size: list[int],
    spacing: list[float] | None,
    in_channels: int,
    out_channels: int,
    width: int = 16,
    max_levels: int = MAX_LEVELS,
) -> tuple[dict, list[int]]:
    """MONAI ``UNet`` configuration from a patch size, nnU-Net style.

    At each level an axis is downsampled when its feature map stays >= ``MIN_FEATURE_MAP`` after
    halving and its current spacing is at most twice the finest one (so anisotropic volumes
    are first downsampled in-plane; strides may differ per axis). Channels double per level from
    ``width`` and stop at ``4 * width`` to keep the weights small (a few MB at width 8-16).
    (``DynUNet`` would be closer to nnU-Net, but its state dict holds shared tensors that
    safetensors refuses to save.)

    Returns
    -------
    architecture : dict
        ``{"name": "UNet", "kwargs": {...}}`` for :func:`napari_medseg.models.build_network`.
    patch_size : list of int
        The patch rounded up so that each axis is divisible by its total stride.
    """
    dims = len(patch_size)
    sp = np.asarray(spacing if spacing is not None else [1.0] * dims, dtype=float)
    size = np.asarray(patch_size, dtype=float)
    strides: list[list[int]] = []
    total = np.ones(dims, dtype=int)
    for _ in range(max_levels - 1):
        s = []
        for a in range(dims):
            ok = size[a] / 2 >= MIN_FEATURE_MAP and sp[a] <= 2 * sp.min()
            s.append(2 if ok else 1)
        if max(s) == 1:
            break
        strides.append(s)
        size = size / np.asarray(s)
        sp = sp * np.asarray(s)
        total *= np.asarray(s)
    if not strides:
        raise ValueError(f"patch size {list(patch_size)} is too small for a U-Net")
    patch = [int(np.ceil(p / t) * t) for p, t in zip(patch_size, total)]
    channels = [int(min(width * 2**i, 4 * width)) for i in range(len(strides) + 1)]
    iso = all(len(set(s)) == 1 for s in strides)
    kwargs = {
        "spatial_dims": dims,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "channels": channels,
        "strides": [s[0] for s in strides] if iso else strides,
        "kernel_size": 3,
        "up_kernel_size": 3,
        "num_res_units": 2,
        "norm": "INSTANCE",
        "dropout": 0.0,
    }
    return {"name": "UNet", "kwargs": kwargs}, patch


def plan(
    dataset: TrainingDataset,
    fingerprint: Fingerprint | None = None,
    *,
    name: str = "model",
    width: int = 16,
    voxel_budget: int | None = None,
    patch_size: list[int] | None = None,
    modality: str | None = None,
    spacing: list[float] | None = None,
) -> ModelCard:
    """Self-configure a segmentation model card for a dataset.

    Parameters
    ----------
    dataset : TrainingDataset
    fingerprint : Fingerprint, optional
        Computed when not given.
    name : str
        Model name written in the card.
    width : int
        Filters at the first level (doubles per level up to ``4 * width``): the size knob.
    voxel_budget : int, optional
        Largest patch in voxels; default ``96**3`` (3D) or ``256**2`` (2D).
    patch_size : list of int, optional
        Force a patch size (model axis order); it is rounded up to fit the network strides.
    modality : str, optional
        Card modality; default from the channel names (``CT``, ``MR``, ``microscopy``...).
    spacing : list of float, optional
        Force the target spacing (3D, mm along R, A, S) instead of the median spacing, e.g. a
        coarser grid for a large organ on a slow machine.

    Returns
    -------
    ModelCard
        Task ``segmentation``, with classes, spacing, orientation, patch size, normalisation,
        architecture and ``extra["fingerprint"]``; ``training``/``metrics`` are left for
        :func:`napari_medseg.training.segment.train`.
    """
    fp = fingerprint or compute_fingerprint(dataset)
    dims = fp.dims
    budget = voxel_budget or (VOXEL_BUDGET_3D if dims == 3 else VOXEL_BUDGET_2D)
    median_shape = fp.median_shape
    if dims == 3 and spacing is not None:
        if len(spacing) != 3:
            raise ValueError(f"spacing must have 3 values (R, A, S mm), got {list(spacing)}")
        spacing = [float(v) for v in spacing]
        median_shape = [
            int(v)
            for v in np.median(
                [
                    [sh * sp / t for sh, sp, t in zip(shp, spc, spacing)]
                    for shp, spc in zip(fp.shapes, fp.spacings)
                ],
                axis=0,
            )
        ]
    else:
        spacing = fp.target_spacing if dims == 3 else None
    if patch_size is None:
        patch = plan_patch_size(median_shape, spacing, budget)
    else:
        if len(patch_size) != dims:
            raise ValueError(f"patch_size must have {dims} values, got {list(patch_size)}")
        patch = [int(p) for p in patch_size]
    arch, patch = plan_network(
        patch, spacing, dataset.in_channels, len(dataset.labels), width=width
    )
    classes = []
    for i in sorted(dataset.labels):
        c: dict[str, Any] = {"id": int(i), "name": dataset.labels[i]}
        if i:
            c["color"] = PALETTE[i % len(PALETTE)]
        classes.append(c)
    norm = plan_normalization(dataset, fp)
    if modality is None:
        scheme = norm["scheme"]
        ch0 = dataset.channel_names.get(0, "").lower()
        if scheme == "ct":
            modality = "CT"
        elif scheme == "rgb":
            modality = "pathology" if ch0 in ("h&e", "he", "ihc") else "microscopy"
        elif dims == 2:
            modality = "microscopy"
        elif ch0 in ("pet", "pt"):
            modality = "PT"
        else:
            modality = "MR"
    card = ModelCard(
        name=name,
        task="segmentation",
        dims=dims,
        modality=modality,
        in_channels=dataset.in_channels,
        classes=classes,
        spacing=[round(float(s), 4) for s in spacing] if spacing is not None else None,
        orientation="RAS" if dims == 3 else "",
        patch_size=patch,
        normalization=norm,
        architecture=arch,
        description=dataset.description,
    )
    card.extra["fingerprint"] = {
        "median_spacing": fp.median_spacing,
        "median_shape": fp.median_shape,
        "channels": fp.channels,
        "class_voxels": {str(k): v for k, v in fp.class_voxels.items()},
        "n_cases": fp.n_cases,
        "anisotropic": fp.anisotropic,
    }
    return card
