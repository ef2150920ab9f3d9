#!/usr/bin/env python
"""Train the built-in models with :func:`napari_medseg.training.segment.train` (segmentation) and
:func:`napari_medseg.training.detect.train_detection` (the box detector).

Usage::

    python scripts/make_builtin_datasets.py /tmp/medseg_datasets
    python scripts/train_builtin.py /tmp/medseg_datasets [--only ct_spleen_3d] [--budget 480]

Each entry of :data:`RECIPES` is one call of ``train()``; it is the same as the command line
``napari-medseg train DATASET -o napari_medseg/models/builtin/NAME`` with the listed options,
so this script can later be replaced by those CLI calls (``--task detection`` for the entries
whose extras say ``"task": "detection"``). The models are written to
``napari_medseg/models/builtin/<name>/`` (model.json + weights.safetensors, < 2 MB each).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: name -> (dataset folder, train() keyword arguments, card extras)
RECIPES: dict[str, tuple[str, dict, dict]] = {
    "ct_spleen_3d": (
        "Dataset001_SpleenCT",
        # 3 x 3 x 4 mm instead of the median 1.9 x 1.9 x 4 mm: the spleen is large, and the
        # coarser grid gives ~2x more iterations per minute on a shared CPU
        {
            "width": 8,
            "spacing": [3.0, 3.0, 4.0],
            "patch_size": [64, 64, 24],
            "batch_size": 2,
            "time_budget": 600.0,
        },
        {
            "license": "CC-BY-SA-4.0",
            "description": "Spleen in abdominal CT (3D U-Net, 3x3x4 mm). Trained in minutes "
            "on a CPU from two small CTs: a demo model, not a clinical tool.",
        },
    ),
    "mr_spinalcord_3d": (
        "Dataset002_SpinalCordMR",
        {
            "width": 8,
            "patch_size": [48, 64, 48],
            "batch_size": 2,
            "time_budget": 420.0,
            "augment": {"flip_axes": [0]},
        },  # left-right flips: the cord is symmetric
        {
            "license": "MIT",
            "description": "Spinal cord in cervical spine MRI (T1w/T2, 3D U-Net, 1 mm). Trained "
            "in minutes on a CPU from one subject: a demo model, not a clinical tool.",
        },
    ),
    "fluo_nuclei_2d": (
        "Dataset003_NucleiDSB",
        {"width": 16, "time_budget": 360.0},
        {
            "license": "BSD-3-Clause",
            "description": "Nuclei (foreground) in 2D fluorescence microscopy (U-Net). Trained in "
            "minutes on a CPU from one DSB 2018 image: a demo model.",
        },
    ),
    "fluo_nuclei_det_2d": (
        "Dataset004_NucleiDSBDetection",
        # same tiles, names and seed as fluo_nuclei_2d, so the same 3 tiles are held out
        # rotations/scaling more often than for segmentation: the box sizes are learnt from
        # ~130 nuclei only, and the held-out boxes overfit without it
        {"width": 16, "time_budget": 420.0, "augment": {"affine_p": 0.5}},
        {
            "task": "detection",
            "license": "BSD-3-Clause",
            "description": "Nuclei as boxes in 2D fluorescence microscopy (centre-heatmap U-Net "
            "with box size regression, CenterNet-style). Trained in minutes on a CPU from one "
            "DSB 2018 image: a demo model.",
        },
    ),
}


def train_one(
    name: str, datasets: Path, out_root: Path, budget: float | None = None, device: str = "auto"
) -> dict:
    import torch

    from napari_medseg.models.card import ModelCard
    from napari_medseg.training.detect import train_detection
    from napari_medseg.training.segment import train

    torch.set_num_threads(1)  # the CPU is shared: one thread is much faster than oversubscribed
    ds_name, kwargs, extras = RECIPES[name]
    if extras.get("task") == "detection":
        train = train_detection  # noqa: F811 - same call, the detector's trainer
    kwargs = dict(kwargs)
    if budget is not None:
        kwargs["time_budget"] = budget
    out = out_root / name
    t0 = time.monotonic()
    gen = train(
        datasets / ds_name, out, name=name, device=device, license=extras["license"], **kwargs
    )
    last = 0.0
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        now = time.monotonic()
        if p.info.get("phase") == "epoch" or now - last > 30:
            last = now
            print(f"[{name} {now - t0:6.1f}s] {p.message}", flush=True)
    card = ModelCard.load(out)
    card.description = extras["description"]
    card.training["dataset"]["built_by"] = "scripts/make_builtin_datasets.py from ../shared/data"
    card.training["trained_by"] = f"scripts/train_builtin.py ({name})"
    card.save(out)
    size = (out / card.weights).stat().st_size
    summary = {
        "name": name,
        "val_dice": card.metrics.get("val_dice"),
        "val_detection": card.metrics.get("val_detection"),
        "held_out": card.metrics.get("held_out"),
        "iterations": card.training["recipe"]["iterations"],
        "time_s": round(time.monotonic() - t0, 1),
        "weights_bytes": size,
    }
    print(f"[{name}] done: {summary}", flush=True)
    return {"result": result, **summary}


#: How each built-in's headline score was measured (the card's ``evaluation`` block): what was
#: held out, and how many subjects the model saw. ``napari-medseg models`` marks models trained
#: on fewer than 5 subjects as "demo".
EVALUATION: dict[str, dict] = {
    "ct_spleen_3d": {
        "split": "slices of the training subjects",
        "n_training_subjects": 2,
        "n_test_subjects": 0,
        "note": "Dice on a held-out block of 20% of the axial slices of each of the two "
        "training CTs. On an unseen subject (the TotalSegmentator DICOM CT) it scored Dice 0.0 "
        "(docs/models.md): a demo, not a spleen model.",
    },
    "mr_spinalcord_3d": {
        "split": "slices of the training subject",
        "n_training_subjects": 1,
        "n_test_subjects": 0,
        "note": "ONE subject, two contrasts (T2, T1w); Dice on a held-out 20% of the axial "
        "slices of each contrast. Never tested on another subject.",
    },
    "fluo_nuclei_2d": {
        "split": "other tiles of the training image",
        "n_training_subjects": 1,
        "n_test_subjects": 0,
        "note": "All 16 tiles come from ONE Data Science Bowl 2018 image; Dice on 3 whole tiles "
        "never sampled for training.",
    },
    "fluo_nuclei_det_2d": {
        "split": "other tiles of the training image",
        "n_training_subjects": 1,
        "n_test_subjects": 0,
        "note": "All 16 tiles come from ONE Data Science Bowl 2018 image; box F1 on 3 whole "
        "tiles (30 nuclei) never sampled for training.",
    },
    "click_refine_2d": {
        "split": "nuclei: other tiles of the training image; cord: another contrast of the "
        "training subject; spleen: an unseen subject",
        "n_training_subjects": 6,
        "n_test_subjects": 1,
        "demo": True,
        "note": "Trained on slices of about 6 subjects: one DSB image, one spinal-cord subject "
        "(T1w, and the MT pair, which may be the same subject), one TotalSegmentator CT, one "
        "TotalSegmentator MR, one pyradiomics brain tumour and one breast lesion case. Scored on "
        "3 held-out DSB tiles, the cord subject's T2 and the MSD spleen CT, which no training "
        "slice came from. Marked demo: trained in minutes, loses to the random walker on CT and "
        "MR (docs/clicks.md).",
    },
}


def write_evaluation(out_root: Path, names: list[str]) -> None:
    """Put :data:`EVALUATION` into the cards of ``names`` under ``out_root`` (no training)."""
    from napari_medseg.models.card import ModelCard

    for n in names:
        folder = out_root / n
        card = ModelCard.load(folder)
        card.evaluation = dict(EVALUATION[n])
        card.save(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", help="folder made by scripts/make_builtin_datasets.py")
    ap.add_argument(
        "--only",
        action="append",
        choices=[*sorted(RECIPES), CLICK_MODEL],
        help="train only this model (repeatable)",
    )
    ap.add_argument("--budget", type=float, default=None, help="time budget per model (s)")
    ap.add_argument("--out", default=str(REPO / "napari_medseg/models/builtin"))
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--cards-only",
        action="store_true",
        help="only (re)write the cards' evaluation blocks, no training",
    )
    args = ap.parse_args(argv)
    names = args.only or [*RECIPES, CLICK_MODEL]
    if args.cards_only:
        write_evaluation(Path(args.out), names)
        return 0
    for n in names:
        if n == CLICK_MODEL:
            train_click_refine(Path(args.out), args.budget)
            continue
        train_one(n, Path(args.datasets), Path(args.out), args.budget, args.device)
    write_evaluation(Path(args.out), names)
    return 0


# --------------------------------------------------------------------------- click model

#: The learned click-refinement model (napari_medseg.core.correct.refine, method="learned").
#: It reads the real data folder directly (../shared/data or $MEDSEG_DATA), not the datasets above.
CLICK_MODEL = "click_refine_2d"


def train_click_refine(out_root: Path, budget: float | None = None) -> dict:
    """Train ``click_refine_2d`` with :func:`napari_medseg.training.clicks.train_clicks`.

    Training slices: DSB nuclei tiles (not the three ``fluo_nuclei_2d`` holds out), the T1w
    spinal-cord volume (slices along all axes) and the MT pair, TotalSegmentator's small CT and
    MR (spleen and other organs, axial), pyradiomics lesions (see ``shared_data_cases``).
    Held out and scored: the three DSB tiles, T2 spinal-cord axial slices, MSD spleen CT slices.
    """
    import os

    import torch

    from napari_medseg.training.clicks import (
        DSB_HELD_OUT,
        shared_data_cases,
        train_clicks,
    )

    torch.set_num_threads(1)
    data = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
    train_cases, held_out = shared_data_cases(data)
    out = out_root / CLICK_MODEL
    t0 = time.monotonic()
    gen = train_clicks(
        train_cases,
        out,
        held_out=held_out,
        time_budget=420.0 if budget is None else budget,
        name=CLICK_MODEL,
        license="BSD-3-Clause (DSB, pyradiomics), MIT (spinal cord), Apache-2.0 (TotalSegmentator)",
        description="Click-guided refinement of a mask in a 2D region (U-Net on image, mask, "
        "positive and negative click maps; DeepEdit-style simulated clicks). Trained in minutes "
        "on a CPU from one nuclei image, one spinal-cord MRI and one small CT: a demo model, "
        "not a clinical tool.",
        training_info={
            "data": {
                "train": "DSB 2018 nuclei 128x128 tiles except the held-out three (MANUAL, "
                "BSD-3); spinal-cord T1w slices along all three axes (MANUAL cord mask, MIT) "
                "and the MT pair's axial slices (AUTO cord masks, MIT); TotalSegmentator small "
                "CT axial slices of the spleen and 16 other organs (AUTO, Apache-2.0); "
                "TotalSegmentator small MR, 16 organs (AUTO, Apache-2.0); pyradiomics brain "
                "tumour and breast lesion slices (MANUAL, BSD-3). Each group (nuclei, spinal "
                "cord, CT organs, MR) is sampled equally often",
                "held_out": f"DSB tiles {', '.join(DSB_HELD_OUT)} (as fluo_nuclei_2d); "
                "spinal-cord T2 contrast, every third axial slice (same subject, other "
                "contrast); MSD spleen CT (MANUAL), every other axial slice",
                "read_from": "../shared/data (see its README)",
            },
            "trained_by": f"scripts/train_builtin.py ({CLICK_MODEL})",
            "demo_grade": True,
        },
    )
    last = 0.0
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        now = time.monotonic()
        if now - last > 30:
            last = now
            print(f"[{CLICK_MODEL} {now - t0:6.1f}s] {p.message}", flush=True)
    size = (out / result.card.weights).stat().st_size
    summary = {
        "name": CLICK_MODEL,
        "held_out": result.held_out,
        "iterations": result.card.training["recipe"]["iterations"],
        "time_s": round(time.monotonic() - t0, 1),
        "weights_bytes": size,
    }
    print(f"[{CLICK_MODEL}] done: {summary}", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
