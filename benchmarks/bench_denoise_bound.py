"""How much can any network gain over the calibrated filters here? A supervised upper bound.

Run: ``python benchmarks/bench_denoise_bound.py [--budgets 120 600] [--features 16 32]
[--steps 1000] [--json OUT]`` (needs ../shared/data or ``$MEDSEG_DATA``).

The self-supervised default (``auto``) never sees a clean image. This benchmark gives a network
what no user has: the clean reference. The N2V U-Net family (the shipped network, with its top
skip connection, which blind-spot training must drop and supervised training may keep) is
trained *supervised*, noisy -> multi-frame mean, on the left half of each image, in the same
variance-stabilised space (noise model estimated from the whole noisy frame, as the product
does), for a wall-clock budget on this machine's threads, and predicted with the same 8
rotations/flips. Everything is scored on the right half, which the supervised network never
saw: the calibrated Gaussian and TV (run on the whole image, as a user runs them), the default
``auto`` (self-supervised on the whole noisy image, as a user runs it), and the supervised
network, alone and blended with the filters as ``auto`` blends its own network (half each, in
the stabilised space). If the supervised network, trained with the answer, gains little over
the filters, a self-supervised one of that size and budget, which learns the same mapping
from a noisier signal, is not expected to gain more.

Cases: ``w2s`` and ``fmd`` (the real pairs, 0-255 range, reference = the 400- / 50-frame mean)
and ``dsb`` (DSB 2018 nuclei with the simulated Poisson-Gaussian noise of
``bench_denoise.py``). Scores: PSNR after a least-squares affine fit to the reference (the
"fitted" column of ``bench_denoise.py``; the W2S frame is on another intensity scale than its
mean). The supervised target is the reference mapped to the noisy frame's intensity scale by
a least-squares line (W2S: ``0.66 mean + 10.5``) so that the stabilising transform applies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from bench_denoise import fit_affine, load_case, start


def train_supervised(
    zin: np.ndarray, zt: np.ndarray, cols: int, budget: float, features: int, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Train on ``[:, :cols]`` (input -> target, both z-scored), predict the whole image.

    Returns the 8-view mean prediction ``(row, col)`` and the number of steps run.
    """
    import torch

    from napari_medseg.core.denoise.n2v import build_n2v_network, tta_views

    views = tta_views(2)  # the shipped denoiser's 8 rotations/flips of (C, row, col) arrays
    torch.manual_seed(seed)
    rs = np.random.default_rng(seed)
    net = build_n2v_network(2, 1, features=features, depth=2, n2v2=False)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    patch, batch, lr0 = 64, 16, 2e-3
    t0, steps = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - t0) < budget:
        for g in opt.param_groups:  # cosine decay over the budget
            g["lr"] = 1e-5 + 0.5 * (lr0 - 1e-5) * (1 + np.cos(np.pi * elapsed / budget))
        ys = rs.integers(0, zin.shape[0] - patch, batch)
        xs = rs.integers(0, cols - patch, batch)
        fwd, _ = views[rs.integers(len(views))]
        pair = []
        for a in (zin, zt):  # the same patches of input and target, the same view of both
            stack = np.stack([a[y : y + patch, x : x + patch] for y, x in zip(ys, xs)])
            pair.append(torch.from_numpy(np.ascontiguousarray(fwd(stack)))[:, None])
        loss = torch.mean((net(pair[0]) - pair[1]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    net.eval()
    outs = []
    with torch.inference_mode():
        for fwd, back in views:
            z = torch.from_numpy(np.ascontiguousarray(fwd(zin[None])))[None]
            outs.append(back(net(z)[0].numpy()))
    return np.mean(outs, axis=0)[0], steps


def run_case(case: str, args) -> list[dict]:
    from napari_medseg.core.denoise.classical import denoise_classical, psnr
    from napari_medseg.core.denoise.denoising import denoise, noise_model_of
    from napari_medseg.core.denoise.noise import gat_forward, gat_inverse
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.progress import run_sync

    x, ref, rng = load_case(case)
    half = x.shape[1] // 2
    r = ref[:, half:]
    data_range = float(r.max() - r.min()) if rng is None else rng
    rows: list[dict] = []

    def add(method: str, out: np.ndarray, secs: float, **info) -> None:
        o = np.asarray(out, dtype=np.float64)[:, half:]
        p = round(psnr(r, fit_affine(r, o), data_range=data_range), 2)
        rows.append(
            {
                "case": case,
                "method": method,
                "psnr_fitted_right_half": p,
                "seconds": round(secs, 1),
                **info,
            }
        )
        print(
            f"{case:4s} {method:44s} fitted PSNR (right half) {p:6.2f}  {secs:6.1f} s {info or ''}",
            flush=True,
        )

    add("noisy input", x, 0.0)
    nm = noise_model_of(x, None, None)
    filters = []
    for m in ("gaussian", "tv"):
        t = time.perf_counter()
        out, info = denoise_classical(x, m, nm)
        filters.append(out)
        add(f"{m} (calibrated)", out, time.perf_counter() - t, parameter=info["parameter"])
    rec = ImageRecord(data=x, affine=np.eye(3), space="pixel", modality="microscopy", name=case)
    kw = {"time_budget": 0, "max_steps": args.steps} if args.steps else {"time_budget": 90.0}
    t = time.perf_counter()
    res = run_sync(denoise(rec, "auto", device="cpu", **kw))
    add(
        "auto (default, self-supervised, whole image)",
        res.data,
        time.perf_counter() - t,
        steps=res.model.training.get("steps") if res.model else None,
    )
    a, b = np.polyfit(ref.ravel(), x.ravel().astype(np.float64), 1)
    v = gat_forward(x, nm).astype(np.float32)
    vt = gat_forward((a * ref + b).astype(np.float32), nm).astype(np.float32)
    mu, sd = float(v.mean()), float(v.std())
    for features in args.features:
        for budget in args.budgets:
            t = time.perf_counter()
            pz, steps = train_supervised((v - mu) / sd, (vt - mu) / sd, half, budget, features)
            out = gat_inverse(pz * sd + mu, nm)
            label = f"supervised bound, {features} features, {budget:g} s"
            add(label, out, time.perf_counter() - t, steps=steps)
            # blended with the filters as auto blends its network, in the stabilised space
            cl = gat_forward(0.5 * (filters[0] + filters[1]), nm)
            add(label + " + filters", gat_inverse(0.5 * (pz * sd + mu + cl), nm), 0.0)
    best_c = max(rw["psnr_fitted_right_half"] for rw in rows[1:3])
    for rw in rows[3:]:
        rw["gain_vs_best_classical"] = round(rw["psnr_fitted_right_half"] - best_c, 2)
        print(
            f"{case}: {rw['method']:44s} {rw['gain_vs_best_classical']:+.2f} dB vs best classical"
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[120.0],
        help="supervised training seconds (each a row)",
    )
    ap.add_argument(
        "--features",
        type=int,
        nargs="+",
        default=[16],
        help="network width(s); 16 is the shipped denoiser's",
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="train auto for N steps instead of its 90 s budget"
    )
    ap.add_argument("--cases", nargs="+", default=["w2s", "fmd", "dsb"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not start(args.threads):
        return 1
    rows = [row for case in args.cases for row in run_case(case, args)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
