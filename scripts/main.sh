#!/usr/bin/env bash
# The main job: QST fine-tune of SmolLM2-135M-Instruct in 4-bit on CPU (set-up included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
