"""Network-heavy segmentation end to end: ``napari-medseg segment`` vs MONAI's bundle pipeline.

Input: a real CT made full size. The 512x512 DICOM series of ``ct/totalseg_small`` (20 slices,
real HU) is stacked along z, mirrored at each end so no slice jumps, to 512x512x300, labelled
0.8x0.8x2.5 mm and saved as int16 ``.nii.gz`` in a temporary folder (never in the repository).

Model: the spleen_ct_segmentation MONAI bundle (its real ``configs/`` from ../shared/data, a
UNet at 1.5x1.5x2 mm, 96^3 windows, overlap 0.5, batch 4) with random weights (seed 0). Random
weights put every voxel in one class, which would make any agreement figure 1.0 whatever ran,
so the last convolution's bias is shifted once (before saving the weights) so that both classes
occur on this CT; that changes nothing in the cost.

Pipelines, each a whole process (imports, model loading, reading, writing included), run
alternately ``--repeats`` times after one warm-up of each:

* ``monai``: MONAI's standard bundle pipeline (LoadImaged, EnsureChannelFirstd, Orientationd,
  Spacingd bilinear, ScaleIntensityRanged, sliding_window_inference, softmax, Invertd on the
  probabilities, AsDiscreted argmax, SaveImaged uint8) in fp32, as in
  ``../shared/reference/anchor_monai_pipeline.py``, with the bundle's own inferer settings
  (``SlidingWindowInferer``: constant blending of the logits), which our bundle loader also
  reads, so the label files can be compared.
* ``ours``: ``napari-medseg segment CT -m BUNDLE -o OUT --verbose`` (``--precision auto``).
* ``monai-bf16`` / ``ours --precision bf16``: only where the CPU runs bf16 natively
  (``avx512_bf16``/AMX); elsewhere the table says so.

Reported: median wall time and CPU time (user + sys, a steadier figure on a shared machine)
per process, peak RSS per process (``wait4``), the stage timings
from our provenance, Dice agreement of the label files, the CPU model and the load average.
``--micro`` instead times the network alone on batches of four 96^3 windows (as loaded, BN
folded, folded + channels_last_3d, and ``torch.compile`` with ``--compile``), alternating, with
the network's floating-point operations (``torch.utils.flop_counter``) per second against this
CPU's fp32 matrix-multiply throughput (a 4096^2 ``sgemm`` on the same threads): how far the
network pass is from what the CPU can do in fp32 at all.

Run: ``python benchmarks/bench_fastpath.py [--repeats 2] [--micro] [--compile]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
BUNDLE = DATA / "monai_bundles" / "spleen_ct_segmentation"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def make_input(tmp: Path, nz: int = 300) -> Path:
    """The real 512x512 CT series stacked (mirrored) to ``nz`` slices at 0.8x0.8x2.5 mm."""
    import nibabel as nib

    from napari_medseg.io import read_image

    rec = read_image(DATA / "ct" / "totalseg_small" / "dicom")[0]
    a = np.asarray(rec.data)
    n = a.shape[2]
    idx = np.resize(np.concatenate([np.arange(n), np.arange(n - 2, 0, -1)]), nz)
    aff = np.array(rec.affine, dtype=float)
    aff[:3, :3] = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0) * np.array([0.8, 0.8, 2.5])
    out = tmp / "ct512.nii.gz"
    nib.save(nib.Nifti1Image(a[:, :, idx].astype(np.int16), aff), str(out))
    return out


def make_bundle(tmp: Path, image: Path) -> Path:
    """The bundle's configs with random weights (seed 0), last bias centred on this CT."""
    import torch

    from napari_medseg.core.engine.preprocess import to_model_grid
    from napari_medseg.io import read_image
    from napari_medseg.models.registry import load_model

    root = tmp / "spleen_ct_segmentation"
    shutil.copytree(BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    torch.save(net.state_dict(), root / "models" / "model.pt")
    model = load_model(str(root), device="cpu")
    x, _ = to_model_grid(read_image(image)[0], model.card)
    c = [s // 2 for s in x.shape[1:]]
    win = x[:, c[0] - 48 : c[0] + 48, c[1] - 48 : c[1] + 48, c[2] - 48 : c[2] + 48]
    net.eval()
    with torch.no_grad():
        y = net(win[None])[0]
    shift = float(torch.quantile((y[1] - y[0]).flatten()[::7], 0.7))
    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.bias[1] -= shift
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def run_monai(image: str, bundle: str, out: str, amp: str) -> dict:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    t0 = time.perf_counter()
    net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    net.load_state_dict(torch.load(Path(bundle) / "models" / "model.pt", weights_only=True))
    net.eval()
    pre = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", "RAS"),
            Spacingd("image", (1.5, 1.5, 2.0), mode="bilinear"),
            ScaleIntensityRanged("image", -57, 164, 0, 1, clip=True),
            EnsureTyped("image"),
        ]
    )
    post = Compose(
        [
            Invertd("pred", pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted("pred", argmax=True),
            SaveImaged(
                "pred",
                output_dir=str(Path(out).parent),
                output_postfix="monai",
                separate_folder=False,
                output_dtype=np.uint8,
                resample=False,
            ),
        ]
    )
    t = {}
    t1 = time.perf_counter()
    d = pre({"image": image})
    t["load+preprocess"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        y = sliding_window_inference(
            d["image"][None], (96, 96, 96), 4, net, overlap=0.5, mode="constant"
        )
    t["sliding_window"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    d["pred"] = torch.softmax(y[0].float(), 0)
    post(d)
    t["invert+argmax+save"] = time.perf_counter() - t1
    t["in_process_total"] = time.perf_counter() - t0
    return {"timings_s": {k: round(v, 2) for k, v in t.items()}}


def _spawn_rss(cmd: list[str]) -> dict:
    """Run a whole process: its wall time, its own peak RSS (``os.wait4``), its last JSON line."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = p.stdout.read()  # type: ignore[union-attr]
        _, status, ru = os.wait4(p.pid, 0)  # reap it here, for its own rusage
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        errtext = err.read()
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{errtext[-3000:]}")
    res: dict = {
        "wall_s": round(wall, 2),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "peak_rss_mb": round(ru.ru_maxrss / 1024),
    }
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            res.update(json.loads(line))
            break
    return res


def ours_cmd(image: Path, bundle: Path, out: Path, precision: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "napari_medseg.cli",
        "segment",
        str(image),
        "-m",
        str(bundle),
        "-o",
        str(out),
        "--precision",
        precision,
        "--overwrite",
        "--quiet",
    ]


def monai_cmd(image: Path, bundle: Path, out: Path, amp: str) -> list[str]:
    return [sys.executable, __file__, "--child", amp, str(image), str(bundle), str(out)]


def dice_per_class(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for c in sorted(set(np.unique(a)) | set(np.unique(b))):
        x, y = a == c, b == c
        s = int(x.sum()) + int(y.sum())
        out[int(c)] = 1.0 if s == 0 else round(2.0 * int((x & y).sum()) / s, 5)
    return out


def micro(compile_too: bool, rounds: int) -> None:
    """Network alone, batches of four 96^3 windows, variants alternating."""
    import torch
    from monai.networks.nets import UNet

    from napari_medseg.core.engine.fastpath import prepare_network

    torch.manual_seed(0)
    net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    net.eval()
    x = torch.rand(4, 1, 96, 96, 96)
    variants = {
        "as loaded (fp32, no_grad)": prepare_network(net, "cpu", "fp32", enabled=False)[0],
        "BN folded, inference_mode": prepare_network(
            net, "cpu", "fp32", memory_format="contiguous"
        )[0],
        "channels_last_3d, not folded": prepare_network(
            net, "cpu", "fp32", memory_format="channels_last", fold_bn=False
        )[0],
        "BN folded + channels_last_3d (auto)": prepare_network(net, "cpu", "auto")[0],
    }
    if compile_too:
        t0 = time.perf_counter()
        comp, _ = prepare_network(net, "cpu", "auto", compile=True)
        with torch.no_grad():
            comp(x)
        print(f"torch.compile: first call (compiling) {time.perf_counter() - t0:.1f} s")
        variants["+ torch.compile"] = comp
    with torch.no_grad():
        for m in variants.values():
            m(x)
    res: dict[str, list] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(rounds):
            for k, m in variants.items():
                t, c = time.perf_counter(), time.process_time()
                m(x)
                res[k].append((time.perf_counter() - t, time.process_time() - c))
    gflop, sgemm = _flops(net, x), _sgemm_gflops()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    print(f"network: {gflop:.1f} GFLOP per batch; fp32 sgemm 4096^2: {sgemm:.1f} GFLOP/s")
    print(
        "| network variant | wall s per batch (min / median) | CPU s per batch (median) "
        "| GFLOP/s (best) | % of sgemm |"
    )
    print("|---|---|---|---|---|")
    for k, v in res.items():
        w = sorted(a for a, _ in v)
        c = sorted(b for _, b in v)
        rate = gflop / w[0]
        print(
            f"| {k} | {w[0]:.3f} / {w[len(w) // 2]:.3f} | {c[len(c) // 2]:.3f} "
            f"| {rate:.1f} | {rate / sgemm:.0%} |"
        )


def _flops(net, x) -> float:
    """Floating-point operations (GFLOP, multiply-add = 2) of one forward pass."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x)
    return fc.get_total_flops() / 1e9


def _sgemm_gflops(n: int = 4096, rounds: int = 5) -> float:
    """Best fp32 matrix-multiply throughput (GFLOP/s) on torch's current threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(rounds))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep", help="folder for the inputs and outputs (default: a temp dir)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up runs")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        amp, image, bundle, out = a.child
        print(json.dumps(run_monai(image, bundle, out, amp)))
        return 0
    if a.micro:
        micro(a.compile, a.rounds)
        return 0
    import nibabel as nib

    from napari_medseg.core.engine.fastpath import bf16_support

    if not (DATA / "ct" / "totalseg_small" / "dicom").is_dir() or not BUNDLE.is_dir():
        print(f"the real CT series or the spleen bundle configs are missing under {DATA}")
        return 1
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_fastpath_"))
    tmp.mkdir(parents=True, exist_ok=True)
    image = tmp / "ct512.nii.gz"
    if not image.exists():
        image = make_input(tmp)
    bundle = tmp / "spleen_ct_segmentation"
    if not bundle.exists():
        bundle = make_bundle(tmp, image)
    bf16, why = bf16_support("cpu")
    runs = {
        "monai fp32": monai_cmd(image, bundle, tmp / "ct512.nii.gz", "fp32"),
        "napari-medseg auto": ours_cmd(image, bundle, tmp / "ours.nii.gz", "auto"),
    }
    if bf16:
        runs["monai bf16"] = monai_cmd(image, bundle, tmp / "ct512.nii.gz", "bf16")
        runs["napari-medseg bf16"] = ours_cmd(image, bundle, tmp / "ours_bf16.nii.gz", "bf16")
    load0 = os.getloadavg()
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, load before {load0}", flush=True)
    for name, cmd in runs.items() if not a.no_warmup else ():  # file cache, kernels
        _spawn_rss(cmd)
        print(f"warm-up {name} done", flush=True)
    res: dict[str, list] = {k: [] for k in runs}
    for r in range(a.repeats):
        for name, cmd in runs.items():
            res[name].append(_spawn_rss(cmd))
            last = res[name][-1]
            print(f"run {r + 1} {name}: {last['wall_s']} s, CPU {last['cpu_s']} s", flush=True)
    load1 = os.getloadavg()
    ours_lab = np.asarray(nib.load(str(tmp / "ours.nii.gz")).dataobj)
    monai_lab = np.asarray(nib.load(str(tmp / "ct512_monai.nii.gz")).dataobj).reshape(
        ours_lab.shape
    )
    prov = json.loads((tmp / "ours.nii.gz.provenance.json").read_text())
    print(f"\n{cpu_name()}, {os.cpu_count()} CPUs; load average before {load0}, after {load1}")
    print(f"bf16: {why}" + ("" if bf16 else " -> bf16 rows not run"))
    print("| pipeline | median wall s (runs) | median CPU s (user+sys) | peak RSS MB (max) |")
    print("|---|---|---|---|")
    for name, rs in res.items():
        walls = [r["wall_s"] for r in rs]
        print(
            f"| {name} | {statistics.median(walls):.1f} ({', '.join(f'{w:.1f}' for w in walls)}) "
            f"| {statistics.median(r['cpu_s'] for r in rs):.1f} "
            f"| {max(r['peak_rss_mb'] for r in rs)} |"
        )
    ratio = {}
    for k in ("wall_s", "cpu_s"):
        m = statistics.median(r[k] for r in res["monai fp32"])
        ratio[k] = m / statistics.median(r[k] for r in res["napari-medseg auto"])
    dice = dice_per_class(ours_lab, monai_lab)
    print(
        f"speed-up {ratio['wall_s']:.2f}x wall, {ratio['cpu_s']:.2f}x CPU time; "
        f"Dice per class ours vs MONAI {dice}"
    )
    print(f"foreground fraction ours {float((ours_lab > 0).mean()):.3f}")
    print("MONAI stages (last run):", res["monai fp32"][-1].get("timings_s"))
    print("ours stages (last run):", prov.get("timings_s"))
    print("ours fast path:", json.dumps(prov.get("fast_path")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
