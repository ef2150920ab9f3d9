"""Model folders (``model.json`` + weights): the one place that checks card, weights and sha256.

:func:`open_model_folder` reads the card once, confines its weights to the folder
(:meth:`~napari_medseg.models.card.ModelCard.weights_path`: no absolute path, no ``..``, no
symlink out, regular files only) and hashes the weights once, comparing the sha256 with the
card's. Every reader of model folders starts there: :func:`load_model_folder` (networks named in
the card), :func:`napari_medseg.models.registry.load_model` (which also sends a folder holding
TorchScript weights to :mod:`.torchscript`), :func:`napari_medseg.models.registry.install_model`
and the denoiser loader (:func:`napari_medseg.core.denoise.store.load_denoiser`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_medseg.models.card import CARD_NAME, ModelCard, sha256_file
from napari_medseg.models.networks import (
    LoadedModel,
    ModelLoadError,
    build_network,
    load_state_dict,
)

__all__ = ["CheckedFolder", "load_model_folder", "network_from_folder", "open_model_folder"]


@dataclass
class CheckedFolder:
    """A model folder whose card was read and whose weights were found and hashed.

    Attributes
    ----------
    folder : pathlib.Path
    card : ModelCard
        The parsed, validated ``model.json``.
    weights : pathlib.Path
        The weights file, inside ``folder``.
    sha256 : str
        Hex sha256 of the weights (equal to ``card.sha256`` when the card states one and the
        folder was opened with ``verify=True``).
    """

    folder: Path
    card: ModelCard
    weights: Path
    sha256: str


def open_model_folder(folder: str | Path, verify: bool = True) -> CheckedFolder:
    """Read and check a model folder: card, weights file, sha256.

    Parameters
    ----------
    folder : path-like
        A folder with ``model.json`` and the weights file it names.
    verify : bool
        Compare the weights' sha256 with the card's (when the card states one).

    Returns
    -------
    CheckedFolder

    Raises
    ------
    ModelLoadError
        One sentence: no ``model.json``, an invalid card (naming the field), weights outside the
        folder or missing, or weights whose sha256 differs from the card's.
    """
    folder = Path(folder)
    if not (folder / CARD_NAME).is_file():
        raise ModelLoadError(f"{folder} is not a model folder: model.json is missing")
    try:
        card = ModelCard.load(folder)
        wpath = card.weights_path(folder)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{folder}/model.json is not a valid model card: {e}") from e
    if not wpath.is_file():
        raise ModelLoadError(f"model {card.name!r} has no weights: {wpath.name} is missing")
    digest = sha256_file(wpath)
    if verify and card.sha256 and digest != card.sha256:
        raise ModelLoadError(
            f"weights of model {card.name!r} do not match the sha256 in its card "
            "(the file was changed or is damaged)"
        )
    return CheckedFolder(folder=folder, card=card, weights=wpath, sha256=digest)


def network_from_folder(checked: CheckedFolder, device: Any = "cpu") -> LoadedModel:
    """The network a checked folder's card names (:func:`~..networks.build_network`) with its
    weights, in eval mode on ``device``.

    Raises
    ------
    ModelLoadError
        Unknown architecture, arguments that do not fit it, or weights that do not fit it.
    """
    card = checked.card
    net = build_network(card)
    state = load_state_dict(checked.weights)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(
            f"weights of model {card.name!r} do not fit its architecture: {str(e)[:200]}"
        ) from e
    net.eval().to(device)
    return LoadedModel(
        card=card, network=net, source=str(checked.folder), weights_sha256=checked.sha256
    )


def load_model_folder(folder: str | Path, device: Any = "cpu", verify: bool = True) -> LoadedModel:
    """Load a model folder written by :func:`~napari_medseg.models.networks.save_model` (or by
    hand, same layout): :func:`open_model_folder` then :func:`network_from_folder`.

    Raises
    ------
    ModelLoadError
        Missing card or weights, sha256 mismatch, weights that do not fit the architecture.
    """
    return network_from_folder(open_model_folder(folder, verify=verify), device)
