"""Training from nnU-Net-layout datasets: loading, fingerprint, train/fine-tune, honest validation.

Real crops from ../shared/data (spleen CT, DSB nuclei, IHC tile), tiny networks, a few seconds
of training each.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

DATA = Path(
    os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not (DATA / "README.md").is_file(), reason=f"real test data not found at {DATA}"
)

pytestmark = needs_data

# awkward crop sizes (not powers of two) to catch padding bugs
CT_CROPS = {"spl_a": (100, 80, 8), "spl_b": (40, 40, 8), "spl_c": (110, 100, 6)}
CT_SHAPE = (40, 41, 12)


def _write_nifti(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


@functools.lru_cache(maxsize=1)
def _spleen_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(DATA / "ct/spleen/image.nii.gz"))
    lab = nib.load(str(DATA / "ct/spleen/label.nii.gz"))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(lab.dataobj), img.affine


def _ct_crop(x0: int, y0: int, z0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vol, lab, affine = _spleen_volume()
    sl = (slice(x0, x0 + CT_SHAPE[0]), slice(y0, y0 + CT_SHAPE[1]), slice(z0, z0 + CT_SHAPE[2]))
    aff = affine.copy()
    aff[:3, 3] = affine[:3, :3] @ np.array([x0, y0, z0]) + affine[:3, 3]
    return vol[sl].copy(), lab[sl].astype(np.uint8), aff


def _mkdirs(root: Path) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def ct_dataset(tmp_path_factory) -> Path:
    """Three 40x41x12 spleen CT crops; spl_b stored LPS (flipped i, j) to test reorientation."""
    root = _mkdirs(tmp_path_factory.mktemp("ct") / "Dataset901_SpleenCrop")
    for name, (x0, y0, z0) in CT_CROPS.items():
        im, lb, aff = _ct_crop(x0, y0, z0)
        if name == "spl_b":  # same voxels stored L-P-S: flip i and j, fix the affine
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = [CT_SHAPE[0] - 1, CT_SHAPE[1] - 1]
            im, lb, aff = im[::-1, ::-1].copy(), lb[::-1, ::-1].copy(), aff @ flip
        _write_nifti(root / f"imagesTr/{name}_0000.nii.gz", im, aff)
        _write_nifti(root / f"labelsTr/{name}.nii.gz", lb, aff)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "spleen": 1},
                "file_ending": ".nii.gz",
                "description": "spleen crops for tests",
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def nuclei_dataset(tmp_path_factory) -> Path:
    """Six 64x64 DSB nuclei tiles (uint16 TIFF), label = mask > 0; no dataset.json labels."""
    import tifffile

    root = _mkdirs(tmp_path_factory.mktemp("nuc") / "Dataset902_Nuclei")
    img = tifffile.imread(str(DATA / "microscopy/dsb2018_nuclei/image.tif"))
    mask = tifffile.imread(str(DATA / "microscopy/dsb2018_nuclei/mask.tif"))
    for i in range(6):
        r, c = 64 * (i // 3), 64 * (i % 3)
        tifffile.imwrite(str(root / f"imagesTr/t{i}_0000.tif"), img[r : r + 64, c : c + 64])
        tifffile.imwrite(
            str(root / f"labelsTr/t{i}.tif"), (mask[r : r + 64, c : c + 64] > 0).astype(np.uint8)
        )
    (root / "dataset.json").write_text(
        json.dumps(
            {"channel_names": {"0": "fluorescence"}, "labels": {"0": "background", "1": "nucleus"}}
        )
    )
    return root


# --------------------------------------------------------------------------- dataset


def test_load_dataset_3d(ct_dataset):
    from napari_medseg.training.dataset import load_dataset

    ds = load_dataset(ct_dataset)
    assert [c.name for c in ds.cases] == ["spl_a", "spl_b", "spl_c"]
    assert ds.labels == {0: "background", 1: "spleen"}
    assert ds.channel_names == {0: "CT"}
    assert ds.dims == 3 and ds.in_channels == 1
    c = ds.cases[0]
    assert c.image.shape == (1, *CT_SHAPE) and c.image.dtype == np.float32
    assert c.label.shape == CT_SHAPE and np.issubdtype(c.label.dtype, np.integer)
    assert np.allclose(c.spacing, (0.795, 0.795, 5.0), atol=1e-3)
    assert c.label.max() == 1 and 0.05 < c.label.mean() < 0.95


def test_reorientation_is_exact(ct_dataset):
    """spl_b is stored LPS; on the model grid (RAS) it must equal the RAS crop voxel for voxel."""
    from napari_medseg.training.dataset import load_dataset
    from napari_medseg.training.fingerprint import plan
    from napari_medseg.training.segment import case_to_model_grid

    ds = load_dataset(ct_dataset)
    card = plan(ds, width=4)
    assert card.orientation == "RAS"
    card.normalization = {"scheme": "none"}
    im, lb, aff = case_to_model_grid(ds.cases[1], card)
    ref_im, ref_lb, ref_aff = _ct_crop(*CT_CROPS["spl_b"])
    # the target spacing equals the crop spacing, so no resampling happens
    assert im.shape == (1, *CT_SHAPE)
    assert np.array_equal(im[0], ref_im) and np.array_equal(lb, ref_lb)
    assert np.allclose(aff, ref_aff, atol=1e-4)


def test_resampling_keeps_world_geometry(ct_dataset):
    from napari_medseg.training.dataset import load_dataset
    from napari_medseg.training.fingerprint import plan
    from napari_medseg.training.segment import case_to_model_grid

    ds = load_dataset(ct_dataset)
    card = plan(ds, width=4)
    card.spacing = [1.6, 1.6, 5.0]
    im, lb, aff = case_to_model_grid(ds.cases[0], card)
    src = ds.cases[0].affine
    sp = np.sqrt((src[:3, :3] ** 2).sum(0))
    # MONAI Spacing's grid: exact target spacing, round((n - 1) * s / t + 1) voxels
    expect = tuple(round((n - 1) * a / b + 1) for n, a, b in zip(CT_SHAPE, sp, card.spacing))
    assert im.shape == (1, *expect) and lb.shape == expect
    assert np.allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), [1.6, 1.6, 5.0], atol=1e-6)
    # the first voxel centre stays where it was
    assert np.allclose(aff[:3, 3], src[:3, 3], atol=1e-4)
    # spleen volume in mm^3 is kept within a few percent by one-hot linear resampling
    v_src = ds.cases[0].label.sum() * np.prod(ds.cases[0].spacing)
    v_new = lb.sum() * np.prod(np.sqrt((aff[:3, :3] ** 2).sum(0)))
    assert abs(v_new / v_src - 1) < 0.05


def test_dataset_errors(tmp_path, ct_dataset):
    import shutil

    from napari_medseg.training.dataset import DatasetError, load_dataset, parse_labels

    bad = tmp_path / "bad"
    shutil.copytree(ct_dataset, bad)
    (bad / "labelsTr/spl_b.nii.gz").unlink()
    with pytest.raises(DatasetError, match="spl_b"):
        load_dataset(bad)

    bad2 = tmp_path / "bad2"
    shutil.copytree(ct_dataset, bad2)
    _, lb, aff = _ct_crop(*CT_CROPS["spl_c"])
    _write_nifti(bad2 / "labelsTr/spl_c.nii.gz", lb[:, :, :-1].copy(), aff)
    with pytest.raises(DatasetError, match=r"spl_c.*shape"):
        load_dataset(bad2)

    empty = _mkdirs(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(empty)
    with pytest.raises(DatasetError, match="imagesTr"):
        load_dataset(tmp_path)

    bad3 = tmp_path / "bad3"
    shutil.copytree(ct_dataset, bad3)
    _, _, aff_a = _ct_crop(*CT_CROPS["spl_a"])  # on spl_a's own grid: only the values are bad
    _write_nifti(bad3 / "labelsTr/spl_a.nii.gz", (lb * 2).astype(np.uint8), aff_a)
    with pytest.raises(DatasetError, match="not listed"):
        load_dataset(bad3)

    assert parse_labels({"background": 0, "spleen": 1}) == {0: "background", 1: "spleen"}
    assert parse_labels({"0": "background", "1": "spleen"}) == {0: "background", 1: "spleen"}
    with pytest.raises(DatasetError, match=r"0\.\.K-1"):
        parse_labels({"background": 0, "liver": 2})


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_and_plan_3d(ct_dataset):
    from napari_medseg.models.networks import build_network
    from napari_medseg.training.dataset import load_dataset
    from napari_medseg.training.fingerprint import compute_fingerprint, plan

    ds = load_dataset(ct_dataset)
    fp = compute_fingerprint(ds)
    assert np.allclose(fp.median_spacing, [0.795, 0.795, 5.0], atol=1e-3)
    assert fp.anisotropic  # 5 mm vs 0.8 mm
    assert fp.median_shape == list(CT_SHAPE)
    st = fp.channels[0]
    assert -200 < st["p00_5"] < st["median"] < st["p99_5"] < 400  # spleen HU, not air or bone
    card = plan(ds, fp, name="t", width=4)
    assert card.modality == "CT" and card.dims == 3 and card.in_channels == 1
    assert card.normalization["scheme"] == "ct"
    assert card.normalization["window"] == [round(st["p00_5"], 1), round(st["p99_5"], 1)]
    assert [c["name"] for c in card.classes] == ["background", "spleen"]
    assert card.classes[1]["color"].startswith("#")
    kw = card.architecture["kwargs"]
    assert card.architecture["name"] == "UNet"
    strides = np.asarray(kw["strides"])
    assert strides[0].tolist() == [2, 2, 1]  # in-plane first on anisotropic data
    total = strides.prod(axis=0)
    assert all(p % t == 0 for p, t in zip(card.patch_size, total))
    assert all(p >= s for p, s in zip(card.patch_size, CT_SHAPE))
    # budget caps the patch
    small = plan(ds, fp, width=4, voxel_budget=16 * 16 * 8)
    assert np.prod(small.patch_size) < np.prod(card.patch_size)
    net = build_network(card)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params * 4 < 2e6


def test_plan_rgb_png_gives_three_channels(tmp_path):
    import imageio.v3 as iio

    from napari_medseg.training.dataset import load_dataset
    from napari_medseg.training.fingerprint import plan

    root = _mkdirs(tmp_path / "Dataset903_RGB")
    tile = iio.imread(str(DATA / "pathology/ihc_tile.png"))[..., :3]
    for i in range(3):
        crop = np.ascontiguousarray(tile[50 * i : 50 * i + 45, 100:148])
        iio.imwrite(str(root / f"imagesTr/c{i}_0000.png"), crop)
        lab = (crop.mean(-1) < 150).astype(np.uint8)  # dark stain, a stand-in label
        iio.imwrite(str(root / f"labelsTr/c{i}.png"), lab)
    ds = load_dataset(root)
    assert ds.cases[0].image.shape == (3, 45, 48) and ds.cases[0].rgb
    card = plan(ds, width=4)
    assert card.in_channels == 3 and card.dims == 2
    assert card.architecture["kwargs"]["in_channels"] == 3
    assert card.normalization["scheme"] == "rgb" and len(card.normalization["mean"]) == 3
    assert card.spacing is None
    assert all(p % 16 == 0 or p % 8 == 0 for p in card.patch_size)


def test_block_split_never_overlaps():
    from napari_medseg.training.patches import split_items

    lab = np.zeros((20, 21, 30), dtype=np.int64)
    lab[5:15, 5:15, 4:26] = 1
    img = np.broadcast_to(np.arange(30, dtype=np.float32), (1, 20, 21, 30)).copy()
    train, val, info = split_items(["one"], [(img, lab)], 3, 0.2, 0, [16, 16, 8])
    assert len(val) == 1 and "single case" in info["held_out"]
    a, b = info["blocks"]["one"]
    assert b - a == 6
    v = val[0]
    assert v.scored(v.label).shape == (20, 21, 6) and v.scored(v.label).any()
    assert v.scored(v.image[0]).shape == (20, 21, 6)
    assert v.scored(v.image[0])[0, 0].tolist() == list(range(a, b))
    # context around the block is image only: up to patch/2 slices each side, not scored
    assert v.label.shape[2] == min(30, b + 4) - max(0, a - 4)
    seen = [int(v) for t in train for v in t.image[0, 0, 0]]
    held = set(range(a, b))
    assert held.isdisjoint(seen)
    assert len(seen) + (b - a) <= 30
    # 2D, three or more cases: whole cases held out
    cases = [(img[..., 0], lab[..., 10])] * 5
    train, val, info = split_items(list("abcde"), cases, 2, 0.2, 0, [16, 16])
    assert len(val) == 1 and len(train) == 4 and info["held_out"] == "held-out cases"
    assert set(info["val_cases"]).isdisjoint(info["train_cases"])


# --------------------------------------------------------------------------- training


def _drive(gen):
    """Run a progress generator; return (result, progress list, (largest gap, where)).

    The gap is measured once training runs (after the first iteration): start-up imports of
    torch/MONAI and the first, warm-up iteration are single calls that take a few seconds.
    """
    seen, worst = [], (0.0, "")
    last, prev = time.monotonic(), "start"
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value, seen, worst
        now = time.monotonic()
        running = any(q.info.get("iteration", 0) >= 1 for q in seen[-1:])
        if running and now - last > worst[0]:
            worst = (now - last, f"between {prev!r} and {p.message!r}")
        last, prev = now, p.message
        seen.append(p)


@pytest.fixture(scope="module")
def trained_ct(ct_dataset, tmp_path_factory):
    from napari_medseg.training.segment import train

    out = tmp_path_factory.mktemp("models") / "spleen_tiny"
    gen = train(
        ct_dataset,
        out,
        time_budget=5.0,
        width=4,
        patch_size=[32, 32, 8],
        batch_size=2,
        device="cpu",
        seed=1,
    )
    return _drive(gen)


def test_train_3d_writes_loadable_model(trained_ct):
    from napari_medseg.models.loaders.folder import load_model_folder
    from napari_medseg.training.segment import TrainResult

    result, seen, gap = trained_ct
    assert isinstance(result, TrainResult)
    model = load_model_folder(result.out_dir)
    card = model.card
    assert card.name == "spleen_tiny" and card.task == "segmentation" and card.dims == 3
    assert card.patch_size == [32, 32, 8]
    tr = card.training
    assert tr["n_train_cases"] == 2 and tr["n_val_cases"] == 1
    assert set(tr["val_cases"]).isdisjoint(tr["train_cases"])
    assert tr["recipe"]["iterations"] > 0 and tr["recipe"]["seed"] == 1
    # the budget is checked between iterations; the first (warm-up) iteration and a validation
    # may end after it, by seconds on this shared 2-core machine
    assert tr["recipe"]["time_s"] < 5.0 + 20.0
    assert tr["dataset"]["name"] == "Dataset901_SpleenCrop"
    m = card.metrics
    assert m["held_out"] == "held-out cases"
    assert 0.0 <= m["val_dice"]["spleen"] <= 1.0
    assert m["val_dice_mean"] == pytest.approx(result.best_val_dice, abs=1e-4)
    assert len(result.history) >= 1 and "val_dice_mean" in result.history[0]
    # the network runs on a patch of the card's size
    import torch

    with torch.no_grad():
        out = model.network(torch.zeros(1, 1, *card.patch_size))
    assert out.shape == (1, 2, *card.patch_size)
    # progress: frequent, with the documented info keys
    infos = [p.info for p in seen if p.info]
    assert {"epoch", "loss", "val_dice"} <= set(infos[-1])
    # < 1 s on an idle CPU; generous here because the test machine's 2 cores are shared
    assert gap[0] < 3.0, f"{gap[0]:.2f} s {gap[1]}"


def test_finetune_keeps_architecture_and_sets_parent(trained_ct, ct_dataset, tmp_path):
    from napari_medseg.models.card import ModelCard
    from napari_medseg.training.segment import train

    result, _, _ = trained_ct
    out = tmp_path / "spleen_ft"
    ft, _, _ = _drive(
        train(
            ct_dataset, out, init=result.out_dir, time_budget=2.0, device="cpu", val_fraction=0.34
        )
    )
    card = ModelCard.load(out)
    parent = result.card
    assert card.architecture == parent.architecture
    assert card.normalization == parent.normalization
    assert card.spacing == parent.spacing
    assert card.parent == f"{parent.name}@{parent.version}"
    assert card.version == str(int(parent.version) + 1)
    assert card.training["fine_tuned_from"] == str(result.out_dir)
    assert 0.0 <= ft.best_val_dice <= 1.0


def test_train_2d_nuclei_single_image_holds_out_rows(nuclei_dataset, tmp_path):
    """One 2D image only: a block of rows is held out, and the network learns something."""
    import shutil

    from napari_medseg.models.loaders.folder import load_model_folder
    from napari_medseg.training.segment import train

    one = tmp_path / "one"
    shutil.copytree(nuclei_dataset, one)
    for p in list((one / "imagesTr").iterdir()) + list((one / "labelsTr").iterdir()):
        if not p.name.startswith("t0"):
            p.unlink()
    # a fixed number of iterations (not a time budget) keeps this test stable on a busy CPU
    res, seen, _ = _drive(
        train(
            one,
            tmp_path / "nuc",
            time_budget=None,
            max_epochs=3,
            iterations_per_epoch=20,
            width=4,
            device="cpu",
            batch_size=4,
            patch_size=[32, 32],
        )
    )
    assert res.card.training["recipe"]["iterations"] == 60
    assert max(p.done for p in seen) == 60 and seen[-2].total == 60
    card = load_model_folder(res.out_dir).card
    assert card.dims == 2 and card.in_channels == 1 and card.modality == "microscopy"
    assert card.normalization["scheme"] == "percentile"
    assert "single case" in card.metrics["held_out"] and "rows" in card.metrics["held_out"]
    assert (
        card.training["validation_split"]["blocks"]["t0"][1]
        - card.training["validation_split"]["blocks"]["t0"][0]
        == 13
    )
    dice = card.metrics["val_dice"]["nucleus"]
    assert 0.0 <= dice <= 1.0
    # nuclei are ~20% of the pixels: a network that learned nothing scores ~0 or ~0.33
    assert dice > 0.4, f"validation Dice {dice:.2f} after a short training"


def test_train_cancel_leaves_no_model(ct_dataset, tmp_path):
    from napari_medseg.training.segment import train

    out = tmp_path / "cancelled"
    gen = train(ct_dataset, out, time_budget=60.0, width=4, patch_size=[32, 32, 8], device="cpu")
    for p in gen:
        if p.info.get("iteration", 0) >= 1:
            break
    gen.close()
    assert not (out / "model.json").exists()


def test_train_dims_mismatch(nuclei_dataset, tmp_path):
    from napari_medseg.training.dataset import DatasetError
    from napari_medseg.training.segment import train

    with pytest.raises(DatasetError, match="2D"):
        _drive(train(nuclei_dataset, tmp_path / "x", dims=3))


def test_train_options_and_keywords_give_identical_weights(nuclei_dataset, tmp_path):
    """A fixed seed repeats a run exactly, whether its settings come as TrainOptions or as
    keywords; another seed gives other weights."""
    from napari_medseg.models.card import sha256_file
    from napari_medseg.training.options import TrainOptions
    from napari_medseg.training.segment import train

    settings = dict(
        time_budget=None,
        max_epochs=2,
        iterations_per_epoch=2,
        width=4,
        batch_size=2,
        patch_size=[32, 32],
        device="cpu",
        val_fraction=0.34,
        seed=3,
    )
    a, _, _ = _drive(train(nuclei_dataset, tmp_path / "a", TrainOptions(**settings)))
    b, _, _ = _drive(train(nuclei_dataset, tmp_path / "b", **settings))
    c, _, _ = _drive(train(nuclei_dataset, tmp_path / "c", TrainOptions(**settings), seed=4))
    weights = [sha256_file(r.out_dir / r.card.weights) for r in (a, b, c)]
    assert weights[0] == weights[1]
    assert weights[2] != weights[0]
    assert a.card.training["recipe"]["seed"] == 3 and c.card.training["recipe"]["seed"] == 4
    assert a.card.training["history"][-1]["loss"] == b.card.training["history"][-1]["loss"]


def test_train_options_name_a_misspelt_setting(nuclei_dataset, tmp_path):
    from napari_medseg.training.options import TrainOptions
    from napari_medseg.training.segment import train

    with pytest.raises(TypeError, match="unknown training setting 'epochs'"):
        _drive(train(nuclei_dataset, tmp_path / "x", epochs=3))
    opts = TrainOptions.merged(TrainOptions(seed=5, width=8), {"width": 4})
    assert (opts.seed, opts.width, opts.time_budget) == (5, 4, 600.0)
    assert TrainOptions().learning_rate() == 3e-3
    assert TrainOptions(init="parent").learning_rate() == 1e-3
    assert TrainOptions(init="parent", lr=0.01).learning_rate() == 0.01
