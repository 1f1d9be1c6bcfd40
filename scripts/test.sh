#!/usr/bin/env bash
# The test suite (set-up included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# idle OpenMP threads sleep instead of spinning: with anything else on the cores, spinning makes torch's many small
# ops (tiny test models) tens of times slower
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# two worker processes (pytest-xdist), each file on one worker so its module fixtures are built once (726 s instead of
# 1148 s in one process, measured when the suite was half its size; about 22 minutes now on 2 AVX2 cores, see the
# README's Development section). PEFT_QST_TEST_WORKERS sets the count (0: one process); a later -n wins
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${PEFT_QST_TEST_WORKERS:-2}" --dist loadfile "$@"
