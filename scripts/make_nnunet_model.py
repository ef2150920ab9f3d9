"""Build real nnU-Net v2 trained-model folders with nnunetv2's own code, for tests and benchmarks.

From a real CT or MR volume with labels in ``../shared/data`` this script

1. writes a small nnU-Net raw dataset (``DatasetXXX_Name/imagesTr``, ``labelsTr``,
   ``dataset.json``): the volume, its left-right mirror and a crop, with a few merged classes;
2. runs nnunetv2's ``extract_fingerprints``, ``plan_experiments`` (``-gpu_memory_target`` small,
   optionally ``-overwrite_target_spacing``) and ``preprocess``;
3. makes the network CPU-sized by lowering ``features_per_stage`` in ``plans.json`` (a custom
   plans file, as nnU-Net's residual-encoder presets are), then preprocesses;
4. for each requested configuration and fold, builds nnunetv2's own ``nnUNetTrainer`` (fixed
   seed per fold, CPU), which initialises the network, and saves ``checkpoint_final.pth`` with
   the trainer's ``save_checkpoint`` (``--iterations N`` trains N iterations first; on 2 shared
   CPU cores 20 iterations took 1-5 minutes per fold and did not yet learn the classes).

The result is ``OUT/nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__CONFIG/`` exactly as
``nnUNetv2_train`` writes it. nnunetv2 reads its ``nnUNet_raw``/``nnUNet_preprocessed``/
``nnUNet_results`` environment variables at import time, so this script sets them and then
imports nnunetv2; call it as a separate process::

    python scripts/make_nnunet_model.py --kind ct --configs 3d_fullres 2d --folds 0 1 -o DIR

It prints one JSON line ``{"CONFIG": "model folder", ...}``. Requires ``nnunetv2`` (installed
by ``scripts/install.sh`` for tests and benchmarks only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

#: kind -> (dataset id, name, image, labels, channel names, {class name: [source label ids]});
#: a second channel name makes a two-channel dataset whose channel 1 is the image smoothed
#: (nnU-Net picks the normalisation from the name: "rescale_to_0_1" -> RescaleTo01Normalization)
DATASETS = {
    "ct": (
        901,
        "MedsegCT",
        "ct/totalseg_small/ct.nii.gz",
        "ct/totalseg_small/seg.nii.gz",
        ("CT",),
        {"spleen": [1], "kidneys": [2, 3], "liver": [5], "colon": [20], "back_muscles": [86, 87]},
    ),
    "mr": (
        902,
        "MedsegMR",
        "ct/totalseg_small/mr.nii.gz",
        "ct/totalseg_small/seg_mr.nii.gz",
        ("MRI", "rescale_to_0_1"),
        {"spleen": [1], "kidneys": [2, 3], "liver": [5], "stomach": [6], "back_muscles": [46, 47]},
    ),
    "brain": (
        903,
        "MedsegBrain",
        "mri/brain_t1_aseg/t1.nii.gz",
        "mri/brain_t1_aseg/aseg.nii.gz",
        ("T1",),
        {"white_matter": [2, 41], "cortex": [3, 42], "ventricles": [4, 43], "cerebellum": [8, 47]},
    ),
}


def write_dataset(kind: str, raw: Path) -> tuple[int, str]:
    """Write ``raw/DatasetXXX_Name`` (3 cases) and return (dataset id, folder name)."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import gaussian_filter

    did, name, img_rel, seg_rel, channels, classes = DATASETS[kind]
    folder = raw / f"Dataset{did:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    img = nib.load(str(DATA / img_rel))
    seg = nib.load(str(DATA / seg_rel))
    image = np.asarray(img.dataobj).astype(np.float32)
    src = np.asarray(seg.dataobj).astype(np.int32)
    labels = np.zeros(src.shape, np.uint8)
    for k, ids in enumerate(classes.values(), start=1):
        labels[np.isin(src, ids)] = k
    n = image.shape[0]
    cases = {
        "case_000": (image, labels),
        "case_001": (image[::-1].copy(), labels[::-1].copy()),
        "case_002": (image[n // 8 :], labels[n // 8 :]),
    }
    hdr = img.header.copy()
    hdr.set_data_dtype(np.float32)
    for cid, (im, lb) in cases.items():
        for c in range(len(channels)):
            arr = im if c == 0 else gaussian_filter(im, 1.0)
            path = folder / "imagesTr" / f"{cid}_{c:04d}.nii.gz"
            nib.save(nib.Nifti1Image(arr, img.affine, hdr), str(path))
        lhdr = seg.header.copy()
        lhdr.set_data_dtype(np.uint8)
        nib.save(nib.Nifti1Image(lb, seg.affine, lhdr), str(folder / "labelsTr" / f"{cid}.nii.gz"))
    dataset = {
        "channel_names": {str(c): n for c, n in enumerate(channels)},
        "labels": {"background": 0, **{c: k for k, c in enumerate(classes, start=1)}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": name,
        "description": f"napari-medseg test dataset from ../shared/data/{img_rel}",
        "licence": "Apache-2.0" if "totalseg" in img_rel else "Apache-2.0 (voxelmorph test scan)",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return did, folder.name


def shrink_plans(plans_file: Path, base: int, max_features: int) -> None:
    """CPU-sized network: features_per_stage = min(base * 2**i, max_features)."""
    plans = json.loads(plans_file.read_text())
    for cfg in plans["configurations"].values():
        arch = cfg.get("architecture")
        if not arch:
            continue
        kw = arch["arch_kwargs"]
        kw["features_per_stage"] = [
            min(base * 2**i, max_features) for i in range(len(kw["features_per_stage"]))
        ]
    plans_file.write_text(json.dumps(plans, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(DATASETS), required=True)
    ap.add_argument("--configs", nargs="+", default=["3d_fullres"])
    ap.add_argument("--folds", nargs="+", type=int, default=[0])
    ap.add_argument("-o", "--out", required=True, help="working folder (nnUNet_raw/... inside)")
    ap.add_argument(
        "--iterations",
        type=int,
        default=0,
        help="training iterations per fold (0: nnU-Net's random initialisation only)",
    )
    ap.add_argument("--gpu-memory-target", type=float, default=0.5, help="GB, for the planner")
    ap.add_argument(
        "--target-spacing",
        nargs=3,
        type=float,
        default=None,
        help="nnU-Net's -overwrite_target_spacing (3d_fullres), nnU-Net axis order",
    )
    ap.add_argument("--features", type=int, default=4, help="features of the first stage")
    ap.add_argument("--max-features", type=int, default=32)
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    for var, sub in (
        ("nnUNet_raw", "raw"),
        ("nnUNet_preprocessed", "preprocessed"),
        ("nnUNet_results", "results"),
    ):
        os.environ[var] = str(out / sub)
        (out / sub).mkdir(parents=True, exist_ok=True)
    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner sets torch threads from it
    os.environ.setdefault("nnUNet_compile", "false")

    import numpy as np
    import torch

    did, dname = write_dataset(args.kind, out / "raw")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    t0 = time.perf_counter()
    extract_fingerprints([did], num_processes=1, check_dataset_integrity=True)
    plan_experiments(
        [did],
        gpu_memory_target_in_gb=args.gpu_memory_target,
        overwrite_target_spacing=args.target_spacing,
    )
    pre = out / "preprocessed" / dname
    shrink_plans(pre / "nnUNetPlans.json", args.features, args.max_features)
    preprocess([did], configurations=args.configs, num_processes=[1] * len(args.configs))
    cases = sorted(p.name.split(".")[0] for p in (out / "raw" / dname / "labelsTr").iterdir())
    # fold k validates on case k (the default 5-fold split needs 5 cases)
    splits = [
        {"train": [c for c in cases if c != cases[k % len(cases)]], "val": [cases[k % len(cases)]]}
        for k in range(max(args.folds) + 1)
    ]
    (pre / "splits_final.json").write_text(json.dumps(splits, indent=2))

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    os.environ["nnUNet_n_proc_DA"] = "0"  # in-process augmentation: reproducible, CPU-friendly

    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    folders = {}
    for cfg in args.configs:
        for fold in args.folds:
            torch.manual_seed(1234 + fold)
            np.random.seed(1234 + fold)  # noqa: NPY002 - nnU-Net draws from the global RNG
            plans_here = dict(
                plans, continue_training=False
            )  # as nnunetv2's run_training passes it
            trainer = nnUNetTrainer(plans_here, cfg, fold, dataset_json, device=torch.device("cpu"))
            if args.iterations > 0:
                trainer.num_epochs = 1
                trainer.num_iterations_per_epoch = args.iterations
                trainer.num_val_iterations_per_epoch = 1
                trainer.run_training()
            else:  # nnU-Net's own initialisation (fixed seed), saved as nnUNetv2_train saves it
                trainer.initialize()
                trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
                os.makedirs(trainer.output_folder, exist_ok=True)
                trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
                from batchgenerators.utilities.file_and_folder_operations import save_json

                save_json(
                    plans, os.path.join(trainer.output_folder_base, "plans.json"), sort_keys=False
                )
                save_json(dataset_json, os.path.join(trainer.output_folder_base, "dataset.json"))
            folders[cfg] = str(Path(trainer.output_folder_base))
    print(json.dumps({**folders, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
