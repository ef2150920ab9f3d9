"""Small shared test helpers: a tiny (few-thousand-parameter) 3D U-Net model card and folder."""

from __future__ import annotations

from pathlib import Path

from napari_medseg.models.card import ModelCard
from napari_medseg.models.networks import build_network, save_model

CLASSES = [{"id": 0, "name": "background"}, {"id": 1, "name": "organ", "color": "#ff0000"}]


def tiny_unet_card(
    name: str = "tiny_ct",
    patch: tuple[int, ...] = (16, 16, 8),
    spacing: tuple[float, ...] | None = (1.6, 1.6, 5.0),
    **overrides,
) -> ModelCard:
    """A CT card with a 2-level MONAI UNet of about 3k parameters."""
    base = dict(
        name=name,
        dims=3,
        modality="CT",
        in_channels=1,
        classes=CLASSES,
        spacing=list(spacing) if spacing else None,
        orientation="RAS",
        patch_size=list(patch),
        normalization={"scheme": "ct", "window": [-160, 240]},
        architecture={
            "name": "UNet",
            "kwargs": {
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 2,
                "channels": [4, 8],
                "strides": [2 if min(patch) >= 4 else 1],
                "num_res_units": 0,
            },
        },
    )
    base.update(overrides)
    return ModelCard(**base)


def save_tiny_model(folder: Path, seed: int = 0, **kw) -> Path:
    """Write a tiny random-weight model folder (card + safetensors) and return it."""
    import torch

    torch.manual_seed(seed)
    card = tiny_unet_card(**kw)
    return save_model(folder, card, build_network(card))
