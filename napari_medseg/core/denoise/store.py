"""Trained denoisers as model folders (``model.json`` with ``task="denoising"`` + weights)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.models.networks import LoadedModel
from napari_medseg.core.denoise.n2v import ARCH, TrainedDenoiser, build_n2v_network


def save_denoiser(
    folder: str | Path, model: TrainedDenoiser, name: str | None = None, description: str = ""
) -> Path:
    """Write a trained denoiser as a model folder (card ``task="denoising"`` + safetensors).

    Returns
    -------
    pathlib.Path
        The folder.
    """
    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.networks import save_model

    folder = Path(folder)
    net = model.network
    names = ["red", "green", "blue"] if model.channels == 3 else None
    card = ModelCard(
        name=name or folder.name,
        task="denoising",
        dims=model.dims,
        modality=model.modality,
        in_channels=model.channels,
        classes=[
            {"id": i, "name": names[i] if names else f"channel {i}"} for i in range(model.channels)
        ],
        spacing=None,
        orientation="",
        patch_size=list(model.patch_size),
        normalization={"scheme": "zscore", "per_image": True},
        architecture={
            "name": ARCH,
            "kwargs": {
                "dims": model.dims,
                "channels": model.channels,
                "features": int(net.down[0][0].out_channels),
                "depth": int(net.depth),
                "n2v2": bool(net.n2v2),
            },
        },
        description=description
        or f"{model.variant.upper()} self-supervised denoiser trained on "
        f"{model.training.get('n_images', 1)} noisy image(s)",
        license="same as the training images",
        training=dict(model.training),
        extra={"variant": model.variant},
    )
    return save_model(folder, card, net)


def load_denoiser(ref: str | Path | LoadedModel, device: Any = "cpu") -> TrainedDenoiser:
    """Read a denoiser model folder (or a registry name) written by :func:`save_denoiser`.

    Raises
    ------
    MedsegError
        Not a model folder, not a denoising model, damaged weights.
    """
    from napari_medseg.models.loaders.folder import open_model_folder
    from napari_medseg.models.networks import (
        LoadedModel,
        ModelLoadError,
        build_network,
        load_state_dict,
    )

    if isinstance(ref, LoadedModel):
        card, net = ref.card, ref.network
    else:
        from napari_medseg.models.registry import resolve_model

        folder = resolve_model(ref)
        if folder.is_file():
            folder = folder.parent
        checked = open_model_folder(folder)  # card, weights in the folder, sha256
        card, wpath = checked.card, checked.weights
        if card.task != "denoising":
            raise ModelLoadError(f"model {card.name!r} is a model for {card.task}, not a denoiser")
        arch = card.architecture or {}
        if arch.get("name") == ARCH:
            try:
                net = build_n2v_network(**arch.get("kwargs", {}))
            except TypeError as e:
                raise ModelLoadError(
                    f"model {card.name!r}: architecture arguments do not fit: {e}"
                ) from e
        else:
            net = build_network(card)
        try:
            net.load_state_dict(load_state_dict(wpath))
        except RuntimeError as e:
            raise ModelLoadError(
                f"weights of model {card.name!r} do not fit its architecture: {str(e)[:200]}"
            ) from e
    if card.task != "denoising":
        raise ModelLoadError(f"model {card.name!r} is a model for {card.task}, not a denoiser")
    net.eval().to(str(device))
    return TrainedDenoiser(
        network=net,
        dims=int(card.dims),
        channels=int(card.in_channels),
        variant=str(card.extra.get("variant", "n2v2")),
        patch_size=list(card.patch_size),
        training=dict(card.training),
        modality=card.modality,
    )
