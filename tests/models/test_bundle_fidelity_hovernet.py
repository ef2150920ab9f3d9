"""Fidelity to MONAI for the HoVerNet nuclei bundle: our nuclei equal MONAI's own bundle run.

``pathology_nuclei_segmentation_classification``'s real Model Zoo config, random weights (fixed
seed), run by MONAI's :class:`monai.bundle.ConfigWorkflow` (what ``python -m monai.bundle run``
does: PILReader, ScaleIntensityRanged, SlidingWindowHoVerNetInferer, MONAI's HoVerNet
post-processing, SaveImaged of the instance and type maps) and by ``napari-medseg segment`` on
the same real H&E crop (the TCIA tile, 300 x 328 so that four windows cover it). Compared: the
type map per class (Dice >= 0.99 for classes on >= 1,000 pixels), the instance map (the same
id on >= 99% of the nuclei pixels, the same number of nuclei within 1%).

Random weights call almost every pixel a nucleus (or none): the nucleus branch's output bias
is shifted by the median logit gap of MONAI's own forward pass on the image (as
``test_bundle_fidelity._balance`` does for two-class networks). Random horizontal/vertical maps
are smooth, so at the bundle's ``marker_threshold`` of 0.4 the watershed finds no seeds; the
copied config (which both runs read) sets it to 0.6, which gives a few hundred nuclei, and so
also checks that the config's post-processing arguments are honoured.

Changes to the reference, each because this machine cannot run the config as it stands (they
change nothing MONAI computes): the device is the CPU, the data loader runs in-process, the
checkpoint is mapped to the CPU, and the maps are read from the evaluator's output instead of
the two ``SaveImaged`` steps, which fail on MONAI 1.6 with this MONAI 1.4 config's metadata
(``TypeError`` in ``spatial_resample``; they only write the maps to disk).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import data_path
from tests.models.test_bundles import BUNDLES, _copy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BUNDLES.is_dir(), reason=f"MONAI bundle configs not at {BUNDLES}"),
]

NAME = "pathology_nuclei_segmentation_classification"
TILE = "pathology/he_tile_tcia.jpg"


def _reference(bundle: Path, image: Path, out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's ConfigWorkflow run of the bundle; its instance and type maps, ``(row, col)``."""
    pytest.importorskip("ignite", reason="MONAI's bundle runner needs pytorch-ignite")
    from monai.bundle import ConfigWorkflow

    cfg = bundle / "configs" / "inference.json"
    post = json.loads(cfg.read_text())["postprocessing"]["transforms"]
    keep = [t for t in post if "SaveImage" not in str(t.get("_target_"))]
    wf = ConfigWorkflow(
        config_file=str(cfg),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=None,
        workflow_type="infer",
        bundle_root=str(bundle),
        output_dir=str(out_dir),
        device="$torch.device('cpu')",
        num_cpus=0,
        dataset_dir=str(image.parent),
        data_list=[{"image": str(image)}],
        **{
            "handlers#0#map_location": "$torch.device('cpu')",
            "postprocessing#transforms": keep,
        },
    )
    wf.initialize()
    wf.run()
    (out,) = wf.parser.get_parsed_content("evaluator").state.output
    wf.finalize()
    # MONAI keeps rasters as (x, y): transposed to (row, col)
    inst, types = (
        np.asarray(out[k]).squeeze().T.astype(np.int64) for k in ("instance_map", "type_map")
    )
    return inst, types


def _balance(bundle: Path, state: dict, image: Path) -> None:
    """Shift the nucleus branch's output bias so that about half of ``image`` is nuclei."""
    import torch
    from monai.bundle import ConfigParser

    conf = json.loads((bundle / "configs" / "inference.json").read_text())
    parser = ConfigParser(conf)
    parser["bundle_root"] = str(bundle)
    x = parser.get_parsed_content("preprocessing")({"image": str(image)})["image"]
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state)
    x = torch.as_tensor(x)[None].float()[..., :256, :256]
    x = torch.nn.functional.pad(x, (0, 256 - x.shape[-1], 0, 256 - x.shape[-2]))
    with torch.no_grad():
        y = net.eval()(x)["nucleus_prediction"][0]
    key = "nucleus_prediction.output_features.decoderblock4.conv.bias"
    state[key][1] -= (y[1] - y[0]).median()


def test_nuclei_equal_monais_own_bundle_run(tmp_path: Path) -> None:
    import tifffile
    import torch
    from PIL import Image

    from napari_medseg.cli import main
    from napari_medseg.models.loaders.bundle import load_bundle

    tile = np.asarray(Image.open(data_path(TILE)).convert("RGB"))[:, :328]
    image = tmp_path / "he_crop.png"
    Image.fromarray(tile).save(image)
    bundle = _copy(NAME, tmp_path)
    cfg = bundle / "configs" / "inference.json"
    conf = json.loads(cfg.read_text())
    for t in conf["postprocessing"]["transforms"]:
        if t["_target_"] == "HoVerNetInstanceMapPostProcessingd":
            t["marker_threshold"] = 0.6
    cfg.write_text(json.dumps(conf, indent=1))
    torch.manual_seed(0)
    state = load_bundle(bundle, weights="random").network.state_dict()
    _balance(bundle, state, image)
    torch.save(state, bundle / "models" / "model.pt")

    ref_inst, ref_types = _reference(bundle, image, tmp_path / "ref")
    ours_file = tmp_path / "ours.tif"
    argv = ["segment", str(image), "-m", str(bundle), "-o", str(ours_file), "--quiet"]
    assert main(argv) == 0  # untrusted: its config's arithmetic is read without eval

    ours_types = tifffile.imread(ours_file).astype(np.int64)
    ours_inst = tifffile.imread(tmp_path / "ours_instances.tif").astype(np.int64)
    assert ours_types.shape == ours_inst.shape == ref_types.shape == tile.shape[:2]

    n_ref, n_ours = len(np.unique(ref_inst)) - 1, len(np.unique(ours_inst)) - 1
    assert n_ref >= 20, f"MONAI found {n_ref} nuclei: too few to compare"
    assert abs(n_ours - n_ref) <= max(1, 0.01 * n_ref), (n_ours, n_ref)
    fg = (ref_inst > 0) | (ours_inst > 0)
    same = float((ref_inst[fg] == ours_inst[fg]).mean())
    print(
        f"nuclei: MONAI {n_ref}, ours {n_ours}; same id on {same:.5f} of nuclei pixels; "
        f"pixels that differ: ids {int((ref_inst != ours_inst).sum())}, "
        f"types {int((ref_types != ours_types).sum())} of {ref_inst.size}"
    )
    assert same >= 0.99, f"the same nucleus id on {same:.4f} of the nuclei pixels"

    scored = [int(c) for c in np.unique(ref_types) if c and (ref_types == c).sum() >= 1000]
    assert scored, "the reference typed no class on 1,000 pixels: nothing to compare"
    for c in scored:
        a, b = ref_types == c, ours_types == c
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        print(f"type {c}: {a.sum()} pixels, Dice {dice:.5f}")
        assert dice >= 0.99, f"type {c}: Dice {dice:.4f} against MONAI's own run"

    table = (tmp_path / "ours_objects.csv").read_text().splitlines()
    assert table[0].startswith("id,row,col,area_px,type")
    assert len(table) - 1 == n_ours
    prov = json.loads((tmp_path / "ours.tif.provenance.json").read_text())
    assert prov["nuclei"] == n_ours and prov["instances"].endswith("ours_instances.tif")
