"""Bad input across the command line: one sentence, a non-zero exit, nothing lost or leaked.

Each row of ``ROWS`` is one kind of bad input: the command line (``{name}`` fields are files of
the shared workspace below), the exit code (2: a bad argument, 1: an error) and a regular
expression the one stderr line must match. Every row asserts the exit code, exactly one line on
stderr, no traceback, and that the workspace is byte for byte what it was (no file changed, none
added: no output, no temporary). Adding a row is one line.

The workspace holds a small real CT crop (``ct``), its real labels, a real 2D nuclei image, and
small broken or conflicting files made from them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.cli import main
from tests.conftest import data_path


@dataclass(frozen=True)
class Row:
    id: str
    argv: str  # shell words; {name} is a workspace path, {ws} the workspace folder
    rc: int
    match: str  # regular expression the stderr line must match (case-insensitive)


SEG = "segment {ct} -m ct_spleen_3d"
DET = "detect {nuclei} -m classical"
REG = "register {ct} {ct2} --mode rigid"
DN = "denoise {nuclei} --method tv"
TRAIN = "train {dataset}"

ROWS = [
    # ---- info: unreadable images
    Row("info-missing-file", "info {ws}/missing.nii.gz", 1, "does not exist"),
    Row("info-empty-file", "info {empty}", 1, "empty"),
    Row("info-text-renamed-nii", "info {text_nii}", 1, "not a valid NIfTI"),
    Row("info-truncated-gzip", "info {truncated}", 1, "truncated or corrupt"),
    Row("info-unknown-extension", "info {notes_xyz}", 1, "unsupported file type"),
    Row("info-no-argument", "info", 2, "required"),
    # ---- whole command line
    Row("unknown-command", "frobnicate {ct}", 2, "invalid choice"),
    Row("models-unknown-option", "models --bogus", 2, "unrecognized arguments"),
    Row("models-pull-timeout-0", "models pull {ws}/none.zip --timeout 0", 2, "--timeout"),
    Row("device-unknown", SEG + " -o {ws}/o.nii.gz --device tpu", 2, "invalid choice"),
    # ---- segment: outputs checked before any work
    Row("seg-output-is-input", SEG + " -o {ct}", 1, "also an input"),
    Row("seg-output-is-input-overwrite", SEG + " -o {ct} --overwrite", 1, "also an input"),
    Row("seg-output-is-input-via-link", SEG + " -o {ct_link} --overwrite", 1, "also an input"),
    Row(
        "seg-prob-is-input",
        SEG + " -o {ws}/o.nii.gz --probabilities {ct} --overwrite",
        1,
        "also an input",
    ),
    Row("seg-output-exists", SEG + " -o {seg}", 1, "exists; pass --overwrite"),
    Row("seg-prob-exists", SEG + " -o {ws}/o.nii.gz --probabilities {seg}", 1, "exists"),
    Row("seg-sidecar-exists", SEG + " -o {ws}/orphan.nii.gz", 1, "provenance.json exists"),
    Row(
        "seg-prob-same-as-output",
        SEG + " -o {ws}/o.nii.gz --probabilities {ws}/o.nii.gz",
        1,
        "given twice",
    ),
    Row("seg-output-folder-missing", SEG + " -o {ws}/nowhere/o.nii.gz", 1, "does not exist"),
    Row(
        "seg-prob-folder-missing",
        SEG + " -o {ws}/o.nii.gz --probabilities {ws}/no/p.nii.gz",
        1,
        "does not exist",
    ),
    Row("seg-output-is-a-folder", SEG + " -o {folder} --overwrite", 1, "is a folder"),
    Row("seg-output-unknown-format", SEG + " -o {ws}/o.xyz", 1, r"cannot write o\.xyz"),
    Row(
        "seg-input-missing",
        "segment {ws}/missing.nii.gz -m ct_spleen_3d -o {ws}/o.nii.gz",
        1,
        "does not exist",
    ),
    Row(
        "seg-output-in-model-folder",
        "segment {ct} -m {model_dir} -o {model_dir}/o.nii.gz",
        1,
        "inside the model folder",
    ),
    Row("seg-unknown-model", "segment {ct} -m no_such_model -o {ws}/o.nii.gz", 1, "no_such_model"),
    Row("seg-batch-size-0", SEG + " -o {ws}/o.nii.gz --batch-size 0", 2, "--batch-size.*>= 1"),
    Row("seg-batch-size-negative", SEG + " -o {ws}/o.nii.gz --batch-size -3", 2, "--batch-size"),
    Row("seg-batch-size-text", SEG + " -o {ws}/o.nii.gz --batch-size four", 2, "--batch-size"),
    Row("seg-overlap-above-0.9", SEG + " -o {ws}/o.nii.gz --overlap 1.5", 2, "--overlap"),
    Row("seg-overlap-nan", SEG + " -o {ws}/o.nii.gz --overlap nan", 2, "--overlap"),
    Row("seg-slide-tile-0", SEG + " -o {ws}/o.zarr --tile 0", 2, "--tile"),
    Row("seg-slide-margin-negative", SEG + " -o {ws}/o.zarr --margin -1", 2, "--margin"),
    Row("seg-slide-level-negative", SEG + " -o {ws}/o.zarr --level -2", 2, "--level"),
    # ---- detect
    Row("det-min-distance-negative", DET + " -o {ws}/d.csv --min-distance -5", 2, "--min-distance"),
    Row("det-min-distance-zero", DET + " -o {ws}/d.csv --min-distance 0", 2, "--min-distance"),
    Row("det-threshold-above-1", DET + " -o {ws}/d.csv --threshold 2", 2, "--threshold"),
    Row("det-nms-iou-0", DET + " -o {ws}/d.csv --nms-iou 0", 2, "--nms-iou"),
    Row("det-min-size-negative", DET + " -o {ws}/d.csv --min-size -1", 2, "--min-size"),
    Row("det-border-iou-above-1", DET + " -o {ws}/d.csv --border-iou 1.5", 2, "--border-iou"),
    Row("det-tile-8", DET + " -o {ws}/d.csv --tile 8", 2, "--tile"),
    Row("det-output-format", DET + " -o {ws}/d.txt", 1, "use .csv or .geojson"),
    Row("det-output-exists", DET + " -o {det_csv}", 1, "exists; pass --overwrite"),
    Row("det-sidecar-exists", DET + " -o {ws}/orphan.csv", 1, "provenance.json exists"),
    Row("det-output-folder-missing", DET + " -o {ws}/nowhere/d.csv", 1, "does not exist"),
    # ---- register: every input validated, every output checked, before anything is written
    Row(
        "reg-float-labels",
        REG + " -o {ws}/w.nii.gz --labels {labels_float} --labels-out {ws}/wl.nii.gz",
        1,
        "non-integer",
    ),
    Row(
        "reg-transform-exists",
        REG + " -o {ws}/w.nii.gz --save-transform {ws}/T",
        1,
        r"T\.json exists",
    ),
    Row(
        "reg-transform-json-exists",
        REG + " -o {ws}/w.nii.gz --save-transform {ws}/T.json",
        1,
        r"T\.json exists",
    ),
    Row("reg-output-is-moving", REG + " -o {ct2} --overwrite", 1, "also an input"),
    Row(
        "reg-labels-out-is-labels",
        REG + " -o {ws}/w.nii.gz --labels {labels} --labels-out {labels} --overwrite",
        1,
        "also an input",
    ),
    Row(
        "reg-labels-out-is-output",
        REG + " -o {ws}/w.nii.gz --labels {labels} --labels-out {ws}/w.nii.gz",
        1,
        "given twice",
    ),
    Row("reg-labels-without-out", REG + " -o {ws}/w.nii.gz --labels {labels}", 1, "go together"),
    Row("reg-output-exists", REG + " -o {seg}", 1, "exists; pass --overwrite"),
    Row(
        "reg-points-bad-csv",
        REG + " -o {ws}/w.nii.gz --points {bad_points} --points-out {ws}/p.csv",
        1,
        "columns x,y,z",
    ),
    Row(
        "reg-points-missing",
        REG + " -o {ws}/w.nii.gz --points {ws}/none.csv --points-out {ws}/p.csv",
        1,
        "does not exist",
    ),
    Row("reg-iterations-0", REG + " -o {ws}/w.nii.gz --iterations 0", 2, "--iterations"),
    Row("reg-levels-0", REG + " -o {ws}/w.nii.gz --levels 0", 2, "--levels"),
    Row(
        "reg-regularization-negative",
        REG + " -o {ws}/w.nii.gz --regularization -1",
        2,
        "--regularization",
    ),
    Row("reg-output-unknown-format", REG + " -o {ws}/w.jpg", 1, r"cannot write w\.jpg"),
    # ---- denoise
    Row("dn-output-is-input", DN + " -o {nuclei} --overwrite", 1, "also an input"),
    Row("dn-output-exists", DN + " -o {seg}", 1, "exists; pass --overwrite"),
    Row("dn-time-budget-negative", DN + " -o {ws}/d.tif --time-budget -1", 2, "--time-budget"),
    Row("dn-no-limit-at-all", "denoise {nuclei} -o {ws}/d.tif --time-budget 0", 1, "--max-steps"),
    Row("dn-time-budget-inf", DN + " -o {ws}/d.tif --time-budget inf", 2, "--time-budget"),
    Row("dn-axis-negative", DN + " -o {ws}/d.tif --axis -1", 2, "--axis"),
    Row("dn-max-steps-0", DN + " -o {ws}/d.tif --max-steps 0", 2, "--max-steps"),
    Row("dn-seed-negative", DN + " -o {ws}/d.tif --seed -1", 2, "--seed"),
    Row("dn-unknown-method", "denoise {nuclei} -o {ws}/d.tif --method magic", 2, "invalid choice"),
    Row(
        "dn-save-model-classical",
        DN + " -o {ws}/d.tif --save-model {ws}/m",
        1,
        "needs a trained method",
    ),
    Row(
        "dn-save-model-not-empty",
        "denoise {nuclei} -o {ws}/d.tif --save-model {model_dir}",
        1,
        "exists; pass --overwrite",
    ),
    # ---- train
    Row("train-time-budget-negative", TRAIN + " -o {ws}/m --time-budget -5", 2, "--time-budget"),
    Row("train-max-epochs-0", TRAIN + " -o {ws}/m --max-epochs 0", 2, "--max-epochs"),
    Row("train-width-0", TRAIN + " -o {ws}/m --width 0", 2, "--width"),
    Row("train-output-not-empty", TRAIN + " -o {model_dir}", 1, "exists; pass --overwrite"),
    Row("train-output-is-dataset", TRAIN + " -o {dataset} --overwrite", 1, "also an input"),
    Row("train-output-is-a-file", TRAIN + " -o {seg} --overwrite", 1, "is a file"),
    Row("train-dataset-missing", "train {ws}/nodata -o {ws}/m", 1, "does not exist"),
    Row("train-output-folder-missing", TRAIN + " -o {ws}/no/where/m", 1, "does not exist"),
    # ---- lying headers, special files, untrusted model folders, misaligned pairs (part B)
    Row("info-nifti1-claims-1000-cubed", "info {liar1}", 1, "truncated or corrupt"),
    Row("info-nifti2-claims-1e15-voxels", "info {liar2}", 1, "truncated or corrupt"),
    Row(
        "seg-nifti-claims-1000-cubed",
        "segment {liar1} -m ct_spleen_3d -o {ws}/o.nii.gz",
        1,
        "truncated or corrupt",
    ),
    Row("info-fifo-named-nii-gz", "info {fifo}", 1, "named pipe"),
    Row("seg-fifo-named-nii-gz", "segment {fifo} -m ct_spleen_3d -o {ws}/o.nii.gz", 1, "pipe"),
    Row("info-dicom-irregular-spacing", "info {dicom_irregular}", 1, "irregular slice spacing"),
    Row("seg-card-classes-5", "segment {ct} -m {card_classes} -o {ws}/o.nii.gz", 1, "'classes'"),
    Row("seg-card-spacing-text", "segment {ct} -m {card_spacing} -o {ws}/o.nii.gz", 1, "'spacing'"),
    Row(
        "seg-card-top-level-list", "segment {ct} -m {card_list} -o {ws}/o.nii.gz", 1, "JSON object"
    ),
    Row(
        "seg-card-weights-etc-passwd",
        "segment {ct} -m {card_passwd} -o {ws}/o.nii.gz",
        1,
        "inside the model folder",
    ),
    Row(
        "seg-card-weights-symlink-out",
        "segment {ct} -m {card_symlink} -o {ws}/o.nii.gz",
        1,
        "outside its model folder",
    ),
    Row(
        "seg-card-weights-fifo",
        "segment {ct} -m {card_fifo} -o {ws}/o.nii.gz",
        1,
        "not a regular file",
    ),
    Row(
        "train-label-3mm-on-2mm-image",
        "train {dataset_grid} -o {ws}/m --quiet",
        1,
        "not on its image's grid",
    ),
]
if sys.platform.startswith("linux"):  # a folder nobody, not even root, can write into
    ROWS.append(Row("seg-output-folder-unwritable", SEG + " -o /proc/o.nii.gz", 1, "not writable"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """The shared workspace: small real images and the broken or conflicting files of the rows."""
    root = tmp_path_factory.mktemp("bad_inputs")
    img = nib.load(str(data_path("ct/spleen/image.nii.gz")))
    lab = nib.load(str(data_path("ct/spleen/label.nii.gz")))
    box = (slice(40, 73), slice(50, 84), slice(3, 24))  # awkward 33x34x21
    aff = img.affine.copy()
    aff[:3, 3] = (img.affine @ np.r_[40, 50, 3, 1.0])[:3]
    ct = np.asarray(img.dataobj)[box].astype(np.int16)
    labels = np.asarray(lab.dataobj)[box].astype(np.uint8)
    f = {"ws": root}
    for name, arr in (("ct", ct), ("ct2", ct), ("labels", labels), ("seg", labels)):
        f[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), str(f[name]))
    f["labels_float"] = root / "labels_float.nii.gz"
    nib.save(nib.Nifti1Image(labels * np.float32(0.5), aff), str(f["labels_float"]))
    f["ct_link"] = root / "ct_link.nii.gz"
    f["ct_link"].symlink_to(f["ct"])
    import tifffile

    nuclei = tifffile.imread(data_path("microscopy/dsb2018_nuclei/image.tif"))[:96, :96]
    f["nuclei"] = root / "nuclei.tif"
    tifffile.imwrite(f["nuclei"], nuclei)
    f["empty"] = root / "empty.nii.gz"
    f["empty"].write_bytes(b"")
    f["text_nii"] = root / "report.nii"
    f["text_nii"].write_text("this is a radiology report, not an image\n" * 20)
    f["truncated"] = root / "truncated.nii.gz"
    raw = f["ct"].read_bytes()
    f["truncated"].write_bytes(raw[: len(raw) // 2])
    f["notes_xyz"] = root / "notes.xyz"
    f["notes_xyz"].write_text("not an image\n")
    f["det_csv"] = root / "det.csv"
    f["det_csv"].write_text("id,class,score,y,x\n1,nucleus,0.9,10,12\n")
    for orphan in ("orphan.nii.gz", "orphan.csv"):  # a sidecar whose output was deleted
        (root / f"{orphan}.provenance.json").write_text(json.dumps({"output": orphan}) + "\n")
    f["bad_points"] = root / "points.csv"
    f["bad_points"].write_text("a,b\n1,2\n")
    (root / "T.json").write_text('{"matrix_ras": "an earlier transform"}\n')
    f["folder"] = root / "folder.nii.gz"  # a folder with an image name
    f["folder"].mkdir()
    (f["folder"] / "keep.txt").write_text("a file the user keeps\n")
    f["model_dir"] = root / "model_dir"
    f["model_dir"].mkdir()
    (f["model_dir"] / "model.json").write_text('{"name": "earlier"}\n')
    f["dataset"] = root / "dataset"
    for sub in ("imagesTr", "labelsTr"):
        (f["dataset"] / sub).mkdir(parents=True)
    nib.save(nib.Nifti1Image(ct, aff), str(f["dataset"] / "imagesTr" / "case_0000.nii.gz"))
    nib.save(nib.Nifti1Image(labels, aff), str(f["dataset"] / "labelsTr" / "case.nii.gz"))
    _part_b_files(f, root, tmp_path_factory.mktemp("special"), ct, labels, aff)
    return f


def _part_b_files(f: dict, root: Path, special: Path, ct, labels, aff) -> None:
    """Lying headers, model folders that must not be trusted, a misaligned dataset; FIFOs live
    in ``special`` (outside the workspace, whose snapshot reads every file)."""
    import gzip
    import os

    for key, header, shape in (
        ("liar1", nib.Nifti1Header(), (1000, 1000, 1000)),
        ("liar2", nib.Nifti2Header(), (100000, 100000, 100000)),
    ):
        header.set_data_shape(shape)
        header.set_data_dtype(np.uint8)
        f[key] = root / f"{key}.nii.gz"
        f[key].write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    f["fifo"] = special / "scan.nii.gz"
    os.mkfifo(f["fifo"])
    card = {
        "name": "bad",
        "dims": 3,
        "classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "spleen"}],
        "patch_size": [16, 16, 16],
    }
    for key, change in (
        ("card_classes", {"classes": 5}),
        ("card_spacing", {"spacing": "x"}),
        ("card_passwd", {"weights": "/etc/passwd"}),
        ("card_symlink", {"weights": "w.safetensors"}),
    ):
        f[key] = root / key
        f[key].mkdir()
        (f[key] / "model.json").write_text(json.dumps({**card, **change}))
    (f["card_symlink"] / "w.safetensors").symlink_to("/etc/hostname")
    f["card_list"] = root / "card_list"
    f["card_list"].mkdir()
    (f["card_list"] / "model.json").write_text(json.dumps([card]))
    f["card_fifo"] = special / "card_fifo"
    f["card_fifo"].mkdir()
    (f["card_fifo"] / "model.json").write_text(json.dumps(card))
    os.mkfifo(f["card_fifo"] / "weights.safetensors")
    f["dataset_grid"] = root / "dataset_grid"  # a 3 mm label on a 2 mm image, same shape
    for sub in ("imagesTr", "labelsTr"):
        (f["dataset_grid"] / sub).mkdir(parents=True)
    a2 = np.diag([2.0, 2.0, 2.0, 1.0])
    a3 = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(ct, a2), str(f["dataset_grid"] / "imagesTr" / "case_0000.nii.gz"))
    nib.save(nib.Nifti1Image(labels, a3), str(f["dataset_grid"] / "labelsTr" / "case.nii.gz"))
    f["dicom_irregular"] = root / "dicom_irregular"
    f["dicom_irregular"].mkdir()
    _irregular_dicom(f["dicom_irregular"])


def _irregular_dicom(folder: Path) -> None:
    """Five real-header CT slices at 0, 2, 4, 7, 10 mm (3 mm is not a whole number of steps)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    for k, z in enumerate((0.0, 2.0, 4.0, 7.0, 10.0)):
        ds = base.copy()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.save_as(folder / f"s{k}.dcm", enforce_file_format=True)


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file and folder under ``root`` (links as links)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_row(row: Row, files: dict[str, Path], capsys) -> str:
    """Run one row and check it; returns its stderr line."""
    before = snapshot(files["ws"])
    argv = [word.format(**files) for word in shlex.split(row.argv)]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == row.rc, f"exit code {rc}, stderr: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got: {err}"
    assert "Traceback" not in err
    assert re.search(row.match, lines[0], re.IGNORECASE), lines[0]
    assert snapshot(files["ws"]) == before, "a file was changed, added or removed"
    return lines[0]


def test_the_table_holds_40_kinds_of_bad_input():
    assert len(ROWS) >= 40 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, ws, capsys):
    run_row(row, ws, capsys)


# --------------------------------------------------------------------------- data loss


def test_any_error_is_one_line_and_debug_adds_the_traceback(capsys, monkeypatch):
    """Only five exception types were caught: anything else was a raw traceback."""
    import napari_medseg.models.registry as registry

    def broken():
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'\nsecond line")

    monkeypatch.setattr(registry, "list_models", broken)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unexpected TypeError: unsupported operand" in err and "--debug" in err
    assert main(["models", "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("napari-medseg: error: unexpected TypeError")


def test_sidecars_of_two_outputs_with_one_stem_are_kept_apart(ws, tmp_path, capsys):
    """``-o s2.nrrd`` beside ``s2.nii.gz`` replaced the other output's provenance."""
    a, b = tmp_path / "s2.nii.gz", tmp_path / "s2.nrrd"
    for out in (a, b):
        assert (
            main(["segment", str(ws["ct"]), "-m", "ct_spleen_3d", "-o", str(out), "--quiet"]) == 0
        )
    for out in (a, b):
        prov = json.loads((tmp_path / f"{out.name}.provenance.json").read_text())
        assert prov["output"] == str(out)
    assert not list(tmp_path.glob("s2.provenance.json"))


def test_failing_slide_run_with_overwrite_keeps_the_previous_result(tmp_path, capsys, monkeypatch):
    """``segment SLIDE -o res.zarr --overwrite`` deleted the old result before the new run."""
    import napari_medseg.core.slides.export as export
    import napari_medseg.core.slides.segment as segment
    from napari_medseg.progress import Progress
    from tests.slide_helpers import make_slide, save_rgb_model

    slide = make_slide(tmp_path / "slide.tif", (600, 500))
    model = save_rgb_model(tmp_path / "tiny_rgb")
    res = tmp_path / "res.zarr"
    res.mkdir()
    (res / "zarr.json").write_text('{"previous": "result"}\n')
    (tmp_path / "res.zarr.provenance.json").write_text('{"previous": "provenance"}\n')
    before = snapshot(tmp_path)

    def fails_half_way(record, model, out_zarr, **kw):
        Path(out_zarr, "zarr.json").write_text("{}")  # a half-written new result
        yield Progress(1, 4, "tile 1/4")
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(segment, "segment_slide", fails_half_way)
    argv = ["segment", str(slide), "-m", str(model), "-o", str(res), "--overwrite", "--quiet"]
    assert main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # old result and its provenance as they were, no temp

    monkeypatch.undo()
    assert main([*argv, "--tile", "256", "--device", "cpu"]) == 0  # a good run replaces it
    assert json.loads((tmp_path / "res.zarr.provenance.json").read_text())["output"] == str(res)
    assert export.open_result(res)[0].shape == (600, 500)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
