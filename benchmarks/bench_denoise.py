"""Denoising quality and time: every method x every case with a clean reference, in one run.

Run: ``python benchmarks/bench_denoise.py [--budget 90 | --steps 1000] [--threads N] [--json OUT]``
(needs ../shared/data or ``$MEDSEG_DATA``; BM3D rows need ``pip install bm3d``).

Cases
-----
* ``w2s``: ``denoising/real_pairs/w2s_010_0_noisy.tif`` (512x512, one real single-exposure
  fluorescence frame, 0-255) against the mean of 400 exposures of the same field.
* ``fmd``: ``denoising/real_pairs/fmd_R1_noisy.png`` (8-bit) against the mean of 50.
* ``fmri``: ``denoising/fmri_30frames.nii.gz`` (68x68x6 voxels x 30 frames, int16): frame 0
  against the mean of the *other* 29 frames, scored inside the head (reference above 10% of
  its maximum). ``auto`` runs on frame 0 alone and on all 30 frames (``--axis 3``).
* ``dsb``: ``microscopy/dsb2018_nuclei/image.tif`` (512x512) as the clean reference with
  simulated Poisson-Gaussian noise (a peak of ``PEAK`` photons, read noise ``READ`` x peak).

Scores
------
PSNR with the 8-bit range (255) for the real pairs, the reference's max - min otherwise, and
PSNR after a least-squares affine fit of the output to the reference ("fitted", as CARE,
Weigert et al. 2018, report real-pair results): the W2S noisy frame is on a different
intensity scale from its 400-frame mean (``noisy ~ 0.66 mean + 10.5``), so the raw PSNR of
*any* denoiser that keeps the image's intensities is capped at 22.7 dB there; the fitted PSNR
removes that, for every method alike. SSIM (:func:`skimage.metrics.structural_similarity`,
per slice for volumes) on the raw output. Times are wall-clock seconds for the whole call.

Reference rows that are not shipped methods: ``gaussian 1.5 px, raw`` (the issue's baseline: a
Gaussian on the raw intensities), ``gaussian oracle`` (the best width in 0.5-3 px, chosen
*with the ground truth*: an upper bound for linear smoothing), ``bm3d + vst`` (the BM3D
package with our variance-stabilising transform and its unbiased inverse; not a dependency:
its licence is non-commercial).
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

from napari_medseg.core.denoise.classical import CALIBRATED
from napari_medseg.core.denoise.classical import CLASSICAL_METHODS as CLASSICAL

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
PEAK = 10.0  # photons at the brightest pixel
READ = 0.05  # Gaussian read noise, fraction of the peak


def fit_affine(ref: np.ndarray, img: np.ndarray) -> np.ndarray:
    a = np.stack([img.ravel(), np.ones(img.size)], axis=1)
    (s, o), *_ = np.linalg.lstsq(a, ref.ravel(), rcond=None)
    return (s * img + o).reshape(img.shape)


def start(threads: int | None) -> bool:
    """Set torch's threads, check the data is there, print the machine; False without data."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if not (DATA / "denoising").is_dir():
        print(f"data not found under {DATA} (set MEDSEG_DATA)", file=sys.stderr)
        return False
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
        f"load {os.getloadavg()}",
        flush=True,
    )
    return True


def load_case(case: str) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The noisy image (float32), its reference (float64) and the PSNR range of a 2D case.

    ``"w2s"``/``"fmd"``: the real pair, range 255. ``"dsb"``: the DSB nuclei as the clean
    reference with simulated Poisson-Gaussian noise (``PEAK``, ``READ``, seed 0), range None
    (the reference's max - min).
    """
    from napari_medseg.io import read_image

    if case in ("w2s", "fmd"):
        noisy_f, mean_f = {
            "w2s": ("w2s_010_0_noisy.tif", "w2s_010_0_mean400.tif"),
            "fmd": ("fmd_R1_noisy.png", "fmd_R1_mean50.png"),
        }[case]
        pairs = DATA / "denoising/real_pairs"
        noisy = np.asarray(read_image(pairs / noisy_f)[0].data, dtype=np.float32)
        ref = np.asarray(read_image(pairs / mean_f)[0].data, dtype=np.float64)
        return noisy, ref, 255.0
    clean = np.asarray(
        read_image(DATA / "microscopy/dsb2018_nuclei/image.tif")[0].data, dtype=np.float64
    )
    top = clean.max()
    rs = np.random.default_rng(0)
    noisy = rs.poisson(clean / top * PEAK) / PEAK + rs.normal(0.0, READ, clean.shape)
    return (noisy * top).astype(np.float32), clean, None


def _scores(ref, img, mask=None, data_range=None) -> tuple:
    from skimage.metrics import structural_similarity

    from napari_medseg.core.denoise.classical import psnr

    ref = np.asarray(ref, dtype=np.float64)
    img = np.asarray(img, dtype=np.float64)
    rng = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    r, i = (ref[mask], img[mask]) if mask is not None else (ref, img)
    p = psnr(r, i, data_range=rng)
    pf = psnr(r, fit_affine(r, i), data_range=rng)
    if ref.ndim == 3:
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
    return round(p, 2), round(pf, 2), round(s, 4)


def _run(record, method: str, **kw) -> tuple[np.ndarray, float, dict]:
    from napari_medseg.core.denoise.denoising import denoise
    from napari_medseg.progress import run_sync

    t = time.perf_counter()
    res = run_sync(denoise(record, method, device="cpu", **kw))
    secs = time.perf_counter() - t
    prov = res.provenance
    info = {"noise_model": prov.get("noise_model_summary")}
    if res.model is not None:
        info["steps"] = res.model.training.get("steps")
    cl = prov.get("classical")
    if isinstance(cl, dict):
        parts = cl.get("mean of", [cl])
        info["classical"] = {c["method"]: c["parameter"] for c in parts}
    if "auto" in prov:
        info["auto_network"] = prov["auto"]["network"]
    return res.data, secs, info


def _gauss(x: np.ndarray, width: float, slice_axis: int | None) -> np.ndarray:
    """A Gaussian on raw intensities (in-plane only across ``slice_axis``)."""
    from scipy import ndimage as ndi

    ws = [0.0 if i == slice_axis else width for i in range(x.ndim)]
    return ndi.gaussian_filter(x.astype(np.float32), ws)


def _bm3d_vst(x: np.ndarray) -> np.ndarray | None:
    """BM3D in the noise model's stabilised space (None without the bm3d package or in 3D)."""
    try:
        import bm3d
    except ImportError:
        return None
    if x.ndim != 2:
        return None
    from napari_medseg.core.denoise.classical import estimate_noise_sigma
    from napari_medseg.core.denoise.denoising import noise_model_of
    from napari_medseg.core.denoise.noise import gat_forward, gat_inverse

    nm = noise_model_of(x, None, None)
    v = gat_forward(x, nm)
    return gat_inverse(bm3d.bm3d(v, sigma_psd=estimate_noise_sigma(v)), nm)


def _case(name, record, ref, mask, args, data_range=None, extra=()) -> list[dict]:
    rows = []
    x = np.asarray(record.data, dtype=np.float32)

    def add(label, out, secs, info=None):
        p, pf, s = _scores(ref, out, mask, data_range)
        rows.append(
            {
                "case": name,
                "method": label,
                "psnr": p,
                "psnr_fitted": pf,
                "ssim": s,
                "seconds": round(secs, 2),
                **(info or {}),
            }
        )
        print(
            f"{name:5s} {label:34s} PSNR {p:6.2f}  fitted {pf:6.2f}  SSIM {s:.4f}  {secs:6.1f} s"
            f"  {info or ''}",
            flush=True,
        )

    add("noisy input", x, 0.0)
    slice_axis = 2 if x.ndim == 3 else None
    add("gaussian 1.5 px, raw", _gauss(x, 1.5, slice_axis), 0.0)
    # the oracle: the calibration's own width grid, the best width chosen with the ground truth
    t = time.perf_counter()
    oracle = max(
        ((w, _gauss(x, w, slice_axis)) for w in CALIBRATED["gaussian"]),
        key=lambda wo: _scores(ref, wo[1], mask, data_range)[1],
    )
    add(f"gaussian oracle ({oracle[0]:g} px)", oracle[1], time.perf_counter() - t)
    t = time.perf_counter()
    b3 = _bm3d_vst(x)
    if b3 is not None:
        add("bm3d + vst (not shipped)", b3, time.perf_counter() - t)
    for m in CLASSICAL:
        out, secs, info = _run(record, m)
        add(m, out, secs, info)
    for label, method, kw in [
        (f"auto {args.budget:g} s (default)", "auto", {}),
        (f"n2v2 {args.budget:g} s", "n2v2", {}),
        (f"n2v2 {args.budget:g} s, no vst, no tta", "n2v2", {"noise_model": "off", "tta": False}),
    ]:
        budget = args.fmri_budget if name == "fmri" else args.budget
        steps = args.fmri_steps if name == "fmri" else args.steps
        if steps:  # a fixed number of steps: scores independent of the machine's load
            label = label.replace(f"{args.budget:g} s", f"{steps} steps")
            kw = {**kw, "time_budget": 0, "max_steps": steps}
        else:
            label = label.replace(f"{args.budget:g} s", f"{budget:g} s")
            kw = {**kw, "time_budget": budget}
        out, secs, info = _run(record, method, **kw)
        add(label, out, secs, info)
    for label, fn in extra:
        out, secs, info = fn()
        add(label, out, secs, info)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=90.0, help="network training seconds")
    ap.add_argument("--fmri-budget", type=float, default=30.0, help="budget on the fMRI frame")
    ap.add_argument(
        "--steps", type=int, default=None, help="train N steps instead of --budget seconds"
    )
    ap.add_argument("--fmri-steps", type=int, default=None, help="steps on the fMRI frame")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--cases", nargs="+", default=["w2s", "fmd", "fmri", "dsb"])
    args = ap.parse_args(argv)

    from napari_medseg.io import read_image
    from napari_medseg.io.record import ImageRecord

    if not start(args.threads):
        return 1
    rows: list[dict] = []
    for case in args.cases:
        if case in ("w2s", "fmd"):
            x, ref, data_range = load_case(case)
            rec = ImageRecord(
                data=x, affine=np.eye(3), space="pixel", modality="microscopy", name=case
            )
            rows += _case(case, rec, ref, None, args, data_range=data_range)
        elif case == "fmri":
            rec4 = read_image(DATA / "denoising/fmri_30frames.nii.gz")[0]
            vol = np.asarray(rec4.data)
            frame0 = ImageRecord(
                data=vol[..., 0], affine=rec4.affine, space="RAS", modality="MR", name="frame0"
            )
            ref = vol[..., 1:].astype(np.float64).mean(axis=-1)
            mask = ref > 0.1 * ref.max()

            def all_frames(method: str = "auto", rec4=rec4, **kw):
                def go():
                    from napari_medseg.core.denoise.denoising import denoise
                    from napari_medseg.progress import run_sync

                    t = time.perf_counter()
                    budget = {"time_budget": args.fmri_budget}
                    if args.fmri_steps:
                        budget = {"time_budget": 0, "max_steps": args.fmri_steps}
                    res = run_sync(denoise(rec4, method, axis=3, device="cpu", **budget, **kw))
                    steps = res.model.training.get("steps") if res.model else None
                    return res.data[..., 0], time.perf_counter() - t, {"steps": steps}

                return go

            rows += _case(
                "fmri",
                frame0,
                ref,
                mask,
                args,
                extra=[
                    ("auto, all 30 frames", all_frames()),
                    ("n2v2, all 30 frames", all_frames("n2v2")),
                ],
            )
        elif case == "dsb":
            noisy, clean, _ = load_case("dsb")
            rec = ImageRecord(
                data=noisy,
                affine=np.eye(3),
                space="pixel",
                modality="microscopy",
                name="dsb_noisy",
            )
            rows += _case("dsb", rec, clean, None, args)
    # summary: the default against the best shipped classical method, per case
    for case in dict.fromkeys(r["case"] for r in rows):
        rs_ = [r for r in rows if r["case"] == case]
        best_c = max((r for r in rs_ if r["method"] in CLASSICAL), key=lambda r: r["psnr_fitted"])
        for r in rs_:
            if r["method"].startswith(("auto", "n2v2")):
                gain = r["psnr_fitted"] - best_c["psnr_fitted"]
                print(
                    f"{case}: {r['method']:34s} {gain:+.2f} dB (fitted) vs best classical "
                    f"({best_c['method']} {best_c['psnr_fitted']:.2f} dB)"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
