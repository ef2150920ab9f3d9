"""Whole-slide segmentation: peak memory, throughput vs the model alone, vs a naive loop.

Run: ``python benchmarks/bench_wsi.py [--sizes 10000 20000 40000] [--device cpu|cuda]``
(needs ../shared/data for the real H&E tile).

Slides: pyramidal JPEG (q90) BigTIFFs, 512-pixel tiles, built by tiling the real 300x500 H&E tile
padded with white glass to 600x1200 (so the tissue detector has background to skip), mpp 0.25.
Model: a random-weight MONAI 2D U-Net, channels (16, 32, 64), strides (2, 2), one residual unit,
BatchNorm, 3 -> 2 classes (about 90k parameters); weights do not change the timing.

For each size, in a fresh subprocess:

* ``segment_slide`` (tile 512, margin 64, batch 4, tissue only) into OME-Zarr, wall time, peak
  RSS (``ru_maxrss``) of the process;
* "model alone": the same network on the first 96 tissue tiles (+ margins) already in memory,
  normalise + forward + argmax, same batch size, measured in its own process before the slide
  run and in the slide's process after it; ratio = pipeline tiles/s / the faster of the two.

On the smallest size also a naive loop in its own subprocess: read the whole level 0 into a
NumPy array, then run the same tiles from memory (peak RSS and time).

``--detect``: instead, ``detect_slide`` with the classical H&E nuclei detector (haematoxylin
channel of a colour deconvolution, Otsu over the tissue of each tile, distance watershed; no
network; ``--dark`` for the older brightness-Otsu "dark objects" variant) on tiles of 1024 + 64
margin, score >= 0.5, outlines kept, then the QuPath GeoJSON written: wall time of each,
objects, peak RSS. The slide tiles the H&E tile *without* glass (all tissue, the worst case for
the size of the table), and once with glass (``--detect-glass``: about 20% tissue).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
HE = DATA / "pathology" / "he_tile_tcia.jpg"


def _card():
    from napari_medseg.models.card import ModelCard

    return ModelCard(
        name="bench_unet_rgb",
        dims=2,
        modality="pathology",
        in_channels=3,
        classes=[{"id": 0, "name": "background"}, {"id": 1, "name": "tissue"}],
        spacing=None,
        orientation="",
        patch_size=[256, 256],
        normalization={"scheme": "rgb", "mean": [0.5] * 3, "std": [0.25] * 3},
        architecture={
            "name": "UNet",
            "kwargs": {
                "spatial_dims": 2,
                "in_channels": 3,
                "out_channels": 2,
                "channels": [16, 32, 64],
                "strides": [2, 2],
                "num_res_units": 1,
                "norm": "batch",
            },
        },
    )


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model_alone(rec, model, device: str, n: int = 96) -> float:
    """Tiles/s of normalise + forward + argmax on the first ``n`` tissue tiles held in memory."""
    import torch

    from napari_medseg.core.slides.segment import plan_segmentation, predict_batch
    from napari_medseg.core.slides.tiles import TileReader, read_with_margin

    plan = plan_segmentation(rec, model, 512, 64, 0, True, None)
    reader = TileReader(rec, 0)
    inputs = [read_with_margin(reader, t, 512, 64, plan.work_shape)[0] for t in plan.tiles[:n]]
    net = model.network.to(device).eval()
    predict_batch(net, inputs[:4], model.card, device, None)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(inputs), 4):
        predict_batch(net, inputs[i : i + 4], model.card, device, None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(inputs) / (time.perf_counter() - t)


def child(args: argparse.Namespace) -> dict:
    import torch

    from napari_medseg.core.slides.segment import predict_batch, segment_slide
    from napari_medseg.io.raster import read_slide
    from napari_medseg.models.registry import load_model
    from napari_medseg.progress import run_sync

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    rec = read_slide(args.slide)
    rss0 = _peak_mb()
    out = Path(args.work) / f"out_{args.mode}.zarr"
    res: dict = {"size": list(rec.data.shape[:2]), "mode": args.mode}
    if args.mode == "pipeline":
        t = time.perf_counter()
        r = run_sync(
            segment_slide(
                rec,
                model,
                out,
                tile=512,
                margin=64,
                batch_size=4,
                device=args.device,
                overwrite=True,
            )
        )
        wall = time.perf_counter() - t
        res.update(tiles=r.tiles_done, wall_s=wall, peak_rss_mb=_peak_mb(), rss_before_mb=rss0)
        res["model_alone_tiles_per_s"] = _model_alone(rec, model, args.device)
    elif args.mode == "detect":
        import functools

        from napari_medseg.core.detect.classical import detect_classical
        from napari_medseg.core.slides.detect import detect_slide
        from napari_medseg.core.slides.export import write_slide_detections

        t = time.perf_counter()
        kw = {"dark_objects": True} if args.dark else {"stain": "hematoxylin"}
        detector = functools.partial(detect_classical, **kw)
        r = run_sync(detect_slide(rec, detector, tile=1024, margin=64, threshold=0.5))
        wall = time.perf_counter() - t
        t = time.perf_counter()
        gj = write_slide_detections(Path(args.work) / "detections.geojson", r, overwrite=True)
        res.update(
            tiles=r.tiles_done,
            tile_side=1024,
            wall_s=wall,
            objects=len(r.table),
            write_s=time.perf_counter() - t,
            geojson_mb=gj.stat().st_size / 1e6,
            peak_rss_mb=_peak_mb(),
            rss_before_mb=rss0,
        )
    elif args.mode == "model":
        res["model_alone_tiles_per_s"] = _model_alone(rec, model, args.device)
    else:  # naive: read everything, then infer the same tiles from memory
        from napari_medseg.core.slides.segment import plan_segmentation

        t = time.perf_counter()
        img = np.asarray(rec.data.compute())
        t_read = time.perf_counter() - t
        plan = plan_segmentation(rec, model, 512, 64, 0, True, None)
        labels = np.zeros(img.shape[:2], np.uint8)
        net = model.network.to(args.device).eval()
        m = 64
        for i in range(0, len(plan.tiles), 4):
            batch = plan.tiles[i : i + 4]
            inputs = []
            for y0, x0, _, _ in batch:
                a = img[max(0, y0 - m) : y0 + 512 + m, max(0, x0 - m) : x0 + 512 + m]
                pads = (
                    (m - min(m, y0), 512 + 2 * m - a.shape[0] - (m - min(m, y0))),
                    (m - min(m, x0), 512 + 2 * m - a.shape[1] - (m - min(m, x0))),
                    (0, 0),
                )
                inputs.append(np.pad(a, pads, mode="reflect"))
            labs = predict_batch(net, inputs, model.card, args.device, None)
            for (y0, x0, y1, x1), lab in zip(batch, labs):
                labels[y0:y1, x0:x1] = lab[m : m + y1 - y0, m : m + x1 - x0]
        wall = time.perf_counter() - t
        res.update(tiles=len(plan.tiles), wall_s=wall, read_s=t_read, peak_rss_mb=_peak_mb())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive loop")
    ap.add_argument("--detect", action="store_true", help="benchmark detect_slide instead")
    ap.add_argument("--detect-glass", action="store_true", help="--detect on the glass slide")
    ap.add_argument("--dark", action="store_true", help="--detect with brightness Otsu")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="pipeline")
    ap.add_argument("--slide")
    ap.add_argument("--model")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    if not HE.is_file():
        sys.exit(f"the real H&E tile is missing ({HE}); set MEDSEG_DATA")
    import torch
    from PIL import Image

    from napari_medseg.io.raster import make_pyramidal_tiff
    from napari_medseg.models.networks import build_network, save_model

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_wsi_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    card = _card()
    model_dir = save_model(work / "bench_unet_rgb", card, build_network(card))
    n_par = sum(p.numel() for p in build_network(card).parameters())
    tile_img = np.pad(
        np.asarray(Image.open(HE).convert("RGB")), ((0, 300), (0, 700), (0, 0)), constant_values=255
    )
    print(
        f"machine: {os.cpu_count()} CPU cores, torch threads {args.threads}, "
        f"device {args.device}; model U-Net {n_par} parameters (random weights)"
    )
    rows = []
    for size in args.sizes:
        slide = work / f"slide_{size}.tif"
        img = tile_img
        if args.detect and not args.detect_glass:
            slide = work / f"slide_tissue_{size}.tif"
            img = tile_img[:300, :500]
        t = time.perf_counter()
        if not slide.exists():
            make_pyramidal_tiff(slide, img, (size, size), tile=512, mpp=0.25)
        print(
            f"built {size}x{size} in {time.perf_counter() - t:.1f} s "
            f"({slide.stat().st_size / 1e6:.0f} MB)",
            flush=True,
        )
        modes = ["model", "pipeline"] + (
            ["naive"] if size == min(args.sizes) and not args.no_naive else []
        )
        if args.detect:
            modes = ["detect"]
        before = None
        for mode in modes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--mode",
                mode,
                "--slide",
                str(slide),
                "--model",
                str(model_dir),
                "--work",
                str(work),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
                *(["--dark"] if args.dark else []),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(out.stderr[-2000:])
                continue
            r = json.loads(line[0][7:])
            if mode == "model":  # the model alone in its own process, before the slide run
                before = r["model_alone_tiles_per_s"]
                continue
            if before is not None and "model_alone_tiles_per_s" in r:
                r["model_alone_before_after"] = [before, r["model_alone_tiles_per_s"]]
                r["model_alone_tiles_per_s"] = max(before, r["model_alone_tiles_per_s"])
            r["tiles_per_s"] = r["tiles"] / r["wall_s"]
            r["mpx_per_s"] = r["tiles"] * r.get("tile_side", 512) ** 2 / 1e6 / r["wall_s"]
            rows.append(r)
            extra = ""
            if "model_alone_tiles_per_s" in r:
                extra = (
                    f"  model alone {r['model_alone_tiles_per_s']:.2f} tiles/s "
                    f"-> ratio {r['tiles_per_s'] / r['model_alone_tiles_per_s']:.2f}"
                )
            if "read_s" in r:
                extra = f"  (read whole level 0: {r['read_s']:.1f} s)"
            if "objects" in r:
                extra = (
                    f"  {r['objects']} objects; GeoJSON {r['geojson_mb']:.0f} MB written in "
                    f"{r['write_s']:.1f} s"
                )
            print(
                f"{size:>6} {mode:<8} {r['tiles']:>5} tiles {r['wall_s']:7.1f} s "
                f"{r['tiles_per_s']:6.2f} tiles/s {r['mpx_per_s']:6.2f} Mpx/s "
                f"peak RSS {r['peak_rss_mb']:7.0f} MB{extra}",
                flush=True,
            )
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"results in {work / 'results.json'}")


if __name__ == "__main__":
    main()
