"""End to end (file in, labels file out): napari-medseg vs MONAI's standard bundle pipeline.

Both pipelines use the SAME network and weights and the same window settings (roi, overlap,
Gaussian blending, batch 4): MONAI's is LoadImaged, EnsureChannelFirstd, Orientationd(RAS),
Spacingd(bilinear), ScaleIntensityRanged, sliding_window_inference, Invertd (probabilities,
bilinear), AsDiscreted(argmax), SaveImaged (uint8) -- the reference pipeline of
``../shared/reference/anchor_monai_pipeline.py``. Ours is ``napari-medseg segment``'s path:
``read_image`` -> ``segment`` -> ``write_image``.

Input: a real CT made large enough (>= 256^3): the MSD spleen crop from ../shared/data
resampled (trilinear) to 0.5 mm isotropic, 261x264x260 voxels, int16 HU, saved as .nii.gz.

Each pipeline runs in a fresh subprocess (so peak RSS is its own), ``REPEATS`` times
alternately, with a warm-up; the median time is reported. Dice agreement compares the two
label files. Run: ``python benchmarks/bench_segment_e2e.py [--model spleen_bundle|ct_spleen_3d]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))

BUNDLE_ARCH = {
    "name": "UNet",
    "kwargs": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    },
}


def make_input(tmp: Path) -> Path:
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    img = nib.load(str(DATA / "ct/spleen/image.nii.gz"))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    zooms = np.array(img.header.get_zooms()[:3])
    new_shape = tuple(round(s * z / 0.5) for s, z in zip(arr.shape, zooms))
    big = F.interpolate(
        torch.from_numpy(arr)[None, None], size=new_shape, mode="trilinear", align_corners=True
    )[0, 0].numpy()
    aff = img.affine.copy()
    aff[:3, :3] = aff[:3, :3] / zooms * 0.5
    out = tmp / "ct_big.nii.gz"
    nib.save(nib.Nifti1Image(np.round(big).astype(np.int16), aff), str(out))
    return out


def make_model(tmp: Path, which: str) -> Path:
    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.networks import build_network, save_model
    from napari_medseg.models.registry import resolve_model

    if which == "ct_spleen_3d":
        return resolve_model("ct_spleen_3d")
    import torch

    torch.manual_seed(0)
    card = ModelCard(
        name="spleen_bundle_arch",
        dims=3,
        modality="CT",
        classes=[{"id": 0, "name": "background"}, {"id": 1, "name": "spleen"}],
        spacing=[1.5, 1.5, 2.0],
        patch_size=[96, 96, 96],
        normalization={"scheme": "ct", "window": [-57, 164]},
        architecture=BUNDLE_ARCH,
    )
    net = build_network(card)  # random weights: for timing, not for Dice agreement
    return save_model(tmp / "spleen_bundle_arch", card, net)


def run_ours(image: str, model: str, out: str) -> dict:
    from napari_medseg.core.segment.segment import segment
    from napari_medseg.io import ImageRecord, read_image, write_image
    from napari_medseg.models.registry import load_model
    from napari_medseg.progress import run_sync

    m = load_model(model)
    t0 = time.perf_counter()
    rec = read_image(image)[0]
    res = run_sync(segment(rec, m, device="cpu", overlap=0.5, batch_size=4))
    lab = ImageRecord(data=res.labels, affine=rec.affine, modality="label", metadata=rec.metadata)
    write_image(out, lab, is_label=True)
    return {"seconds": time.perf_counter() - t0}


def run_monai(image: str, model: str, out: str) -> dict:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from napari_medseg.models.registry import load_model

    m = load_model(model)
    card, net = m.card, m.network.eval()
    lo, hi = card.normalization["window"]
    outdir = str(Path(out).parent)
    pre = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", "RAS"),
            Spacingd("image", card.spacing, mode="bilinear"),
            ScaleIntensityRanged("image", lo, hi, 0.0, 1.0, clip=True),
            EnsureTyped("image"),
        ]
    )
    post = Compose(
        [
            Invertd("pred", pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted("pred", argmax=True),
            SaveImaged(
                "pred",
                output_dir=outdir,
                output_postfix="monai",
                separate_folder=False,
                output_dtype=np.uint8,
                resample=False,
            ),
        ]
    )
    t0 = time.perf_counter()
    d = pre({"image": image})
    with torch.no_grad():
        y = sliding_window_inference(
            d["image"][None], tuple(card.patch_size), 4, net, overlap=0.5, mode="gaussian"
        )
    d["pred"] = torch.softmax(y[0].float(), 0)
    post(d)
    return {"seconds": time.perf_counter() - t0}


def _child(kind: str, image: str, model: str, out: str) -> None:
    fn = run_ours if kind == "ours" else run_monai
    r = fn(image, model, out)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(r))


def _spawn(kind: str, image: Path, model: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(image), str(model), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Foreground (non-zero) Dice of two label images (1.0 when both are empty)."""
    from napari_medseg.core.engine.metrics import dice as overlap

    return overlap(a > 0, b > 0, [1], empty=1.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ct_spleen_3d", choices=["ct_spleen_3d", "spleen_bundle"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(*a.child)
        return 0
    import nibabel as nib
    import torch

    tmp = Path(tempfile.mkdtemp())
    image = make_input(tmp)
    model = make_model(tmp, a.model)
    shape = nib.load(str(image)).shape
    ours_out, monai_out = tmp / "ours_seg.nii.gz", tmp / "ct_big_monai.nii.gz"
    _spawn("ours", image, model, ours_out)  # warm-up (file cache, torch kernels)
    res: dict[str, list] = {"ours": [], "monai": []}
    for _ in range(a.repeats):
        res["monai"].append(_spawn("monai", image, model, monai_out))
        res["ours"].append(_spawn("ours", image, model, ours_out))
    t = {k: statistics.median(r["seconds"] for r in v) for k, v in res.items()}
    mem = {k: max(r["peak_rss_mb"] for r in v) for k, v in res.items()}
    A = np.asarray(nib.load(str(ours_out)).dataobj)
    B = np.asarray(nib.load(str(monai_out)).dataobj).reshape(A.shape)
    same_geom = np.allclose(nib.load(str(ours_out)).affine, nib.load(str(image)).affine, atol=1e-4)
    print(
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model {a.model}; input {shape} int16 .nii.gz"
    )
    print("| pipeline | median time (s) | peak RSS (MB) |")
    print("|---|---|---|")
    print(f"| MONAI bundle pipeline | {t['monai']:.2f} | {mem['monai']:.0f} |")
    print(f"| napari-medseg | {t['ours']:.2f} | {mem['ours']:.0f} |")
    print(
        f"speed-up {t['monai'] / t['ours']:.2f}x, memory ratio {mem['ours'] / mem['monai']:.2f}, "
        f"Dice agreement {dice(A, B):.4f} (foreground voxels ours {int((A > 0).sum())}, "
        f"MONAI {int((B > 0).sum())}), output on the input grid: {same_geom}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
