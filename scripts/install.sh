#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (no GPU, no display) for napari-medseg:
# the X virtual framebuffer and Qt's xcb libraries (apt, as root), a Python environment,
# torch, then the project with its test extras. Safe to run again: steps that are done are
# quick.
#
# Python: the active virtual environment if there is one; else `.venv` in the checkout when it
# exists or when the system's pip refuses to install packages (PEP 668 "externally managed",
# Debian 12, Ubuntu 24.04); else `python3` (or $PYTHON). scripts/run.sh runs a command in the
# same environment.
#
# torch: `pip install torch==$TORCH_VERSION` (default 2.13.0) unless torch is installed
# already (a GPU build you installed first is kept). Set TORCH_INDEX_URL to choose the wheel
# index, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU-only build (on a
# stock machine plain PyPI gives the multi-GB CUDA build), or .../whl/cu126 for a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  need=()
  for pkg in xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
             libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
             libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 libglib2.0-0 python3-venv; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
  elif "$PY" -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
    echo "install.sh: $PY is managed by the system (PEP 668): creating .venv" >&2
    "$PY" -m venv .venv
    PY=.venv/bin/python
  fi
fi

# torch first, so that the project's torch requirement is already met by the build chosen here
# (see TORCH_INDEX_URL above).
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"$PY" -m pip install -q -e ".[test]"

# nnU-Net v2: dynamic-network-architectures builds nnU-Net networks (the `nnunet` extra), and
# nnunetv2 is the reference the nnU-Net tests and benchmarks compare against (tests only). Both
# declare timm -> torchvision, which would replace the torch chosen above: install them without
# their dependencies, then their other requirements with torch held at the installed version.
"$PY" -m pip install -q --no-deps "dynamic-network-architectures==0.4.4" "nnunetv2==2.8.1"
"$PY" -c "import torch; print('torch==' + torch.__version__)" > .torch-constraint.txt
"$PY" -m pip install -q -c .torch-constraint.txt "acvl-utils>=0.2.6,<0.3" \
  "batchgenerators>=0.25.1" "batchgeneratorsv2>=0.3.2" scikit-learn graphviz yacs \
  "blosc2>=3.3.2" seaborn matplotlib requests tqdm
rm -f .torch-constraint.txt
