#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (no GPU, no display) for napari-medseg:
# the X virtual framebuffer and Qt's xcb libraries (apt), torch's CPU build, then the project
# with its test extras. Safe to run again: steps that are done are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  need=()
  for pkg in xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
             libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
             libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 libglib2.0-0; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

# torch first, so that the project's `torch>=2.4` is already met by the CPU build
# (a plain `pip install torch` would pull a multi-GB CUDA build).
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
