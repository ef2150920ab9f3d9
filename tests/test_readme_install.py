"""The README's two commands, CI, the install helpers and the console script agree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The two commands") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block under 'The two commands'"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    run_line, test_line = _readme_commands()
    assert run_line.startswith("bash scripts/install.sh && ") and "napari-medseg view" in run_line
    assert test_line.startswith("bash scripts/install.sh && ") and "pytest" in test_line
    ci = [ln for ln in (REPO / ".ci/run").read_text().splitlines() if ln and ln[0] != "#"]
    assert ci[-1] == test_line


def test_run_sh_runs_in_the_checkout_venv_when_there_is_one(tmp_path):
    (tmp_path / "scripts").mkdir()
    run = tmp_path / "scripts" / "run.sh"
    run.write_bytes((REPO / "scripts" / "run.sh").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    probe = ["sh", "-c", 'echo "${VIRTUAL_ENV:-none}"; command -v medseg-probe || true']
    out = subprocess.run(["bash", str(run), *probe], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.splitlines() == ["none"]
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "medseg-probe"):
        (bin_dir / name).write_text("#!/bin/sh\necho venv\n")
        (bin_dir / name).chmod(0o755)
    out = subprocess.run(["bash", str(run), *probe], capture_output=True, text=True, env=env)
    assert out.stdout.splitlines() == [str(tmp_path / ".venv"), str(bin_dir / "medseg-probe")]
    # an active virtual environment wins over the checkout's .venv
    env["VIRTUAL_ENV"] = "/some/active/env"
    out = subprocess.run(["bash", str(run), *probe], capture_output=True, text=True, env=env)
    assert out.stdout.splitlines()[0] == "/some/active/env"


def test_install_script_parses_and_passes_the_torch_index_to_pip():
    script = (REPO / "scripts" / "install.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "install.sh")]).returncode == 0
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in script
    assert "EXTERNALLY-MANAGED" in script and "-m venv .venv" in script
    assert "torch==${TORCH_VERSION:-2.13.0}" in script


def test_console_script_entry_point_resolves():
    """`napari-medseg` as pip installs it: the [project.scripts] target imports and runs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    target = project["scripts"]["napari-medseg"]
    module, func = target.split(":")
    code = f"from {module} import {func} as f; f(['--version'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("napari-medseg ")


def test_declared_dependency_floors_match_the_code():
    from packaging.requirements import Requirement

    reqs = {
        r.name.lower(): r.specifier
        for r in map(
            Requirement,
            tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"],
        )
    }
    # zarr 3: open_group(zarr_format=3), create_array
    assert "2.18.0" not in reqs["zarr"] and "3.0.0" in reqs["zarr"]
    # tifffile's aszarr stores for zarr 3 (tifffile.zarr) came in 2025.5.21
    assert "2025.5.10" not in reqs["tifffile"] and "2025.5.21" in reqs["tifffile"]
    assert "psutil" in reqs  # napari_medseg.io.limits and core.segment.segment import it


def test_demo_refuses_to_overwrite_without_the_flag(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    first = out / "ct_spleen_seg.nii.gz"
    first.write_bytes(b"an earlier result")
    cmd = [sys.executable, "-m", "napari_medseg.cli", "demo", "-o", str(out), "--quiet"]
    res = subprocess.run([*cmd, "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "--overwrite" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert first.read_bytes() == b"an earlier result"
    res = subprocess.run(
        [*cmd, "--device", "cpu", "--overwrite"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert first.stat().st_size > 1000 and (out / "fluo_nuclei_seg.tif").exists()
