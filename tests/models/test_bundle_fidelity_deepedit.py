"""Fidelity to MONAI for DeepEdit (``spleen_deepedit_annotation``) in automatic mode, no clicks.

As in :mod:`tests.models.test_bundle_fidelity`: the real Model Zoo config is copied, given
random weights (fixed seed) as ``models/model.pt``, run by MONAI's own
:class:`monai.bundle.ConfigWorkflow` on a real CT crop, and compared class by class with
``napari-medseg segment --trust-bundle`` on the same file (Dice >= 0.99 for every class MONAI
paints on >= 1,000 voxels, same shape and affine).

What this bundle exercises: ScaleIntensityRanged (clip) BEFORE a ``Resized(mode="area")`` to
128^3 (torch's box means, so clipping first is not the same as after), two click-guidance
channels appended as zeros (network in_channels 3 for a 1-channel CT), DynUNet on the whole
resized image (SimpleInferer), softmax, and Invertd taking the probabilities back with the
inverse resize, again in ``"area"`` mode, then argmax. The crop is stored with its first two
axes flipped (the same voxels in the world, LPS-like axes) so Orientationd reorients it.

Changes made to the reference, each a no-op without clicks or forced by this machine:

* the config's first ``deepedit_transforms`` item,
  ``scripts.transforms.OrientationGuidanceMultipleLabelDeepEditd``, is dropped through a
  ConfigWorkflow override of ``deepedit_transforms``: it is the bundle's own Python (its
  ``scripts/`` folder is not shipped here) and only reorients click points, of which there
  are none;
* the data dict holds ``"spleen": []`` and ``"background": []``: no clicks for either label
  (AddGuidanceFromPointsDeepEditd reads ``[]`` for a missing key too; said explicitly here);
* as in the other fidelity tests: CPU device, in-process data loader, ``ITKReader`` becomes
  ``NibabelReader`` (``itk`` is not installed; both read NIfTI to the same array and affine).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import data_path
from tests.models.test_bundle_fidelity import MIN_VOXELS, _read_labels
from tests.models.test_bundles import BUNDLES, _copy

needs_bundles = pytest.mark.skipif(
    not BUNDLES.is_dir(), reason=f"MONAI bundle configs not at {BUNDLES}"
)

NAME = "spleen_deepedit_annotation"
CT = "ct/spleen/image.nii.gz"


def _flipped_crop(src: Path, dst: Path) -> Path:
    """A 150x146x24 crop of the CT, first two axes flipped (affine kept world-exact).

    Not a multiple of 128 on any axis: the area resize shrinks x and y by non-integer factors
    (boxes of 1 or 2 voxels) and stretches z more than fivefold.
    """
    import nibabel as nib

    im = nib.load(str(src))
    a = np.asarray(im.dataobj, dtype=np.float32)[7:157, 10:156, 1:25]
    aff = im.affine.copy()
    aff[:3, 3] = im.affine[:3, :3] @ np.array([7.0, 10.0, 1.0]) + im.affine[:3, 3]
    n = np.asarray(a.shape, float)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = n[:2] - 1  # new index i' = n - 1 - i
    nib.save(nib.Nifti1Image(a[::-1, ::-1].copy(), aff @ flip), str(dst))
    return dst


def _reference(bundle: Path, image: Path, out_dir: Path) -> Path:
    """The bundle's own inference config run by MONAI's ConfigWorkflow; the saved label file."""
    pytest.importorskip("ignite", reason="MONAI's bundle runner needs pytorch-ignite")
    from monai.bundle import ConfigWorkflow

    cfg = bundle / "configs" / "inference.json"
    conf = json.loads(cfg.read_text())
    clicks = conf["deepedit_transforms"]
    assert clicks[0]["_target_"].startswith("scripts."), "the config changed: see the docstring"
    data = {"image": str(image), "spleen": [], "background": []}  # automatic mode: no clicks
    wf = ConfigWorkflow(
        config_file=str(cfg),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=None,
        workflow_type="infer",
        run_id="run",
        bundle_root=str(bundle),
        output_dir=str(out_dir),
        device="$torch.device('cpu')",
        **{
            "dataloader#num_workers": 0,
            "datalist": [str(image)],
            "dataset#data": [data],
            "preprocessing_transforms#0#reader": "NibabelReader",
            "deepedit_transforms": clicks[1:],
        },
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    (out,) = sorted(out_dir.rglob("*.nii.gz"))
    return out


def test_area_resize_after_window_and_empty_guidance_match_monai() -> None:
    """The engine's steps against MONAI's transforms themselves (fast, no network).

    Orientation to RAS, the CT window, ``Resize(mode="area")``, two empty guidance channels
    (AddGuidanceSignalDeepEditd without clicks); back: Resize's inverse (area) and
    Orientation's, as Invertd runs them on the probabilities.
    """
    import torch
    from monai.apps.deepedit.transforms import AddGuidanceSignalDeepEditd
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientation, Resize, ScaleIntensityRange

    from napari_medseg.core.engine.preprocess import to_model_grid
    from napari_medseg.core.segment.segment import check_channels
    from napari_medseg.errors import MedsegError
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.card import ModelCard

    rng = np.random.default_rng(0)
    a = rng.normal(40.0, 300.0, size=(37, 23, 9)).astype(np.float32)  # HU, beyond the window
    affine = np.diag([-0.8, -0.9, 5.0, 1.0])  # LPS axes: Orientation flips two of them
    affine[:3, 3] = [10.0, -20.0, 30.0]
    size = (16, 30, 40)  # shrinks x by 37/16, y by 23/30 < 1 (grows), z by 9/40
    window = {"op": "range", "a_min": -175.0, "a_max": 250.0, "b_min": 0.0, "b_max": 1.0}
    norm = {
        "scheme": "ct",
        "window": [-175.0, 250.0],
        "on_model_grid": True,
        "monai_steps": [{**window, "clip": True}],
        "resize": {
            "spatial_size": list(size),
            "size_mode": "all",
            "mode": "area",
            "intensity_steps_before": 1,
        },
    }
    card = ModelCard(
        name="deepedit",
        dims=3,
        in_channels=3,
        spacing=None,
        orientation="RAS",
        normalization=norm,
        extra={"guidance_channels": 2},
    )
    record = ImageRecord(data=a, affine=affine, modality="CT")
    check_channels(record, card)  # 1 image channel + 2 guidance channels = in_channels 3
    with pytest.raises(MedsegError, match=r"expects 1 input channel\(s\) \(plus 2 empty"):
        check_channels(ImageRecord(data=np.stack([a, a], -1), affine=affine), card)
    ours, grid = to_model_grid(record, card)

    pre = Compose(
        [
            Orientation(axcodes="RAS"),
            ScaleIntensityRange(-175.0, 250.0, 0.0, 1.0, clip=True),
            Resize(size, mode="area"),
        ]
    )
    m = pre(MetaTensor(torch.from_numpy(a[None]), affine=torch.as_tensor(affine)))
    d = {"image": m, "guidance": {"spleen": [], "background": []}}
    expected = AddGuidanceSignalDeepEditd(keys="image", guidance="guidance")(d)["image"]
    assert tuple(ours.shape) == tuple(expected.shape) == (3, *size)
    np.testing.assert_allclose(ours.numpy(), np.asarray(expected), atol=1e-6)
    np.testing.assert_allclose(grid.model_affine, np.asarray(m.affine), atol=1e-5)
    # the window before the resize matters: the same resize first, then the window, differs
    late = Compose([Orientation(axcodes="RAS"), Resize(size, mode="area")])
    resized = late(MetaTensor(torch.from_numpy(a[None]), affine=torch.as_tensor(affine)))
    wrong = ScaleIntensityRange(-175.0, 250.0, 0.0, 1.0, clip=True)(resized)
    assert np.abs(np.asarray(wrong)[0] - ours[0].numpy()).max() > 0.05

    probs = torch.softmax(torch.from_numpy(rng.normal(size=(2, *size)).astype(np.float32)), 0)
    pred = MetaTensor(probs, affine=m.affine, meta=m.meta)
    pred.applied_operations = m.applied_operations
    back = np.asarray(pre.inverse(pred))
    assert back.shape == (2, *a.shape)
    np.testing.assert_allclose(grid.probs_to_source(probs), back, atol=1e-6)
    assert np.array_equal(grid.argmax_to_source(probs), back.argmax(0).astype(np.uint8))


@pytest.mark.slow
@needs_bundles
def test_deepedit_without_clicks_equals_monais_own_run(tmp_path: Path) -> None:
    import nibabel as nib
    import torch

    from napari_medseg.cli import main
    from napari_medseg.models.loaders.bundle import load_bundle

    bundle = _copy(NAME, tmp_path)
    torch.manual_seed(0)
    random = load_bundle(bundle, trust=True, weights="random")
    card = random.card
    # the card says what runs: the image plus two empty guidance channels, area resize after
    # the CT window, and that this is the automatic mode
    assert card.in_channels == 3 and card.extra["guidance_channels"] == 2
    assert card.normalization["resize"] == {
        "spatial_size": [128, 128, 128],
        "size_mode": "all",
        "mode": "area",
        "intensity_steps_before": 1,
    }
    assert "no clicks" in card.extra["bundle_mode"]
    assert card.extra["bundle_transforms_ignored"] == []
    torch.save(random.network.state_dict(), bundle / "models" / "model.pt")

    image = _flipped_crop(data_path(CT), tmp_path / "input.nii.gz")
    ref_file = _reference(bundle, image, tmp_path / "ref")
    ours_file = tmp_path / "ours.nii.gz"
    argv = ["segment", str(image), "-m", str(bundle), "-o", str(ours_file), "--quiet"]
    assert main([*argv, "--trust-bundle"]) == 0

    ref, ours = _read_labels(ref_file, {}), _read_labels(ours_file, {})
    ref_img, ours_img = nib.load(str(ref_file)), nib.load(str(ours_file))
    assert ours.shape == ref.shape == nib.load(str(image)).shape[:3]
    np.testing.assert_allclose(ours_img.affine, ref_img.affine, atol=1e-3)
    prov = json.loads((tmp_path / "ours.nii.gz.provenance.json").read_text())
    assert any("no clicks" in n for n in prov["notes"])
    assert prov["parameters"]["label_resampling"] == "area"  # as MONAI's Resize inverse runs
    scored = [int(c) for c in (0, 1) if (ref == c).sum() >= MIN_VOXELS]
    assert scored == [0, 1], f"random weights painted one class only: {np.bincount(ref.ravel())}"
    for c in scored:
        a, b = ref == c, ours == c
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.99, f"class {c}: Dice {dice:.4f} against MONAI's own run"
