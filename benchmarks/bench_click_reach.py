"""Click reach on nuclei: Dice after simulated clicks for several ``reach`` values (pixels).

``python benchmarks/bench_click_reach.py [random_walker|learned]``. On the 3 DSB tiles the
built-in models hold out (``dsb_r000_c256``, ``dsb_r000_c384``, ``dsb_r256_c384``; 128x128,
pixel spacing 1, so the reach is in pixels), three imperfect starts per tile (half the nuclei
missing, grown by 2 px, shrunk by 2 px; ``training.train_clicks.imperfect_mask``), then 5
simulated clicks (``core.refine.simulate_session``). Prints the mean Dice at the start and after
1, 3 and 5 clicks for each reach, measured in the same run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TILES = [(0, 256), (0, 384), (256, 384)]
STARTS = [("missing", 0.5), ("grown", 2), ("shrunk", 2)]


def main() -> int:
    import tifffile
    import torch

    from napari_medseg.core.correct.refine import simulate_session
    from napari_medseg.training.clicks import imperfect_mask

    torch.set_num_threads(1)
    method = sys.argv[1] if len(sys.argv) > 1 else "random_walker"
    folder = DATA / "microscopy" / "dsb2018_nuclei"
    img = tifffile.imread(folder / "image.tif").astype(np.float32)
    mask = tifffile.imread(folder / "mask.tif") > 0
    print(f"method {method}; {len(TILES)} held-out tiles x {len(STARTS)} starts; 5 clicks")
    print("| reach (px) | start | 1 click | 3 clicks | 5 clicks |")
    print("|---|---|---|---|---|")
    for reach in (25.0, 12.0, 8.0):
        runs = []
        for r, c in TILES:
            im, gt = img[r : r + 128, c : c + 128], mask[r : r + 128, c : c + 128]
            for kind, amount in STARTS:
                start = imperfect_mask(gt, kind, amount)
                dice, _ = simulate_session(im, gt, start, 5, method=method, reach=reach)
                runs.append(dice)
        m = np.asarray(runs)[:, [0, 1, 3, 5]].mean(axis=0)
        print(f"| {reach:g} | " + " | ".join(f"{v:.3f}" for v in m) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
