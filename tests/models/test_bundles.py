"""MONAI bundles as LoadedModel: every real Model Zoo config in ../shared/data/monai_bundles.

The bundles there hold configs only (no weights). Each segmentation bundle is copied to tmp_path,
given random weights saved as ``models/model.pt``, loaded back with :func:`load_bundle` and run
on a synthetic patch. Nothing from an untrusted bundle may execute.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_medseg.models.card import PALETTE, sha256_file
from napari_medseg.models.loaders.bundle import (
    TRUST_HINT,
    BundleTrustError,
    bundle_task,
    is_bundle,
    load_bundle,
)
from napari_medseg.models.networks import ModelLoadError

DATA = Path(
    os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
BUNDLES = DATA / "monai_bundles"
pytestmark = pytest.mark.skipif(
    not BUNDLES.is_dir(), reason=f"real MONAI bundle configs not found at {BUNDLES}"
)
ALL = sorted(p.name for p in BUNDLES.iterdir() if p.is_dir()) if BUNDLES.is_dir() else []

# name -> (task, needs trust, test patch (reduced roi) | None, reason it is unsupported | None)
SEG, CLS, GEN = "segmentation", "classification", "generative"
EXPECTED: dict[str, tuple[str, bool, tuple | None, str | None]] = {
    "brats_mri_axial_slices_generative_diffusion": (GEN, False, None, None),
    "brats_mri_generative_diffusion": (GEN, False, None, None),
    "brats_mri_segmentation": (SEG, False, (16, 24, 32), None),
    "breast_density_classification": (CLS, False, None, None),
    "classification_template": (CLS, False, None, None),
    "endoscopic_inbody_classification": (CLS, False, None, None),
    "endoscopic_tool_segmentation": (SEG, False, (64, 96), None),
    "lung_nodule_ct_detection": ("detection", False, None, None),
    "maisi_ct_generative": (GEN, False, None, None),
    "mednist_gan": (GEN, False, None, None),
    "mednist_reg": ("registration", False, None, None),
    "multi_organ_segmentation": (SEG, True, (32, 32, 32), None),
    "pancreas_ct_dints_segmentation": (SEG, True, (32, 32, 32), None),
    "pathology_nuclei_classification": (CLS, False, None, None),
    # HoVerNet: three maps per window, nuclei as instances (tested on its own below)
    "pathology_nuclei_segmentation_classification": (SEG, False, None, None),
    # NuClick: one patch per user click, nuclei as instances (tested on its own below)
    "pathology_nuclick_annotation": (SEG, False, None, None),
    "pathology_tumor_detection": (CLS, False, None, None),
    "pediatric_abdominal_ct_segmentation": (SEG, False, (32, 32, 32), None),
    "prostate_mri_anatomy": (SEG, False, (32, 32, 32), None),
    "renalStructures_CECT_segmentation": (SEG, False, (16, 24, 32), None),
    "renalStructures_UNEST_segmentation": (SEG, True, None, "needs its Python module scripts"),
    "segmentation_template": (SEG, False, (24, 32, 40), None),
    "spleen_ct_segmentation": (SEG, False, (32, 48, 16), None),
    "spleen_deepedit_annotation": (SEG, False, (64, 64, 32), None),  # automatic mode: no clicks
    "swin_unetr_btcv_segmentation": (SEG, False, (64, 64, 64), None),
    "valve_landmarks": ("landmarks", False, None, None),
    "ventricular_short_axis_3label": (SEG, False, (64, 80), None),
    "vista2d": (SEG, False, None, "cell flows"),
    "vista3d": (SEG, False, None, "own Python code"),
    "wholeBody_ct_segmentation": (SEG, True, (16, 16, 24), None),
    "wholeBrainSeg_Large_UNEST_segmentation": (SEG, True, None, "needs its Python module scripts"),
}
SUPPORTED = [
    n
    for n in ALL
    if n in EXPECTED and EXPECTED[n][0] == SEG and EXPECTED[n][3] is None and EXPECTED[n][2]
]
UNSUPPORTED_SEG = [n for n in ALL if n in EXPECTED and EXPECTED[n][0] == SEG and EXPECTED[n][3]]
OTHER = [n for n in ALL if n in EXPECTED and EXPECTED[n][0] != SEG]
# ~30 s (SwinUNETR, 62 M parameters) and ~5 s (DynUNet 31 M, UNet 38 M) on 2 CPU cores
HEAVY = {
    "swin_unetr_btcv_segmentation",
    "pediatric_abdominal_ct_segmentation",
    "prostate_mri_anatomy",
}


def _copy(name: str, tmp_path: Path) -> Path:
    """Copy a bundle's configs to tmp_path (plus the DiNTS architecture file it refers to)."""
    dst = tmp_path / name
    shutil.copytree(BUNDLES / name / "configs", dst / "configs")
    (dst / "models").mkdir()
    config_text = "".join(p.read_text() for p in (dst / "configs").glob("inference.*"))
    if "search_code_18590.pt" in config_text:  # DiNTS: a searched architecture, as NumPy arrays
        import torch

        node_a = np.zeros((13, 4))
        node_a[:, 0] = 1  # the full-resolution path only: valid and small
        arch_a = np.zeros((12, 10))
        arch_a[:, 0] = 1
        code = {
            "node_a": node_a,
            "arch_code_a": arch_a,
            "arch_code_a_max": arch_a.copy(),
            "arch_code_c": np.zeros((12, 10), dtype=np.int64),
        }
        torch.save(code, dst / "models" / "search_code_18590.pt")
    return dst


def test_every_folder_is_a_classified_bundle() -> None:
    assert len(ALL) >= 31
    for name in ALL:
        assert is_bundle(BUNDLES / name), name
    unknown = sorted(set(ALL) - set(EXPECTED))
    assert not unknown, f"new bundles: add them to EXPECTED: {unknown}"


@pytest.mark.parametrize("name", ALL)
def test_bundle_task(name: str) -> None:
    assert bundle_task(BUNDLES / name) == EXPECTED[name][0]


@pytest.mark.parametrize("name", OTHER)
def test_non_segmentation_bundles_are_refused_clearly(name: str) -> None:
    with pytest.raises(ModelLoadError, match=f"is a {EXPECTED[name][0]} model"):
        load_bundle(BUNDLES / name, trust=True, weights="random")


@pytest.mark.parametrize("name", UNSUPPORTED_SEG)
def test_unsupported_segmentation_bundles_say_why(name: str, tmp_path: Path) -> None:
    bundle = _copy(name, tmp_path)
    with pytest.raises(ModelLoadError, match=EXPECTED[name][3]) as info:
        load_bundle(bundle, trust=True, weights="random")
    assert not isinstance(info.value, BundleTrustError)
    assert name in str(info.value)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in SUPPORTED]
)
def test_segmentation_bundle_roundtrip(name: str, tmp_path: Path) -> None:
    import torch

    if name == "swin_unetr_btcv_segmentation":
        pytest.importorskip("einops", reason="SwinUNETR.forward needs einops")
    _, needs_trust, patch, _ = EXPECTED[name]
    bundle = _copy(name, tmp_path)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())

    if needs_trust:
        with pytest.raises(BundleTrustError, match=TRUST_HINT) as info:
            load_bundle(bundle, weights="random")
        assert name in str(info.value) and "$" in str(info.value)
    random = load_bundle(bundle, trust=needs_trust, weights="random")
    state = random.network.state_dict()
    torch.save(state, bundle / "models" / "model.pt")

    lm = load_bundle(bundle, trust=needs_trust)
    assert lm.kind == "bundle" and lm.source == str(bundle.resolve())
    assert lm.weights_sha256 == sha256_file(bundle / "models" / "model.pt")
    assert lm.card.sha256 == lm.weights_sha256 and lm.card.weights == "models/model.pt"
    loaded = lm.network.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not lm.network.training

    card = lm.card
    assert card.task == "segmentation" and card.architecture["name"] == "monai_bundle"
    assert card.dims == len(patch) == len(card.patch_size)
    assert card.extra["bundle"]["version"] == meta["version"]
    assert card.extra["bundle"]["name"] == meta["name"]
    assert card.extra["trusted"] is needs_trust
    out_def = meta["network_data_format"]["outputs"]["pred"]
    if isinstance(out_def.get("channel_def"), dict) and len(out_def["channel_def"]) == len(
        card.classes
    ):
        assert [c["name"] for c in card.classes] == list(out_def["channel_def"].values())

    x = torch.rand(1, card.in_channels, *patch)
    with torch.no_grad():
        y = lm.network(x)
    assert tuple(y.shape) == (1, card.out_channels, *patch)
    assert torch.isfinite(y).all()


def test_hovernet_card_reads_the_config_without_running_it() -> None:
    """HoVerNet's overlap and padding are arithmetic in ``$`` expressions: read, not run."""
    lm = load_bundle(BUNDLES / "pathology_nuclei_segmentation_classification", weights="random")
    card = lm.card
    assert card.extra["trusted"] is False
    assert card.dims == 2 and card.in_channels == 3 and card.patch_size == [256, 256]
    assert card.overlap == 1.0 - 164 / 256  # "$1.0 - float(@out_size) / float(@patch_size)"
    spec = card.extra["hovernet"]
    assert spec["input_padding"] == [46, 46, 46, 46]  # "$((@patch_size - @out_size) // 2,) * 4"
    assert spec["instance"] == {
        "sobel_kernel_size": 21,
        "marker_threshold": 0.4,
        "marker_radius": 2,
    }
    names = [c["name"] for c in card.classes]
    assert names == ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
    assert card.normalization["window"] == [0.0, 255.0]
    assert card.extra["bundle_transforms_ignored"] == []


def test_nuclick_card_reads_the_config_without_running_it() -> None:
    """NuClick loads untrusted: its click patches and post-processing are plain values."""
    from napari_medseg.models.loaders.bundle import bundle_takes_clicks

    path = BUNDLES / "pathology_nuclick_annotation"
    card = load_bundle(path, weights="random").card
    assert card.extra["trusted"] is False
    assert card.dims == 2 and card.in_channels == 5
    assert card.extra["nuclick"] == {
        "bb_size": 128,
        "gaussian": False,
        "sigma": 1.0,
        "truncated": 2.0,
        "add_exclusion_map": True,
        "signal_channels": 2,
        "sigmoid": True,
        "threshold": 0.5,
        "keep_largest": {"connectivity": None, "num_components": 1},
    }
    assert [c["name"] for c in card.classes] == ["background", "Nuclei"]
    assert card.normalization["window"] == [0.0, 255.0] and card.normalization["clip"] is False
    assert card.normalization["b_min"] == -1.0 and card.normalization["raster_axes"] == "xy"
    assert card.extra["bundle_transforms_ignored"] == []
    assert "bundle_postprocessing_ignored" not in card.extra
    assert bundle_takes_clicks(path)
    assert not bundle_takes_clicks(BUNDLES / "spleen_deepedit_annotation")
    assert not bundle_takes_clicks(BUNDLES / "pathology_nuclei_segmentation_classification")


def test_spleen_card_matches_config(tmp_path: Path) -> None:
    card = load_bundle(BUNDLES / "spleen_ct_segmentation", weights="random").card
    assert card.name == "spleen_ct_segmentation"
    assert card.spacing == [1.5, 1.5, 2.0]
    assert card.orientation == "RAS"
    assert card.normalization == {
        "scheme": "ct",
        "window": [-57.0, 164.0],
        "on_model_grid": True,  # MONAI scales intensities after Spacing
        "monai_steps": [
            {
                "op": "range",
                "a_min": -57.0,
                "a_max": 164.0,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        ],
    }
    assert card.patch_size == [96, 96, 96] and card.overlap == 0.5
    assert card.dims == 3 and card.in_channels == 1 and card.modality == "CT"
    assert card.classes == [
        {"id": 0, "name": "background"},
        {"id": 1, "name": "spleen", "color": PALETTE[1]},
    ]
    # Invertd before AsDiscreted(argmax): scores go back to the image grid, then argmax
    assert card.postprocessing == {
        "activation": "softmax",
        "argmax": True,
        "label_resampling": "linear",
    }
    assert card.extra["blend_mode"] == "constant" and card.extra["padding_mode"] == "constant"
    assert card.extra["whole_image"] is False  # a SlidingWindowInferer: windows
    assert card.extra["bundle_transforms_ignored"] == []
    assert card.extra["bundle"]["name"] == "Spleen CT segmentation"
    assert card.extra["bundle"]["version"] == "0.5.9"
    assert card.architecture["network"] == "UNet"
    assert card.architecture["kwargs"]["channels"] == [16, 32, 64, 128, 256]
    assert card.metrics == {"mean_dice": 0.961}
    card.save(tmp_path)  # the card is JSON-serialisable as a model.json


def test_card_translates_other_transforms() -> None:
    brats = load_bundle(BUNDLES / "brats_mri_segmentation", weights="random").card
    assert brats.normalization == {
        "scheme": "zscore",
        "foreground_only": True,
        "channel_wise": True,
        "on_model_grid": True,
        "monai_steps": [{"op": "normalize", "nonzero": True, "channel_wise": True}],
    }
    assert brats.patch_size == [240, 240, 160] and brats.in_channels == 4
    assert brats.postprocessing == {
        "activation": "sigmoid",
        "threshold": 0.5,
        "label_resampling": "linear",
        # its Lambdad, read without running it: 4 = enhancing, else 1 = core, else 2 = whole
        "channel_labels": [[2, 4], [0, 1], [1, 2]],
    }
    assert brats.classes[0] == {"id": 0, "name": "Tumor core", "color": PALETTE[-1]}

    endo = load_bundle(BUNDLES / "endoscopic_tool_segmentation", weights="random").card
    assert endo.dims == 2 and endo.patch_size == [736, 480] and endo.in_channels == 3
    assert {k: endo.normalization[k] for k in ("scheme", "lower", "upper")} == {
        "scheme": "percentile",
        "lower": 0.0,
        "upper": 100.0,
    }
    assert endo.normalization["monai_steps"] == [
        {"op": "minmax", "minv": 0.0, "maxv": 1.0, "channel_wise": False}
    ]
    # its Resized to 736x480 (MONAI's (x, y): the 2D image is read columns first) and back
    assert endo.normalization["resize"] == {"spatial_size": [736, 480], "size_mode": "all"}
    assert endo.normalization["raster_axes"] == "xy"
    assert endo.extra["bundle_transforms_ignored"] == []
    # Invertd moves the logits back before AsDiscreted's argmax; its Lambdad x[1:] keeps the
    # foreground channel of the two-class one-hot labels: the label map itself
    assert endo.postprocessing == {
        "label_resampling": "linear",
        "resample_raw_outputs": True,
        "argmax": True,
    }
    assert "bundle_postprocessing_ignored" not in endo.extra
    # SimpleInferer: the whole image in one forward pass
    assert endo.extra["whole_image"] is True
    template = load_bundle(BUNDLES / "segmentation_template", weights="random").card
    assert template.extra["bundle_inferer"] == "SimpleInferer" and template.extra["whole_image"]

    renal = load_bundle(BUNDLES / "renalStructures_CECT_segmentation", weights="random").card
    assert renal.orientation == "LPS" and renal.spacing == [0.8, 0.8, 0.8]
    assert renal.normalization["scheme"] == "ct"
    assert renal.normalization["window"] == [-1000.0, 1000.0]
    assert renal.overlap == 0.25 and renal.extra["bundle_transforms_ignored"] == []
    # its own scripts' ConcatImages (channel files, in order) and MergeClassesd (lowest wins)
    assert renal.extra["channel_inputs"] == ["artery", "vein", "excret"]
    assert renal.postprocessing["channel_labels"] == [[k, k] for k in range(1, 6)]
    assert renal.postprocessing["activation"] == "sigmoid"
    assert "bundle_postprocessing_ignored" not in renal.extra
    from napari_medseg.core.segment.segment import check_channels
    from napari_medseg.errors import MedsegError
    from napari_medseg.io.record import ImageRecord

    one = ImageRecord(data=np.zeros((8, 8, 8), np.int16), affine=np.eye(4), space="RAS")
    with pytest.raises(MedsegError, match=r"3 input channel\(s\) \(artery, vein, excret: one file"):
        check_channels(one, renal)

    heart = load_bundle(BUNDLES / "ventricular_short_axis_3label", weights="random").card
    assert heart.extra["bundle_slice_inferer"] == {"spatial_dim": 2} and heart.dims == 2


def test_trusted_card_from_expressions(tmp_path: Path) -> None:
    card = load_bundle(BUNDLES / "wholeBody_ct_segmentation", trust=True, weights="random").card
    assert card.spacing == [1.5, 1.5, 1.5]  # "$[1.5, 1.5, 1.5] if @displayable_configs#highres..."
    assert card.overlap == 0.25 and card.out_channels == 105
    assert card.normalization["scheme"] == "percentile"
    assert (card.normalization["b_min"], card.normalization["b_max"]) == (-1.0, 1.0)
    assert [s["scheme"] for s in card.normalization["steps"]] == ["zscore", "percentile"]
    ped = load_bundle(
        BUNDLES / "pediatric_abdominal_ct_segmentation", trust=True, weights="random"
    ).card
    assert [c["name"] for c in ped.classes] == ["background", "liver", "spleen", "pancreas"]
    # CropForegroundd is reproduced now (the box of values > 0 after the CT window)
    assert ped.extra["bundle_transforms_ignored"] == []
    assert ped.normalization["crop_foreground"] == {
        "margin": 0,
        "k_divisible": 1,
        "allow_smaller": True,
    }
    assert card.normalization["monai_steps"] == [
        {"op": "normalize", "nonzero": True, "channel_wise": False},
        {"op": "minmax", "minv": -1.0, "maxv": 1.0, "channel_wise": False},
    ]
    assert card.extra["padding_mode"] == "replicate" and card.extra["blend_mode"] == "gaussian"
    assert card.postprocessing["label_resampling"] == "nearest"  # argmax, then Invertd


def _spleen_with(tmp_path: Path, **network_def: object) -> Path:
    bundle = _copy("spleen_ct_segmentation", tmp_path)
    cfg_path = bundle / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in network_def.items():
        if k.startswith("top_"):
            cfg[k[4:]] = v
        else:
            cfg["network_def"][k] = v
    cfg_path.write_text(json.dumps(cfg))
    return bundle


def test_untrusted_bundle_never_runs_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"$__import__('pathlib').Path({str(marker)!r}).write_text('x') and 1"
    bundle = _spleen_with(tmp_path, in_channels="@evil", top_evil=evil)
    with pytest.raises(BundleTrustError) as info:
        load_bundle(bundle, weights="random")
    msg = str(info.value)
    assert "spleen_ct_segmentation" in msg and "'evil'" in msg and TRUST_HINT in msg
    assert not marker.exists()
    # with the user's trust the same config does run (that is what trust means)
    load_bundle(bundle, trust=True, weights="random")
    assert marker.exists()


@pytest.mark.parametrize(
    "target", ["os.system", "monai.networks.utils.save_state", "scripts.net.Net", "Compose"]
)
def test_untrusted_targets_outside_monai_networks_are_refused(tmp_path: Path, target: str) -> None:
    bundle = _spleen_with(tmp_path, _target_=target)
    with pytest.raises(BundleTrustError, match="not a MONAI network class"):
        load_bundle(bundle, weights="random")


def test_untrusted_nested_target_is_checked(tmp_path: Path) -> None:
    bundle = _spleen_with(tmp_path, act={"_target_": "subprocess.Popen", "args": ["true"]})
    with pytest.raises(BundleTrustError, match=r"subprocess\.Popen"):
        load_bundle(bundle, weights="random")


def test_bundle_without_weights(tmp_path: Path) -> None:
    bundle = _copy("spleen_ct_segmentation", tmp_path)
    with pytest.raises(ModelLoadError, match=r"has no weights: put model\.pt or model\.ts in"):
        load_bundle(bundle)
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_bundle(BUNDLES / "spleen_ct_segmentation")
    with pytest.raises(ModelLoadError, match="not a MONAI bundle"):
        load_bundle(tmp_path)
    assert not is_bundle(tmp_path) and not is_bundle(bundle / "configs")


def test_checkpoint_wrappers_and_bad_weights(tmp_path: Path) -> None:
    import torch

    bundle = _copy("segmentation_template", tmp_path)
    net = load_bundle(bundle, weights="random").network
    state = net.state_dict()
    wrapped = {"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    torch.save(wrapped, bundle / "models" / "model.pt")
    lm = load_bundle(bundle)
    assert all(torch.equal(lm.network.state_dict()[k], v) for k, v in state.items())
    outside = tmp_path / "elsewhere.pt"  # an explicit weights file, outside the bundle
    torch.save(state, outside)
    lm = load_bundle(bundle, weights=str(outside))
    assert lm.card.weights == str(outside) and lm.weights_sha256 == sha256_file(outside)

    state_bad = dict(state)
    state_bad.pop(next(iter(state_bad)))
    torch.save(state_bad, bundle / "models" / "model.pt")
    with pytest.raises(ModelLoadError, match="do not fit the network of bundle"):
        load_bundle(bundle)
    (bundle / "models" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="corrupt or not a weights file"):
        load_bundle(bundle)


def test_torchscript_needs_no_trust(tmp_path: Path) -> None:
    """A bundle whose network_def is custom code still loads, untrusted, from models/model.ts."""
    import torch

    name = "wholeBrainSeg_Large_UNEST_segmentation"
    bundle = _copy(name, tmp_path)
    tiny = torch.nn.Conv3d(1, 133, kernel_size=1)
    torch.jit.trace(tiny, torch.rand(1, 1, 8, 8, 8)).save(str(bundle / "models" / "model.ts"))
    lm = load_bundle(bundle)
    assert lm.card.extra["bundle_weights_format"] == "torchscript"
    assert lm.card.weights == "models/model.ts" and lm.card.sha256 == lm.weights_sha256
    assert lm.card.out_channels == 133 and lm.card.classes[1]["name"] == "3rd-Ventricle"
    assert lm.card.normalization["monai_steps"] == [
        {"op": "normalize", "nonzero": True, "channel_wise": True}
    ]
    with torch.no_grad():
        y = lm.network(torch.rand(1, 1, 9, 10, 11))
    assert tuple(y.shape) == (1, lm.card.out_channels, 9, 10, 11)
    # with a model.pt too, the network_def it needs cannot be built untrusted: the fall back to
    # model.ts is said (warning) and kept in the provenance, never silent
    torch.save(tiny.state_dict(), bundle / "models" / "model.pt")
    with pytest.warns(UserWarning, match=r"running its TorchScript export models/model\.ts"):
        lm = load_bundle(bundle)
    assert lm.card.extra["bundle_weights_format"] == "torchscript"
    assert "models/model.ts" in lm.provenance()["notes"][0]
    # a model.pt it cannot use without trust: TorchScript is taken instead
    torch.save({"w": torch.zeros(1)}, bundle / "models" / "model.pt")
    card = load_bundle(bundle).card
    assert card.extra["bundle_weights_format"] == "torchscript"
    assert "not a MONAI network class" in card.extra["bundle_network_def_skipped"]
