"""TorchScript models: a ``torch.jit.save`` file with a card beside it, or in a model folder.

A lone file (``.ts``, ``.pt``, ``.pth``, ``.zip``) takes its card from ``<stem>.json`` beside it,
else ``model.json`` in the same folder (:func:`card_for_file`). Loading runs no Python pickle
(``torch.jit.load``); a state-dict ``.pt`` belongs in a model folder (:mod:`.folder`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from napari_medseg.models.card import CARD_NAME, ModelCard, sha256_file
from napari_medseg.models.networks import LoadedModel, ModelLoadError

__all__ = ["TORCHSCRIPT_SUFFIXES", "card_for_file", "load_torchscript"]

#: File endings taken as TorchScript when given on their own.
TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".pth", ".zip")


def card_for_file(path: Path) -> tuple[ModelCard, Path]:
    """The card of a lone weights file: ``<stem>.json`` beside it, else ``model.json``.

    Returns
    -------
    card : ModelCard
    card_path : pathlib.Path
        The JSON file it came from.

    Raises
    ------
    ModelLoadError
        No card beside the file, or an invalid one.
    """
    for cand in (path.with_suffix(".json"), path.parent / CARD_NAME):
        if cand.is_file():
            try:
                return ModelCard.from_dict(json.loads(cand.read_text())), cand
            except (ValueError, TypeError) as e:
                raise ModelLoadError(f"{cand} is not a valid model card: {e}") from e
    raise ModelLoadError(
        f"{path.name} has no model card: put a {path.stem}.json or model.json (classes, "
        "dimensions, spacing, normalisation) next to it"
    )


def load_torchscript(
    path: Path,
    card: ModelCard,
    card_path: Path | None,
    device: Any,
    sha256: str | None = None,
) -> LoadedModel:
    """Load a TorchScript file described by ``card`` onto ``device``.

    Parameters
    ----------
    path : pathlib.Path
        The ``torch.jit.save`` file.
    card : ModelCard
    card_path : pathlib.Path, optional
        Where the card came from; its sha256 is checked against ``path`` when the card names
        this file (``weights``) or is its ``<stem>.json``.
    device : str or torch.device
    sha256 : str, optional
        The file's sha256 when it is already known and checked (a model folder opened with
        :func:`.folder.open_model_folder`); then the file is not hashed again.

    Raises
    ------
    ModelLoadError
        A sha256 that differs from the card's, or a file that is not TorchScript.
    """
    import torch

    digest = sha256 or sha256_file(path)
    checks_this_file = card.weights == path.name or (
        card_path is not None and card_path.stem == path.stem
    )
    if card.sha256 and checks_this_file and digest != card.sha256:
        raise ModelLoadError(
            f"weights of model {card.name!r} do not match the sha256 in its card "
            "(the file was changed or is damaged)"
        )
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=str(device))
    except Exception as e:  # noqa: BLE001 - any failure means "not a TorchScript file"
        raise ModelLoadError(
            f"{path.name} is not a TorchScript model (torch.jit.save) or is damaged; a state "
            f"dict belongs in a model folder with a model.json ({str(e).splitlines()[0][:120]})"
        ) from e
    net.eval()
    return LoadedModel(
        card=card, network=net, source=str(path), kind="torchscript", weights_sha256=digest
    )
