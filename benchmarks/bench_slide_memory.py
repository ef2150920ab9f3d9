"""Peak memory and time of opening and panning gigapixel slides with ``read_slide``.

Builds square pyramidal JPEG TIFFs (10k, 20k, 40k pixels a side by default) by tiling the real
H&E tile from ``../shared/data`` in a temporary folder, then, in a fresh subprocess per size,
measures peak RSS (``resource.getrusage().ru_maxrss``) and time for

1. opening with :func:`napari_medseg.io.raster.read_slide`,
2. reading a 1024x1024 viewport at full resolution at 5 positions (panning),
3. reading the whole lowest pyramid level,

and compares with the naive reference: ``tifffile.imread`` of the full-resolution level of the
10k slide (what a non-lazy reader does). Prints a markdown table.

Usage::

    python benchmarks/bench_slide_memory.py [--sizes 10000 20000 40000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", ROOT.parent / "shared" / "data"))
HE = DATA / "pathology" / "he_tile_tcia.jpg"


def _rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_now_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")


def child_lazy(path: str) -> dict:
    """Run in a subprocess: open lazily, pan, read the lowest level."""
    t0 = time.perf_counter()
    import dask
    import dask.array  # noqa: F401 - imported here so that "open" times the open, not imports
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    from napari_medseg.io.raster import read_slide

    t_import = time.perf_counter() - t0
    dask.config.set(scheduler="threads")
    base = _rss_now_mb()
    t0 = time.perf_counter()
    rec = read_slide(path)
    t_open = time.perf_counter() - t0
    peak_open = _rss_peak_mb()
    lv0 = rec.multiscale[0] if rec.multiscale else rec.data
    h, w = lv0.shape[:2]
    positions = [(0.1, 0.1), (0.3, 0.6), (0.5, 0.5), (0.8, 0.2), (0.9, 0.9)]
    t_view = []
    for fy, fx in positions:
        y, x = int(fy * (h - 1024)), int(fx * (w - 1024))
        t = time.perf_counter()
        v = lv0[y : y + 1024, x : x + 1024].compute()
        t_view.append(time.perf_counter() - t)
        assert v.shape[:2] == (1024, 1024) and v.mean() > 10, "viewport is empty"
    peak_pan = _rss_peak_mb()
    low = rec.multiscale[-1] if rec.multiscale else rec.data
    t = time.perf_counter()
    lowest = low.compute()
    t_low = time.perf_counter() - t
    return {
        "levels": len(rec.multiscale or [rec.data]),
        "lowest_shape": list(lowest.shape),
        "rss_after_imports_mb": base,
        "t_import_s": t_import,
        "t_open_s": t_open,
        "peak_open_mb": peak_open,
        "t_view_mean_s": sum(t_view) / len(t_view),
        "peak_pan_mb": peak_pan,
        "t_lowest_s": t_low,
        "peak_total_mb": _rss_peak_mb(),
    }


def child_naive(path: str) -> dict:
    """Run in a subprocess: the reference, full-resolution ``tifffile.imread``."""
    import tifffile

    base = _rss_now_mb()
    t0 = time.perf_counter()
    arr = tifffile.imread(path, level=0)
    t = time.perf_counter() - t0
    return {
        "rss_after_imports_mb": base,
        "t_open_s": t,
        "peak_total_mb": _rss_peak_mb(),
        "shape": list(arr.shape),
    }


def _run_child(kind: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000])
    ap.add_argument("--keep", type=Path, default=None, help="write slides here and keep them")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, path = args.child
        res = child_lazy(path) if kind == "lazy" else child_naive(path)
        print(json.dumps(res))
        return 0

    if not HE.is_file():
        print(f"skipped: the H&E tile {HE} is absent", file=sys.stderr)
        return 0
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from napari_medseg.io.raster import make_pyramidal_tiff

    tile = np.asarray(Image.open(HE).convert("RGB"))
    folder = args.keep or Path(tempfile.mkdtemp(prefix="medseg_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(folder).free / 1e9
    print(f"slides in {folder} ({free_gb:.0f} GB free); H&E tile {tile.shape}", file=sys.stderr)
    rows = []
    naive = None
    try:
        for size in args.sizes:
            path = folder / f"slide_{size}.tif"
            t = time.perf_counter()
            if not path.exists():
                make_pyramidal_tiff(path, tile, (size, size), tile=512, compression="jpeg")
            t_write = time.perf_counter() - t
            mb = path.stat().st_size / 2**20
            print(f"{size}: written in {t_write:.1f} s, {mb:.0f} MB", file=sys.stderr)
            res = _run_child("lazy", path)
            res.update(size=size, file_mb=mb, t_write_s=t_write, full_gb=size * size * 3 / 1e9)
            rows.append(res)
            print(json.dumps(res), file=sys.stderr)
            if naive is None:
                naive = _run_child("naive", path)
                naive.update(size=size, file_mb=mb, full_gb=size * size * 3 / 1e9)
                print(json.dumps(naive), file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    print()
    print(
        "| slide (px) | file (MB) | full res in RAM (GB) | levels | open (s) | peak RSS open (MB) "
        "| 1024² viewport (s) | peak RSS pan (MB) | lowest level (s) | peak RSS total (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']}² | {r['file_mb']:.0f} | {r['full_gb']:.2f} | {r['levels']} "
            f"| {r['t_open_s']:.3f} | {r['peak_open_mb']:.0f} | {r['t_view_mean_s']:.3f} "
            f"| {r['peak_pan_mb']:.0f} | {r['t_lowest_s']:.3f} | {r['peak_total_mb']:.0f} |"
        )
    if naive:
        print(
            f"| naive tifffile.imread {naive['size']}² | {naive['file_mb']:.0f} "
            f"| {naive['full_gb']:.2f} | 1 | {naive['t_open_s']:.3f} "
            f"| {naive['peak_total_mb']:.0f} | - | - | - | {naive['peak_total_mb']:.0f} |"
        )
        base = rows[0]
        print(
            f"\nvs naive on {naive['size']}²: peak RSS {naive['peak_total_mb']:.0f} MB -> "
            f"{base['peak_total_mb']:.0f} MB ({naive['peak_total_mb'] / base['peak_total_mb']:.1f}x"
            f" less), time to first pixels {naive['t_open_s']:.2f} s -> "
            f"{base['t_open_s'] + base['t_view_mean_s']:.2f} s"
        )
    print(
        f"(RSS after imports, before opening: ~{rows[0]['rss_after_imports_mb']:.0f} MB; "
        f"importing dask/zarr/tifffile: {rows[0]['t_import_s']:.2f} s, not in 'open')"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
