#!/usr/bin/env bash
# Bench-only extra (issue 19): a virtual environment .venv-torch2 with a modern PyTorch (pinned in
# python/requirements-bench.txt) for `dlcm bench train --torch .venv-torch2/bin/python[:...]`.
# Separate from .venv (which sees Debian's torch 1.13) and not needed by the tests: PyPI's Linux
# torch wheels bring the CUDA runtime along, about 5.4 GB. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-torch2
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
stamp="$VENV/.requirements-bench.sha256"
want=$(sha256sum python/requirements-bench.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup_bench] pip install -r python/requirements-bench.txt into $VENV (~5.4 GB)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r python/requirements-bench.txt
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import torch; print('[setup_bench] torch', torch.__version__, 'in $VENV')"
