"""Denoising quality and time: every method in the same run, on real data with a clean reference.

Run: ``python benchmarks/bench_denoise.py [--budgets 30 60 120] [--threads N] [--json OUT]``
(needs ../shared/data or ``$MEDSEG_DATA``).

Cases
-----
* ``fmri``: ``denoising/fmri_30frames.nii.gz`` (68x68x6 voxels x 30 frames, int16). The noisy
  input is frame 0; the reference is the mean of the *other* 29 frames (its noise is ~5x lower
  and independent of frame 0's; including frame 0 would favour methods that return the input).
  Scored inside the head (reference above 10% of its maximum). N2V methods are trained on the
  frame alone (6 slices of 68x68, slice by slice: the slices are 17 mm thick), and once more on
  all 30 frames (``--axis 3`` in the CLI), which is how a user would denoise an fMRI run.
* ``dsb``: ``microscopy/dsb2018_nuclei/image.tif`` (512x512) as the clean reference, with
  Poisson-Gaussian noise added (fixed seed): intensities scaled to a peak of ``PEAK`` photons,
  Poisson sampled, plus Gaussian read noise of ``READ`` times the peak, scaled back.

PSNR uses the reference's (max - min) as the peak; SSIM is
:func:`skimage.metrics.structural_similarity` with the same data range. Times are wall-clock
seconds for the whole ``denoise`` call (training + prediction for N2V methods).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
PEAK = 10.0  # photons at the brightest pixel
READ = 0.05  # Gaussian read noise, fraction of the peak
CLASSICAL = ("nlmeans", "tv", "bilateral", "wavelet")


def _scores(ref: np.ndarray, img: np.ndarray, mask: np.ndarray | None = None) -> tuple:
    from skimage.metrics import structural_similarity

    from napari_medseg.core.denoise.classical import psnr

    ref = np.asarray(ref, dtype=np.float64)
    img = np.asarray(img, dtype=np.float64)
    rng = float(ref.max() - ref.min())
    if mask is not None:
        p = psnr(ref[mask], img[mask], data_range=rng)
    else:
        p = psnr(ref, img, data_range=rng)
    if ref.ndim == 3:  # thick slices: SSIM per slice (2D windows), averaged
        s = float(
            np.mean(
                [
                    structural_similarity(ref[..., k], img[..., k], data_range=rng)
                    for k in range(ref.shape[-1])
                ]
            )
        )
    else:
        s = float(structural_similarity(ref, img, data_range=rng))
    return round(p, 2), round(s, 4)


def _run(record, method: str, **kw) -> tuple[np.ndarray, float, dict]:
    from napari_medseg.core.denoise.denoising import denoise
    from napari_medseg.progress import run_sync

    t = time.perf_counter()
    res = run_sync(denoise(record, method, device="cpu", **kw))
    secs = time.perf_counter() - t
    info = {}
    if res.model is not None:
        info = {
            "steps": res.model.training.get("steps"),
            "final_loss": res.model.training.get("final_loss"),
        }
    return res.data, secs, info


def _case_rows(name, record, ref, mask, budgets, extra_runs=()) -> list[dict]:
    rows = []
    inp = np.asarray(record.data)
    p, s = _scores(ref, inp, mask)
    rows.append({"case": name, "method": "noisy input", "psnr": p, "ssim": s, "seconds": 0.0})
    print(f"{name:5s} {'noisy input':24s} PSNR {p:6.2f}  SSIM {s:.4f}", flush=True)
    for m in CLASSICAL:
        out, secs, _ = _run(record, m)
        p, s = _scores(ref, out, mask)
        rows.append({"case": name, "method": m, "psnr": p, "ssim": s, "seconds": round(secs, 2)})
        print(f"{name:5s} {m:24s} PSNR {p:6.2f}  SSIM {s:.4f}  {secs:6.1f} s", flush=True)
    for b in budgets:
        for m in ("n2v2", "n2v"):
            out, secs, info = _run(record, m, time_budget=b)
            p, s = _scores(ref, out, mask)
            label = f"{m} {b:g} s"
            rows.append(
                {
                    "case": name,
                    "method": label,
                    "psnr": p,
                    "ssim": s,
                    "seconds": round(secs, 2),
                    **info,
                }
            )
            print(
                f"{name:5s} {label:24s} PSNR {p:6.2f}  SSIM {s:.4f}  {secs:6.1f} s "
                f"({info.get('steps')} steps)",
                flush=True,
            )
    for label, fn in extra_runs:
        out, secs, info = fn()
        p, s = _scores(ref, out, mask)
        rows.append(
            {"case": name, "method": label, "psnr": p, "ssim": s, "seconds": round(secs, 2), **info}
        )
        print(
            f"{name:5s} {label:24s} PSNR {p:6.2f}  SSIM {s:.4f}  {secs:6.1f} s "
            f"({info.get('steps')} steps)",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[30.0, 60.0, 120.0])
    ap.add_argument(
        "--fmri-budget", type=float, default=30.0, help="N2V budget (s) on the small fMRI frame"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--cases", nargs="+", default=["fmri", "dsb"])
    args = ap.parse_args(argv)

    import torch

    from napari_medseg.io import read_image
    from napari_medseg.io.record import ImageRecord

    if args.threads:
        torch.set_num_threads(args.threads)
    fmri_path = DATA / "denoising/fmri_30frames.nii.gz"
    dsb_path = DATA / "microscopy/dsb2018_nuclei/image.tif"
    if not fmri_path.exists() or not dsb_path.exists():
        print(f"data not found under {DATA} (set MEDSEG_DATA)", file=sys.stderr)
        return 1
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)",
        flush=True,
    )
    rows: list[dict] = []
    if "fmri" in args.cases:
        rec4 = read_image(fmri_path)[0]
        vol = np.asarray(rec4.data)
        frame0 = ImageRecord(
            data=vol[..., 0], affine=rec4.affine, space="RAS", modality="MR", name="frame0"
        )
        ref = vol[..., 1:].astype(np.float64).mean(axis=-1)
        mask = ref > 0.1 * ref.max()

        def all_frames(method: str, **kw):
            def go():
                from napari_medseg.core.denoise.denoising import denoise
                from napari_medseg.progress import run_sync

                t = time.perf_counter()
                res = run_sync(
                    denoise(rec4, method, axis=3, time_budget=args.fmri_budget, device="cpu", **kw)
                )
                info = {"steps": res.model.training.get("steps")}
                return res.data[..., 0], time.perf_counter() - t, info

            return go

        rows += _case_rows(
            "fmri",
            frame0,
            ref,
            mask,
            [args.fmri_budget],
            extra_runs=[
                (f"n2v2 {args.fmri_budget:g} s, 30 frames", all_frames("n2v2")),
                (
                    f"n2v2 {args.fmri_budget:g} s, 30 frames, blind radius 1",
                    all_frames("n2v2", blind_radius=1),
                ),
            ],
        )
    if "dsb" in args.cases:
        clean = np.asarray(read_image(dsb_path)[0].data, dtype=np.float64)
        top = clean.max()
        rs = np.random.default_rng(0)
        noisy = rs.poisson(clean / top * PEAK) / PEAK + rs.normal(0.0, READ, clean.shape)
        noisy = (noisy * top).astype(np.float32)
        rec = ImageRecord(
            data=noisy, affine=np.eye(3), space="pixel", modality="microscopy", name="dsb_noisy"
        )
        rows += _case_rows("dsb", rec, clean, None, args.budgets)
    # summary: best classical vs N2V per case
    for case in sorted({r["case"] for r in rows}):
        rs_ = [r for r in rows if r["case"] == case]
        best_c = max((r for r in rs_ if r["method"] in CLASSICAL), key=lambda r: r["psnr"])
        for r in rs_:
            if r["method"].startswith("n2v"):
                gain = r["psnr"] - best_c["psnr"]
                print(
                    f"{case}: {r['method']:24s} {gain:+.2f} dB vs best classical "
                    f"({best_c['method']} {best_c['psnr']:.2f} dB)"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
