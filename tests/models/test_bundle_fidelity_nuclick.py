"""Fidelity to MONAI for the NuClick bundle: the nuclei we outline equal MONAI's own bundle run.

``pathology_nuclick_annotation``'s real Model Zoo config, random weights (fixed seed), run by
MONAI's :class:`monai.bundle.ConfigWorkflow` (what ``python -m monai.bundle run`` does:
PILReader, ScaleIntensityRanged, AddClickSignalsd, BasicUNet, sigmoid, threshold,
KeepLargestConnectedComponentd) and by ``napari-medseg segment --clicks`` on the same real H&E
crop (the TCIA tile, 300 x 328), with clicks on real nuclei (centroids of the darkest
hematoxylin blobs, found deterministically) plus one click repeated on the same pixel (MONAI
makes a patch for each; the later id wins).

MONAI's patches are pasted into one instance map as ``PostFilterLabeld`` does (``flatten`` off:
id = click order + 1, a later patch overwriting an earlier one) and compared with ours: the
same id on >= 99% of the nucleus pixels, Dice >= 0.99 of the nucleus mask.

Random weights call all or nothing of a patch a nucleus: the output head's bias is shifted by
the median logit of MONAI's own forward pass on the clicked patches (as
``test_bundle_fidelity._balance`` does), so that about half of each patch is foreground.

Changes to the reference, each because this machine cannot run the config as it stands or
because the config as it stands takes one click per image: the device is the CPU, the data
loader runs in-process, and for several clicks the config's ``SqueezeDimd`` (which refuses a
batch of more than one patch: "Can only squeeze singleton dimension") is replaced by MONAI's
``SplitDimd`` so that MONAI's evaluator runs the patches of all clicks as one batch (as MONAI
Label runs them) and its ``SaveImaged`` is left out (it would write every patch to the same
file name); the patches are read from the evaluator's output. A second run with one click uses
the config unchanged but for device and workers, and reads the patch MONAI's ``SaveImaged``
wrote.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import data_path
from tests.models.test_bundles import BUNDLES, _copy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BUNDLES.is_dir(), reason=f"MONAI bundle configs not at {BUNDLES}"),
]

NAME = "pathology_nuclick_annotation"
TILE = "pathology/he_tile_tcia.jpg"


def nuclei_clicks(rgb: np.ndarray, n: int = 12) -> np.ndarray:
    """``(n, 2)`` ``(row, col)`` centroids of the ``n`` largest dark hematoxylin blobs."""
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    h = rgb2hed(rgb)[..., 0]
    mask = ndimage.binary_opening(h > threshold_otsu(h), iterations=2)
    lab, k = ndimage.label(mask)
    ids = np.arange(1, k + 1)
    area = ndimage.sum_labels(np.ones_like(h), lab, ids)
    ok = ids[(area >= 30) & (area <= 2000)]
    ok = ok[np.argsort(-area[ok - 1], kind="stable")][:n]
    cent = np.asarray(ndimage.center_of_mass(np.ones_like(h), lab, ok))
    return np.floor(cent + 0.5).astype(int)


def _workflow(bundle: Path, image: Path, xy: list, out_dir: Path, **override: object) -> object:
    pytest.importorskip("ignite", reason="MONAI's bundle runner needs pytorch-ignite")
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=None,
        workflow_type="infer",
        bundle_root=str(bundle),
        output_dir=str(out_dir),
        device="$torch.device('cpu')",
        input_data=[{"image": str(image), "foreground": xy}],
        **{"dataloader#num_workers": 0, **override},
    )
    wf.initialize()
    wf.run()
    return wf


def _reference(bundle: Path, image: Path, xy: list, out_dir: Path) -> np.ndarray:
    """MONAI's run on all clicks; the patches pasted as PostFilterLabeld does, ``(row, col)``."""
    conf = json.loads((bundle / "configs" / "inference.json").read_text())
    pre = conf["preprocessing"]["transforms"]
    squeeze = [i for i, t in enumerate(pre) if t["_target_"] == "SqueezeDimd"]
    assert squeeze, "the config no longer has the SqueezeDimd this test replaces"
    keep = [t for t in conf["postprocessing"]["transforms"] if "SaveImage" not in t["_target_"]]
    split = {"_target_": "SplitDimd", "keys": "@image_key", "dim": 0, "keepdim": False}
    split["list_output"] = True
    wf = _workflow(
        bundle,
        image,
        xy,
        out_dir,
        **{f"preprocessing#transforms#{squeeze[0]}": split, "postprocessing#transforms": keep},
    )
    ev = wf.parser.get_parsed_content("evaluator")
    preds = [np.asarray(o["pred"])[0] > 0 for o in ev.state.output]
    first = ev.state.batch[0]
    boxes, width, height = first["bounding_boxes"], first["img_width"], first["img_height"]
    wf.finalize()
    assert len(preds) == len(boxes) == len(xy)
    # PostFilterLabeld.gen_instance_map with flatten=False, on MONAI's (x, y) grid
    inst = np.zeros((int(width), int(height)), dtype=np.int64)
    for i, (mask, bb) in enumerate(zip(preds, boxes)):
        part = inst[bb[0] : bb[2], bb[1] : bb[3]]
        inst[bb[0] : bb[2], bb[1] : bb[3]] = np.where(mask, i + 1, part)
    return inst.T  # (x, y) -> (row, col)


def _balance(bundle: Path, state: dict, image: Path, xy: list) -> None:
    """Shift the output bias so that about half of each clicked patch is nucleus."""
    import torch
    from monai.bundle import ConfigParser

    conf = json.loads((bundle / "configs" / "inference.json").read_text())
    conf["preprocessing"]["transforms"] = [
        t for t in conf["preprocessing"]["transforms"] if t["_target_"] != "SqueezeDimd"
    ]
    parser = ConfigParser(conf)
    parser["bundle_root"] = str(bundle)
    x = parser.get_parsed_content("preprocessing")({"image": str(image), "foreground": xy})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state)
    with torch.no_grad():
        y = net.eval()(torch.as_tensor(x["image"]).float())
    state["final_conv.bias"] -= float(y.median())


def nuclick_bundle(tmp_path: Path, image: Path | None = None, xy: list | None = None) -> Path:
    """The real NuClick config with random weights (seed 0) as ``models/model.pt``; balanced
    on ``image`` and its ``[x, y]`` clicks when given."""
    import torch

    from napari_medseg.models.loaders.bundle import load_bundle

    bundle = _copy(NAME, tmp_path)
    torch.manual_seed(0)
    state = load_bundle(bundle, weights="random").network.state_dict()
    if image is not None and xy:
        _balance(bundle, state, image, xy)
    torch.save(state, bundle / "models" / "model.pt")
    return bundle


def test_clicked_nuclei_equal_monais_own_bundle_run(tmp_path: Path) -> None:
    import tifffile
    from PIL import Image

    from napari_medseg.cli import main

    tile = np.asarray(Image.open(data_path(TILE)).convert("RGB"))[:, :328]
    image = tmp_path / "he_crop.png"
    Image.fromarray(tile).save(image)
    clicks = nuclei_clicks(tile)
    assert len(clicks) == 12, "fewer dark blobs than expected in the H&E crop"
    clicks = np.concatenate([clicks, clicks[2:3]])  # the same pixel clicked twice
    xy = [[int(c), int(r)] for r, c in clicks]  # MONAI's (x, y) = (col, row)
    bundle = nuclick_bundle(tmp_path, image, xy)

    t = time.perf_counter()
    ref = _reference(bundle, image, xy, tmp_path / "ref")
    t_ref = time.perf_counter() - t
    csv = tmp_path / "clicks.csv"
    csv.write_text("row,col\n" + "".join(f"{r},{c}\n" for r, c in clicks))
    ours_file = tmp_path / "ours.tif"
    argv = ["segment", str(image), "-m", str(bundle), "-o", str(ours_file), "--clicks", str(csv)]
    t = time.perf_counter()
    assert main([*argv, "--quiet"]) == 0  # untrusted: nothing in the config is evaluated
    t_ours = time.perf_counter() - t
    ours = tifffile.imread(tmp_path / "ours_instances.tif").astype(np.int64)
    labels = tifffile.imread(ours_file)
    assert ours.shape == ref.shape == tile.shape[:2]
    assert np.array_equal(labels > 0, ours > 0)

    n_ids = len(np.unique(ref)) - 1
    assert n_ids >= 8, f"MONAI outlined {n_ids} nuclei: too few to compare"
    assert 3 not in np.unique(ref), "the repeated click should cover click 3's nucleus"
    a, b = ref > 0, ours > 0
    fg = a | b
    same = float((ref[fg] == ours[fg]).mean())
    dice = 2 * float((a & b).sum()) / float(a.sum() + b.sum())
    print(
        f"{len(clicks)} clicks, {n_ids} ids in MONAI's map; same id on {same:.5f} of nucleus "
        f"pixels, Dice {dice:.5f}; pixels that differ: {int((ref != ours).sum())} of {ref.size} "
        f"({int(a.sum())} nucleus pixels); MONAI {t_ref:.1f} s, ours {t_ours:.1f} s"
    )
    assert 0.2 < a.mean() < 0.9, "the balanced weights should outline part of the image"
    assert same >= 0.99, f"the same nucleus id on {same:.4f} of the nucleus pixels"
    assert dice >= 0.99, f"nucleus Dice {dice:.4f} against MONAI's own run"

    table = (tmp_path / "ours_objects.csv").read_text().splitlines()
    assert table[0] == "id,row,col,area_px" and len(table) - 1 == len(clicks)
    assert table[3].split(",")[3] == "0"  # click 3, covered by the same click again
    prov = json.loads((tmp_path / "ours.tif.provenance.json").read_text())
    assert prov["clicks"] == len(clicks) and prov["instances"].endswith("ours_instances.tif")
    print("our stages (s):", prov["timings_s"])

    # one click: the config as it is (SqueezeDimd, SaveImaged), the JSON [x, y] click file
    one = [xy[0]]
    _workflow(bundle, image, one, tmp_path / "ref1")
    (saved,) = (tmp_path / "ref1").rglob("*.png")
    ref_patch = np.asarray(Image.open(saved)) > 0  # SaveImaged writes it as (row, col)
    js = tmp_path / "one.json"
    js.write_text(json.dumps(one))
    out1 = tmp_path / "one.tif"
    assert (
        main(["segment", str(image), "-m", str(bundle), "-o", str(out1), "--clicks", str(js)]) == 0
    )
    ours1 = tifffile.imread(tmp_path / "one_instances.tif")
    from napari_medseg.core.segment.nuclick import click_boxes

    x0, y0, x1, y1 = click_boxes(np.asarray(one), (tile.shape[1], tile.shape[0]), 128)[0]
    assert ours1[y0:y1, x0:x1].shape == ref_patch.shape
    differ = int(((ours1[y0:y1, x0:x1] > 0) != ref_patch).sum())
    print(f"one click, the config unchanged: {differ} of {ref_patch.size} patch pixels differ")
    assert ref_patch.sum() > 0 and differ <= 0.01 * ref_patch.sum()
    outside = np.ones(ours1.shape, dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert not ours1[outside].any()  # a nucleus lies inside its click's patch
