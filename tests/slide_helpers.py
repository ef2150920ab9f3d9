"""Test helpers for whole-slide work: slides built from the real H&E tile, a tiny RGB model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

_DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = Path(os.environ.get("MEDSEG_DATA", _DEFAULT_DATA))
HE = DATA / "pathology" / "he_tile_tcia.jpg"

RGB_CLASSES = [{"id": 0, "name": "background"}, {"id": 1, "name": "nuclei", "color": "#ff00ff"}]


def he_tile_with_glass(pad: tuple[int, int] = (300, 700)) -> np.ndarray:
    """The real 300x500 H&E tile padded with white glass below and to the right (uint8 RGB)."""
    if not HE.is_file():
        pytest.skip(f"real H&E tile absent ({HE}); set MEDSEG_DATA")
    from PIL import Image

    img = np.asarray(Image.open(HE).convert("RGB"))
    return np.pad(img, ((0, pad[0]), (0, pad[1]), (0, 0)), constant_values=255)


def make_slide(path: Path, size: tuple[int, int], tile: int = 256, **kw) -> Path:
    """A pyramidal JPEG TIFF of ``size`` (rows, cols) tiling the H&E tile padded with glass."""
    from napari_medseg.io.raster import make_pyramidal_tiff

    return make_pyramidal_tiff(path, he_tile_with_glass(), size, tile=tile, **kw)


def rgb_card(name: str = "tiny_rgb", patch: tuple[int, int] = (64, 64), **overrides):
    """A 2D RGB segmentation card with a ~2k-parameter MONAI UNet (total stride 2)."""
    from napari_medseg.models.card import ModelCard

    base = dict(
        name=name,
        dims=2,
        modality="pathology",
        in_channels=3,
        classes=RGB_CLASSES,
        spacing=None,
        orientation="",
        patch_size=list(patch),
        normalization={"scheme": "rgb", "mean": [0.5] * 3, "std": [0.25] * 3},
        architecture={
            "name": "UNet",
            "kwargs": {
                "spatial_dims": 2,
                "in_channels": 3,
                "out_channels": 2,
                "channels": [4, 8],
                "strides": [2],
                "num_res_units": 0,
                # BatchNorm (running statistics in eval) keeps the network local; MONAI's
                # default InstanceNorm normalises over each input, so results would depend on
                # how the slide is tiled.
                "norm": "batch",
            },
        },
    )
    base.update(overrides)
    return ModelCard(**base)


def save_rgb_model(folder: Path, seed: int = 0, **kw) -> Path:
    """Write a tiny random-weight RGB model folder and return it."""
    import torch

    from napari_medseg.models.networks import build_network, save_model

    torch.manual_seed(seed)
    card = rgb_card(**kw)
    net = build_network(card)
    with torch.no_grad():  # a bias so that both classes occur on H&E
        for p in net.parameters():
            p.mul_(3.0)
    return save_model(folder, card, net)


def he_tissue() -> np.ndarray:
    """The real 300x500 H&E tile alone (uint8 RGB, all tissue, no glass)."""
    return he_tile_with_glass(pad=(0, 0))


def make_tissue_slide(path: Path, size: tuple[int, int], tile: int = 256, **kw) -> Path:
    """A pyramidal JPEG TIFF of ``size`` (rows, cols) tiling the H&E tile without glass."""
    from napari_medseg.io.raster import make_pyramidal_tiff

    return make_pyramidal_tiff(path, he_tissue(), size, tile=tile, **kw)


def dark_components(record, min_distance=None, threshold: float = 90.0):
    """A purely local nucleus detector for tiling tests: connected components of pixels whose
    RGB mean is below ``threshold`` (haematoxylin-dark), measured with ``measure_instances``.

    It returns a :class:`DetectionResult` (not a generator), so it also exercises that path.
    Its result on a region does not depend on the region's surroundings, which makes exact
    comparisons between tilings possible.
    """
    from scipy import ndimage as ndi

    from napari_medseg.core.detect.instances import measure_instances
    from napari_medseg.core.detect.result import DetectionResult
    from napari_medseg.progress import run_sync

    grey = np.asarray(record.data, dtype=np.float32)
    grey = grey.mean(axis=-1) if grey.ndim == 3 else grey
    inst = ndi.label(grey < threshold)[0].astype(np.int32)
    table = run_sync(
        measure_instances(inst, record.affine, record.space, None, None, {1: "nucleus"})
    )
    return DetectionResult(
        table, inst, np.asarray(record.affine), record.space, {"nucleus": "#0000ff"},
        {"method": "dark connected components"},
    )  # fmt: skip


FLUO = DATA / "microscopy" / "dsb2018_nuclei" / "image.tif"


def make_fluo_slide(path: Path, size: tuple[int, int], tile: int = 256) -> Path:
    """A pyramidal zlib TIFF (uint16, one channel) tiling the real 512x512 DSB fluorescence
    nuclei image, for the built-in ``fluo_nuclei_2d`` model."""
    if not FLUO.is_file():
        pytest.skip(f"real fluorescence image absent ({FLUO}); set MEDSEG_DATA")
    import tifffile

    from napari_medseg.io.raster import make_pyramidal_tiff

    img = tifffile.imread(FLUO)
    return make_pyramidal_tiff(path, img, size, tile=tile, compression="zlib", mpp=0.5)
