#!/usr/bin/env bash
# Every GPU figure bench/RESULTS.md owes, in one command (one device call):
#   bash bench/run_gpu_suite.sh OUT_DIR [NAME ...]
# Writes OUT_DIR/<bench>.json and OUT_DIR/<bench>.log; a failing bench does not stop the others.
# NAMEs (tests gae logprob rope_attention rope_sweep paged_attention rmsnorm_swiglu sampling rollout_b64
# rollout_b1 rollout_b64_sync rollout_ppo_like ppo_step) run only those: the whole suite can outlast one
# 10-minute device call, so a second call can finish the rest.
# Each kernel bench checks ours against the reference before it times anything.
set -u
out=${1:?usage: bash bench/run_gpu_suite.sh OUT_DIR [NAME ...]}
shift
only=" $* "
out=$(mkdir -p "$out" && cd "$out" && pwd)  # absolute: the script changes directory next
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python - <<'PY' | tee "$out/env.log"
import subprocess, torch, triton
print("device", torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__)
print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
PY
run() {  # name, command...
  local name=$1; shift
  if [ "$only" != "  " ] && [[ "$only" != *" $name "* ]]; then return; fi
  echo "=== $name: $*"
  "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1; echo "exit $?" >> "$out/$name.log"
  tail -n 25 "$out/$name.log"
}
if [ "$only" = "  " ] || [[ "$only" == *" tests "* ]]; then  # correctness first: compiled kernels, graphs
  echo "=== tests: TULU_TEST_DEVICE=cuda pytest tests/kernels tests/engine/test_gpu.py"
  TULU_TEST_DEVICE=cuda python -m pytest -q -rfEs tests/kernels tests/engine/test_gpu.py > "$out/tests.log" 2>&1
  echo "exit $?" >> "$out/tests.log"
  tail -n 40 "$out/tests.log"
fi
run gae python bench/bench_gae.py
run logprob python bench/bench_logprob.py
run rope_attention python bench/bench_rope_attention.py
run rope_sweep python bench/bench_rope_attention.py --sweep   # every launch variant: which tiles to keep
run paged_attention python bench/bench_paged_attention.py
run rmsnorm_swiglu python bench/bench_rmsnorm_swiglu.py
run sampling python bench/bench_sampling.py
run rollout_b64 python bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 --prompt-len 128 --gen-len 256 --hf-static
run rollout_b1 python bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 --prompt-len 128 --gen-len 256
run rollout_b64_sync python bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 --prompt-len 128 \
  --gen-len 256 --no-overlap --no-hf   # what the overlapped scheduler buys
run rollout_ppo_like python bench/rollout_throughput.py --model llama2-13b --random-weights --batch 256 \
  --max-num-seqs 64 --prompt-len 128 --gen-len 256 --stop-tokens 160   # admissions mid-run: mixed steps
run ppo_step python bench/ppo_step.py --model llama2-7b --random-weights --num-layers 8 --rollout-batch-size 64 \
  --train-batch-size 16 --prompt-len 256 --max-new-tokens 256
