"""Load nnU-Net v2 trained-model folders (and TotalSegmentator's task folders) as models.

An nnU-Net v2 model folder is what ``nnUNetv2_train`` writes under
``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG/``::

    dataset.json                       channel names, labels (or regions), file ending, licence
    plans.json                         per configuration: spacing, patch size, normalisation,
                                       resampling, the network (class name + arguments)
    fold_0/checkpoint_final.pth        {"network_weights": state dict, "init_args": {...,
    fold_1/checkpoint_final.pth         "configuration": "3d_fullres"}, "trainer_name": ...,
    ...                                 "inference_allowed_mirroring_axes": (0, 1, 2)}

TotalSegmentator's downloaded tasks have the same layout. Everything needed to run the model
comes from the folder (:class:`NnunetPlan`); nnunetv2 itself is not needed: the network is
built with ``dynamic-network-architectures`` from ``architecture.network_class_name`` and
``arch_kwargs``. Only classes under ``dynamic_network_architectures`` that are
``torch.nn.Module`` subclasses can be named, and the ``_kw_requires_import`` arguments must be
classes under ``torch.nn`` (a plans file is data and never names arbitrary code).

Checkpoints are untrusted pickles: they are read with ``torch.load(weights_only=True)``
(nnU-Net checkpoints hold plain types, tensors and NumPy scalars, which are allowed). When torch
refuses a file, it holds other Python objects: load it once in a Python session you trust and
save ``{"network_weights": ckpt["network_weights"], "init_args": {"configuration": ...},
"inference_allowed_mirroring_axes": ckpt["inference_allowed_mirroring_axes"]}`` with
``torch.save`` in its place.

Inference (:mod:`napari_medseg.core.segment.nnunet`) reproduces ``nnUNetPredictor``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_medseg.models.card import PALETTE, ModelCard, sha256_file
from napari_medseg.models.networks import LoadedModel, ModelLoadError

__all__ = [
    "CHECKPOINT_NAMES",
    "NORMALIZATION_SCHEMES",
    "NnunetEnsemble",
    "NnunetPlan",
    "find_nnunet_folder",
    "is_nnunet_folder",
    "load_nnunet",
    "nnunet_entry",
]

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
#: Normalisations nnU-Net ships (``preprocessing/normalization``) that the engine reproduces.
NORMALIZATION_SCHEMES = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)
#: nnU-Net's ANISO_THRESHOLD (``nnunetv2/configuration.py``): spacing ratio above which an axis
#: is resampled separately (nearest neighbour along it).
ANISO_THRESHOLD = 3.0
_MODALITIES = {
    "CT": "CT",
    "CTA": "CT",
    "PET": "PT",
    "PT": "PT",
    "US": "US",
    "RGB": "microscopy",
}
_MR_WORDS = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "SWI", "BOLD", "T2*", "DIXON")


@dataclass
class NnunetPlan:
    """What inference needs from an nnU-Net folder; axes in nnU-Net's order after
    ``transpose_forward`` (nnU-Net reads images as SimpleITK does: ``(z, y, x)`` of the file's
    ``(i, j, k)`` voxel axes), spacings in mm.

    Attributes
    ----------
    configuration : str
        ``"2d"``, ``"3d_fullres"``, ``"3d_lowres"`` (or a custom name).
    spacing : list of float
        Target spacing (2 entries for 2D configurations: the in-plane axes; the first axis keeps
        its spacing).
    patch_size : list of int
        Window size (2 or 3 entries).
    transpose_forward, transpose_backward : list of int
        Axis permutation applied after reading (and its inverse).
    normalization_schemes : list of str
        One per input channel (:data:`NORMALIZATION_SCHEMES`).
    use_mask_for_norm : list of bool
        Z-score statistics (and normalisation) only inside the nonzero mask.
    intensity_properties : dict
        ``{"0": {"mean", "std", "percentile_00_5", "percentile_99_5", ...}}`` (CT).
    resampling_data, resampling_probabilities : dict
        ``{"order", "order_z", "force_separate_z"}`` of ``resample_data_or_seg_to_shape``.
    labels : dict
        ``dataset.json`` labels: ``{name: int or list of int (regions)}``.
    regions_class_order : list of int or None
        Region-based models: the label painted for each output channel, in order.
    num_heads : int
        Output channels of the network.
    mirror_axes : list of int or None
        The trainer's ``inference_allowed_mirroring_axes`` (spatial axes, nnU-Net order).
    folds : list of str
        Folds loaded (``"0"``, ``"1"``, ..., ``"all"``).
    image_reader_writer : str
        ``plans["image_reader_writer"]`` (SimpleITKIO, NibabelIO, NibabelIOWithReorient, ...).
    """

    configuration: str
    spacing: list[float]
    patch_size: list[int]
    transpose_forward: list[int]
    transpose_backward: list[int]
    normalization_schemes: list[str]
    use_mask_for_norm: list[bool]
    intensity_properties: dict
    resampling_data: dict
    resampling_probabilities: dict
    labels: dict
    regions_class_order: list[int] | None
    num_heads: int
    mirror_axes: list[int] | None
    folds: list[str] = field(default_factory=list)
    image_reader_writer: str = "SimpleITKIO"
    channel_names: dict = field(default_factory=dict)
    trainer: str = ""
    checkpoint: str = "checkpoint_final.pth"

    @property
    def dims(self) -> int:
        """2 for 2D configurations (run slice by slice along the first axis), else 3."""
        return len(self.patch_size)

    def to_dict(self) -> dict:
        """JSON-able copy (kept in the card's ``extra["nnunet"]``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NnunetPlan:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


class NnunetEnsemble:
    """The network of an nnU-Net folder and the weights of each fold, as ``nnUNetPredictor``
    holds them: one module, its state dict swapped in per fold.

    Parameters
    ----------
    network : torch.nn.Module
        Built from the plans (deep supervision off), in eval mode.
    fold_states : list of dict
        One state dict per fold, in the order of ``plan.folds``.
    """

    def __init__(self, network: Any, fold_states: list[dict]):
        self.network = network
        self.fold_states = fold_states

    def use_fold(self, i: int) -> Any:
        """Load fold ``i``'s weights into the network and return the network."""
        self.network.load_state_dict(self.fold_states[i])
        return self.network

    def to(self, device: Any) -> NnunetEnsemble:
        """Move the network (the fold states stay on the CPU until loaded)."""
        self.network.to(device)
        return self

    def eval(self) -> NnunetEnsemble:
        self.network.eval()
        return self

    def __call__(self, x: Any) -> Any:
        return self.network(x)


def _checkpoints(folder: Path) -> dict[str, dict[str, Path]]:
    """``{fold: {checkpoint name: path}}`` for the ``fold_*`` sub-folders."""
    out: dict[str, dict[str, Path]] = {}
    if not folder.is_dir():
        return out
    for sub in sorted(folder.glob("fold_*")):
        found = {n: sub / n for n in CHECKPOINT_NAMES if (sub / n).is_file()}
        if found:
            out[sub.name[len("fold_") :]] = found
    return out


def is_nnunet_folder(folder: str | Path) -> bool:
    """True for an nnU-Net v2 trained-model folder: ``dataset.json``, ``plans.json`` and at
    least one ``fold_*/checkpoint_final.pth`` (or ``checkpoint_best.pth``)."""
    folder = Path(folder)
    return (
        folder.is_dir()
        and (folder / "dataset.json").is_file()
        and (folder / "plans.json").is_file()
        and bool(_checkpoints(folder))
    )


def find_nnunet_folder(path: str | Path) -> Path | None:
    """The nnU-Net model folder at ``path``, or inside it when ``path`` is a ``DatasetXXX``
    folder holding exactly one ``TRAINER__PLANS__CONFIG`` folder (TotalSegmentator's archives
    unpack that way); ``None`` otherwise."""
    path = Path(path)
    if is_nnunet_folder(path):
        return path
    if path.is_dir():
        subs = [p for p in sorted(path.iterdir()) if is_nnunet_folder(p)]
        if len(subs) == 1:
            return subs[0]
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not readable JSON: {e}") from e


def _config_name(folder: Path, plans: dict) -> str | None:
    """The configuration from the folder name ``TRAINER__PLANS__CONFIG`` (None if unclear)."""
    parts = folder.name.split("__")
    if len(parts) == 3 and parts[2] in plans.get("configurations", {}):
        return parts[2]
    return None


def _configuration(plans: dict, name: str) -> dict:
    """A configuration of the plans with ``inherits_from`` resolved (as PlansManager does)."""
    configs = plans.get("configurations", {})
    if name not in configs:
        raise ModelLoadError(
            f"plans.json has no configuration {name!r} (it has {', '.join(configs) or 'none'})"
        )
    cfg = dict(configs[name])
    seen = {name}
    while "inherits_from" in cfg:
        parent = cfg.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ModelLoadError(f"plans.json: configuration {name!r} inherits from {parent!r}")
        seen.add(parent)
        base = dict(configs[parent])
        base.update(cfg)
        cfg = base
    return cfg


def _label_info(dataset: dict) -> tuple[dict, list[int] | None, int, bool]:
    """(labels without 'ignore', regions_class_order, number of output channels, has_regions)."""
    labels = dict(dataset.get("labels", {}))
    if not labels:
        raise ModelLoadError("dataset.json has no 'labels'")
    labels.pop("ignore", None)
    has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
    if has_regions:
        order = dataset.get("regions_class_order")
        if not order:
            raise ModelLoadError("dataset.json defines regions but no 'regions_class_order'")
        n_heads = sum(1 for k in labels if k != "background")
        return labels, [int(v) for v in order], n_heads, True
    return labels, None, len(labels), False


def _import(dotted: str, prefix: str) -> Any:
    """Import ``a.b.C`` only when it lies under ``prefix`` (never arbitrary code)."""
    if not dotted.startswith(prefix):
        raise ModelLoadError(f"plans.json names {dotted!r}, which is not under {prefix!r}")
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"plans.json names {dotted!r}, which cannot be found: {e}") from e


def build_nnunet_network(architecture: dict, in_channels: int, num_heads: int) -> Any:
    """The network of a plans ``architecture`` block, built as nnU-Net builds it for inference
    (``dynamic-network-architectures``, deep supervision off, random weights)."""
    import torch

    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(
            "nnU-Net models need the package dynamic-network-architectures "
            "(pip install --no-deps dynamic-network-architectures)"
        ) from e
    name = str(architecture.get("network_class_name", ""))
    cls = _import(name, "dynamic_network_architectures.")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelLoadError(f"plans.json: {name!r} is not a network class")
    kwargs = dict(architecture.get("arch_kwargs", {}))
    for key in architecture.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            obj = _import(str(kwargs[key]), "torch.nn.")
            if not isinstance(obj, type):
                raise ModelLoadError(f"plans.json: {kwargs[key]!r} is not a class")
            kwargs[key] = obj
    kwargs["deep_supervision"] = False
    try:
        return cls(input_channels=in_channels, num_classes=num_heads, **kwargs)
    except TypeError as e:
        raise ModelLoadError(f"plans.json: the network arguments do not fit {name}: {e}") from e


def _safe_globals() -> list:
    """NumPy scalars and dtypes (trainer logs hold ``np.float32`` values): data, not code."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    out: list = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_):
        out.append(type(np.dtype(t)))
    return out


def read_checkpoint(path: Path) -> dict:
    """``torch.load(path, weights_only=True)`` with NumPy scalars allowed; a clear error when
    torch refuses the file (see the module docstring for what to do then)."""
    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal or corruption means: not loadable
        raise ModelLoadError(
            f"{path} could not be read as weights only (torch.load weights_only=True: "
            f"{str(e).splitlines()[0][:160]}); if you trust the file, re-save its "
            "network_weights, init_args and inference_allowed_mirroring_axes as plain "
            "tensors and types (see napari_medseg.models.loaders.nnunet)"
        ) from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise ModelLoadError(f"{path} is not an nnU-Net checkpoint (no network_weights)")
    return ckpt


def _checkpoint_config(folder: Path) -> str | None:
    """The configuration a checkpoint was trained with, read without loading its tensors
    (``mmap=True``): for folders not named ``TRAINER__PLANS__CONFIG``."""
    import torch

    for names in _checkpoints(folder).values():
        path = next(iter(names.values()))
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            return str((ckpt.get("init_args") or {}).get("configuration") or "") or None
        except Exception:  # noqa: BLE001 - a listing shows what it can; loading reports errors
            return None
    return None


def _modality(channel_names: dict) -> str:
    names = [str(v).upper() for v in channel_names.values()]
    if names and all(n in _MODALITIES for n in names):
        return _MODALITIES[names[0]]
    if any(n == "CT" for n in names):
        return "CT"
    if any(any(w in n for w in _MR_WORDS) for n in names) or any(
        n in ("NOISE", "ZSCORE") for n in names
    ):
        return "MR"
    return "unknown"


def _license(folder: Path, dataset: dict) -> str:
    for key in ("licence", "license"):
        if dataset.get(key):
            return str(dataset[key])
    for parent in (folder, folder.parent):
        for name in ("LICENSE", "LICENSE.txt", "LICENCE", "license.txt"):
            if (parent / name).is_file():
                first = (parent / name).read_text(errors="replace").strip().splitlines()
                return first[0][:80] if first else name
    return "not stated in the model folder"


def _plan(
    folder: Path, plans: dict, dataset: dict, config: str, ckpt: dict, folds: list[str], ck: str
) -> NnunetPlan:
    cfg = _configuration(plans, config)
    labels, regions_order, n_heads, _ = _label_info(dataset)
    channels = dict(dataset.get("channel_names", dataset.get("modality", {})))
    schemes = [str(s) for s in cfg.get("normalization_schemes", [])]
    bad = [s for s in schemes if s not in NORMALIZATION_SCHEMES]
    if bad:
        raise ModelLoadError(
            f"nnU-Net model {folder.name}: normalisation {', '.join(bad)} is not one nnU-Net "
            f"ships ({', '.join(NORMALIZATION_SCHEMES)}); it cannot be reproduced"
        )
    if len(schemes) != len(channels):
        raise ModelLoadError(
            f"nnU-Net model {folder.name}: {len(schemes)} normalisation schemes for "
            f"{len(channels)} channels in dataset.json"
        )
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        fn = cfg.get(key, "resample_data_or_seg_to_shape")
        if fn != "resample_data_or_seg_to_shape":
            raise ModelLoadError(
                f"nnU-Net model {folder.name}: resampling function {fn!r} is not nnU-Net's "
                "default (resample_data_or_seg_to_shape) and cannot be reproduced"
            )
    if cfg.get("previous_stage") or cfg.get("previous_stage_name"):
        raise ModelLoadError(
            f"nnU-Net model {folder.name}: configuration {config!r} is a cascade stage (it needs "
            "the low-resolution stage's output); run the 3d_lowres or 3d_fullres folder instead"
        )

    def rs(kw: dict) -> dict:
        return {
            "order": int(kw.get("order", 3)),
            "order_z": int(kw.get("order_z", 0)),
            "force_separate_z": kw.get("force_separate_z"),
        }

    axes = ckpt.get("inference_allowed_mirroring_axes")
    tf = [int(v) for v in plans.get("transpose_forward", [0, 1, 2])]
    tb = [int(v) for v in plans.get("transpose_backward", [0, 1, 2])]
    return NnunetPlan(
        configuration=config,
        spacing=[float(v) for v in cfg["spacing"]],
        patch_size=[int(v) for v in cfg["patch_size"]],
        transpose_forward=tf,
        transpose_backward=tb,
        normalization_schemes=schemes,
        use_mask_for_norm=[bool(v) for v in cfg.get("use_mask_for_norm", [False] * len(schemes))],
        intensity_properties=dict(plans.get("foreground_intensity_properties_per_channel", {})),
        resampling_data=rs(cfg.get("resampling_fn_data_kwargs", {})),
        resampling_probabilities=rs(
            cfg.get("resampling_fn_probabilities_kwargs", {"order": 1, "order_z": 0})
        ),
        labels={
            k: (list(v) if isinstance(v, (list, tuple)) else int(v)) for k, v in labels.items()
        },
        regions_class_order=regions_order,
        num_heads=n_heads,
        mirror_axes=None if axes is None else [int(a) for a in axes],
        folds=folds,
        image_reader_writer=str(plans.get("image_reader_writer", "SimpleITKIO")),
        channel_names={str(k): str(v) for k, v in channels.items()},
        trainer=str(ckpt.get("trainer_name", folder.name.split("__")[0])),
        checkpoint=ck,
    )


def _classes(plan: NnunetPlan) -> list[dict]:
    if plan.regions_class_order is not None:
        names = [k for k in plan.labels if k != "background"]
        ids = plan.regions_class_order
        classes = [{"id": 0, "name": "background"}]
        classes += [{"id": int(i), "name": n} for i, n in zip(ids, names)]
    else:
        classes = [{"id": int(v), "name": k} for k, v in plan.labels.items()]
        classes.sort(key=lambda c: c["id"])
    for c in classes:
        c["color"] = PALETTE[int(c["id"]) % len(PALETTE)] if c["id"] else "#000000"
    return classes


def nnunet_entry(folder: str | Path) -> dict:
    """The listing of an nnU-Net folder in the models folder (``napari-medseg models``, the
    Segment dock): its derived card as a dict, read from the JSON files (checkpoints are not
    opened). ``name`` is the folder's name, the name :func:`load_model` accepts; the card's
    own name (dataset and configuration) is kept as ``title``."""
    folder = Path(folder)
    try:
        card = _card(folder, None, None)
        d = card.to_dict()
        d["title"] = card.name
    except ModelLoadError as e:
        d = {"error": str(e)}
    d["name"] = folder.name
    d["kind"] = "nnunet"
    return d


def _card(folder: Path, plan: NnunetPlan | None, weights: str | None) -> ModelCard:
    dataset = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    if plan is None:  # listing only: the folder name, else the first checkpoint (memory-mapped)
        config = _config_name(folder, plans) or _checkpoint_config(folder) or ""
        cfg = _configuration(plans, config)
        labels, order, n_heads, _ = _label_info(dataset)
        plan = NnunetPlan(
            configuration=config,
            spacing=[float(v) for v in cfg.get("spacing", [])],
            patch_size=[int(v) for v in cfg.get("patch_size", [])],
            transpose_forward=list(plans.get("transpose_forward", [0, 1, 2])),
            transpose_backward=list(plans.get("transpose_backward", [0, 1, 2])),
            normalization_schemes=list(cfg.get("normalization_schemes", [])),
            use_mask_for_norm=list(cfg.get("use_mask_for_norm", [])),
            intensity_properties={},
            resampling_data={},
            resampling_probabilities={},
            labels=labels,
            regions_class_order=order,
            num_heads=n_heads,
            mirror_axes=None,
            folds=sorted(_checkpoints(folder)),
            channel_names={
                str(k): str(v)
                for k, v in dict(dataset.get("channel_names", dataset.get("modality", {}))).items()
            },
            trainer=folder.name.split("__")[0],
        )
    dname = str(plans.get("dataset_name", folder.parent.name or folder.name))
    # file-axis (x, y, z) spacing: nnU-Net's order is (z, y, x) after transpose_forward
    spacing = None
    if plan.dims == 3 and len(plan.spacing) == 3:
        nn_order = [0.0] * 3
        for i, t in enumerate(plan.transpose_forward):
            nn_order[t] = plan.spacing[i]
        spacing = nn_order[::-1]
    chans = ", ".join(plan.channel_names.values()) or "?"
    desc = (
        f"nnU-Net v2 {plan.configuration} model of {dname} ({plan.trainer}, folds "
        f"{', '.join(plan.folds) or 'none'}; input channels: {chans})"
    )
    if dataset.get("description"):
        desc += f". {dataset['description']}"
    return ModelCard(
        name=f"{dname} {plan.configuration}",
        task="segmentation",
        dims=plan.dims,
        modality=_modality(plan.channel_names),
        in_channels=max(1, len(plan.channel_names)),
        classes=_classes(plan),
        spacing=spacing,
        orientation="nnU-Net (z, y, x)",
        patch_size=list(plan.patch_size),
        normalization={"scheme": "nnunet", "schemes": list(plan.normalization_schemes)},
        architecture={"name": "nnunet"},
        weights=weights or "",
        version=str(plans.get("plans_name", "nnUNetPlans")),
        description=desc,
        license=_license(folder, dataset),
        overlap=0.5,
        extra={"format": "nnunet", "nnunet": plan.to_dict()},
    )


def load_nnunet(
    path: str | Path,
    device: Any = "cpu",
    folds: list[int | str] | None = None,
    checkpoint: str | None = None,
) -> LoadedModel:
    """Load an nnU-Net v2 model folder.

    Parameters
    ----------
    path : str or Path
        The ``TRAINER__PLANS__CONFIG`` folder (or a ``DatasetXXX`` folder holding one).
    device : str or torch.device
        Where the network is put.
    folds : list of int or str, optional
        Folds to ensemble (default: every ``fold_*`` with a checkpoint, as nnU-Net does).
    checkpoint : str, optional
        ``checkpoint_final.pth`` (default when present) or ``checkpoint_best.pth``.

    Returns
    -------
    LoadedModel
        ``kind="nnunet"``; ``network`` is an :class:`NnunetEnsemble`; the card's
        ``extra["nnunet"]`` is the :class:`NnunetPlan` as a dict.

    Raises
    ------
    ModelLoadError
        Not an nnU-Net folder, a missing fold, a checkpoint torch refuses to read as weights,
        a plans file naming something outside dynamic-network-architectures/torch.nn, weights
        that do not fit the network.
    """
    found = find_nnunet_folder(path)
    if found is None:
        raise ModelLoadError(
            f"{path} is not an nnU-Net v2 model folder (dataset.json, plans.json and "
            "fold_*/checkpoint_final.pth)"
        )
    folder = found
    available = _checkpoints(folder)
    wanted = [str(f) for f in folds] if folds else sorted(available)
    missing = [f for f in wanted if f not in available]
    if missing:
        raise ModelLoadError(
            f"nnU-Net model {folder.name} has no fold {', '.join(missing)} (it has "
            f"{', '.join(sorted(available))})"
        )
    dataset = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    states, digests = [], {}
    first: dict | None = None
    ck_used = checkpoint
    for f in wanted:
        names = [checkpoint] if checkpoint else list(CHECKPOINT_NAMES)
        cpath = next((available[f][n] for n in names if n in available[f]), None)
        if cpath is None:
            raise ModelLoadError(f"nnU-Net model {folder.name}: fold_{f} has no {checkpoint}")
        ck_used = ck_used or cpath.name
        ckpt = read_checkpoint(cpath)
        if first is None:
            first = ckpt
        states.append(ckpt["network_weights"])
        digests[f] = sha256_file(cpath)
    assert first is not None
    config = str((first.get("init_args") or {}).get("configuration") or "") or _config_name(
        folder, plans
    )
    if not config:
        raise ModelLoadError(f"nnU-Net model {folder.name}: cannot tell its configuration")
    plan = _plan(folder, plans, dataset, config, first, wanted, ck_used or CHECKPOINT_NAMES[0])
    cfg = _configuration(plans, config)
    arch = cfg.get("architecture")
    if not arch:
        raise ModelLoadError(
            f"nnU-Net model {folder.name}: plans.json has no 'architecture' (plans of "
            "nnU-Net < 2.4); re-plan it with a current nnunetv2"
        )
    net = build_nnunet_network(arch, max(1, len(plan.channel_names)), plan.num_heads)
    for f, state in zip(wanted, states):
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(
                f"nnU-Net model {folder.name}: fold_{f} weights do not fit the network of "
                f"plans.json: {str(e)[:200]}"
            ) from e
    net.eval().to(str(device))
    ensemble = NnunetEnsemble(net, states)
    ensemble.use_fold(0)
    rel = f"fold_{wanted[0]}/{plan.checkpoint}"
    card = _card(folder, plan, rel)
    card.extra["fold_sha256"] = digests
    combined = (
        digests[wanted[0]]
        if len(wanted) == 1
        else hashlib.sha256("".join(digests[f] for f in wanted).encode()).hexdigest()
    )
    return LoadedModel(
        card=card, network=ensemble, source=str(folder), kind="nnunet", weights_sha256=combined
    )
