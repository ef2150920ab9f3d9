"""The napari manifest is valid and every python_name in it imports."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _python_names():
    manifest = yaml.safe_load((REPO / "napari.yaml").read_text())
    return [c["python_name"] for c in manifest["contributions"]["commands"]]


def test_every_python_name_imports():
    names = _python_names()
    assert len(names) >= 8
    for name in names:
        module, attr = name.split(":")
        obj = getattr(importlib.import_module(module), attr)
        assert callable(obj), name


def test_manifest_packaged_and_valid():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-medseg")
    assert pm.name == "napari-medseg"
    assert {s.key for s in pm.contributions.sample_data} >= {"ct", "mri", "pathology"}
    assert Path(str(importlib.resources.files("napari_medseg") / "napari.yaml")).exists()
    out = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-medseg"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_compute_packages_never_import_qt_or_napari():
    """Import all compute and command-line modules in a fresh interpreter where Qt and napari
    cannot load."""
    code = r"""
import sys, importlib, pkgutil
class Block:
    BANNED = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BANNED:
            raise ImportError(f"compute imported {name}")
        return None
sys.meta_path.insert(0, Block())
import napari_medseg
for leaf in ("errors", "progress", "_files"):
    importlib.import_module(f"napari_medseg.{leaf}")
for sub in ("io", "core", "models", "training", "cli"):
    pkg = importlib.import_module(f"napari_medseg.{sub}")
    for m in pkgutil.walk_packages(pkg.__path__, f"napari_medseg.{sub}."):
        if not m.name.endswith("__main__"):  # `python -m napari_medseg.cli` runs the CLI
            importlib.import_module(m.name)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_import_linter_contract():
    out = subprocess.run(["lint-imports"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_manifest_claims_only_what_the_plugin_adds_and_saves_points_and_shapes():
    """Plain PNG/JPEG are napari's (no reader-choice dialog); the slide formats the code reads
    are listed; Points and Shapes layers can be saved (CSV, QuPath GeoJSON)."""
    manifest = yaml.safe_load((REPO / "napari.yaml").read_text())
    (reader,) = manifest["contributions"]["readers"]
    patterns = set(reader["filename_patterns"])
    assert not patterns & {"*.png", "*.jpg", "*.jpeg"}
    assert {"*.scn", "*.btf", "*.svs", "*.ndpi", "*.csv", "*.geojson"} <= patterns
    writers = {w["layer_types"][0]: w for w in manifest["contributions"]["writers"]}
    assert set(writers["points"]["filename_extensions"]) == {".csv", ".geojson"}
    assert set(writers["shapes"]["filename_extensions"]) == {".csv", ".geojson"}
    # display names and menus stay as they were
    widgets = [w["display_name"] for w in manifest["contributions"]["widgets"]]
    assert widgets == ["Segment", "Register", "Denoise", "Correct & Train", "Detect", "Whole slide"]
