"""Registration quality and speed on the real pairs in ../shared/data (see docs/registration.md).

Each pair is scored before registration (identity: the images as they lie in world space),
after affine-only and after deformable registration, in the same run, and against a SimpleITK
baseline (affine, then B-spline) where it is cheap:

* lung masks (ITKElastix example): mean target registration error (TRE) of the 51 paired
  landmarks (ITK landmark files are LPS; converted to RAS) and mask Dice;
* mt pair (two MR contrasts of one subject): cord-mask Dice;
* MNI152 template (nilearn) -> brain_t1_aseg (160x192x224): grey/white-matter Dice of the
  template's tissue maps against FreeSurfer's aseg; 3D and on 2D axial slices.

Run: ``python benchmarks/bench_registration.py [--pairs lung,mt,brain,brain2d] [--threads N]
[--device cpu|cuda] [--no-sitk]``. Prints one line per method and a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))

from napari_medseg.core.engine.metrics import dice  # noqa: E402
from napari_medseg.core.register.optimise import RegistrationOptions, register  # noqa: E402
from napari_medseg.core.register.transform import RegistrationTransform  # noqa: E402
from napari_medseg.core.register.transform_io import read_itk_landmarks  # noqa: E402
from napari_medseg.core.register.warp import warp  # noqa: E402
from napari_medseg.io import read_image  # noqa: E402
from napari_medseg.io.record import ImageRecord  # noqa: E402
from napari_medseg.progress import run_sync  # noqa: E402

ROWS: list[dict] = []

# FreeSurfer aseg: cerebral/cerebellar cortex + deep grey nuclei; cerebral/cerebellar white matter
GM_LABELS = [3, 42, 8, 47, 10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58]
WM_LABELS = [2, 41, 7, 46]


def _row(pair: str, method: str, secs: float, **scores: float) -> None:
    ROWS.append({"pair": pair, "method": method, "seconds": secs, **scores})
    txt = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    print(f"{pair:10s} {method:28s} {secs:7.1f} s  {txt}", flush=True)


def _run(fixed, moving, device, **kw):
    opts = RegistrationOptions(device=device, **{k: v for k, v in kw.items() if k != "labels"})
    t0 = time.perf_counter()
    res = run_sync(register(fixed, moving, opts, moving_labels=kw.get("labels")))
    return res, time.perf_counter() - t0


def _sitk_image(rec: ImageRecord):
    import SimpleITK as sitk

    from napari_medseg.io.geometry import itk_from_affine

    img = sitk.GetImageFromArray(np.asarray(rec.data, np.float32).transpose(2, 1, 0).copy())
    o, s, d = itk_from_affine(rec.affine)
    img.SetOrigin(o)
    img.SetSpacing(s)
    img.SetDirection(d)
    return img


def _sitk_register(fixed: ImageRecord, moving: ImageRecord, deformable: bool, metric: str):
    """SimpleITK baseline: centred affine (multi-resolution), then a B-spline on top."""
    import SimpleITK as sitk

    f, m = _sitk_image(fixed), _sitk_image(moving)
    init = sitk.CenteredTransformInitializer(
        f, m, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )

    def method():
        r = sitk.ImageRegistrationMethod()
        if metric == "ms":
            r.SetMetricAsMeanSquares()
        else:
            r.SetMetricAsANTSNeighborhoodCorrelation(2)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(0.1, 1)
        r.SetInterpolator(sitk.sitkLinear)
        r.SetShrinkFactorsPerLevel([4, 2, 1])
        r.SetSmoothingSigmasPerLevel([2, 1, 0])
        r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        return r

    r = method()
    r.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 100)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetInitialTransform(init, inPlace=True)
    r.Execute(f, m)
    if not deformable:
        return init
    mesh = [max(2, int(s * sp / 40.0)) for s, sp in zip(f.GetSize(), f.GetSpacing())]
    bs = sitk.BSplineTransformInitializer(f, mesh)
    r = method()
    r.SetOptimizerAsLBFGSB(1e-5, 5, 100, 1000, 1e-7, 50)
    r.SetMovingInitialTransform(init)
    r.SetInitialTransform(bs, inPlace=True)
    r.Execute(f, m)
    return sitk.CompositeTransform([init, bs])


def _sitk_points(tfm, ras: np.ndarray) -> np.ndarray:
    lps = np.array([-1.0, -1.0, 1.0])
    return np.array([tfm.TransformPoint(tuple(p * lps)) for p in ras]) * lps


def _sitk_warp_labels(tfm, fixed: ImageRecord, labels: ImageRecord) -> np.ndarray:
    import SimpleITK as sitk

    out = sitk.Resample(_sitk_image(labels), _sitk_image(fixed), tfm, sitk.sitkNearestNeighbor, 0.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0).astype(np.int32)


# ------------------------------------------------------------------------------ pairs


def bench_lung(device: str, sitk_too: bool) -> None:
    d = DATA / "registration/lung_masks/CT_3D_lung_"
    fixed = read_image(str(d) + "fixed_mask.mha")[0]
    moving = read_image(str(d) + "moving_mask.mha")[0]
    fp = read_itk_landmarks(str(d) + "fixed_point_set_corrected.txt")
    mp = read_itk_landmarks(str(d) + "moving_point_set_corrected.txt")
    fm = np.asarray(fixed.data)
    ident = RegistrationTransform(np.eye(4), fixed.affine, fixed.shape)
    _row(
        "lung",
        "identity (before)",
        0.0,
        tre_mm=float(np.linalg.norm(fp - mp, axis=1).mean()),
        dice=dice(fm, warp(ident, moving, "nearest")),
    )
    for mode in ("affine", "deformable"):
        res, secs = _run(fixed, moving, device, mode=mode, labels=moving)
        tre = np.linalg.norm(res.transform.map_points(fp) - mp, axis=1)
        extra = {"folding_pct": 100 * res.folding_fraction} if mode == "deformable" else {}
        _row(
            "lung",
            f"medseg {mode}",
            secs,
            tre_mm=float(tre.mean()),
            dice=dice(fm, res.warped_labels),
            **extra,
        )
    if sitk_too:
        for deformable in (False, True):
            t0 = time.perf_counter()
            tfm = _sitk_register(fixed, moving, deformable, "ms")
            secs = time.perf_counter() - t0
            tre = np.linalg.norm(_sitk_points(tfm, fp) - mp, axis=1)
            _row(
                "lung",
                "SimpleITK " + ("affine+BSpline" if deformable else "affine"),
                secs,
                tre_mm=float(tre.mean()),
                dice=dice(fm, _sitk_warp_labels(tfm, fixed, moving)),
            )


def bench_mt(device: str, sitk_too: bool) -> None:
    d = DATA / "registration/mt_pair"
    fixed, moving = read_image(d / "mt0.nii.gz")[0], read_image(d / "mt1.nii.gz")[0]
    fseg, mseg = read_image(d / "mt0_seg.nii.gz")[0], read_image(d / "mt1_seg.nii.gz")[0]
    fs = np.asarray(fseg.data)
    ident = RegistrationTransform(np.eye(4), fixed.affine, fixed.shape)
    _row("mt", "identity (before)", 0.0, dice=dice(fs, warp(ident, mseg, "nearest")))
    for mode in ("affine", "deformable"):
        res, secs = _run(fixed, moving, device, mode=mode, labels=mseg)
        extra = {"folding_pct": 100 * res.folding_fraction} if mode == "deformable" else {}
        _row("mt", f"medseg {mode}", secs, dice=dice(fs, res.warped_labels), **extra)
    if sitk_too:
        for deformable in (False, True):
            t0 = time.perf_counter()
            try:
                tfm = _sitk_register(fixed, moving, deformable, "cc")
            except RuntimeError as e:  # too few slices for its pyramid
                print(f"mt SimpleITK failed: {str(e).splitlines()[-1][:120]}")
                continue
            secs = time.perf_counter() - t0
            _row(
                "mt",
                "SimpleITK " + ("affine+BSpline" if deformable else "affine"),
                secs,
                dice=dice(fs, _sitk_warp_labels(tfm, fixed, mseg)),
            )


def _mni() -> tuple[ImageRecord, ImageRecord]:
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
    lab = np.zeros(gm.shape, np.int16)
    lab[(gm >= 0.5) & (gm >= wm)] = 1
    lab[(wm >= 0.5) & (wm > gm)] = 2
    img = ImageRecord(
        np.asarray(t1.get_fdata(), np.float32), t1.affine, modality="MR", name="MNI152"
    )
    return img, ImageRecord(lab, t1.affine, modality="label", name="MNI152_tissue")


def _tissue(aseg: np.ndarray) -> np.ndarray:
    out = np.zeros(aseg.shape, np.int16)
    out[np.isin(aseg, GM_LABELS)] = 1
    out[np.isin(aseg, WM_LABELS)] = 2
    return out


def _lia_affine(shape: tuple) -> np.ndarray:
    """t1.nii.gz stores an identity affine, but its axes are FreeSurfer's conformed LIA (axis 0
    towards the left, axis 1 superior -> inferior, axis 2 posterior -> anterior; checked by
    eye on the middle slices). Give it that orientation, centred on the world origin, so that
    world-space registration with the MNI template starts from a sensible place."""
    aff = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1.0]])
    c = (np.array(shape) - 1) / 2
    aff[:3, 3] = -aff[:3, :3] @ c
    return aff


def _subject() -> tuple[ImageRecord, np.ndarray]:
    d = DATA / "mri/brain_t1_aseg"
    rec = read_image(d / "t1.nii.gz")[0]
    arr = np.asarray(rec.data, np.float32)
    fixed = ImageRecord(arr, _lia_affine(arr.shape), modality="MR", name="t1")
    return fixed, _tissue(np.asarray(read_image(d / "aseg.nii.gz")[0].data))


def bench_brain(device: str, sitk_too: bool) -> None:
    fixed, truth = _subject()
    moving, tissue = _mni()
    ident = RegistrationTransform(np.eye(4), fixed.affine, fixed.shape)
    w = warp(ident, tissue, "nearest")
    _row(
        "brain", "identity (before)", 0.0, gm_dice=dice(truth, w, [1]), wm_dice=dice(truth, w, [2])
    )
    for mode in ("affine", "deformable"):
        res, secs = _run(fixed, moving, device, mode=mode, labels=tissue, init="com")
        extra = {"folding_pct": 100 * res.folding_fraction} if mode == "deformable" else {}
        _row(
            "brain",
            f"medseg {mode}",
            secs,
            gm_dice=dice(truth, res.warped_labels, [1]),
            wm_dice=dice(truth, res.warped_labels, [2]),
            **extra,
        )


def bench_brain2d(device: str) -> None:
    """Axial slice of the subject vs the corresponding slice of the affinely aligned template."""
    fixed3, truth3 = _subject()
    moving3, tissue3 = _mni()
    # bring the template onto the subject's grid with a 3D affine first, then register slices
    res, _ = _run(fixed3, moving3, device, mode="affine", labels=tissue3, init="com")
    for k in (100, 120):
        f2 = ImageRecord(fixed3.data[:, :, k], np.eye(3), space="pixel", modality="MR")
        m2 = ImageRecord(res.warped[:, :, k], np.eye(3), space="pixel", modality="MR")
        l2 = ImageRecord(res.warped_labels[:, :, k], np.eye(3), space="pixel", modality="label")
        t2 = truth3[:, :, k]
        _row(
            f"brain2d z{k}",
            "affine-3D slice (before)",
            0.0,
            gm_dice=dice(t2, l2.data, [1]),
            wm_dice=dice(t2, l2.data, [2]),
        )
        r2, secs = _run(f2, m2, device, mode="deformable", labels=l2)
        _row(
            f"brain2d z{k}",
            "medseg deformable 2D",
            secs,
            gm_dice=dice(t2, r2.warped_labels, [1]),
            wm_dice=dice(t2, r2.warped_labels, [2]),
            folding_pct=100 * r2.folding_fraction,
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="lung,mt,brain,brain2d")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-sitk", action="store_true")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if not DATA.exists():
        print(f"no data under {DATA}; set MEDSEG_DATA")
        return 1
    pairs = args.pairs.split(",")
    t0 = time.perf_counter()
    if "lung" in pairs:
        bench_lung(args.device, not args.no_sitk)
    if "mt" in pairs:
        bench_mt(args.device, not args.no_sitk)
    if "brain" in pairs:
        bench_brain(args.device, False)
    if "brain2d" in pairs:
        bench_brain2d(args.device)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s\n")
    keys = []
    for r in ROWS:
        keys += [k for k in r if k not in keys and k not in ("pair", "method", "seconds")]
    print("| pair | method | " + " | ".join(keys) + " | seconds |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    for r in ROWS:
        vals = [f"{r[k]:.3f}" if k in r else "" for k in keys]
        print(f"| {r['pair']} | {r['method']} | " + " | ".join(vals) + f" | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
