"""Build networks from a model card and move weights in and out of model folders.

Only classes from :mod:`monai.networks.nets` (and this module's own) can be named in a card's
``architecture``: a card is data and never executes code. :class:`LoadedModel` is what every
loader returns; reading a model folder back is :mod:`napari_medseg.models.loaders.folder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_medseg.errors import MedsegError
from napari_medseg.models.card import ModelCard, sha256_file


class ModelLoadError(MedsegError, ValueError):
    """A model folder, weights file or bundle could not be loaded (message is for people)."""


def build_network(card: ModelCard) -> Any:
    """Instantiate the network a card describes (random weights).

    Parameters
    ----------
    card : ModelCard
        ``card.architecture = {"name": <class in monai.networks.nets>, "kwargs": {...}}``.

    Returns
    -------
    torch.nn.Module
    """
    import monai.networks.nets as nets

    arch = card.architecture or {}
    name = arch.get("name")
    if not name or not hasattr(nets, name):
        raise ModelLoadError(
            f"model {card.name!r}: unknown architecture {name!r}; use a class from "
            "monai.networks.nets (e.g. UNet, BasicUNet, DynUNet, SegResNet)"
        )
    cls = getattr(nets, name)
    kwargs = dict(arch.get("kwargs", {}))
    dropped = drop_download_kwargs(kwargs)
    if dropped:
        card.extra["architecture_args_dropped"] = dropped
    try:
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - constructors raise anything on arguments that do not fit
        raise ModelLoadError(f"model {card.name!r}: architecture arguments do not fit: {e}") from e


def drop_download_kwargs(kwargs: dict) -> list[str]:
    """Switch off, in place, every architecture argument that would download weights.

    A model's weights come from its folder or bundle, never from the network: ``pretrained``,
    ``pretrained_url``, ``pretrained_state_dict_key``, ``download``, ``progress`` and torchvision's
    ``weights`` name are set to ``False`` (flags) or ``None`` (names, URLs) so that building the
    network cannot open a connection (HoVerNet, DenseNet, EfficientNet, TorchVisionFCModel...).

    Parameters
    ----------
    kwargs : dict
        Constructor arguments from a card's ``architecture.kwargs`` or a bundle's ``network_def``.

    Returns
    -------
    list of str
        The names of the arguments that were switched off (for the card/provenance).
    """
    dropped = []
    for k, v in list(kwargs.items()):
        low = k.lower()
        downloads = "pretrain" in low or "download" in low or "url" in low
        if low == "weights" and isinstance(v, str):  # torchvision: weights="DEFAULT" downloads
            downloads = True
        if downloads and v:
            kwargs[k] = False if isinstance(v, bool) else None
            dropped.append(k)
    return dropped


def save_weights(network: Any, path: str | Path) -> str:
    """Save a state dict as safetensors (atomically); return its sha256."""
    from safetensors.torch import save_file

    from napari_medseg._files import atomic_path

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_path(path) as tmp:  # mode from the user's umask, like any file they save
        save_file(state, str(tmp))
    return sha256_file(path)


def load_state_dict(path: str | Path) -> dict:
    """Read weights without unpickling objects: safetensors, or a ``.pt`` with weights_only."""
    import torch

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt or foreign file
        raise ModelLoadError(
            f"weights file {path.name} is corrupt or not a weights file ({e})"
        ) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"weights file {path.name} does not hold a state dict")
    return state


@dataclass
class LoadedModel:
    """A ready-to-run model: its card, the network in eval mode, and where it came from.

    ``network`` maps a float tensor ``(B, in_channels, *patch)`` to logits
    ``(B, out_channels, *patch)``; patch axes follow the card's ``orientation`` (3D) or are
    ``(row, col)`` (2D).
    """

    card: ModelCard
    network: Any
    source: str = ""
    kind: str = "folder"  # "folder", "torchscript" or "bundle"
    weights_sha256: str | None = None
    #: what loading did that the user should know (a bundle's TorchScript fallback, ...)
    notes: list[str] = field(default_factory=list)

    def provenance(self) -> dict:
        """The ``"model"`` block of a result's provenance: name, version, where it came from,
        weights and card sha256, licence (one definition for every task)."""
        return {
            "name": self.card.name,
            "version": self.card.version,
            "source": self.source,
            "kind": self.kind,
            "weights_sha256": self.weights_sha256,
            "card_sha256": self.card.sha256,
            "license": self.card.license,
            "notes": self.load_notes(),
        }

    def load_notes(self) -> list[str]:
        """What loading changed or chose on the user's behalf (always in the provenance)."""
        notes = list(self.notes)
        dropped = self.card.extra.get("architecture_args_dropped")
        if dropped:
            notes.append(
                f"architecture arguments {', '.join(dropped)} switched off: weights come from "
                "the model folder, never from a download"
            )
        return notes


def save_model(folder: str | Path, card: ModelCard, network: Any) -> Path:
    """Write a model folder: weights (safetensors) then ``model.json`` with their sha256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card.weights = card.weights or "weights.safetensors"
    card.sha256 = save_weights(network, folder / card.weights)
    card.save(folder)
    return folder
