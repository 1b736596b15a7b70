#!/usr/bin/env bash
# Every GPU figure bench/RESULTS.md owes, in one command (one device call):
#   bash bench/run_gpu_suite.sh OUT_DIR [NAME ...]
# Writes OUT_DIR/<bench>.json and OUT_DIR/<bench>.log; a failing bench does not stop the others.
# NAMEs (tests gae logprob rope_attention rope_sweep paged_attention paged_attention_fp8 paged_sweep
# paged_sweep_fp8 rmsnorm_swiglu sampling rollout_b64 rollout_b1 rollout_b64_sync rollout_b64_fp8 rollout_ppo_like
# ppo_step) run only those: the whole suite can outlast one 10-minute device call, so a second call can finish
# the rest.
# Each kernel bench checks ours against the reference before it times anything.
set -u
out=${1:?usage: bash bench/run_gpu_suite.sh OUT_DIR [NAME ...]}
shift
only=" $* "
out=$(mkdir -p "$out" && cd "$out" && pwd)  # absolute: the script changes directory next
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the device image names its interpreter python3
"$PY" - <<'EOF_PY' | tee "$out/env.log"
import subprocess, torch, triton
print("device", torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__)
print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
EOF_PY
run() {  # name, command...
  local name=$1; shift
  if [ "$only" != "  " ] && [[ "$only" != *" $name "* ]]; then return; fi
  echo "=== $name: $*"
  "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1; echo "exit $?" >> "$out/$name.log"
  tail -n 25 "$out/$name.log"
}
if [ "$only" = "  " ] || [[ "$only" == *" tests "* ]]; then  # correctness first: compiled kernels, graphs
  echo "=== tests: TULU_TEST_DEVICE=cuda pytest tests/kernels tests/engine/test_gpu.py"
  # pytest-xdist, where installed, spreads Triton's compilations over the CPU cores (one GPU serves all workers)
  xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
  timeout=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300")  # a hung test must not eat the call
  TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $xdist $timeout tests/kernels tests/engine/test_gpu.py \
    > "$out/tests.log" 2>&1
  echo "exit $?" >> "$out/tests.log"
  tail -n 40 "$out/tests.log"
fi
run gae "$PY" bench/bench_gae.py
run logprob "$PY" bench/bench_logprob.py
run rope_attention "$PY" bench/bench_rope_attention.py
run rope_sweep "$PY" bench/bench_rope_attention.py --sweep   # every launch variant: which tiles to keep
run paged_attention "$PY" bench/bench_paged_attention.py
run paged_attention_fp8 "$PY" bench/bench_paged_attention.py --kv-dtype fp8 --no-compile  # half the KV bytes
sweep_shapes="13b-b64-c384 13b-b8-c4096 13b-b256-c1024 70b-gqa8-b32-c2048"
run paged_sweep "$PY" bench/bench_paged_attention.py --sweep --no-compile --shapes $sweep_shapes  # decode_config
run paged_sweep_fp8 "$PY" bench/bench_paged_attention.py --sweep --no-compile --kv-dtype fp8 --shapes $sweep_shapes
run rmsnorm_swiglu "$PY" bench/bench_rmsnorm_swiglu.py
run sampling "$PY" bench/bench_sampling.py
run rollout_b64 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 --prompt-len 128 --gen-len 256 --hf-static
run rollout_b1 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 --prompt-len 128 --gen-len 256
run rollout_b64_sync "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 --prompt-len 128 \
  --gen-len 256 --no-overlap --no-hf   # what the overlapped scheduler buys
run rollout_b64_fp8 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 --prompt-len 128 \
  --gen-len 256 --kv-cache-dtype fp8 --no-hf   # half the KV bytes per decode step
run rollout_ppo_like "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 256 \
  --max-num-seqs 64 --prompt-len 128 --gen-len 256 --stop-tokens 160   # admissions mid-run: mixed steps
run ppo_step "$PY" bench/ppo_step.py --model llama2-7b --random-weights --num-layers 8 --rollout-batch-size 64 \
  --train-batch-size 16 --prompt-len 256 --max-new-tokens 256 --iterations 2  # the 3rd: graphs replayed?
