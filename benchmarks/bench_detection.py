"""Detection quality and speed: box detector vs segmentation + watershed vs classical, same run.

Run: ``python benchmarks/bench_detection.py [--repeats 3] [--threads N] [--json OUT]``
(needs ../shared/data or ``$MEDSEG_DATA``).

Data: ``microscopy/dsb2018_nuclei`` (512x512 fluorescence, 125 nuclei, MANUAL instance mask).
``fluo_nuclei_2d`` (segmentation, objects by watershed) and ``fluo_nuclei_det_2d`` (the
centre-heatmap box detector) were trained on the same 16 tiles of 128x128 of this very image
with the same split; their cards'

``training.val_cases`` lists the tiles it never trained on (``dsb_r000_c256``,
``dsb_r000_c384``, ``dsb_r256_c384``: ``dsb_r<row>_c<col>`` = ``image[row:row+128,
col:col+128]``). Quality is scored ONLY on those held-out tiles: each tile is cut out and
detected on its own (as the model saw its training tiles), the ground truth is the mask cut the
same way. Scores on the 13 training tiles are printed too, marked as seen in training.

Metrics (pooled over the tiles, every method with score >= 0.5 for P/R/F1):

* points: one-to-one Hungarian matching of predicted centres (the table's ``y, x``: centroid
  of an instance, box centre for the box detector) and true centres (mask centroids); a pair
  counts when the distance is <= 6 px.
* boxes: Hungarian matching on box IoU; a pair counts when IoU >= 0.5.
* AP50: average precision of boxes at IoU 0.5 over all scores (greedy matching in decreasing
  score order, all-point interpolated precision-recall area; VOC/COCO style, one class).

Time: wall-clock seconds of the whole call (normalisation, network, watershed or peak
decoding, measurements) on the full 512x512 image (sliding window of 128x128, overlap 0.5, for
both networks), median of ``--repeats`` runs after one warm-up, as seconds per megapixel.
Torch runs on ONE thread (``--threads``, default 1): the machine's 2 cores are shared.

MONAI RetinaNet (``--retinanet-budget S``, default 420 s = the built-in detector's budget; 0
skips it): trained in this run on the same 13 training tiles for the same time, then scored and
timed like the others (see :func:`train_retinanet`), so the choice between the two box
detectors is made on numbers from one run.
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

    from napari_medseg.core.detect.result import box_iou

    if len(pred) == 0 or len(gt) == 0:
        return 0
    iou = box_iou(pred, gt)
    r, c = linear_sum_assignment(-iou)
    return int((iou[r, c] >= thr).sum())


def _ap50(dets: list[tuple[float, int, np.ndarray]], gts: list[np.ndarray]) -> float:
    """dets: (score, tile index, box); gts: boxes per tile (VOC all-point AP at IoU 0.5)."""
    from napari_medseg.core.detect.scores import average_precision

    return average_precision(dets, gts, 0.5)


def _prf(tp: int, n_pred: int, n_gt: int) -> dict:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gt if n_gt else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 3), "recall": round(r, 3), "f1": round(f, 3)}


def score_tiles(method, img, mask, tiles, threshold: float = 0.5) -> dict:
    from napari_medseg.core.detect.result import boxes_of, filter_detections
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.progress import run_sync

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
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.progress import run_sync

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


# --------------------------------------------------------------------------- MONAI RetinaNet


def _tile_boxes(mask: np.ndarray) -> np.ndarray:
    return _gt(mask)[1]


#: FPN and head channels of the RetinaNet (MONAI's resnet_fpn_feature_extractor uses 256; 64
#: keeps its compute near the U-Net detector's on this 2-core CPU)
FPN_CHANNELS = 64


def _FPNExtractor(backbone, returned_layers, out_channels):  # noqa: N802 - a module factory
    """MONAI's ``BackboneWithFPN`` without torchvision.

    ``monai.apps.detection``'s ``resnet_fpn_feature_extractor`` / ``BackboneWithFPN`` take two
    helpers from torchvision (a trainable-layers check and ``IntermediateLayerGetter``), which
    is not installed here (installing it would pull another torch). This is the same network:
    the ResNet's stem and ``layer1..layerN`` in order, the outputs of ``returned_layers`` into
    MONAI's ``FeaturePyramidNetwork`` with ``LastLevelMaxPool`` (every layer trainable, as
    without a pretrained backbone).
    """
    import torch
    from monai.networks.blocks.feature_pyramid_network import (
        FeaturePyramidNetwork,
        LastLevelMaxPool,
    )

    class Extractor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            stage2 = backbone.in_planes // 8
            self.names = [f"layer{k}" for k in returned_layers]
            self.fpn = FeaturePyramidNetwork(
                spatial_dims=2,
                in_channels_list=[stage2 * 2 ** (i - 1) for i in returned_layers],
                out_channels=out_channels,
                extra_blocks=LastLevelMaxPool(2),
            )
            self.out_channels = out_channels

        def forward(self, x):
            b = self.backbone
            x = b.act(b.bn1(b.conv1(x)))
            if not b.no_max_pool:
                x = b.maxpool(x)
            feats = {}
            for name in ["layer1", "layer2", "layer3", "layer4"]:
                x = getattr(b, name)(x)
                if name in self.names:
                    feats[str(self.names.index(name))] = x
                if len(feats) == len(self.names):
                    break
            return self.fpn(feats)

    return Extractor()


def train_retinanet(img, mask, tiles, budget: float, seed: int = 0) -> tuple:
    """Train MONAI's RetinaNet (monai.apps.detection) on the training tiles for ``budget`` s.

    The MONAI detection tutorial's recipe in 2D and small: ResNet (BasicBlock, layers 1-1-1-1,
    16-128 channels) + FPN (returned layers 1, 2; FPN and heads with ``FPN_CHANNELS``),
    anchors 6/8/10 px x feature-map scales 1, 2, 4 (6 to 40 px, the DSB nuclei are 8 to 39 px),
    ATSS matcher, hard negative sampler, BCE + smooth L1, AdamW 1e-3 with poly decay; whole
    128x128 tiles, batch 8, flips and transposes (exact for boxes). Boxes in MONAI's
    ``xyxy`` mode with x = array axis 0, i.e. exactly our ``mins, maxs`` rows.

    Returns ``(detector, info)``.
    """
    import monai.apps.detection.networks.retinanet_detector as rd
    import torch
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet
    from monai.utils import optional_import

    from napari_medseg.core.engine.preprocess import normalize

    if not optional_import("torchvision")[1]:
        # the detector tests isinstance(matcher, torchvision Matcher) even with MONAI's own ATSS
        # matcher and hard negative sampler (used here); without torchvision that name is a stub
        # that raises, so give it a class nothing is an instance of
        rd.Matcher = type("Matcher", (), {})
        rd.BalancedPositiveNegativeSampler = type("BalancedPositiveNegativeSampler", (), {})
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    layers = [1, 2]
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[1, 2, 4], base_anchor_shapes=((6, 6), (8, 8), (10, 10))
    )
    backbone = resnet.ResNet(
        block=resnet.ResNetBlock,
        layers=[1, 1, 1, 1],
        block_inplanes=[16, 32, 64, 128],
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_stride=(2, 2),
        conv1_t_size=(7, 7),
    )
    fe = _FPNExtractor(backbone, layers, FPN_CHANNELS)
    div = [int(st) * 2 * 2 ** max(layers) for st in backbone.conv1.stride]
    net = RetinaNet(
        spatial_dims=2,
        num_classes=1,
        num_anchors=anchors.num_anchors_per_location()[0],
        feature_extractor=fe,
        size_divisible=div,
    )
    det = RetinaNetDetector(network=net, anchor_generator=anchors, debug=False)
    det.set_atss_matcher(num_candidates=4, center_in_gt=False)
    det.set_hard_negative_sampler(
        batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16
    )
    det.set_target_keys(box_key="box", label_key="label")
    det.set_box_selector_parameters(
        score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22, detections_per_img=300
    )
    norm = {"scheme": "percentile", "lower": 0.5, "upper": 99.5}
    data = []
    for r, c in tiles:
        x = normalize(img[r : r + TILE, c : c + TILE].astype(np.float32)[None], norm, 0)
        data.append((x, _tile_boxes(mask[r : r + TILE, c : c + TILE])))
    opt = torch.optim.AdamW(det.parameters(), lr=1e-3, weight_decay=3e-5)
    t0 = time.monotonic()
    it = 0
    det.train()
    while time.monotonic() - t0 < budget:
        xs, targets = [], []
        for _ in range(8):
            x, b = data[int(rng.integers(len(data)))]
            x, b = x.copy(), b.copy()
            for a in (0, 1):
                if rng.random() < 0.5:
                    x = np.flip(x, a + 1)
                    b[:, [a, a + 2]] = TILE - b[:, [a + 2, a]]
            if rng.random() < 0.5:
                x = np.swapaxes(x, 1, 2)
                b = b[:, [1, 0, 3, 2]]
            xs.append(torch.from_numpy(np.ascontiguousarray(x)))
            targets.append(
                {"box": torch.from_numpy(b).float(), "label": torch.zeros(len(b), dtype=torch.long)}
            )
        for g in opt.param_groups:
            g["lr"] = 1e-3 * (1 - min((time.monotonic() - t0) / budget, 0.999)) ** 0.9
        losses = det(torch.stack(xs), targets)
        loss = losses[det.cls_key] + losses[det.box_reg_key]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
    det.eval()
    n_par = sum(p.numel() for p in det.parameters())
    return det, {"iterations": it, "time_s": round(time.monotonic() - t0, 1), "parameters": n_par}


def retinanet_method(det):
    """A detect()-like generator around a trained RetinaNet (whole image, one forward pass)."""
    import torch

    from napari_medseg.core.detect.boxes import boxes_table
    from napari_medseg.core.detect.result import DetectionResult
    from napari_medseg.core.engine.preprocess import normalize
    from napari_medseg.progress import Progress

    norm = {"scheme": "percentile", "lower": 0.5, "upper": 99.5}

    def run(rec):
        yield Progress(0, 1, "RetinaNet")
        x = normalize(np.asarray(rec.data, np.float32)[None], norm, 0)
        with torch.no_grad():
            out = det([torch.from_numpy(np.ascontiguousarray(x))], use_inferer=False)[0]
        boxes = out["box"].numpy().astype(float).reshape(-1, 4)
        scores = out["label_scores"].numpy().astype(float)
        centres = (boxes[:, :2] + boxes[:, 2:] - 1) / 2
        table = boxes_table(
            boxes, centres, scores, ["nucleus"], np.zeros(len(scores), int), rec.affine,
            rec.space, tuple(rec.data.shape[:2]),
        )  # fmt: skip
        return DetectionResult(table, None, np.asarray(rec.affine), rec.space, {}, {})

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--retinanet-budget",
        type=float,
        default=420.0,
        help="seconds to train MONAI RetinaNet on the same tiles (the built-in detector's "
        "budget; 0 skips it)",
    )
    args = ap.parse_args()
    import tifffile
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_medseg.core.detect.classical import detect_classical
    from napari_medseg.core.detect.detection import detect
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
    detector = load_model("fluo_nuclei_det_2d", device="cpu")
    det_val = detector.card.training["val_cases"]
    if sorted(det_val) != sorted(val):
        raise SystemExit(f"the two models hold out different tiles: {det_val} vs {val}")
    methods = {
        "fluo_nuclei_det_2d (box detector)": lambda rec: detect(rec, detector, device="cpu"),
        "fluo_nuclei_2d + watershed": lambda rec: detect(rec, model, device="cpu"),
        "classical Otsu + watershed": lambda rec: detect_classical(rec),
    }
    retina_info = None
    if args.retinanet_budget > 0:
        det, retina_info = train_retinanet(img, mask, tiles_of(train), args.retinanet_budget)
        methods["MONAI RetinaNet (same tiles, same budget)"] = retinanet_method(det)
    report = {
        "retinanet_training": retina_info,
        "detector_training": detector.card.training.get("recipe"),
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
    print("| method | held-out F1 @6px (P/R) | F1 @IoU0.5 (P/R) | AP50 | s/MP median (min) |")
    print("|---|---|---|---|---|")
    for name, r in report["results"].items():
        h = r["held_out"]
        p, b = h["points_6px"], h["boxes_iou50"]
        print(
            f"| {name} | {p['f1']} ({p['precision']}/{p['recall']}) | "
            f"{b['f1']} ({b['precision']}/{b['recall']}) | {h['ap50']} | "
            f"{r['time_512x512']['s_per_megapixel']} "
            f"({r['time_512x512']['min_s_per_megapixel']}) |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
