"""In a real napari viewer (Xvfb): samples, files and hand-drawn masks keep the scan's geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.io.napari_io import sample_path
from tests.conftest import data_path

pytestmark = pytest.mark.gui


def _check_layer_geometry(layer, path):
    img = nib.load(str(path))
    meta = layer.metadata["medseg"]
    perm = meta["layer_axes"]
    np.testing.assert_allclose(np.asarray(meta["affine"]), img.affine, atol=1e-5)
    for ijk in ([0, 0, 0], [3, 4, 5], [s - 1 for s in img.shape[:3]]):
        lidx = np.asarray(ijk)[perm]
        ras = (img.affine @ np.r_[ijk, 1.0])[:3]
        np.testing.assert_allclose(np.asarray(layer.data_to_world(lidx)), ras[::-1], atol=1e-4)


@pytest.mark.parametrize(
    "key, file", [("ct", "ct_abdomen_spleen.nii.gz"), ("mri", "mr_cervical_spine_t2.nii.gz")]
)
def test_open_sample_volume_geometry(make_napari_viewer, key, file):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-medseg", key)
    assert len(layers) == 1
    layer = layers[0]
    _check_layer_geometry(layer, sample_path(file))
    assert viewer.dims.ndim == 3


def test_open_sample_pathology_stays_rgb(make_napari_viewer):
    viewer = make_napari_viewer()
    (layer,) = viewer.open_sample("napari-medseg", "pathology")
    assert layer.rgb and layer.data.shape == (300, 500, 3)


def test_scans_in_different_orientations_overlay(make_napari_viewer, tmp_path):
    """The PSR T2 and an LPS copy of it open in one viewer and agree at every world point."""
    viewer = make_napari_viewer()
    t2_path = data_path("mri/spinal_cord/t2.nii.gz")
    src = nib.load(str(t2_path))
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(src.affine), nib.orientations.axcodes2ornt("LPS")
    )
    nib.save(src.as_reoriented(ornt), tmp_path / "t2_lps.nii.gz")
    (t2,) = viewer.open(str(t2_path), plugin="napari-medseg")
    (lps,) = viewer.open(str(tmp_path / "t2_lps.nii.gz"), plugin="napari-medseg")
    (seg,) = viewer.open(
        str(data_path("mri/spinal_cord/t2_seg-manual.nii.gz")), plugin="napari-medseg"
    )
    assert type(seg).__name__ == "Labels"
    assert lps.metadata["medseg"]["orientation"] == "LPS"
    seg_ref = np.asarray(nib.load(str(data_path("mri/spinal_cord/t2_seg-manual.nii.gz"))).dataobj)
    rng = np.random.default_rng(0)
    for _ in range(200):
        i = [rng.integers(0, s) for s in t2.data.shape]
        w = t2.data_to_world(i)
        j = np.rint(lps.world_to_data(w)).astype(int)
        k = np.rint(seg.world_to_data(w)).astype(int)
        np.testing.assert_allclose(lps.world_to_data(w), j, atol=1e-3)
        assert t2.data[tuple(i)] == lps.data[tuple(j)]
        ijk = np.rint(np.linalg.inv(src.affine) @ np.r_[np.asarray(w)[::-1], 1.0])[:3]
        assert seg.data[tuple(k)] == seg_ref[tuple(ijk.astype(int))]


def test_new_labels_by_hand_saves_on_the_scan_grid(make_napari_viewer, tmp_path):
    """Draw on napari's own new Labels layer, File > Save: same voxels and affine as the scan."""
    viewer = make_napari_viewer()
    path = data_path("mri/spinal_cord/t2.nii.gz")  # PSR: file order differs from layer order
    (image,) = viewer.open(str(path), plugin="napari-medseg")
    viewer.layers.selection.active = image
    viewer._new_labels()
    labels = viewer.layers[-1]
    assert type(labels).__name__ == "Labels"
    labels.data[10, 20, 30] = 3  # a brush stroke, in layer (S, A, R) order
    out = tmp_path / "mask.nii.gz"
    viewer.layers.selection.active = labels
    written = viewer.layers.save(str(out), selected=True, plugin="napari-medseg")
    assert written == [str(out)]
    img = nib.load(str(out))
    src = nib.load(str(path))
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
    assert np.issubdtype(img.get_data_dtype(), np.integer)
    mask = np.asarray(img.dataobj)
    assert mask.sum() == 3
    ijk = np.argwhere(mask == 3)[0]
    np.testing.assert_allclose(
        (src.affine @ np.r_[ijk, 1.0])[:3][::-1], labels.data_to_world([10, 20, 30]), atol=1e-4
    )


def test_bad_file_is_an_error_and_viewer_keeps_working(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    bad = tmp_path / "report.nii"
    bad.write_text("not an image")
    with pytest.raises(Exception, match="not a valid NIfTI"):
        viewer.open(str(bad), plugin="napari-medseg")
    layers = viewer.open_sample("napari-medseg", "ct")
    assert len(viewer.layers) == 1 and layers[0].data.shape == (26, 166, 164)


def test_open_dicom_folder_as_hu_volume(make_napari_viewer):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(data_path("ct/totalseg_small/dicom")), plugin="napari-medseg")
    assert layer.data.shape == (20, 512, 512)  # axial slices on the slider
    assert layer.metadata["medseg"]["modality"] == "CT"
    assert layer.data.min() == -1024
    seg = nib.load(str(data_path("ct/totalseg_small/seg_dicom.nii.gz")))
    # the segmentation made on this series covers the same world box
    corners = [np.array(c) for c in ([0, 0, 0], [s - 1 for s in seg.shape])]
    ras = [(seg.affine @ np.r_[c, 1.0])[:3][::-1] for c in corners]
    for w in ras:
        idx = np.asarray(layer.world_to_data(w))
        assert np.all(idx > -0.5) and np.all(idx < np.array(layer.data.shape) - 0.5)


def test_open_pyramidal_slide_lazily(make_napari_viewer, tmp_path):
    from skimage.io import imread

    from napari_medseg.io.raster import make_pyramidal_tiff

    tile = imread(str(data_path("pathology/he_tile_tcia.jpg")))
    path = make_pyramidal_tiff(tmp_path / "slide.tif", tile, (6000, 5000), tile=256)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-medseg")
    assert layer.multiscale and layer.rgb
    assert layer.data[0].shape[:2] == (6000, 5000)
    assert type(layer.data[0]).__module__.startswith("dask")
