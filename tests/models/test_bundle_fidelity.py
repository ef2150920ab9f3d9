"""Fidelity to MONAI: our labels equal the bundle's own inference config run by MONAI.

For each bundle the docs list as supported: copy its real Model Zoo config, give it random
weights (fixed seed) as ``models/model.pt``, run MONAI's own workflow
(:class:`monai.bundle.ConfigWorkflow`, what ``python -m monai.bundle run`` does: LoadImage,
its preprocessing, its inferer, Invertd, SaveImage) on a real image of the matching modality,
run ``napari-medseg segment`` on the same file with the same weights, and compare the label
files voxel by voxel (Dice >= 0.99 for every class MONAI paints on >= 1,000 voxels, same
shape and affine; a 2D PNG output carries no affine). The images are centred crops of about
1.3 windows of each model's grid (a bundle that resizes whole 2D images gets a whole real
300x500 H&E tile), so a run takes seconds to a minute on 2 CPU cores. Where random weights
paint one class everywhere (``BALANCE``), the output head's bias is shifted, from MONAI's own
forward pass, so that both classes cover about half of the image.

Changes made to the reference, each because this machine cannot run the config as it stands
(they change nothing MONAI computes): the device is the CPU, the data loader runs in-process,
``ITKReader`` becomes ``NibabelReader`` (``itk`` is not installed; both read NIfTI to the same
array and affine), SwinUNETR's ``img_size`` argument, which MONAI 1.6 no longer accepts, is
dropped (our loader drops it the same way), DiNTS's architecture file is loaded on the CPU
with ``weights_only=False`` (it holds NumPy arrays, which torch >= 2.6 refuses by default), and
a config's ``dataset_dir`` (the segmentation template's SaveImaged ``data_root_dir``) is the
test image's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import data_path
from tests.models.test_bundles import BUNDLES, EXPECTED, _copy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BUNDLES.is_dir(), reason=f"MONAI bundle configs not at {BUNDLES}"),
]

CT = "ct/spleen/image.nii.gz"
MR = "ct/totalseg_small/mr.nii.gz"  # abdominal MR, LPS: also checks orientation handling

#: bundle -> the real image it runs on (a 4-channel stack for BraTS)
FIDELITY = {
    "spleen_ct_segmentation": CT,
    "wholeBody_ct_segmentation": CT,
    "pediatric_abdominal_ct_segmentation": CT,
    "multi_organ_segmentation": CT,
    "pancreas_ct_dints_segmentation": CT,
    "swin_unetr_btcv_segmentation": CT,
    "prostate_mri_anatomy": MR,
    "ventricular_short_axis_3label": MR,  # a 2D network on slices (SliceInferer)
    "brats_mri_segmentation": "4 channels",  # 4 contrasts, sigmoid outputs, its own Lambdad
    # a 2D RGB network on a whole 300x500 H&E tile (JPEG): MONAI reads it as (x, y), resizes
    # it to 736x480 and its Invertd resizes the logits back
    "endoscopic_tool_segmentation": "pathology/he_tile_tcia.jpg",
    # SimpleInferer: a UNet with InstanceNorm on the whole image at once (no windows)
    "segmentation_template": CT,
    # 3 contrast phases as channel files, sigmoid outputs merged by the bundle's own script
    "renalStructures_CECT_segmentation": "3 phases",
}

#: The renal CECT bundle's ``scripts/my_transforms.py`` is not among the configs here. The
#: reference run gets this module instead, written from the Model Zoo's source: ConcatImages
#: stacks ``keys_merge`` as channels (meta of the first), MergeClassesd gives each voxel the
#: lowest channel k >= 1 that is set (0 where none is).
RENAL_SCRIPTS = """
import numpy as np
import torch
from monai.transforms import InvertibleTransform, MapTransform


class ConcatImages(MapTransform, InvertibleTransform):
    def __init__(self, keys_merge, keys_out, allow_missing_keys=True):
        self.keys_merge, self.keys_out = list(keys_merge), keys_out
        self.allow_missing_keys = allow_missing_keys

    def __call__(self, data):
        data[self.keys_out] = np.concatenate([np.asarray(data[k]) for k in self.keys_merge])
        data[self.keys_out + "_meta_dict"] = data[self.keys_merge[0] + "_meta_dict"]
        return data

    def inverse(self, data):
        return data


class MergeClassesd(MapTransform):
    def __call__(self, data):
        for key in self.key_iterator(data):
            x = data[key]
            out = torch.zeros_like(x[:1])
            for k in range(x.shape[0] - 1, 0, -1):
                out = torch.where(x[k : k + 1] != 0, torch.full_like(out, k), out)
            data[key] = out
        return data
"""
MIN_VOXELS = 1000
RASTER = (".png", ".jpg", ".jpeg")

#: Bundles whose random network paints one class everywhere: the output head's bias outweighs
#: the spatial variation of its features (FlexibleUNet: a logit gap of 0.099 against a spread of
#: 0.0002 over the image). The bias of class 1 is shifted by the median gap of MONAI's own
#: forward pass on the test image, so both classes cover about half of it.
BALANCE = {"endoscopic_tool_segmentation", "renalStructures_CECT_segmentation"}


def _reference(bundle: Path, image: Path | list[Path] | dict, out_dir: Path) -> Path:
    """Run the bundle's inference config with MONAI's ConfigWorkflow; the saved label file."""
    pytest.importorskip("ignite", reason="MONAI's bundle runner needs pytorch-ignite")
    from monai.bundle import ConfigWorkflow

    cfg = next((bundle / "configs").glob("inference.*"))
    text = cfg.read_text()
    if cfg.suffix == ".json":
        conf = json.loads(text)
    else:
        import yaml

        conf = yaml.safe_load(text)
    key = conf.get("image_key", conf.get("image", "image"))
    if str(key).startswith("$"):  # e.g. the template's "$monai.utils.CommonKeys.IMAGE"
        from monai.bundle import ConfigParser

        key = ConfigParser(conf).get_parsed_content("image")
    if isinstance(image, dict):  # several input keys (the renal bundle's contrast phases)
        value: Any = str(next(iter(image.values())))
        item = {k: str(v) for k, v in image.items()}
    else:
        value = [str(i) for i in image] if isinstance(image, list) else str(image)
        item = {key: value}
    overrides: dict = {
        "bundle_root": str(bundle),
        "output_dir": str(out_dir),
        "device": "$torch.device('cpu')",
        "dataloader#num_workers": 0,
        "datalist": [value],
        "dataset#data": [item],
    }
    if "data_dicts" in conf:  # the segmentation template names its data list so
        overrides["data_dicts"] = [{key: value}]
    if "dataset_dir" in conf:  # SaveImaged's data_root_dir in the template
        overrides["dataset_dir"] = str(Path(value if isinstance(value, str) else value[0]).parent)
    if "inference" in conf and "run" not in conf:  # the renal bundle's run list is "inference"
        overrides["inference"] = ["$@evaluator.run()"]  # without its cudnn setting
    pre = conf.get("preprocessing", {})
    for i, t in enumerate(pre.get("transforms", []) if isinstance(pre, dict) else []):
        if isinstance(t, dict) and t.get("reader") == "ITKReader":
            overrides[f"preprocessing#transforms#{i}#reader"] = "NibabelReader"
    if isinstance(conf.get("dints_space"), dict):
        overrides["dints_space#device"] = "$torch.device('cpu')"  # DiNTS hard-codes CUDA
    if "arch_ckpt" in conf:
        # DiNTS: the searched architecture file holds NumPy arrays (torch >= 2.6 refuses them
        # with weights_only) and is mapped to CUDA: load it on the CPU, as MONAI would there
        overrides["arch_ckpt"] = (
            "$torch.load(@arch_ckpt_path, map_location=torch.device('cpu'), weights_only=False)"
        )
    wf = ConfigWorkflow(
        config_file=str(cfg),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=None,
        workflow_type="infer",
        run_id=next((r for r in ("run", "inference") if r in conf), "evaluating"),
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    files = sorted(out_dir.rglob("*.nii.gz")) or sorted(out_dir.rglob("*.png"))
    (out,) = [f for f in files if not f.name.startswith("label")]  # not a saved input label
    return out


def _balance(bundle: Path, conf: dict, state: dict, image: Path | dict) -> None:
    """Shift the output head's bias (in ``state``) so that the classes share the image.

    Two classes: class 1's bias by the median logit gap. Sigmoid channels (a dict of input
    files): each channel's bias by its median logit, so each is set on about half of the
    voxels and the bundle's channel-to-label rule decides. The logits come from MONAI alone:
    the bundle's own preprocessing and network definition, parsed by
    :class:`monai.bundle.ConfigParser`, run on ``image`` whole (a centred 96^3 crop of a
    volume).
    """
    import sys

    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser(conf)
    parser["bundle_root"] = str(bundle)
    key = conf.get("image_key", "image")
    data = {k: str(v) for k, v in image.items()} if isinstance(image, dict) else {key: str(image)}
    sys.path.insert(0, str(bundle))  # the bundle's scripts/, as MONAI's runner has it
    try:
        x = parser.get_parsed_content("preprocessing")(data)[key]
    finally:
        sys.path.remove(str(bundle))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state)
    x = torch.as_tensor(np.asarray(x))[None].float()
    if x.ndim == 5:
        lo = [max((n - 96) // 2, 0) for n in x.shape[2:]]
        x = x[(..., *(slice(a, a + 96) for a in lo))]
    with torch.no_grad():
        y = net.eval()(x)[0]
    n = y.shape[0]
    head = [k for k, v in state.items() if k.endswith("bias") and tuple(v.shape) == (n,)][-1]
    if isinstance(image, dict):
        for c in range(n):
            state[head][c] -= y[c].median()
        return
    assert n == 2, "balancing a softmax network is for two classes"
    state[head][1] -= (y[1] - y[0]).median()


def _read_labels(path: Path, conf: dict) -> np.ndarray:
    """A label file as integers: NIfTI as stored; a PNG from SaveImage divided by its scale."""
    if path.suffix != ".png":
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj).squeeze().astype(np.int64)
    from PIL import Image

    a = np.asarray(Image.open(path)).astype(np.int64)
    scale = next(
        (
            int(t.get("scale") or 1)
            for t in conf.get("postprocessing", {}).get("transforms", [])
            if isinstance(t, dict) and "SaveImage" in str(t.get("_target_"))
        ),
        1,
    )
    assert not (a % scale).any(), f"{path.name} holds values that are not multiples of {scale}"
    return a // scale


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _crop(card, src: Path, dst: Path) -> Path:
    """A centred crop of about 1.3 windows of the model grid, geometry kept.

    A bundle that runs whole images (SimpleInferer) gets sizes that are multiples of its
    network's total stride (``strides`` of a UNet), as its network needs.
    """
    import nibabel as nib

    im = nib.load(str(src))
    a = np.asarray(im.dataobj)
    zooms = np.asarray(im.header.get_zooms()[:3], float)
    roi = np.asarray(card.patch_size[:3], float)
    sp = np.asarray(card.spacing[:3] if card.spacing else zooms, float)
    if card.dims == 2:  # a 2D network on slices: a few slices are enough
        roi, sp = np.array([*roi[:2], 4.0]), np.array([*sp[:2], zooms[2]])
    n = np.minimum(np.ceil(1.3 * roi * sp / zooms).astype(int), a.shape[:3])
    if card.extra.get("whole_image"):
        k = int(np.prod(card.architecture["kwargs"].get("strides") or [1]))
        n = n // k * k
    lo = (np.asarray(a.shape[:3]) - n) // 2
    sl = tuple(slice(int(start), int(start + k)) for start, k in zip(lo, n))
    aff = im.affine.copy()
    aff[:3, 3] = im.affine[:3, :3] @ lo + im.affine[:3, 3]
    nib.save(nib.Nifti1Image(a[sl], aff, im.header), str(dst))
    return dst


@pytest.mark.parametrize("name", list(FIDELITY))
def test_labels_equal_monais_own_bundle_run(name: str, tmp_path: Path) -> None:
    import nibabel as nib
    import torch

    from napari_medseg.cli import main
    from napari_medseg.models.loaders.bundle import checkpoint_paths, load_bundle

    if name == "swin_unetr_btcv_segmentation":
        pytest.importorskip("einops", reason="SwinUNETR.forward needs einops")
    trust = EXPECTED[name][1]
    bundle = _copy(name, tmp_path)
    for cfg in (bundle / "configs").glob("inference.json"):
        conf = json.loads(cfg.read_text())
        net = conf.get("network_def")
        if isinstance(net, dict) and "SwinUNETR" in str(net.get("_target_")):
            net.pop("img_size", None)  # MONAI 1.6's SwinUNETR no longer takes it
            cfg.write_text(json.dumps(conf, indent=1))
    torch.manual_seed(0)
    random = load_bundle(bundle, trust=trust, weights="random")
    state = random.network.state_dict()
    # where the config's CheckpointLoader looks (models/model.pt, or e.g. models/dynunet_FT.pt)
    cfg = next((bundle / "configs").glob("inference.*"))
    conf = json.loads(cfg.read_text()) if cfg.suffix == ".json" else _yaml(cfg)
    raster = Path(FIDELITY[name]).suffix in RASTER
    ref_input: Path | list[Path] | dict
    if raster:  # a whole 2D image: the bundle resizes it itself
        image = tmp_path / Path(FIDELITY[name]).name
        image.write_bytes(data_path(FIDELITY[name]).read_bytes())
        ref_input = image
    elif FIDELITY[name] == "4 channels":
        # a 4-contrast stand-in made from the real CT: the 4D file for us, 4 files for MONAI
        image = _crop(random.card, data_path(CT), tmp_path / "ct.nii.gz")
        ct = nib.load(str(image))
        a = np.asarray(ct.dataobj, dtype=np.float32)
        chans = [a, 0.5 * a + 100, np.sqrt(np.abs(a)), -a]
        ref_input = []
        for k, c in enumerate(chans):
            f = tmp_path / f"contrast{k}.nii.gz"
            nib.save(nib.Nifti1Image(c, ct.affine), str(f))
            ref_input.append(f)
        image = tmp_path / "input.nii.gz"
        nib.save(nib.Nifti1Image(np.stack(chans, axis=-1), ct.affine), str(image))
    elif FIDELITY[name] == "3 phases":
        # arterial, venous and excretory stand-ins made from the real CT: 3 files each side
        ct_file = _crop(random.card, data_path(CT), tmp_path / "ct.nii.gz")
        ct = nib.load(str(ct_file))
        a = np.asarray(ct.dataobj, dtype=np.float32)
        phases = {"artery": a, "vein": 0.8 * a + 60, "excret": np.where(a > 150, a + 300, a)}
        ref_input = {}
        for key, c in phases.items():
            f = tmp_path / f"{key}.nii.gz"
            nib.save(nib.Nifti1Image(c, ct.affine), str(f))
            ref_input[key] = f
        ref_input["label"] = tmp_path / "label.nii.gz"  # the config also reads a label file
        nib.save(nib.Nifti1Image((a > 0).astype(np.uint8), ct.affine), str(ref_input["label"]))
        image = ref_input["artery"]
        (bundle / "scripts").mkdir()
        (bundle / "scripts" / "__init__.py").write_text("")
        (bundle / "scripts" / "my_transforms.py").write_text(RENAL_SCRIPTS)
    else:
        image = _crop(random.card, data_path(FIDELITY[name]), tmp_path / "input.nii.gz")
        ref_input = image
    if name in BALANCE:
        _balance(bundle, conf, state, ref_input if isinstance(ref_input, dict) else image)
    for rel in checkpoint_paths(conf) or ["models/model.pt"]:
        torch.save(state, bundle / rel)

    ref_file = _reference(bundle, ref_input, tmp_path / "ref")
    ours_file = tmp_path / ("ours.png" if raster else "ours.nii.gz")
    argv = ["segment", str(image), "-m", str(bundle), "-o", str(ours_file), "--quiet"]
    if isinstance(ref_input, dict):  # the other phases as channel files, in the bundle's order
        argv[2:2] = [str(ref_input[k]) for k in random.card.extra["channel_inputs"][1:]]
    assert main([*argv, *(["--trust-bundle"] if trust else [])]) == 0

    ref, ours = _read_labels(ref_file, conf), _read_labels(ours_file, {})
    if raster:  # PNG labels carry no geometry: the same pixels, (row, col) as the image
        from PIL import Image

        assert ours.shape == ref.shape == np.asarray(Image.open(image)).shape[:2]
    else:
        ref_img, ours_img = nib.load(str(ref_file)), nib.load(str(ours_file))
        assert ours.shape == ref.shape == nib.load(str(image)).shape[:3]
        np.testing.assert_allclose(ours_img.affine, ref_img.affine, atol=1e-3)
    scored = [int(c) for c in np.unique(ref) if c != 0 and (ref == c).sum() >= MIN_VOXELS]
    assert scored, "the reference painted no class on 1,000 voxels: nothing to compare"
    for c in scored:
        a, b = ref == c, ours == c
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        print(f"{name} class {c}: {int(a.sum())} voxels, Dice {dice:.5f}")
        assert dice >= 0.99, f"class {c}: Dice {dice:.4f} against MONAI's own run"
    print(f"{name}: {int((ref != ours).sum())} of {ref.size} voxels differ")
