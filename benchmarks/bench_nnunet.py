"""napari-medseg vs nnunetv2's own predictor on one nnU-Net v2 model folder, whole processes.

Both run as separate processes on the same model folder, image and fold, on the CPU:

* reference: ``nnUNetv2_predict_from_modelfolder -i IN -o OUT -m FOLDER -f 0 -device cpu``
  (``--disable_tta`` without mirroring; ``-npp 1 -nps 1``: one preprocessing and one export
  worker, the least memory nnU-Net allows);
* ours: ``napari-medseg segment IMAGE -m FOLDER -o OUT --folds 0 --device cpu``
  (``--no-mirror`` without mirroring).

Each process's wall time and the peak resident memory of its whole process tree (sampled every
50 ms with psutil: nnU-Net's worker processes count) are measured; the labels are compared
(Dice per class the reference predicts with >= 1,000 voxels). The model folder is made with
nnunetv2's own planner and trainer (``scripts/make_nnunet_model.py``, random initialisation)
unless ``--model`` names one.

Default: the skull-stripped T1 brain (160 x 192 x 224 at 1 mm; nonzero box 155 x 171 x 191)
with a plan at 0.65 mm: the cropped, resampled grid is 238 x 263 x 294 = 18.4 M voxels
(>= 256^3 = 16.8 M). Example (a smaller plan for a loaded machine)::

    python benchmarks/bench_nnunet.py --target-spacing 1.5 1.5 1.5 --no-mirror
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS of the process tree in MB, stderr tail) of one command."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return wall, peak / 2**20, err.decode()[-400:]


def dice_per_class(ref: np.ndarray, ours: np.ndarray, min_voxels: int = 1000) -> dict:
    out = {}
    for c in np.unique(ref):
        a = ref == c
        if a.sum() >= min_voxels:
            b = ours == c
            out[int(c)] = round(2 * float((a & b).sum()) / float(a.sum() + b.sum()), 5)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an nnU-Net model folder (default: build one)")
    ap.add_argument("--image", default=str(DATA / "mri/brain_t1_aseg/t1.nii.gz"))
    ap.add_argument("--kind", default="brain", help="dataset of scripts/make_nnunet_model.py")
    ap.add_argument("--target-spacing", nargs=3, type=float, default=[0.65, 0.65, 0.65])
    ap.add_argument("--gpu-memory-target", type=float, default=0.5)
    ap.add_argument("--no-mirror", action="store_true", help="only the run without mirroring")
    ap.add_argument("--mirror-only", action="store_true", help="only the run with mirroring")
    ap.add_argument("--work", default=None, help="working folder (default: a temp folder)")
    ap.add_argument("--json", help="also write the results there")
    args = ap.parse_args(argv)

    import nibabel as nib

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-nnunet-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        folder = Path(args.model)
    else:
        cmd = [sys.executable, str(REPO / "scripts" / "make_nnunet_model.py"), "--kind",
               args.kind, "--configs", "3d_fullres", "--folds", "0", "-o", str(work / "model"),
               "--gpu-memory-target", str(args.gpu_memory_target), "--target-spacing",
               *map(str, args.target_spacing)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        folder = Path(json.loads(out.strip().splitlines()[-1])["3d_fullres"])
    plans = json.loads((folder / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    inp = work / "input"
    inp.mkdir(exist_ok=True)
    case = inp / "case_0000.nii.gz"
    if not case.exists():
        shutil.copy(args.image, case)
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.setdefault(var, str(work))
    nn_bin = shutil.which("nnUNetv2_predict_from_modelfolder")
    ours_bin = [sys.executable, "-m", "napari_medseg.cli"]
    modes = [False] if args.no_mirror else [True] if args.mirror_only else [False, True]
    rows = []
    for mirror in modes:
        ref_dir = work / f"ref_{'mirror' if mirror else 'plain'}"
        shutil.rmtree(ref_dir, ignore_errors=True)
        ref_cmd = [nn_bin, "-i", str(inp), "-o", str(ref_dir), "-m", str(folder), "-f", "0",
                   "-device", "cpu", "-npp", "1", "-nps", "1",
                   "--disable_progress_bar"]  # fmt: skip
        if not mirror:
            ref_cmd.append("--disable_tta")
        ours_out = work / f"ours_{'mirror' if mirror else 'plain'}.nii.gz"
        ours_cmd = [*ours_bin, "segment", str(case), "-m", str(folder), "-o", str(ours_out),
                    "--folds", "0", "--device", "cpu", "--overwrite", "--quiet"]  # fmt: skip
        if not mirror:
            ours_cmd.append("--no-mirror")
        t_ours, m_ours, _ = run_measured(ours_cmd, env)
        t_ref, m_ref, _ = run_measured(ref_cmd, env)
        ref = np.asarray(nib.load(str(ref_dir / "case.nii.gz")).dataobj)
        ours = np.asarray(nib.load(str(ours_out)).dataobj)
        prov = (
            json.loads(Path(str(ours_out) + ".provenance.json").read_text())
            if Path(str(ours_out) + ".provenance.json").exists()
            else {}
        )
        grid = (prov.get("parameters") or {}).get("network_grid_shape")
        row = {
            "mirroring": mirror,
            "network_grid": grid,
            "network_grid_voxels": int(np.prod(grid)) if grid else None,
            "ours_s": round(t_ours, 1),
            "nnunet_s": round(t_ref, 1),
            "speedup": round(t_ref / t_ours, 2),
            "ours_peak_rss_mb": round(m_ours),
            "nnunet_peak_rss_mb": round(m_ref),
            "rss_ratio": round(m_ours / m_ref, 2),
            "dice": dice_per_class(ref, ours),
            "identical_voxels": round(float((ref == ours).mean()), 6),
            "ours_stage_s": (prov.get("parameters") or {}).get("timings_s"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "model": str(folder),
        "image": args.image,
        "patch_size": cfg["patch_size"],
        "target_spacing": cfg["spacing"],
        "features_per_stage": cfg["architecture"]["arch_kwargs"]["features_per_stage"],
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()}",
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
