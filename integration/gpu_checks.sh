#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command, for a GPU machine lent without internet
# (docs/performance.md, "On a GPU").
#
#   bash integration/gpu_checks.sh OUT_DIR [WHEEL_DIR]
#
# 1. Installs the wheels in WHEEL_DIR (default .whl; skipped when absent) into /tmp/site with --no-deps: bitsandbytes
#    and the transformers/peft versions this project is tested with, where the machine's own are older. The set used
#    on the lent H200 (Python 3.12, torch 2.11 there; about 60 MB):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#        bitsandbytes==0.50.2 transformers==5.25.0 peft==0.21.2 huggingface_hub==2.4.0 httpx2==2.16.2 \
#        httpcore2==2.16.2 truststore==0.10.5 regex==2026.11.19
# 2. Runs tests/test_cuda.py (skipped on CI, which has no GPU).
# 3. Runs integration/bench_train.py --device cuda (random LLaMA-2-7B-shaped model, batch 4, sequence 384: QST,
#    QLoRA and the no-grad floor, each in its own process), and a second round in a fresh run while time allows.
# 4. Runs integration/profile_cuda.py: variants timed side by side in one process, a QST step split into sections,
#    and the profiler's GPU-busy time and top kernels.
# GPU_CHECKS (default "tests bench profile") picks the stages. Everything is logged to OUT_DIR/log.txt; the JSON
# results go to OUT_DIR.
set -u -o pipefail
out="${1:?usage: bash integration/gpu_checks.sh OUT_DIR [WHEEL_DIR]}"
wheels="${2:-.whl}"
budget_s="${GPU_CHECKS_BUDGET_S:-420}"  # no new benchmark round starts after this many seconds
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1 USE_HUB_KERNELS=0 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}

if compgen -G "$wheels/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== [$SECONDS s] machine and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$python" - <<'EOF'
import platform, torch, transformers, peft, accelerate, bitsandbytes, peft_qst
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__,
      "bitsandbytes", bitsandbytes.__version__, "peft_qst", peft_qst.__version__)
print("device", torch.cuda.get_device_name(0))
import bitsandbytes.functional as F
w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
q, state = F.quantize_4bit(w, quant_type="nf4")
print("bitsandbytes nf4 round trip, max error", (F.dequantize_4bit(q, state) - w).abs().max().item())
EOF

stages=" ${GPU_CHECKS:-tests bench profile} "
if [[ "$stages" == *" tests "* ]]; then
  echo "== [$SECONDS s] tests/test_cuda.py"
  timeout 240 "$python" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
  echo "pytest exit status $?"
fi

if [[ "$stages" == *" profile "* ]]; then
  echo "== [$SECONDS s] profile"
  timeout 360 "$python" integration/profile_cuda.py \
    --methods qst qst:loss=transformers floor floor:loss=chunked qlora --output "$out/profile_cuda.json"
  echo "profile exit status $?"
fi

round=1
while [[ "$stages" == *" bench "* ]] && [ "$SECONDS" -lt "$budget_s" ] && [ "$round" -le 2 ]; do
  echo "== [$SECONDS s] benchmark round $round"
  timeout 420 "$python" integration/bench_train.py --device cuda --rounds 1 --steps 6 --warmup 2 \
    --methods qst qlora floor --output "$out/bench_train_cuda_round$round.json"
  echo "benchmark exit status $?"
  round=$((round + 1))
done
echo "== [$SECONDS s] done"
