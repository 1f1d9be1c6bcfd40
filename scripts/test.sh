#!/usr/bin/env bash
# The test suite (set-up included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# idle OpenMP threads sleep instead of spinning: with anything else on the cores, spinning makes torch's many small
# ops (tiny test models) tens of times slower
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
