"""Whole-slide tiled inference: tissue mask, tiling without seams, OME-Zarr output, cancel."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.slides.export import open_result
from napari_medseg.core.slides.segment import predict_batch, segment_slide
from napari_medseg.core.slides.tiles import plan_tiles
from napari_medseg.core.slides.tissue import tissue_mask
from napari_medseg.errors import MedsegError
from napari_medseg.io.raster import make_pyramidal_tiff, read_slide
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import run_sync
from tests.slide_helpers import he_tile_with_glass, make_slide, save_rgb_model


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("wsi")
    path = make_slide(d / "slide.tif", (3000, 2500))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from napari_medseg.models.registry import load_model

    folder = save_rgb_model(tmp_path_factory.mktemp("m") / "tiny_rgb")
    return load_model(str(folder), device="cpu")


def _glass(shape):
    """True where the periodic test slide is white glass (the tile padding)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy % 600) >= 300) | ((xx % 1200) >= 500)


def test_tissue_mask_finds_tissue_not_glass(slide):
    rec = read_slide(slide)
    mask, down = tissue_mask(rec)
    assert down == 2.0 and mask.shape == (1500, 1250)
    glass = _glass((3000, 2500))[::2, ::2]
    assert mask[glass].mean() < 0.02
    assert mask[~glass].mean() > 0.6


def test_whole_slide_zarr_levels_and_background_skipped(slide, model, tmp_path):
    rec = read_slide(slide)
    out = tmp_path / "slide_seg.zarr"
    seen = []
    res = run_sync(
        segment_slide(rec, model, out, device="cpu", tile=512, batch_size=4), seen.append
    )
    assert res.complete and res.tiles_done == res.tiles_total
    all_tiles = plan_tiles((3000, 2500), 512)
    assert 0 < res.tiles_total < len(all_tiles)  # some tiles are all glass and skipped
    levels = open_result(out)
    assert levels[0].shape == rec.data.shape[:2] and levels[0].dtype == np.uint8
    assert [lv.shape for lv in levels[:3]] == [(3000, 2500), (1500, 1250), (750, 625)]
    assert levels[0].chunksize == (512, 512)
    l0 = levels[0].compute()
    assert set(np.unique(l0)) == {0, 1}
    # a skipped all-glass tile stays 0; level 1 is level 0 subsampled
    done = set(plan_tiles((3000, 2500), 512, *tissue_mask(rec)))
    skipped = [t for t in all_tiles if t not in done]
    y0, x0, y1, x1 = skipped[0]
    assert not l0[y0:y1, x0:x1].any()
    np.testing.assert_array_equal(levels[1].compute(), l0[::2, ::2])
    import zarr

    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"][0][
        "scale"
    ] == pytest.approx([0.5, 0.5])
    assert attrs["medseg"]["complete"] is True
    assert any(p.info.get("tiles") for p in seen)


def test_tiles_are_seam_free_against_one_whole_image_pass(tmp_path, model):
    """Away from the slide border the tiled result equals one forward pass on the whole image
    exactly (the margin covers the receptive field); against the Gaussian sliding window of
    ``segment`` (different windows, blended) agreement is measured at 0.998."""
    from napari_medseg.core.segment.segment import segment

    path = make_slide(tmp_path / "small.tif", (700, 900))
    rec = read_slide(path)
    run_sync(
        segment_slide(
            rec, model, tmp_path / "o.zarr", device="cpu", tile=256, margin=32, tissue_only=False
        )
    )
    l0 = open_result(tmp_path / "o.zarr")[0].compute()
    img = np.asarray(rec.data.compute())
    whole = predict_batch(model.network, [img], model.card, "cpu", None)[0]
    b = 32
    np.testing.assert_array_equal(l0[b:-b, b:-b], whole[b:-b, b:-b])
    mem = ImageRecord(
        data=img,
        affine=np.eye(3),
        space="pixel",
        modality="pathology",
        name="small",
        rgb=True,
        metadata={},
    )
    ref = run_sync(segment(mem, model, device="cpu")).labels
    assert (ref == l0).mean() > 0.99


def test_region_and_cancel_leave_a_readable_partial_result(slide, model, tmp_path):
    rec = read_slide(slide)
    out = tmp_path / "view.zarr"
    res = run_sync(segment_slide(rec, model, out, device="cpu", region=(0, 0, 600, 600)))
    assert res.tiles_total == 2  # (0,0) and (512,0); columns 512-1023 are glass
    l0 = open_result(out)[0]
    assert l0[1024:, :].max().compute() == 0
    # cancel after the first batch: the zarr stays readable and says it is incomplete
    out2 = tmp_path / "cancel.zarr"
    gen = segment_slide(rec, model, out2, device="cpu", batch_size=2)
    for p in gen:
        if p.done >= 2:
            break
    gen.close()
    import zarr

    attrs = zarr.open_group(str(out2), mode="r").attrs["medseg"]
    assert attrs["complete"] is False and attrs["tiles_done"] == 2
    lv = open_result(out2)
    assert lv[0].shape == (3000, 2500) and lv[0][:512, :].max().compute() <= 1
    with pytest.raises(MedsegError, match="exists"):
        run_sync(segment_slide(rec, model, out2, device="cpu"))


def test_no_tissue_and_corrupt_tile(tmp_path, model):
    blank = make_pyramidal_tiff(
        tmp_path / "blank.tif", np.full((64, 64, 3), 250, np.uint8), (1200, 1300), tile=256
    )
    with pytest.raises(MedsegError, match="no tissue"):
        run_sync(segment_slide(read_slide(blank), model, tmp_path / "b.zarr", device="cpu"))
    # corrupt one JPEG tile of level 0: it is read as zeros, labelled 0 and listed as skipped
    path = make_slide(tmp_path / "bad.tif", (1024, 1024), tile=256)
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        off, n = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as f:
        f.seek(off + 2)
        f.write(b"\x00" * (n - 4))
    rec = read_slide(path)
    with pytest.warns(RuntimeWarning, match="decode"):
        res = run_sync(
            segment_slide(
                rec, model, tmp_path / "bad.zarr", device="cpu", tile=256, tissue_only=False
            )
        )
    assert (0, 0, 256, 256) in [tuple(s) for s in res.skipped]
    l0 = open_result(tmp_path / "bad.zarr")[0].compute()
    assert not l0[:256, :256].any() and l0[256:, 256:].any()


def test_tissue_mask_keeps_small_fragments_on_a_low_level():
    """At a 32x downsample a 300x500-pixel piece of tissue is only ~9x15 mask pixels; it must
    not be removed as a speck (it was, when the speck size scaled with the level only)."""
    import dask.array as da

    he = he_tile_with_glass()
    low = np.full((1250, 1250, 3), 255, np.uint8)
    piece = he[:288:32, :480:32]  # the real H&E tile at 1/32: 9 x 15 pixels
    for y in range(0, 1250 - 10, 19):
        for x in range(0, 1250 - 16, 37):
            low[y : y + piece.shape[0], x : x + piece.shape[1]] = piece
    level0 = da.zeros((40000, 40000, 3), dtype=np.uint8, chunks=(4096, 4096, 3))
    rec = ImageRecord(
        data=level0,
        affine=np.eye(3),
        space="pixel",
        modality="pathology",
        name="big",
        rgb=True,
        multiscale=[level0, da.from_array(low)],
        metadata={},
    )
    mask, down = tissue_mask(rec)
    assert down == 32.0
    assert mask.mean() > 0.1


def test_bundles_with_their_own_pipeline_are_refused_on_slides(slide, tmp_path):
    """HoVerNet (three maps, watershed nuclei) runs on images, not tile by tile: one sentence."""
    from tests.models.test_bundles import BUNDLES

    if not BUNDLES.is_dir():
        pytest.skip(f"MONAI bundle configs not at {BUNDLES}")
    from napari_medseg.models.loaders.bundle import load_bundle

    hovernet = load_bundle(
        BUNDLES / "pathology_nuclei_segmentation_classification", weights="random"
    )
    with pytest.raises(MedsegError, match="save a region of the slide as an image"):
        run_sync(segment_slide(read_slide(slide), hovernet, tmp_path / "h.zarr", device="cpu"))
    assert not (tmp_path / "h.zarr").exists()
