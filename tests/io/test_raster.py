"""2D images, TIFF stacks and lazy pyramidal slides built from real H&E tiles."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
da = pytest.importorskip("dask.array")
from PIL import Image  # noqa: E402

from napari_medseg.errors import ImageReadError  # noqa: E402
from napari_medseg.io import raster  # noqa: E402
from napari_medseg.io.raster import (  # noqa: E402
    is_slide,
    make_pyramidal_tiff,
    read_raster,
    read_slide,
    synthetic_slide_region,
)

_DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATA = Path(os.environ.get("MEDSEG_DATA", _DEFAULT_DATA))
HE = DATA / "pathology" / "he_tile_tcia.jpg"
IHC = DATA / "pathology" / "ihc_tile.png"
NUCLEI = DATA / "microscopy" / "dsb2018_nuclei" / "image.tif"
needs_data = pytest.mark.skipif(not HE.is_file(), reason=f"real pathology tiles absent ({DATA})")


@pytest.fixture(scope="module")
def he():
    if not HE.is_file():
        pytest.skip(f"real H&E tile absent ({HE})")
    return np.asarray(Image.open(HE).convert("RGB"))


# --------------------------------------------------------------------------- plain 2D images


@needs_data
def test_png_rgb():
    rec = read_raster(IHC)
    assert rec.shape == (512, 512, 3) and rec.data.dtype == np.uint8
    assert rec.rgb and rec.modality == "pathology" and rec.space == "pixel"
    np.testing.assert_array_equal(rec.affine, np.eye(3))
    np.testing.assert_array_equal(rec.data, np.asarray(Image.open(IHC)))
    assert rec.spacing == (1.0, 1.0) and rec.orientation == ""


@needs_data
def test_jpeg_rgb(he):
    rec = read_raster(HE)
    assert rec.shape == (300, 500, 3) and rec.rgb
    np.testing.assert_array_equal(rec.data, he)


@needs_data
def test_uint16_tiff_stays_uint16():
    rec = read_raster(NUCLEI)
    assert rec.shape == (512, 512) and rec.data.dtype == np.uint16
    assert not rec.rgb and rec.modality == "microscopy" and rec.space == "pixel"
    np.testing.assert_array_equal(rec.data, tifffile.imread(NUCLEI))
    assert not is_slide(NUCLEI)


@needs_data
def test_grayscale_png_8_and_16_bit_awkward_size(tmp_path):
    nuc = tifffile.imread(NUCLEI)[:33, :34]
    Image.fromarray(nuc).save(tmp_path / "g16.png")
    rec = read_raster(tmp_path / "g16.png")
    assert rec.shape == (33, 34) and rec.data.dtype == np.uint16
    np.testing.assert_array_equal(rec.data, nuc)
    g8 = (nuc >> 4).astype(np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    rec = read_raster(tmp_path / "g8.png")
    assert rec.data.dtype == np.uint8 and rec.shape == (33, 34) and not rec.rgb
    np.testing.assert_array_equal(rec.data, g8)


@needs_data
def test_rgba_and_palette_png(tmp_path, he):
    rgba = np.dstack([he[:33, :34], np.full((33, 34), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rec = read_raster(tmp_path / "a.png")
    assert rec.shape == (33, 34, 4) and rec.rgb
    Image.fromarray(he[:33, :34]).convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "p.png"
    )
    rec = read_raster(tmp_path / "p.png")
    assert rec.shape == (33, 34, 3) and rec.rgb
    assert np.abs(rec.data.astype(int) - he[:33, :34]).mean() < 12


def test_tiff_resolution_gives_mpp(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (33, 34, 3), dtype=np.uint8)
    f = tmp_path / "rgb.tif"
    tifffile.imwrite(
        f, data, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER"
    )
    rec = read_raster(f)
    assert rec.rgb and rec.metadata["mpp"] == pytest.approx(0.5)
    np.testing.assert_array_equal(rec.data, data)


def test_multichannel_tiff_channels_last(tmp_path):
    data = np.random.default_rng(1).integers(0, 4000, (2, 33, 34), dtype=np.uint16)
    f = tmp_path / "c.tif"
    tifffile.imwrite(f, data, photometric="minisblack", metadata={"axes": "CYX"})
    rec = read_raster(f)
    assert rec.shape == (33, 34, 2) and not rec.rgb and rec.space == "pixel"
    np.testing.assert_array_equal(rec.data[..., 1], data[1])


def test_imagej_stack_is_a_volume_with_its_spacing(tmp_path):
    data = np.arange(5 * 33 * 34, dtype=np.uint16).reshape(5, 33, 34)
    f = tmp_path / "z.tif"
    tifffile.imwrite(
        f,
        data,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.25),
        metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"},
    )
    rec = read_raster(f)
    assert rec.space == "RAS" and rec.shape == (5, 33, 34)
    np.testing.assert_array_equal(rec.data, data)
    np.testing.assert_allclose(rec.spacing, (0.002, 0.00025, 0.0005))  # mm
    assert rec.orientation == "SPL"  # ITK identity direction: z up, y posterior, x left
    # voxel (z, y, x) -> LPS (x*sx, y*sy, z*sz)
    ras = rec.affine @ [4, 10, 20, 1]
    np.testing.assert_allclose(ras[:3], [-20 * 0.0005, -10 * 0.00025, 4 * 0.002])
    # without any stated spacing: 1 mm voxels
    tifffile.imwrite(tmp_path / "plain.tif", data)
    rec = read_raster(tmp_path / "plain.tif")
    assert rec.space == "RAS" and rec.spacing == (1.0, 1.0, 1.0)


def test_unreadable_files_raise(tmp_path):
    for name in ("x.png", "x.jpg", "x.tif"):
        (tmp_path / name).write_text("not an image at all")
        with pytest.raises(ImageReadError):
            read_raster(tmp_path / name)
    with pytest.raises(ImageReadError):
        read_slide(tmp_path / "x.tif")
    with pytest.raises(ImageReadError):
        read_raster(tmp_path / "missing.png")
    assert not is_slide(tmp_path / "x.tif")


@needs_data
def test_truncated_png_raises(tmp_path):
    raw = IHC.read_bytes()
    (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_raster(tmp_path / "t.png")


# --------------------------------------------------------------------------- slides


@pytest.fixture(scope="module")
def slide_zlib(tmp_path_factory, he):
    path = tmp_path_factory.mktemp("slide") / "s.tif"
    return make_pyramidal_tiff(path, he, (3000, 2000), tile=512, compression="zlib", mpp=0.25)


def test_pyramidal_tiff_opens_lazily_with_exact_pixels(slide_zlib, he):
    assert is_slide(slide_zlib)
    rec = read_slide(slide_zlib)
    assert rec.space == "pixel" and rec.rgb and rec.modality == "pathology"
    np.testing.assert_array_equal(rec.affine, np.eye(3))
    shapes = [lv.shape for lv in rec.multiscale]
    assert shapes == [(3000, 2000, 3), (1500, 1000, 3), (750, 500, 3), (375, 250, 3)]
    assert all(isinstance(lv, da.Array) for lv in rec.multiscale)
    assert rec.data is rec.multiscale[0]
    assert rec.metadata["mpp"] == pytest.approx(0.25)
    assert rec.metadata["tile"] == [512, 512]
    assert rec.metadata["downsamples"] == [1.0, 2.0, 4.0, 8.0]
    # level 0 equals the tiled H&E image (lossless zlib), also across tile borders and the edge
    for r0, c0, h, w in [(0, 0, 40, 40), (500, 490, 33, 34), (2950, 1960, 50, 40)]:
        got = rec.data[r0 : r0 + h, c0 : c0 + w].compute()
        np.testing.assert_array_equal(got, synthetic_slide_region(he, (r0, r0 + h), (c0, c0 + w)))
    # lower levels are the exact 2**l means of full resolution
    low = rec.multiscale[3].compute()
    np.testing.assert_array_equal(low, synthetic_slide_region(he, (0, 375), (0, 250), level=3))
    full = synthetic_slide_region(he, (0, 64), (0, 64))
    mean2 = full.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    lv1 = rec.multiscale[1][:32, :32].compute()
    assert np.abs(lv1.astype(float) - mean2).max() <= 0.5 + 1e-9
    # read_raster hands a slide to read_slide
    assert read_raster(slide_zlib).multiscale is not None


def test_reading_a_viewport_touches_only_its_chunks(slide_zlib, monkeypatch):
    rec = read_slide(slide_zlib)
    calls = []
    orig = raster._SafeLevel.__getitem__

    def spy(self, key):
        calls.append((self.level, key))
        return orig(self, key)

    monkeypatch.setattr(raster._SafeLevel, "__getitem__", spy)
    rec.data[100:200, 1100:1200].compute()
    assert len(calls) == 1 and calls[0][0] == 0
    (ys, xs, _) = calls[0][1]
    assert ys.stop - ys.start <= 1024 and xs.stop - xs.start <= 1024


def test_jpeg_slide_close_to_written_tiles(tmp_path, he):
    path = make_pyramidal_tiff(tmp_path / "j.tif", he, (1100, 1300), tile=256)
    rec = read_slide(path)
    assert len(rec.multiscale) >= 2
    for r0, c0 in [(0, 0), (300, 700), (1000, 1200)]:
        got = rec.data[r0 : r0 + 64, c0 : c0 + 64].compute().astype(int)
        want = synthetic_slide_region(he, (r0, r0 + 64), (c0, c0 + 64)).astype(int)
        assert np.abs(got - want).mean() < 6  # JPEG quality 90
    with tifffile.TiffFile(path) as tf:
        assert tf.pages[0].compression == 7 and tf.pages[0].is_tiled  # JPEG, tiled


def test_ome_tiff_slide(tmp_path, he):
    path = make_pyramidal_tiff(tmp_path / "s.ome.tif", he, (1100, 1300), tile=256, ome=True,
                               mpp=0.5)  # fmt: skip
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
    rec = read_slide(path)
    assert rec.metadata["format"] == "ome-tiff"
    assert rec.metadata["mpp"] == pytest.approx(0.5)
    shapes = [lv.shape[:2] for lv in rec.multiscale]
    assert shapes == [(1100, 1300), (550, 650), (275, 325), (137, 162)]
    assert rec.rgb


def test_svs_like_slide_reads_mpp_and_levels(tmp_path, he):
    path = tmp_path / "a.svs"
    base = synthetic_slide_region(he, (0, 600), (0, 700))
    desc = (
        "Aperio Image Library v12.0.15 \r\n700x600 [0,0 700x600] (256x256) JPEG/RGB Q=70"
        "|AppMag = 20|MPP = 0.4990"
    )
    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(256, 256), photometric="rgb", description=desc, metadata=None)
        tw.write(base[::8, ::8], photometric="rgb", description="Aperio thumbnail",
                 metadata=None)  # fmt: skip
        tw.write(base[::4, ::4].copy(), tile=(256, 256), photometric="rgb",
                 description="Aperio level", metadata=None)  # fmt: skip
    assert is_slide(path)
    rec = read_slide(path)
    assert rec.metadata["format"] == "svs"
    assert rec.metadata["mpp"] == pytest.approx(0.499)
    assert rec.metadata["objective_power"] == 20
    assert [lv.shape for lv in rec.multiscale] == [(600, 700, 3), (150, 175, 3)]
    np.testing.assert_array_equal(rec.data[:50, :60].compute(), base[:50, :60])


def test_broken_tile_gives_zeros_and_one_warning(tmp_path, he):
    path = make_pyramidal_tiff(tmp_path / "b.tif", he, (1100, 1300), tile=256)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert page.chunked == (5, 6, 1)
        off = page.dataoffsets[7]  # tile row 1, column 1
    with open(path, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * 64)
    rec = read_slide(path)  # opening succeeds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = rec.data.compute()
        again = rec.data[300:400, 300:400].compute()
    msgs = [str(w.message) for w in caught if "decode" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "rows 256-512, columns 256-512 of level 0" in msgs[0]
    assert (full[256:512, 256:512] == 0).all() and (again == 0).all()
    # neighbours decode normally
    want = synthetic_slide_region(he, (0, 256), (0, 256)).astype(int)
    assert np.abs(full[:256, :256].astype(int) - want).mean() < 6
    assert full[256:512, 512:768].mean() > 50


def test_truncated_slide_raises(tmp_path, he):
    path = make_pyramidal_tiff(tmp_path / "t.tif", he, (1100, 1300), tile=256)
    raw = path.read_bytes()
    for n in (100, len(raw) // 2):
        cut = tmp_path / f"cut{n}.tif"
        cut.write_bytes(raw[:n])
        with pytest.raises(ImageReadError):
            read_slide(cut)


def test_large_slide_without_pyramid_gets_a_lazy_one(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (5000, 300, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, data, tile=(256, 256), photometric="rgb")
    assert is_slide(path)
    with pytest.warns(UserWarning, match="no pyramid"):
        rec = read_slide(path)
    assert rec.metadata["lazy_pyramid"] is True
    shapes = [lv.shape for lv in rec.multiscale]
    assert shapes == [(5000, 300, 3), (2500, 150, 3), (1250, 75, 3), (625, 37, 3)]
    lv1 = rec.multiscale[1][:100, :50].compute()
    want = np.round(data[:200, :100].reshape(100, 2, 50, 2, 3).mean(axis=(1, 3)))
    np.testing.assert_array_equal(lv1, want.astype(np.uint8))


def test_small_plain_tiff_is_not_a_slide(tmp_path):
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, np.zeros((300, 400), np.uint8), tile=(256, 256))
    assert not is_slide(path)
    rec = read_slide(path)  # still works, single level, no pyramid
    assert rec.multiscale is None and rec.shape == (300, 400)
