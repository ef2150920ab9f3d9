"""Training the centre-heatmap box detector: real DSB crops, instance masks and CSV boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medseg.progress import run_sync
from napari_medseg.training.dataset import DatasetError
from napari_medseg.training.detect import (
    load_detection_dataset,
    read_box_labels,
    train_detection,
)
from tests.conftest import data_path

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

# 64x64 crops of the DSB image: training crops and one held-out crop (r064 c000 below)
CROPS = [(0, 0), (0, 64), (64, 64), (128, 0), (64, 0)]
SIZE = 64


def _dsb():
    import tifffile

    img = tifffile.imread(data_path("microscopy/dsb2018_nuclei/image.tif"))
    mask = tifffile.imread(data_path("microscopy/dsb2018_nuclei/mask.tif"))
    return img, mask


def _boxes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    objs = [o for o in ndi.find_objects(mask) if o is not None]
    return np.array([[s.start for s in o] + [s.stop for s in o] for o in objs], float)


def _dataset(root, kind: str = "mask"):
    import tifffile

    img, mask = _dsb()
    ds = root / f"Dataset_{kind}"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for r, c in CROPS:
        name = f"dsb_r{r:03d}_c{c:03d}"
        tifffile.imwrite(ds / f"imagesTr/{name}_0000.tif", img[r : r + SIZE, c : c + SIZE])
        m = mask[r : r + SIZE, c : c + SIZE]
        if kind == "mask":
            tifffile.imwrite(ds / f"labelsTr/{name}.tif", m.astype(np.uint16))
        else:
            b = _boxes(m).astype(int)
            lines = ["y_min,y_max,x_min,x_max,class,score"]
            lines += [f"{y0},{y1},{x0},{x1},nucleus,1.0" for y0, x0, y1, x1 in b]
            (ds / f"labelsTr/{name}.csv").write_text("\n".join(lines) + "\n")
    (ds / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "nucleus": 1}, "channel_names": {"0": "fl"}})
    )
    return ds


def _heldout_loss(net, card, image: np.ndarray, mask: np.ndarray) -> float:
    """CenterNet loss of a network on a held-out crop (normalised like inference)."""
    from napari_medseg.core.detect.boxes import centernet_loss, encode_targets
    from napari_medseg.core.engine.preprocess import to_model_grid
    from napari_medseg.io.record import ImageRecord

    rec = ImageRecord(data=image, affine=np.eye(3), space="pixel")
    x, _ = to_model_grid(rec, card)
    t = encode_targets(_boxes(mask), None, mask.shape, 1)
    tg = {k: torch.from_numpy(v)[None] for k, v in t.items()}
    with torch.no_grad():
        loss, _ = centernet_loss(net.eval()(x[None]), tg, 1)
    return float(loss)


def test_tiny_training_on_real_crops_improves_over_untrained(tmp_path):
    from napari_medseg.core.detect.boxes import head_channels, init_heatmap_bias
    from napari_medseg.models.loaders.folder import load_model_folder
    from napari_medseg.models.networks import build_network

    ds = _dataset(tmp_path)
    res = run_sync(
        train_detection(
            ds,
            tmp_path / "det",
            time_budget=12.0,
            width=8,
            num_res_units=0,
            patch_size=[64, 64],
            batch_size=4,
            iterations_per_epoch=15,
            device="cpu",
        )
    )
    card = res.card
    assert card.task == "detection" and card.detection["head"] == "centernet"
    assert card.architecture["kwargs"]["out_channels"] == head_channels(1, 2) == 5
    assert [c["name"] for c in card.classes] == ["background", "nucleus"]
    assert len(card.training["val_cases"]) == 1
    assert "val_f1_iou50" in card.metrics and "ap50" in card.metrics["val_detection"]
    loaded = load_model_folder(tmp_path / "det")
    torch.manual_seed(0)  # the trainer's seed: the same initial weights
    untrained = build_network(card)
    init_heatmap_bias(untrained, 5, 1)
    img, mask = _dsb()
    r, c = 192, 192  # never in the dataset
    crop, m = img[r : r + SIZE, c : c + SIZE], mask[r : r + SIZE, c : c + SIZE]
    before = _heldout_loss(untrained, card, crop, m)
    after = _heldout_loss(loaded.network, card, crop, m)
    print(f"held-out loss untrained {before:.3f} -> trained {after:.3f}")
    assert after < 0.6 * before, (before, after)


def test_csv_box_labels_load_and_train(tmp_path):
    ds = _dataset(tmp_path, kind="csv")
    data, classes = run_sync(load_detection_dataset(ds))
    assert data.labels == {0: "background", 1: "nucleus"}
    _, mask = _dsb()
    case = data.cases[0]  # dsb_r000_c000
    want = _boxes(mask[:SIZE, :SIZE])
    got = _boxes(case.label)
    assert len(got) == len(want) and set(classes[0].values()) == {"nucleus"}
    # painted boxes give the CSV boxes back (DSB boxes overlap little)
    hit = sum(bool(np.any(np.all(np.abs(want - g) < 0.5, axis=1))) for g in got)
    assert hit >= 0.9 * len(want)
    res = run_sync(
        train_detection(
            ds,
            tmp_path / "det_csv",
            max_epochs=1,
            time_budget=None,
            width=4,
            num_res_units=0,
            patch_size=[32, 32],
            batch_size=2,
            iterations_per_epoch=2,
            device="cpu",
        )
    )
    assert res.card.training["recipe"]["iterations"] == 2
    assert (tmp_path / "det_csv" / "weights.safetensors").exists()


def test_bad_box_labels_are_one_sentence(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("y_min,y_max,x_min\n1,2,3\n")
    with pytest.raises(DatasetError, match="lacks the column"):
        read_box_labels(p, 2)
    p.write_text("y_min,y_max,x_min,x_max\n5,5,3,9\n")
    with pytest.raises(DatasetError, match="max not above its min"):
        read_box_labels(p, 2)
    p.write_text("z_min,z_max,y_min,y_max,x_min,x_max,class\n0,2,1,4,3,9,1\n")
    boxes, cls = read_box_labels(p, 3, {0: "background", 1: "lesion"})
    np.testing.assert_array_equal(boxes, [[0, 1, 3, 2, 4, 9]])
    assert cls == ["lesion"]
    j = tmp_path / "b.json"
    j.write_text(json.dumps({"boxes": [{"y_min": 1, "y_max": 4, "x_min": 2, "x_max": 8}]}))
    boxes, cls = read_box_labels(j, 2)
    np.testing.assert_array_equal(boxes, [[1, 2, 4, 8]])


def test_dims_mismatch_and_unknown_class(tmp_path):
    ds = _dataset(tmp_path, kind="csv")
    with pytest.raises(DatasetError, match="dims=3 was asked"):
        run_sync(train_detection(ds, tmp_path / "x", dims=3, max_epochs=1, time_budget=None))
    f = next((ds / "labelsTr").glob("*.csv"))
    f.write_text(f.read_text().replace("nucleus", "mitosis", 1))
    with pytest.raises(DatasetError, match="'mitosis' is not listed"):
        run_sync(load_detection_dataset(ds))


def test_cli_train_task_detection(tmp_path, capsys):
    from napari_medseg.cli import main

    ds = _dataset(tmp_path)
    out = tmp_path / "cli_det"
    rc = main(
        [
            "train",
            str(ds),
            "--task",
            "detection",
            "-o",
            str(out),
            "--max-epochs",
            "1",
            "--time-budget",
            "4",
            "--width",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    card = json.loads((out / "model.json").read_text())
    assert card["task"] == "detection" and card["detection"]["head"] == "centernet"
    assert "box F1 at IoU 0.5" in capsys.readouterr().err


def test_3d_detector_trains_and_detects_on_awkward_ct_crops(tmp_path):
    """The 3D path end to end: NIfTI crops (awkward sizes), the spleen as the object."""
    import nibabel as nib

    from napari_medseg.core.detect.detection import detect
    from napari_medseg.io.readers import read_image
    from napari_medseg.models.loaders.folder import load_model_folder

    img = nib.load(str(data_path("ct/spleen/image.nii.gz")))
    lab = nib.load(str(data_path("ct/spleen/label.nii.gz")))
    vol = np.asarray(img.dataobj, np.float32)
    seg = (np.asarray(lab.dataobj) == 1).astype(np.uint8)
    lo = np.argwhere(seg).min(0)
    ds = tmp_path / "Dataset_ct"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for k, (di, dj) in enumerate([(0, 0), (5, -4), (-6, 3)]):
        i0, j0 = max(0, lo[0] - 10 + di), max(0, lo[1] - 10 + dj)
        sl = (slice(i0, i0 + 45), slice(j0, j0 + 43), slice(0, 13))
        aff = img.affine.copy()
        aff[:3, 3] = img.affine[:3, :3] @ [i0, j0, 0] + img.affine[:3, 3]
        nib.save(nib.Nifti1Image(vol[sl], aff), str(ds / f"imagesTr/ct{k}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(seg[sl], aff), str(ds / f"labelsTr/ct{k}.nii.gz"))
    (ds / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "spleen": 1}, "channel_names": {"0": "CT"}})
    )
    res = run_sync(
        train_detection(
            ds,
            tmp_path / "det3d",
            max_epochs=1,
            time_budget=None,
            width=4,
            num_res_units=0,
            patch_size=[16, 16, 8],
            batch_size=2,
            iterations_per_epoch=2,
            device="cpu",
        )
    )
    assert res.card.dims == 3 and res.card.architecture["kwargs"]["out_channels"] == 7
    assert res.card.metrics["val_detection"]["n_true"] >= 1
    model = load_model_folder(tmp_path / "det3d")
    rec = read_image(ds / "imagesTr/ct1_0000.nii.gz")[0]
    out = run_sync(detect(rec, model, device="cpu"))
    assert out.ndim == 3 and "volume_mm3" in out.table.columns
    assert list(out.table.columns[3:6]) == ["z", "y", "x"]
