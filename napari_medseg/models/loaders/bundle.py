"""Load MONAI Model Zoo bundles as :class:`~napari_medseg.models.networks.LoadedModel`, safely.

A MONAI bundle is a folder::

    <bundle>/configs/inference.json (or .yaml)   how MONAI builds and runs the model
    <bundle>/configs/metadata.json               name, version, inputs/outputs, class names
    <bundle>/models/model.pt                     state dict (read with ``weights_only=True``)
    <bundle>/models/model.ts                     or a TorchScript archive
    <bundle>/scripts/                            optional Python code the config may import
    <bundle>/LICENSE

Safety (docs/ARCHITECTURE.md rule 5). Bundle configs may hold ``$`` expressions (Python run through
``eval``) and ``_target_`` entries that name any importable callable. Without ``trust=True`` this
module executes nothing from the bundle: it reads only the config items it needs (``network_def``
and what it references, the arguments of the preprocessing transforms it translates, the
inferer's ``roi_size``/``overlap``), follows ``@`` references and ``"$@a + @b"`` list
concatenations itself, refuses any other ``$`` expression with :class:`BundleTrustError`, and
instantiates only classes under ``monai.networks`` that are ``torch.nn.Module`` subclasses
(arguments such as ``pretrained=True`` or ``pretrained_url`` are switched off in both modes: the
weights come from the bundle and nothing is downloaded).
``$`` expressions elsewhere in the config (``device``, ``datalist``, handlers...) are never looked
at. With ``trust=True`` the items it needs are evaluated by :class:`monai.bundle.ConfigParser` as
MONAI does, with the bundle folder on ``sys.path`` (for its ``scripts/``), ``@bundle_root`` set to
the bundle folder, ``@device`` and hard-coded ``torch.device('cuda')`` set to the requested device,
and ``torch.load`` inside expressions still limited to weights (plus NumPy arrays).

The card (:class:`~napari_medseg.models.card.ModelCard`) is built from the config and metadata:
spacing from ``Spacingd``, orientation from ``Orientationd``, patch size and overlap from the
inferer, normalisation from the intensity transforms (see :func:`load_bundle`), class names from
``metadata.json``. Transforms that are not translated are listed in
``card.extra["bundle_transforms_ignored"]`` so a person can see what is not reproduced.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from napari_medseg.models.card import sha256_file
from napari_medseg.models.loaders.bundle_card import DEEPEDIT_CLICKS, build_card
from napari_medseg.models.loaders.bundle_config import (
    TRUST_HINT,
    BundleTrustError,
    ConfigResolver,
    all_targets,
    first_line,
)
from napari_medseg.models.networks import (
    LoadedModel,
    ModelLoadError,
    load_state_dict,
)

__all__ = [
    "CONFIG_NAMES",
    "TRUST_HINT",
    "BundleTrustError",
    "bundle_takes_clicks",
    "bundle_task",
    "checkpoint_paths",
    "is_bundle",
    "load_bundle",
]

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")


# --------------------------------------------------------------------------------------------
# public helpers
# --------------------------------------------------------------------------------------------


def is_bundle(path: str | Path) -> bool:
    """True if ``path`` is a MONAI bundle folder (``configs/metadata.json`` + inference config).

    Parameters
    ----------
    path : str or Path
        The bundle folder (the one that holds ``configs/``).
    """
    p = Path(path)
    cfg = p / "configs"
    return (
        p.is_dir()
        and (cfg / "metadata.json").is_file()
        and any((cfg / n).is_file() for n in CONFIG_NAMES)
    )


def bundle_takes_clicks(path: str | Path) -> bool:
    """True if the bundle at ``path`` outlines objects from the user's clicks (NuClick:
    ``AddClickSignalsd`` in its preprocessing), read from its config without building or
    evaluating anything; False for anything else (other bundles, model folders, files).
    """
    root = Path(path)
    if not is_bundle(root):
        return False
    cfg = next(root / "configs" / n for n in CONFIG_NAMES if (root / "configs" / n).is_file())
    try:
        from monai.bundle import ConfigParser

        config = ConfigParser.load_config_file(cfg)
    except Exception:  # noqa: BLE001 - an unreadable config is refused when it is loaded
        return False
    if not isinstance(config, dict):
        return False
    return "AddClickSignalsd" in all_targets(config.get("preprocessing"), config)


def bundle_task(path: str | Path) -> str:
    """Classify a bundle from its metadata.

    Returns
    -------
    str
        One of ``"segmentation"``, ``"classification"``, ``"detection"``, ``"generative"``,
        ``"registration"``, ``"landmarks"``, ``"other"``.
    """
    root = _check_root(path)
    return _classify(_read_json(root / "configs" / "metadata.json", root.name))


def load_bundle(
    path: str | Path, device: str = "cpu", trust: bool = False, weights: str | None = None
) -> LoadedModel:
    """Load a MONAI segmentation bundle as a ready-to-run model with a model card.

    Parameters
    ----------
    path : str or Path
        Bundle folder (``configs/``, ``models/``).
    device : str
        Torch device for the network (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).
    trust : bool
        Allow the config's ``$`` expressions and non-MONAI ``_target_`` entries to run (the user's
        explicit consent: ``--trust-bundle`` or the napari confirmation). Without it nothing from
        the bundle is executed.
    weights : str or None
        ``None``: ``models/model.pt`` (state dict), else ``models/model.ts`` (TorchScript).
        A path (absolute or relative to the bundle) to a ``.pt``/``.safetensors``/``.ts`` file.
        ``"random"`` is a TESTING AID: build the network with random weights and load none.

    Returns
    -------
    LoadedModel
        ``kind="bundle"``; ``network`` maps ``(B, in_channels, *patch)`` float to
        ``(B, out_channels, *patch)`` logits, patch axes in the card's ``orientation`` (3D) or
        ``(row, col)`` (2D). The card's normalisation: ``ScaleIntensityRanged`` gives
        ``{"scheme": "ct", "window": [a_min, a_max]}`` (+ ``b_min``/``b_max`` when not 0/1,
        ``clip: false`` when not clipped); ``NormalizeIntensityd`` gives
        ``{"scheme": "zscore", "foreground_only": nonzero, "channel_wise": ...}``;
        ``ScaleIntensityd`` gives ``{"scheme": "percentile", "lower": 0, "upper": 100}`` (plain
        min-max; + ``b_min``/``b_max`` when not 0/1); ``ScaleIntensityRangePercentilesd`` gives
        ``percentile``. With several, the last one is the scheme and ``"steps"`` lists all.

    Raises
    ------
    BundleTrustError
        Untrusted load of a bundle whose needed config items run code.
    ModelLoadError
        Not a bundle, not a segmentation bundle, unsupported, no weights, weights that do not fit.
    """
    root = _check_root(path)
    name = root.name
    cfg_path = next(root / "configs" / n for n in CONFIG_NAMES if (root / "configs" / n).is_file())
    meta = _read_json(root / "configs" / "metadata.json", name)
    try:
        from monai.bundle import ConfigParser

        config = ConfigParser.load_config_file(cfg_path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a broken config for the user
        raise ModelLoadError(f"bundle '{name}': {cfg_path.name} cannot be read ({e})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"bundle '{name}': {cfg_path.name} does not hold a mapping")

    task = _classify(meta)
    if task != "segmentation":
        raise ModelLoadError(
            f"bundle '{name}' is a {task} model; napari-medseg runs segmentation bundles only"
        )
    _check_supported(name, meta, config)

    wfile, wkind = _weights_file(root, weights, checkpoint_paths(config))
    res = ConfigResolver(root, name, config, meta, trust=trust, device=device)

    network = None
    build_error: ModelLoadError | None = None
    if wkind != "torchscript":
        try:
            network = res.build_network()
        except ModelLoadError as e:
            ts = root / "models" / "model.ts"
            if weights is None and ts.is_file():
                build_error, wfile, wkind = e, ts, "torchscript"
            else:
                raise

    card = build_card(res, root, meta, network)
    notes = []
    if build_error is not None:
        card.extra["bundle_network_def_skipped"] = str(build_error)
        note = (
            f"bundle '{name}': its network definition was not used ({build_error}); "
            "running its TorchScript export models/model.ts instead"
        )
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=2)

    import torch

    digest = None
    if wkind == "random":
        card.weights = ""
    elif wkind == "torchscript":
        try:
            network = torch.jit.load(str(wfile), map_location=device)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(
                f"bundle '{name}': {wfile.name} is not a readable TorchScript model ({e})"
            ) from e
        digest = sha256_file(wfile)
    else:
        state = _unwrap_state(load_state_dict(wfile))
        try:
            network.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(
                f"weights {wfile.name} do not fit the network of bundle '{name}': "
                f"{first_line(str(e))}"
            ) from e
        digest = sha256_file(wfile)
    if wkind != "random":
        card.weights = str(wfile.relative_to(root)) if wfile.is_relative_to(root) else str(wfile)
        card.sha256 = digest
    card.extra["bundle_weights_format"] = wkind
    card.architecture["class"] = type(network).__name__
    network.eval().to(device)
    return LoadedModel(
        card=card,
        network=network,
        source=str(root),
        kind="bundle",
        weights_sha256=digest,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# classification and support
# --------------------------------------------------------------------------------------------


def _classify(meta: dict) -> str:
    text = f"{meta.get('name', '')} {meta.get('task', '')}".lower()
    ndf = meta.get("network_data_format") or {}
    inputs = ndf.get("inputs") or {}
    outputs = ndf.get("outputs") or {}
    out = outputs.get("pred") or next(iter(outputs.values()), {}) or {}
    fmt = str(out.get("format", "")).lower()
    typ = str(out.get("type", "")).lower()
    in_types = {str((v or {}).get("type", "")).lower() for v in inputs.values()}
    if "registration" in text:
        return "registration"
    if any(str((o or {}).get("format", "")).lower() == "segmentation" for o in outputs.values()):
        return "segmentation"
    if in_types & {"noise", "tuples", "latent"} or "generat" in text or "synthesis" in text:
        return "generative"
    if fmt in ("classes", "classification"):
        return "classification"
    if typ == "object" or fmt == "dict":
        return "detection"
    if fmt == "points":
        return "landmarks"
    if fmt == "labels":
        img = inputs.get("image") or next(iter(inputs.values()), {}) or {}
        same = list(out.get("spatial_shape") or []) == list(img.get("spatial_shape") or [None])
        return "segmentation" if same else "classification"
    return "other"


def _check_supported(name: str, meta: dict, config: dict) -> None:
    """Refuse segmentation bundles napari-medseg cannot run, with the reason, before any work."""
    outputs = (meta.get("network_data_format") or {}).get("outputs") or {}
    inferer = config.get("inferer")
    target = inferer.get("_target_") if isinstance(inferer, dict) else None
    hovernet = isinstance(target, str) and target.rsplit(".", 1)[-1] == (
        "SlidingWindowHoVerNetInferer"
    )
    if len(outputs) > 1 and not hovernet:
        raise ModelLoadError(
            f"bundle '{name}' is not supported: its network returns {len(outputs)} maps "
            f"({', '.join(outputs)}) that need the bundle's own post-processing"
        )
    if isinstance(target, str) and "." in target and not target.startswith("monai."):
        raise ModelLoadError(
            f"bundle '{name}' is not supported: its inference needs the bundle's own Python "
            f"code ({target})"
        )
    text = json.dumps(config.get("network_def"))
    if "CellSamWrapper" in text:
        raise ModelLoadError(
            f"bundle '{name}' is not supported: its SAM-based network predicts cell flows that "
            "need cellpose-style post-processing (and the segment_anything package)"
        )
    # DeepEdit runs in automatic mode: without clicks its click transforms only add empty
    # guidance channels (reproduced by the card's extra["guidance_channels"])
    targets = all_targets(config.get("preprocessing"), config)
    deepedit = sorted(DEEPEDIT_CLICKS & set(targets))
    guidance = [t for t in targets if ("Guidance" in t or "Click" in t) and t not in deepedit]
    if not guidance and deepedit and "AddGuidanceSignalDeepEditd" not in targets:
        guidance = deepedit  # clicks read but no channels made of them
    if guidance == ["AddClickSignalsd"]:
        # NuClick: one patch per user click, reproduced (core/segment/nuclick.py); the user
        # gives the clicks (card extra["nuclick"])
        guidance = []
    if guidance:
        raise ModelLoadError(
            f"bundle '{name}' is not supported: it is an interactive annotation model whose input "
            f"needs click-guidance channels ({guidance[0]})"
        )


# --------------------------------------------------------------------------------------------
# resolving config items
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# the card
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


_LOAD_PATH = re.compile(r"""^\$?\s*@bundle_root\s*\+\s*['"]/?([\w./-]+)['"]\s*$""")


def checkpoint_paths(config: Any) -> list[str]:
    """Weights files the config's ``CheckpointLoader`` items name, relative to the bundle.

    Read without evaluating anything: a ``load_path`` of the form
    ``"$@bundle_root + '/models/NAME.pt'"`` or a plain relative path (bundles such as the
    pediatric CT one ship ``models/dynunet_FT.pt``, not ``models/model.pt``).
    """
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            target = str(v.get("_target_", ""))
            lp = v.get("load_path")
            if target.endswith("CheckpointLoader") and isinstance(lp, str):
                m = _LOAD_PATH.match(lp.strip())
                if m:
                    found.append(m.group(1))
                elif not lp.startswith(("$", "@", "%", "/")) and ".." not in lp:
                    found.append(lp)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(config)
    return [f for f in found if ".." not in Path(f).parts]


def _weights_file(
    root: Path, weights: str | None, named: list[str] | None = None
) -> tuple[Path, str]:
    """The weights file and its kind: ``"state_dict"``, ``"torchscript"`` or ``"random"``.

    Without ``weights``: ``models/model.pt``, ``models/model.ts``, then the files the config's
    checkpoint loaders name (``named``).
    """
    if weights == "random":
        return root, "random"
    if weights is not None:
        p = Path(weights)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise ModelLoadError(f"bundle '{root.name}': weights file {p} does not exist")
        return p, ("torchscript" if p.suffix == ".ts" else "state_dict")
    pt, ts = root / "models" / "model.pt", root / "models" / "model.ts"
    if pt.is_file():
        return pt, "state_dict"
    if ts.is_file():
        return ts, "torchscript"
    for rel in named or []:
        p = root / rel
        if p.is_file() and p.suffix in (".pt", ".pth", ".ts"):
            return p, ("torchscript" if p.suffix == ".ts" else "state_dict")
    raise ModelLoadError(
        f"bundle {root.name} has no weights: put model.pt or model.ts in {root / 'models'}"
    )


def _unwrap_state(state: dict) -> dict:
    """``{"model": state}`` / ``{"state_dict": ...}`` wrappers off, ``module.`` prefixes off."""
    import torch

    for key in ("model", "network", "state_dict", "net"):
        inner = state.get(key)
        if isinstance(inner, dict) and inner and not isinstance(inner, torch.Tensor):
            state = inner
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _check_root(path: str | Path) -> Path:
    root = Path(path)
    if root.name == "configs" and is_bundle(root.parent):
        root = root.parent
    if not is_bundle(root):
        raise ModelLoadError(
            f"{root} is not a MONAI bundle: it needs configs/metadata.json and "
            "configs/inference.json (or .yaml)"
        )
    return root.resolve()


def _read_json(path: Path, name: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"bundle '{name}': {path.name} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ModelLoadError(f"bundle '{name}': {path.name} does not hold a mapping")
    return d
