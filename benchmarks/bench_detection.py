"""Detection quality and speed: built-in model + watershed vs the classical baseline, same run.

Run: ``python benchmarks/bench_detection.py [--repeats 3] [--threads N] [--json OUT]``
(needs ../shared/data or ``$MEDSEG_DATA``).

Data: ``microscopy/dsb2018_nuclei`` (512x512 fluorescence, 125 nuclei, MANUAL instance mask).
``fluo_nuclei_2d`` was trained on 16 tiles of 128x128 of this very image; its card's
``training.val_cases`` lists the tiles it never trained on (``dsb_r000_c256``,
``dsb_r000_c384``, ``dsb_r256_c384``: ``dsb_r<row>_c<col>`` = ``image[row:row+128,
col:col+128]``). Quality is scored ONLY on those held-out tiles: each tile is cut out and
detected on its own (as the model saw its training tiles), the ground truth is the mask cut the
same way. Scores on the 13 training tiles are printed too, marked as seen in training.

Metrics (pooled over the tiles, both methods with score >= 0.5 for P/R/F1):

* points: one-to-one Hungarian matching of predicted and true centres (centroids); a pair
  counts when the distance is <= 6 px.
* boxes: Hungarian matching on box IoU; a pair counts when IoU >= 0.5.
* AP50: average precision of boxes at IoU 0.5 over all scores (greedy matching in decreasing
  score order, all-point interpolated precision-recall area; VOC/COCO style, one class).

Time: wall-clock seconds of the whole call (normalisation, network, watershed, measurements)
on the full 512x512 image, median of ``--repeats`` runs after one warm-up, as seconds per
megapixel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
TILE = 128


def _gt(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage as ndi

    ids = np.unique(mask)
    ids = ids[ids > 0]
    centres = np.asarray(ndi.center_of_mass(np.ones(mask.shape), mask, ids)).reshape(-1, 2)
    objs = ndi.find_objects(mask)
    boxes = np.array(
        [
            [objs[i - 1][0].start, objs[i - 1][1].start, objs[i - 1][0].stop, objs[i - 1][1].stop]
            for i in ids
        ],
        dtype=float,
    ).reshape(-1, 4)
    return centres, boxes


def _match_points(pred: np.ndarray, gt: np.ndarray, dist: float = 6.0) -> int:
    from scipy.optimize import linear_sum_assignment

    if len(pred) == 0 or len(gt) == 0:
        return 0
    d = np.linalg.norm(pred[:, None] - gt[None], axis=-1)
    r, c = linear_sum_assignment(np.where(d <= dist, d, 1e6))
    return int((d[r, c] <= dist).sum())


def _match_boxes(pred: np.ndarray, gt: np.ndarray, thr: float = 0.5) -> int:
    from scipy.optimize import linear_sum_assignment

    from napari_medseg.core.detection import box_iou

    if len(pred) == 0 or len(gt) == 0:
        return 0
    iou = box_iou(pred, gt)
    r, c = linear_sum_assignment(-iou)
    return int((iou[r, c] >= thr).sum())


def _ap50(dets: list[tuple[float, int, np.ndarray]], gts: list[np.ndarray]) -> float:
    """dets: (score, tile index, box); gts: boxes per tile."""
    from napari_medseg.core.detection import box_iou

    n_gt = sum(len(g) for g in gts)
    if n_gt == 0 or not dets:
        return 0.0
    used = [np.zeros(len(g), dtype=bool) for g in gts]
    tp = []
    for _, k, box in sorted(dets, key=lambda d: -d[0]):
        g = gts[k]
        if len(g) == 0:
            tp.append(0)
            continue
        iou = box_iou(box[None], g)[0]
        iou[used[k]] = -1
        j = int(np.argmax(iou))
        if iou[j] >= 0.5:
            used[k][j] = True
            tp.append(1)
        else:
            tp.append(0)
    tp = np.asarray(tp, dtype=float)
    ctp = np.cumsum(tp)
    prec = ctp / np.arange(1, len(tp) + 1)
    rec = ctp / n_gt
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]).sum())


def _prf(tp: int, n_pred: int, n_gt: int) -> dict:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gt if n_gt else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 3), "recall": round(r, 3), "f1": round(f, 3)}


def score_tiles(method, img, mask, tiles, threshold: float = 0.5) -> dict:
    from napari_medseg.core.detection import boxes_of, filter_detections
    from napari_medseg.core.progress import run_sync
    from napari_medseg.io.record import ImageRecord

    n_pred = n_gt = tp_pt = tp_box = 0
    dets, gts = [], []
    for k, (r, c) in enumerate(tiles):
        crop = img[r : r + TILE, c : c + TILE]
        gmask = mask[r : r + TILE, c : c + TILE]
        g_centres, g_boxes = _gt(gmask)
        rec = ImageRecord(data=crop, affine=np.eye(3), space="pixel", name=f"r{r}_c{c}")
        res = run_sync(method(rec))
        for s, b in zip(res.table["score"], boxes_of(res.table)):
            dets.append((float(s), k, b))
        gts.append(g_boxes)
        kept = filter_detections(res.table, score_threshold=threshold)
        n_pred += len(kept)
        n_gt += len(g_centres)
        tp_pt += _match_points(kept[["y", "x"]].to_numpy(float), g_centres)
        tp_box += _match_boxes(boxes_of(kept), g_boxes)
    return {
        "n_true": n_gt,
        "n_pred": n_pred,
        "points_6px": _prf(tp_pt, n_pred, n_gt),
        "boxes_iou50": _prf(tp_box, n_pred, n_gt),
        "ap50": round(_ap50(dets, gts), 3),
    }


def time_full(method, img, repeats: int) -> dict:
    from napari_medseg.core.progress import run_sync
    from napari_medseg.io.record import ImageRecord

    rec = ImageRecord(data=img, affine=np.eye(3), space="pixel", name="dsb")
    run_sync(method(rec))  # warm-up (imports, first-call allocations)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = run_sync(method(rec))
        times.append(time.perf_counter() - t0)
    mp = img.size / 1e6
    med = float(np.median(times))
    return {
        "seconds": round(med, 3),
        "min_seconds": round(min(times), 3),
        "min_s_per_megapixel": round(min(times) / mp, 3),
        "s_per_megapixel": round(med / mp, 3),
        "n_objects_full_image": len(res.table),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import tifffile
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_medseg.core.detection import detect, detect_classical
    from napari_medseg.models.registry import builtin_models_dir, load_model

    folder = DATA / "microscopy/dsb2018_nuclei"
    img = tifffile.imread(folder / "image.tif")
    mask = tifffile.imread(folder / "mask.tif")
    card = json.loads((builtin_models_dir() / "fluo_nuclei_2d/model.json").read_text())
    val = card["training"]["val_cases"]
    train = card["training"]["train_cases"]

    def tiles_of(names):
        out = []
        for n in names:
            m = re.fullmatch(r"dsb_r(\d+)_c(\d+)", n)
            out.append((int(m.group(1)), int(m.group(2))))
        return out

    model = load_model("fluo_nuclei_2d", device="cpu")
    methods = {
        "fluo_nuclei_2d + watershed": lambda rec: detect(rec, model, device="cpu"),
        "classical Otsu + watershed": lambda rec: detect_classical(rec),
    }
    report = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()} (2 CPU cores, shared, loaded)",
        "held_out_tiles": val,
        "results": {},
    }
    for name, fn in methods.items():
        report["results"][name] = {
            "held_out": score_tiles(fn, img, mask, tiles_of(val)),
            "training_tiles_seen_by_the_model": score_tiles(fn, img, mask, tiles_of(train)),
            "time_512x512": time_full(fn, img, args.repeats),
        }
    print(json.dumps(report, indent=2))
    print()
    print("| method | held-out F1 @6px (P/R) | F1 @IoU0.5 | AP50 | s/MP median (min) |")
    print("|---|---|---|---|---|")
    for name, r in report["results"].items():
        h = r["held_out"]
        p = h["points_6px"]
        print(
            f"| {name} | {p['f1']} ({p['precision']}/{p['recall']}) | "
            f"{h['boxes_iou50']['f1']} | {h['ap50']} | {r['time_512x512']['s_per_megapixel']} "
            f"({r['time_512x512']['min_s_per_megapixel']}) |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
