#!/usr/bin/env bash
# Run a command in the Python environment scripts/install.sh installed into: the active
# virtual environment, else .venv in the checkout when install.sh created one, else as is.
#   bash scripts/run.sh napari-medseg view
#   xvfb-run -a bash scripts/run.sh python3 -m pytest -q
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$root/.venv/bin/python" ]; then
  export VIRTUAL_ENV="$root/.venv"
  export PATH="$root/.venv/bin:$PATH"
fi
exec "$@"
