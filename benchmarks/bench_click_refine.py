"""Click-guided refinement (model-free random walker): Dice after 1-3 simulated clicks.

Run: ``python benchmarks/bench_click_refine.py`` (needs ../shared/data). Clicks are simulated
as a careful user would place them (:func:`napari_medseg.core.correct.refine.simulate_click`: inside
the largest error, farthest from its edge), one at a time, each followed by a refinement of
that slice.

* Spleen CT (manual mask, 0.8 x 0.8 x 5 mm), every other axial slice, four damaged starting
  masks: shrunk by 4 mm, grown by 5 mm, the lower half of the slice cut away, the slice empty.
* DSB 2018 nuclei (manual): ten nuclei removed from the mask, one positive click on each
  (random walker, then the learned model; the whole 512x512 image is the region; 13 of its 16
  tiles are training data of the learned model, so that row is a timing, not a held-out score).

Reported: mean Dice of the slice before and after 1, 2 and 3 clicks; the slowest refinement.

Learned vs model-free (``--compare``, also run by default): the built-in click model
``click_refine_2d`` (``method="learned"``) and the random walker, in the same run, on the
slices the click model never saw in training: the three held-out DSB nuclei tiles, every third
axial slice of the spinal-cord T2 MRI (the model trained on the T1w contrast) and every other
axial slice of the MSD spleen CT (the model trained on another CT). Both start from the same
imperfect masks (:data:`napari_medseg.training.clicks.EVAL_STARTS`: half the objects
missing, shrunk 2 px, grown 2 px, shifted 3 px, cut in half) and get the same simulated
clicks policy; mean Dice of the slice after 0, 1, 3 and 5 clicks and time per click
(``refine_with_clicks`` call, default reach 25 mm) are printed as a Markdown table.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
SP = (5.0, 0.795, 0.795)  # layer axes (S, A, R)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    from napari_medseg.core.engine.metrics import dice as overlap

    return overlap(a, b, [1], empty=1.0)


def ct() -> None:
    import nibabel as nib

    from napari_medseg.core.correct import edits as C
    from napari_medseg.core.correct.refine import refine_with_clicks, simulate_click

    img = np.asarray(nib.load(str(DATA / "ct/spleen/image.nii.gz")).dataobj).transpose(2, 1, 0)
    img = img.astype(np.float32)
    lab = np.asarray(nib.load(str(DATA / "ct/spleen/label.nii.gz")).dataobj).transpose(2, 1, 0)
    lab = lab.astype(np.uint8)
    ks = np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1))[1:-1:2]
    for scenario in ("shrunk 4 mm", "grown 5 mm", "half cut", "empty"):
        scores = np.zeros((len(ks), 4))
        worst = 0.0
        for row, k in enumerate(ks):
            gt = lab[k] == 1
            if scenario.startswith("shrunk"):
                cur = C.grow_shrink(lab, 1, -4.0, SP).apply(lab)
            elif scenario.startswith("grown"):
                cur = C.grow_shrink(lab, 1, 5.0, SP).apply(lab)
            else:
                cur = lab.copy()
                if scenario == "empty":
                    cur[k] = 0
                else:
                    cur[k][int(np.median(np.nonzero(gt)[0])) :] = 0
            scores[row, 0] = dice(cur[k] == 1, gt)
            pos: list = []
            neg: list = []
            for n in range(3):
                c = simulate_click(lab[k : k + 1] == 1, cur[k : k + 1] == 1)
                if c is not None:
                    p = c[0].astype(float)
                    p[0] = k
                    (pos if c[1] else neg).append(p)
                    t0 = time.perf_counter()
                    e = refine_with_clicks(
                        img, cur, 1, pos, neg, SP, mode="2d", axis=0, window=(-160, 240)
                    )
                    worst = max(worst, time.perf_counter() - t0)
                    cur = e.apply(cur)
                scores[row, n + 1] = dice(cur[k] == 1, gt)
        m = scores.mean(axis=0)
        print(
            f"  CT spleen {scenario:12s} Dice {m[0]:.3f} -> {m[1]:.3f} -> {m[2]:.3f} -> "
            f"{m[3]:.3f}  (slices {len(ks)}, slowest click {worst * 1000:.0f} ms)"
        )


def nuclei() -> None:
    import tifffile
    from scipy import ndimage as ndi

    from napari_medseg.core.correct.refine import refine_with_clicks

    img = tifffile.imread(DATA / "microscopy/dsb2018_nuclei/image.tif").astype(np.float32)
    inst = tifffile.imread(DATA / "microscopy/dsb2018_nuclei/mask.tif")
    sem = inst > 0
    ids = np.unique(inst)[1:][::12][:10]
    cur = sem.astype(np.uint8)
    for i in ids:
        cur[inst == i] = 0
    clicks = [np.array(ndi.center_of_mass(inst == i)) for i in ids]
    for method in ("random_walker", "learned"):
        if method == "learned":
            import torch

            torch.set_num_threads(1)
            refine_with_clicks(img[:64, :64], cur[:64, :64], 1, [(30, 30)], method=method)
        t0 = time.perf_counter()
        out = refine_with_clicks(img, cur, 1, clicks, [], method=method).apply(cur)
        dt = time.perf_counter() - t0
        rec = np.mean([(out[inst == i] == 1).mean() for i in ids])
        print(
            f"  DSB nuclei, 10 missed ({method}): Dice {dice(cur == 1, sem):.4f} -> "
            f"{dice(out == 1, sem):.4f}, missed nuclei recovered {rec:.0%}, "
            f"{dt * 1000:.0f} ms for 10 clicks (512x512)"
        )


def compare() -> None:
    """Learned click model vs random walker on held-out slices, same starts, same run."""
    import platform

    import torch

    from napari_medseg.core.correct.refine import load_click_model
    from napari_medseg.progress import run_sync
    from napari_medseg.training.clicks import EVAL_STARTS, evaluate_clicks, shared_data_cases

    torch.set_num_threads(1)
    _, held = shared_data_cases(DATA)
    model = load_click_model()  # the built-in click_refine_2d
    print(
        f"\nlearned ({model.card.name} v{model.card.version}) vs random walker; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"torch threads 1, no GPU used"
    )
    print("starts: " + ", ".join(f"{k} {a}" for k, a in EVAL_STARTS))
    res = {}
    for method in ("random_walker", "learned"):
        kw = {"method": method, "model": model} if method == "learned" else {"method": method}
        res[method] = run_sync(evaluate_clicks(held, **kw))
    print(
        "\n| held-out data | method | sessions | Dice start | 1 click | 3 clicks | 5 clicks "
        "| ms/click mean (max) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for group in res["random_walker"]:
        for method in ("random_walker", "learned"):
            r = res[method][group]
            d = r["dice"]
            print(
                f"| {group} ({r['slices']} slices) | {method.replace('_', ' ')} | "
                f"{r['n_sessions']} | {d[0]:.3f} | {d[1]:.3f} | {d[3]:.3f} | {d[5]:.3f} | "
                f"{r['ms_per_click']:.0f} ({r['ms_max']:.0f}) |"
            )


def main() -> int:
    if not (DATA / "ct/spleen/image.nii.gz").exists():
        print(f"needs the real data under {DATA}", file=sys.stderr)
        return 1
    if "--compare" not in sys.argv[1:]:
        print("click-guided refinement, model-free random walker (defaults)")
        ct()
        nuclei()
    compare()
    return 0


if __name__ == "__main__":
    sys.exit(main())
