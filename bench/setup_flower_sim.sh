#!/usr/bin/env bash
# The separate environment of Flower's simulation engine for bench/federated_sim.py (column c).
#
# flwr[simulation] 1.42 pins ray==2.55.1, which the project's own environment does not carry: the
# benchmark runs Flower's simulation in this venv (as a subprocess) and everything else in .venv.
# It holds flwr[simulation]==1.42.*, ray, torch and asymvlm itself (editable, without its heavy
# optional dependencies: the Flower side imports only the client update, the batcher and the
# sampling, which need torch, numpy, tqdm, pyyaml, safetensors and psutil).
#
# Usage:  bash bench/setup_flower_sim.sh            # creates build/venv-flwrsim (git-ignored)
#         ASYMVLM_FLWRSIM_VENV=/some/where bash bench/setup_flower_sim.sh
#         PYTHON=python3.11 bash bench/setup_flower_sim.sh
# Then:   python bench/federated_sim.py --flower_python build/venv-flwrsim/bin/python ...
#         (the benchmark finds build/venv-flwrsim or $ASYMVLM_FLWRSIM_VENV by itself)
# Never committed; re-running it only installs what is missing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ASYMVLM_FLWRSIM_VENV:-$REPO/build/venv-flwrsim}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" - <<'EOF'
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 12)):
    raise SystemExit(f"ray 2.55 (flwr[simulation] 1.42) needs Python 3.10-3.12, got {sys.version.split()[0]}")
EOF

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "flwr[simulation]==1.42.*" torch numpy tqdm pyyaml safetensors psutil
# asymvlm from this checkout, without its dependencies (transformers, open_clip, ...: not needed here)
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$REPO"
"$VENV/bin/python" - <<'EOF'
import flwr, ray, torch
import asymvlm.federated.client  # noqa: F401  (the client update the Flower side runs)
print(f"flower-sim venv ready: flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}")
EOF
echo "$VENV/bin/python"
