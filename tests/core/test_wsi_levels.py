"""The model's pyramid level from the card's pixel size and the slide's mpp (segmentation)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from napari_medseg.core.slides.export import open_result
from napari_medseg.core.slides.segment import segment_slide
from napari_medseg.core.slides.tiles import level_for_mpp, model_level
from napari_medseg.io.raster import read_slide
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import run_sync
from tests.slide_helpers import make_slide, save_rgb_model


def test_model_level_is_the_coarsest_at_most_1_5x_the_card_pixel():
    """Levels of 0.25, 0.5 and 1.0 µm/px: a card at 0.4 µm runs on 0.5, at 0.7 on 1.0 (1.43x),
    at 0.3 on 0.25 (0.5 would be 1.67x); unknown spacing or mpp: full resolution."""
    import dask.array as da

    lv = [da.zeros((s, s // 2, 3), np.uint8, chunks=(1024, 1024, 3)) for s in (8000, 4000, 2000)]
    fake = ImageRecord(
        data=lv[0], affine=np.eye(3), space="pixel", name="fake", rgb=True, multiscale=lv,
        metadata={"mpp": 0.25},
    )  # fmt: skip
    for spacing, want in [(None, 0), (0.25, 0), (0.3, 0), (0.4, 1), (0.5, 1), (0.7, 2), (5.0, 2)]:
        card = SimpleNamespace(spacing=[spacing, spacing] if spacing else None)
        assert model_level(fake, SimpleNamespace(card=card)) == want, spacing
    fake.metadata["mpp"] = None
    assert level_for_mpp(fake, 0.5) == 0  # slide without a pixel size: full resolution


def test_segment_slide_runs_on_the_level_of_the_card_spacing(tmp_path):
    """A card at 0.5 µm/px on a 0.25 µm/px slide runs on level 1; the labels land on the level-0
    grid as 2x2 blocks, identical to forcing level=1."""
    import torch

    torch.set_num_threads(1)
    from napari_medseg.models.registry import load_model

    slide = make_slide(tmp_path / "s.tif", (700, 900))  # mpp 0.25
    m = load_model(str(save_rgb_model(tmp_path / "m", spacing=[0.5, 0.5])), device="cpu")
    auto = run_sync(segment_slide(read_slide(slide), m, tmp_path / "a.zarr", tile=256,
                                  margin=32, device="cpu"))  # fmt: skip
    assert auto.provenance["parameters"]["level"] == 1
    run_sync(segment_slide(read_slide(slide), m, tmp_path / "f.zarr", tile=256,
                             margin=32, device="cpu", level=1))  # fmt: skip
    a = open_result(tmp_path / "a.zarr")[0].compute()
    assert a.shape == (700, 900) and a.any()
    np.testing.assert_array_equal(a, open_result(tmp_path / "f.zarr")[0].compute())
    # level-1 labels repeated onto level 0: constant 2x2 blocks
    np.testing.assert_array_equal(a, np.repeat(np.repeat(a[::2, ::2], 2, 0), 2, 1)[:700, :900])


def test_tissue_mask_of_a_slide_that_is_all_tissue():
    """Otsu on a slide without glass splits the tissue itself into specks, which were then all
    removed ("no tissue"); measured on a 10k slide tiling the H&E tile: mask 0% before, 100%
    after. The glass slide of tests/core/test_wsi.py keeps its Otsu mask."""
    import dask.array as da

    from napari_medseg.core.slides.tissue import tissue_mask
    from tests.slide_helpers import he_tissue

    low = np.tile(he_tissue()[::8, ::8], (34, 20, 1))[:1250, :1250]  # the tile at 1/8
    level0 = da.zeros((10000, 10000, 3), dtype=np.uint8, chunks=(4096, 4096, 3))
    rec = ImageRecord(
        data=level0, affine=np.eye(3), space="pixel", modality="pathology", name="all", rgb=True,
        multiscale=[level0, da.from_array(low)], metadata={},
    )  # fmt: skip
    mask, down = tissue_mask(rec)
    assert down == 8.0 and mask.mean() > 0.95
