"""Where models live and how a name or path becomes a runnable model.

Two folders hold models, one sub-folder per model (the folder name is the model's name):

* built-in models: ``napari_medseg/models/builtin/<name>/`` (shipped with the package);
* user models: ``platformdirs.user_data_dir("napari-medseg")/models/<name>/``, or
  ``$MEDSEG_MODELS_DIR/<name>/`` when that environment variable is set.

A model folder holds ``model.json`` plus weights (see :mod:`napari_medseg.models.card`); a MONAI
bundle folder (``configs/metadata.json`` and ``configs/inference.json`` or ``.yaml``,
:func:`~napari_medseg.models.loaders.bundle.is_bundle`) and an nnU-Net v2 trained-model folder
(:mod:`napari_medseg.models.loaders.nnunet`) are also accepted. Built-in names win
over user names (:func:`install_model` refuses to shadow one).

:func:`load_model` accepts a registry name, a model folder, a MONAI bundle folder, or a
TorchScript file (``torch.jit.save`` output, ``.ts``/``.pt``/``.pth``) with its card next to it
(``<stem>.json``, else ``model.json`` in the same folder). TorchScript loading runs no Python
pickles; state-dict ``.pt`` files belong in a model folder and are read with
``weights_only=True``. Each kind has its loader in :mod:`napari_medseg.models.loaders`
(``folder``, ``torchscript``, ``bundle``, ``nnunet``); :func:`load_model` only chooses one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from napari_medseg.models.card import CARD_NAME, ModelCard
from napari_medseg.models.loaders.bundle import is_bundle
from napari_medseg.models.loaders.folder import network_from_folder, open_model_folder
from napari_medseg.models.loaders.torchscript import (
    TORCHSCRIPT_SUFFIXES,
    card_for_file,
    load_torchscript,
)
from napari_medseg.models.networks import LoadedModel, ModelLoadError

__all__ = [
    "BUILTIN_DIR",
    "TORCHSCRIPT_SUFFIXES",
    "builtin_models_dir",
    "install_model",
    "is_bundle",
    "is_model_folder",
    "list_models",
    "load_model",
    "resolve_model",
    "user_models_dir",
]

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def builtin_models_dir() -> Path:
    """Folder of the models shipped with the package."""
    return BUILTIN_DIR


def user_models_dir(create: bool = False) -> Path:
    """Folder of installed models: ``$MEDSEG_MODELS_DIR`` or the platform's user data dir."""
    env = os.environ.get("MEDSEG_MODELS_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir("napari-medseg")) / "models"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def is_model_folder(folder: Path) -> bool:
    """True for a model folder (``model.json``), a MONAI bundle or an nnU-Net v2 folder."""
    from napari_medseg.models.loaders.nnunet import is_nnunet_folder

    return folder.is_dir() and (
        (folder / CARD_NAME).is_file() or is_bundle(folder) or is_nnunet_folder(folder)
    )


def _entry(folder: Path, builtin: bool) -> dict:
    """The listing of one model folder: its card as a dict plus where it comes from."""
    from napari_medseg.models.loaders.nnunet import is_nnunet_folder, nnunet_entry

    if is_nnunet_folder(folder) and not (folder / CARD_NAME).is_file():
        d = nnunet_entry(folder)
    elif (folder / CARD_NAME).is_file():
        try:
            d = ModelCard.load(folder).to_dict()
        except (ValueError, TypeError, OSError) as e:
            d = {"name": folder.name, "error": f"invalid model.json: {e}"}
        d["kind"] = "folder"
    else:
        d = {"name": folder.name, "task": "unknown", "kind": "bundle"}
        meta = folder / "configs" / "metadata.json"
        if meta.is_file():
            try:
                m = json.loads(meta.read_text())
                d["version"] = str(m.get("version", ""))
                d["description"] = str(m.get("description", ""))
                d["license"] = str(m.get("copyright", m.get("license", "")))
            except (ValueError, OSError):
                pass
    d["registry_name"] = folder.name
    d["source"] = str(folder)
    d["builtin"] = builtin
    return d


def _scan(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_model_folder(p))


def list_models() -> list[dict]:
    """Built-in then installed models.

    Returns
    -------
    list of dict
        Each is the model card as a dict (``ModelCard.to_dict()``; for MONAI bundles a few
        fields from ``configs/metadata.json``) plus ``"registry_name"`` (folder name, what
        :func:`load_model` accepts), ``"source"`` (folder path), ``"builtin"`` (bool) and
        ``"kind"`` (``"folder"`` or ``"bundle"``). A user model with a built-in's name is
        not listed (the built-in wins).
    """
    out = [_entry(p, True) for p in _scan(builtin_models_dir())]
    seen = {d["registry_name"] for d in out}
    out += [_entry(p, False) for p in _scan(user_models_dir()) if p.name not in seen]
    return out


def _available_names() -> str:
    names = [d["registry_name"] for d in list_models()]
    return ", ".join(names) if names else "none installed"


def resolve_model(name_or_path: str | Path) -> Path:
    """Find a model: an existing path (folder or file) or a registry name.

    Returns
    -------
    pathlib.Path
        A model folder, a MONAI bundle folder or a TorchScript file.

    Raises
    ------
    ModelLoadError
        Nothing of that name or path exists (the message lists the available names).
    """
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    name = str(name_or_path)
    if "/" not in name and "\\" not in name:
        for root in (builtin_models_dir(), user_models_dir()):
            cand = root / name
            if is_model_folder(cand):
                return cand
    raise ModelLoadError(
        f"no model named or found at {name!r}; available models: {_available_names()}"
    )


def load_model(
    name_or_path: str | Path,
    device: Any = "cpu",
    trust_bundle: bool = False,
    folds: list[int | str] | None = None,
) -> LoadedModel:
    """Load a model by registry name or path, ready to run on ``device``.

    Parameters
    ----------
    name_or_path : str or Path
        Registry name, model folder, MONAI bundle folder, or TorchScript file with a card.
    device : str or torch.device
        Where the network is put (``"cpu"``, ``"cuda"``, ...).
    trust_bundle : bool
        Allow a MONAI bundle config to run its ``$`` expressions (passed to
        :func:`napari_medseg.models.loaders.bundle.load_bundle`).
    folds : list of int or str, optional
        nnU-Net v2 model folders only: the folds to ensemble (default: all present).

    Raises
    ------
    ModelLoadError
        Unknown name, missing card, sha256 mismatch, corrupt or unfitting weights.
    """
    device = str(device)
    path = resolve_model(name_or_path)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return load_model(path.parent, device=device, trust_bundle=trust_bundle)
        if path.suffix.lower() not in TORCHSCRIPT_SUFFIXES:
            raise ModelLoadError(
                f"{path.name} is not a model: give a model folder, a MONAI bundle folder or "
                "a TorchScript file (.ts, .pt)"
            )
        card, card_path = card_for_file(path)
        return load_torchscript(path, card, card_path, device)
    if (path / CARD_NAME).is_file():
        checked = open_model_folder(path)  # the card read and the weights hashed, once
        card = checked.card
        if checked.weights.suffix.lower() == ".ts" or card.extra.get("format") == "torchscript":
            return load_torchscript(
                checked.weights, card, path / CARD_NAME, device, sha256=checked.sha256
            )
        return network_from_folder(checked, device)
    if is_bundle(path):
        from napari_medseg.models.loaders.bundle import (
            load_bundle,  # written separately; ImportError propagates
        )

        return load_bundle(path, device=device, trust=trust_bundle)
    from napari_medseg.models.loaders.nnunet import find_nnunet_folder, load_nnunet

    nnunet = find_nnunet_folder(path)
    if nnunet is not None:
        return load_nnunet(nnunet, device=device, folds=folds)
    raise ModelLoadError(
        f"{path} is not a model folder: it has neither model.json nor configs/inference.json"
    )


def install_model(src_folder: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Copy a model folder (or MONAI bundle) into the user models folder.

    The copy is checked first (card readable, weights sha256 as stated) and written to a
    temporary folder that is renamed into place, so a failed install leaves nothing behind.

    Parameters
    ----------
    src_folder : str or Path
        A model folder with ``model.json`` or a MONAI bundle folder.
    name : str, optional
        Registry name (default: the card's ``name``, or the bundle folder's name). The copied
        card's ``name`` is set to it.
    overwrite : bool
        Replace an installed model of the same name.

    Returns
    -------
    pathlib.Path
        The installed folder.
    """
    src = Path(src_folder).expanduser()
    if not is_model_folder(src):
        raise ModelLoadError(f"{src} is not a model folder (no model.json or configs/)")
    card = None
    if (src / CARD_NAME).is_file():
        card = open_model_folder(src).card  # card readable, weights present, sha256 as stated
    name = name or (card.name if card is not None else src.name)
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        raise ModelLoadError(f"{name!r} is not a valid model name")
    if (builtin_models_dir() / name).exists():
        raise ModelLoadError(f"{name!r} is the name of a built-in model; choose another name")
    root = user_models_dir(create=True)
    dest = root / name
    if dest.exists() and not overwrite:
        raise ModelLoadError(f"a model named {name!r} is already installed at {dest}")
    from napari_medseg._files import atomic_dir

    with atomic_dir(dest, overwrite=overwrite) as staged:  # unique names: parallel installs
        shutil.copytree(src, staged, dirs_exist_ok=True)
        if card is not None and card.name != name:
            card.name = name
            card.save(staged)
    return dest
