"""Time of each correction tool on a 512x512x200 label volume (target: well under 1 s each).

Run: ``python benchmarks/bench_corrections.py`` (needs ../shared/data). Two volumes of shape
``(200, 512, 512)`` (napari's ``(S, A, R)``) at 2 x 0.8 x 0.8 mm are built from the real spleen
mask scaled up with nearest neighbour:

* ``organ``: a spleen-sized structure (about 0.2 L) plus 50 stray islands spread over the whole
  scan (so the class's bounding box is the whole scan, the usual state of a model prediction);
* ``huge``: a 4.7 L structure (bigger than a liver) with the same islands: a worst case.

Each tool runs ``REPEATS`` times; the best time is reported (the machine may be shared). For
comparison the scipy one-liners on the whole class bounding box are timed once (``ref``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
REPEATS = 3
SPACING = (2.0, 0.8, 0.8)


def _best(fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(REPEATS):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def build(zoom: tuple[float, float, float]) -> np.ndarray:
    import nibabel as nib

    lab = np.asarray(nib.load(str(DATA / "ct/spleen/label.nii.gz")).dataobj).transpose(2, 1, 0)
    big = ndi.zoom(lab, zoom, order=0)
    vol = np.zeros((200, 512, 512), np.uint8)
    vol[20 : 20 + big.shape[0], 50 : 50 + big.shape[1], 60 : 60 + big.shape[2]] = big
    rng = np.random.default_rng(0)
    for _ in range(50):
        z, y, x = rng.integers(0, 190), rng.integers(0, 500), rng.integers(0, 500)
        vol[z : z + 2, y : y + 3, x : x + 3] = 1
    return vol


def main() -> int:
    if not (DATA / "ct/spleen/label.nii.gz").exists():
        print(f"needs the real data under {DATA}", file=sys.stderr)
        return 1
    from napari_medseg.core.correct import edits as C

    for name, zoom in [("organ", (52 / 26, 1.0, 1.0)), ("huge", (150 / 26, 2.5, 2.5))]:
        vol = build(zoom)
        # a structure drawn by hand on every 5th slice (no stray islands)
        gap = C.keep_largest_component(vol, 1).apply(vol)
        gap[np.arange(200) % 5 != 0] = 0
        n = int((vol == 1).sum())
        print(f"\n{name}: class 1 = {n} voxels = {n * np.prod(SPACING) / 1e6:.2f} L")
        tools = {
            "keep largest component": lambda v=vol: C.keep_largest_component(v, 1),
            "remove islands < 50 mm3": lambda v=vol: C.remove_islands(
                v, 1, min_mm3=50, spacing=SPACING
            ),
            "fill holes 3D": lambda v=vol: C.fill_holes(v, 1),
            "fill holes 2D": lambda v=vol: C.fill_holes(v, 1, mode="2d"),
            "interpolate (1 in 5 slices)": lambda g=gap: C.interpolate_slices(
                g, 1, spacing=SPACING
            ),
            "grow 3 mm": lambda v=vol: C.grow_shrink(v, 1, 3.0, SPACING),
            "shrink 3 mm": lambda v=vol: C.grow_shrink(v, 1, -3.0, SPACING),
            "relabel 1 -> 2": lambda v=vol: C.relabel(v, {1: 2}),
            "class volumes (full scan)": lambda v=vol: C.class_volumes(v, SPACING),
        }
        for tname, fn in tools.items():
            t, e = _best(fn)
            changed = getattr(e, "n_changed", "")
            print(f"  {tname:30s} {t * 1000:7.0f} ms   changed {changed}")
        box = C.bounding_box(vol == 1)
        t0 = time.perf_counter()
        ndi.distance_transform_edt(vol[box] != 1, sampling=SPACING)
        print(f"  ref: scipy EDT on the class box  {(time.perf_counter() - t0) * 1000:7.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
