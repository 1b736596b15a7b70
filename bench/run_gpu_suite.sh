#!/usr/bin/env bash
# Every GPU figure bench/RESULTS.md owes, under one deadline (one device call):
#   bash bench/run_gpu_suite.sh OUT_DIR [NAME ...]
#   SUITE_BUDGET_S=540 bash bench/run_gpu_suite.sh "$OUT" first     # a first lease: the headline checks
#   bash bench/run_gpu_suite.sh --tree   # the fingerprint of this checkout's sources, as summary.txt's `tree` line
# NAMEs: gpu_tests kernel_tests gluon_tests pingpong_tests (or tests: the four) offload gae logprob rope_attention
# grad_sums rope_sweep paged_attention paged_attention_fp8 paged_sweep paged_sweep_fp8 rmsnorm_swiglu sampling
# rollout_b64 rollout_b64_hf_static rollout_b1 rollout_b64_sync rollout_b64_fp8 rollout_ppo_like ppo_step
# ppo_step_no_sums ppo_step_offload ppo_step_resident ppo_save (a checkpoint written at once and in the background)
# compile (a cold start's autotuning, one compile thread against many); the group `first` is what a 15-minute lease can hold (the two issues' headline figures and the kernels'
# comparisons without their torch.compile rows, then the engine's GPU tests and the kernel tests with the time left).
# The group `tune` (alone) is the lease after it: the paged decode sweep on the rollout's shapes, the 13B batch-64
# rollout again with the sweep's fastest launch for its shape (--decode-config) and a profile of where its step time
# goes (--profile: the costliest kernels per step), the rope attention sweep, then test_gpu.py and the kernel tests that
# failed on the first lease. The group `check` (alone; 5 minutes on a fresh machine): the rollouts and the paged decode
# at the launch decode_config now picks (no override), the offload test that failed, then log-probs, sampling,
# RMSNorm/SwiGLU. The group `fused` (alone): the paged attention tests and bench with the rope write fused in, the 13B
# rollouts with it (fuse_rope 1) and without, then log-probs, sampling, RMSNorm/SwiGLU. The group `b1` (alone): the 13B
# batch-1 rollout profiled, the paged decode sweep at its shape (launch variants and split counts), the rollout with one
# context split, with and without the fused step. The group `long` (alone, or after `b1` on a warm machine): the 13B
# batch-32 rollout at 512 + 1024 tokens with and without the fused step (which won at long contexts in the paged bench).
# The group `linear` (alone): the decode projections' kernel (kernels/decode_linear.py) tested on the GPU with the
# sampling, paged attention and rotary tests, timed against cuBLAS, the sampling bench (top-k's floor), the 13B rollouts
# with it (decode_config's linear 1), with it and programmatic dependent launch (pdl 1), then without either, batch 1
# with the first layer's norm apart (norm_rows 0), then its launch sweep. The group `tma` (alone; ~4 minutes, after
# `linear` on a warm machine): issue 4's attention with its inner tiles by tensor descriptor (Hopper's TMA), the rope
# attention tests on the GPU, the bench with ours by TMA and by pointer loads beside SDPA, and the launch sweep (TMA and
# pointer variants; the warp-specialised kernels first). The group `next` (alone: what one call of a 15-minute lease
# should run first, ~9 minutes): the untimed work of 2026-12-04/05 by what it decides: the tests of the decode
# projections, paged attention (PDL in a CUDA graph), sampling and rope attention compiled, and test_gpu.py's checks
# of the training side built without a GPU (grad sums, MLP recompute, the parameter gather); the 13B rollouts at batch 64
# and 1 with decode_config's linear 1, with linear 1 + pdl 1, and at the defaults (batch 1 also with pdl 1 alone: 2%
# short of its target), with the rope attention bench (TMA against pointer loads against SDPA, dq by atomic adds, and
# the warp-specialised kernels) between the two batches; the projections against cuBLAS; the sampling bench; the Gluon
# forward's tests (rope_attention.GLUON_FWD: a kernel new to the GPU, apart under a short cap; the rope bench times it
# last, after a check in a subprocess under a timeout); then the two sweeps with the time left (the Gluon variants last
# in the rope sweep). The group `gluon` (alone; ~5 minutes warm): issue 4's Gluon kernels apart from the rest: their
# tests (the forward in 8 warps, with dk/dv; its ping-pong form under its own cap), the rope bench's rows of ours at its
# defaults, the Gluon forms and SDPA (--only), and the sweep of the Gluon variants alone (--sweep-gluon). The group
# `multi` (alone; a machine of two GPUs or more, none lent so far): the two-GPU tests (async TP, the symmetric-memory
# sums), bench/tp_allreduce.py, the 13B rollouts at TP (all the GPUs, up to 8) with NCCL's sums and with
# TULU_SYMM_ALL_REDUCE=1 at batch 64 (128 + 256) and 256 (512 + 512), a PPO iteration at TP, and the training overlaps'
# A/B (bench/train_overlaps.py). No NAME: everything, in the order below.
# SUITE_COMMIT names the commit in summary.txt.
#
# The lease's limits shape this script: a call returns at most 8 files from OUT_DIR and is killed at its timeout.
# So every step runs under `timeout` within SUITE_BUDGET_S seconds overall (default 540; give the device call
# ~40 s more), a step that would start with under SUITE_MIN_STEP_S (20) left is skipped and says so, and after
# each step the logs and JSON are packed again into OUT_DIR/suite.tgz next to OUT_DIR/summary.txt (one line per
# step: exit code, seconds); a killed call still returns everything finished before it. `tar xzf suite.tgz` gives
# <name>.log and <name>.json per step. Each kernel bench checks ours against its reference before it times anything.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
tree_hash() {  # the Python sources and this script, in name order: which code a device ran
  (cd "$root" && find engine kernels bench -name '*.py' -o -name '*.sh' | LC_ALL=C sort | xargs cat | sha256sum \
    | cut -c1-12)
}
if [ "${1:-}" = "--tree" ]; then tree_hash; exit 0; fi
out=${1:?usage: bash bench/run_gpu_suite.sh OUT_DIR [NAME ...]}
shift
budget=${SUITE_BUDGET_S:-540}
min_step=${SUITE_MIN_STEP_S:-20}  # a step that would start with less left than this is skipped
start=$SECONDS
names=" $* "
# the headline figures first (each bench checks ours against its reference before it times anything), the lighter
# way (no torch.compile peer rows: their cold compiles cost a minute each); then the tests with the time left
first=0
[[ "$names" == *" first "* ]] && first=1 \
  && names="$names rope_attention rollout_b64 rollout_b1 paged_attention logprob gpu_tests kernel_tests gluon_tests " \
  && names="$names pingpong_tests "
[[ "$names" == *" tests "* ]] && names="$names gpu_tests kernel_tests gluon_tests pingpong_tests "
out=$(mkdir -p "$out" && cd "$out" && pwd)  # absolute: the script changes directory next
work=${SUITE_WORK_DIR:-$(mktemp -d)}  # the per-step files; OUT_DIR gets only the archive and the summary
work=$(mkdir -p "$work" && cd "$work" && pwd)  # (absolute too)
cd "$root"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the device image names its interpreter python3
"$PY" - <<'EOF_PY' 2>&1 | tee "$work/env.log" "$out/summary.txt"
import torch, triton
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print("device", name, "torch", torch.__version__, "triton", triton.__version__)
EOF_PY
# (the device gets a copy of the files, maybe without .git or git: SUITE_COMMIT says which commit it is)
echo "commit ${SUITE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (set SUITE_COMMIT)")}" \
  | tee -a "$work/env.log" "$out/summary.txt"
# what ran, whatever .git says (a device's copy of .git was once a stale one): `bash bench/run_gpu_suite.sh --tree`
# prints the same fingerprint of a checkout's engine/, kernels/ and bench/ sources
echo "tree $(tree_hash)" | tee -a "$work/env.log" "$out/summary.txt"
echo "budget ${budget}s; steps: ${*:-all}" | tee -a "$out/summary.txt"

wanted() { [ "$names" = "  " ] || [[ "$names" == *" $1 "* ]]; }
pack() { tar czf "$out/suite.tgz.tmp" -C "$work" . && mv "$out/suite.tgz.tmp" "$out/suite.tgz"; }
step() {  # name, cap seconds, command...: run it under the smaller of its cap and the time left
  local name=$1 cap=$2; shift 2
  wanted "$name" || return 0
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt "$min_step" ]; then
    echo "$name: skipped (${left}s of the budget left)" | tee -a "$out/summary.txt"
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "=== $name (up to ${cap}s): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$cap" "$@" > "$work/$name.log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && rc="124 (stopped at its ${cap}s cap)"
  [ "$rc" = 137 ] && rc="137 (killed 10 s after its ${cap}s cap: it did not stop on SIGTERM)"
  echo "exit $rc" >> "$work/$name.log"
  tail -n 25 "$work/$name.log"
  echo "$name: exit $rc, $((SECONDS - t0))s" | tee -a "$out/summary.txt"
  pack
}
bench() {  # name, cap, command...: a bench that writes <name>.json
  local name=$1 cap=$2; shift 2
  step "$name" "$cap" "$@" --json "$work/$name.json"
}

finish() {  # a group's end: the archive, the total, and nothing of the other steps
  pack
  echo "done in $((SECONDS - start))s" | tee -a "$out/summary.txt"
  exit 0
}
light_kernel_rows() {  # the kernel benches a lease's last minutes hold: log-probs, sampling, RMSNorm/SwiGLU
  names="$names logprob grad_sums sampling rmsnorm_swiglu "
  bench logprob 60 "$PY" bench/bench_logprob.py --skip-compile
  bench grad_sums 40 "$PY" bench/bench_grad_sums.py  # weight grads into their fp32 sums: one GEMM or two kernels
  bench sampling 30 "$PY" bench/bench_sampling.py --no-compile
  bench rmsnorm_swiglu 30 "$PY" bench/bench_rmsnorm_swiglu.py
}

# pytest-xdist (in the device image) spreads Triton's compilations over the CPU cores, one GPU serving every
# worker; pytest-timeout stops a hung test before it eats the call.
xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
per_test=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
light=()  # the `first` group's lighter benches
[ "$first" = 1 ] && light=(--no-compile)
if [[ "$names" == *" multi "* ]]; then  # a machine of several GPUs (alone; none lent so far): the multi-GPU figures
  ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null)
  if ! [[ "$ngpu" =~ ^[0-9]+$ ]] || [ "$ngpu" -lt 2 ]; then
    echo "multi: skipped (it needs two GPUs or more; this machine has ${ngpu:-none})" | tee -a "$out/summary.txt"
    finish
  fi
  tp=$ngpu; [ "$tp" -gt 8 ] && tp=8  # (a node's NVLink domain)
  run=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$tp")
  names="$names multi_tests tp_allreduce rollout_tp_b64 rollout_tp_b64_symm rollout_tp_b256 rollout_tp_b256_symm "
  names="$names ppo_step_tp train_overlaps "
  # the two-GPU checks first: async TP's fused ops and the symmetric-memory sums against NCCL (in a CUDA graph too)
  step multi_tests 150 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/engine/test_gpu.py -k "two_gpus"
  # TP's all-reduces at decode sizes: NCCL against each symmetric-memory form (engine/symm_reduce.py) and the floor
  bench tp_allreduce 120 "${run[@]}" bench/tp_allreduce.py
  # the 13B rollouts at TP, their sums by NCCL (the default) and through symmetric memory (TULU_SYMM_ALL_REDUCE=1)
  for shape in "64 128 256" "256 512 512"; do
    read -r b plen glen <<< "$shape"
    bench "rollout_tp_b$b" 150 "${run[@]}" bench/rollout_throughput.py --model llama2-13b --random-weights \
      --tp "$tp" --batch "$b" --prompt-len "$plen" --gen-len "$glen"
    bench "rollout_tp_b${b}_symm" 120 env TULU_SYMM_ALL_REDUCE=1 "${run[@]}" bench/rollout_throughput.py \
      --model llama2-13b --random-weights --tp "$tp" --batch "$b" --prompt-len "$plen" --gen-len "$glen"
  done
  # a PPO iteration at TP (13B's shape, 10 layers: four models and two optimizers fit at TP 2)
  bench ppo_step_tp 240 "${run[@]}" bench/ppo_step.py --model llama2-13b --random-weights --num-layers 10 \
    --tp "$tp" --rollout-batch-size 64 --train-batch-size 32 --prompt-len 256 --max-new-tokens 256 --iterations 2
  # the training phase's overlaps A/B (DP 2 where there are 4 GPUs or more, so the DP ones run too): the default,
  # all three off, async TP (each run checked to train to the default's losses)
  half=$((ngpu / 2)); [ "$ngpu" -lt 4 ] && half=1
  step train_overlaps 400 "$PY" bench/train_overlaps.py --nproc "$((2 * half))" --tp "$half" \
    --settings default,none,async_tp --json "$work/train_overlaps.json" -- --model llama2-13b --random-weights \
    --num-layers 10 --rollout-batch-size 64 --train-batch-size 32 --prompt-len 256 --max-new-tokens 256 \
    --iterations 2
  finish
fi
if [[ "$names" == *" tune "* ]]; then  # the tiles first: each sweep times every launch variant of its kernel
  names="$names paged_sweep rollout_b64_tuned rope_sweep gpu_tests kernel_tests_fixed "
  bench paged_sweep 150 "$PY" bench/bench_paged_attention.py --sweep --no-compile --shapes 13b-b64-c384 13b-b8-c4096 \
    70b-gqa8-b32-c2048
  # the fastest variant at the batch-64 rollout's own shape (MHA, bf16, contexts up to 384), on the whole generator
  best=$("$PY" - "$work/paged_sweep.json" 13b-b64-c384 <<'EOF_PY' 2>/dev/null
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r.get("shape") == sys.argv[2] and "block_n" in r and "ms" in r]
best = min(rows, key=lambda r: r["ms"])
print(json.dumps({k: best[k] for k in ("block_n", "num_warps", "num_stages", "dot_min_group")}))
EOF_PY
)
  if [[ "$best" == "{"* ]]; then
    echo "rollout_b64_tuned: --decode-config $best" >> "$out/summary.txt"
    # (--profile: where a step's time goes, kernel by kernel; the trace stays out of the archive: too large)
    bench rollout_b64_tuned 110 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
      --prompt-len 128 --gen-len 256 --no-hf --decode-config "$best" --profile "$(mktemp -d)/rollout_b64_trace.json"
  else
    echo "rollout_b64_tuned: skipped (no paged_sweep row for 13b-b64-c384)" | tee -a "$out/summary.txt"
  fi
  bench rope_sweep 200 "$PY" bench/bench_rope_attention.py --sweep
  step gpu_tests 70 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $xdist $per_test tests/engine/test_gpu.py
  step kernel_tests_fixed 60 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $xdist $per_test \
    tests/kernels/test_gae.py tests/kernels/test_paged_attention.py tests/kernels/test_rope_attention.py \
    -k "float64_values_with or decode_step_end_to_end or paged_decode_errors or nest_and_end or more_bad_inputs \
or set_decode_config"
  finish
fi
if [[ "$names" == *" fused "* ]]; then  # the decode step's rope write fused into the paged attention (alone)
  names="$names fused_tests paged_fused rollout_b64_fused rollout_b64_unfused rollout_b1_fused rollout_b1_unfused "
  step fused_tests 75 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $xdist $per_test \
    tests/kernels/test_paged_attention.py tests/kernels/test_rotary.py
  bench paged_fused 45 "$PY" bench/bench_paged_attention.py --no-compile --shapes 13b-b64-c384 13b-b8-c4096 \
    70b-gqa8-b32-c2048  # the fused step's columns beside ours + the rope write
  bench rollout_b64_fused 150 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"fuse_rope": 1}' \
    --profile "$(mktemp -d)/rollout_b64_trace.json"
  bench rollout_b64_unfused 100 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
    --prompt-len 128 --gen-len 256 --no-hf  # the two kernels (the default), same run
  bench rollout_b1_fused 90 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"fuse_rope": 1}'
  bench rollout_b1_unfused 60 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf
  light_kernel_rows
  finish
fi
if [[ "$names" == *" b1 "* ]]; then  # batch 1, 2% short of its target: where its step goes, and the split count
  names="$names rollout_b1_profile paged_sweep_b1 rollout_b1_split1 rollout_b1_split1_fused "
  bench rollout_b1_profile 100 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf --profile "$(mktemp -d)/rollout_b1_trace.json"
  bench paged_sweep_b1 90 "$PY" bench/bench_paged_attention.py --sweep --no-compile --shapes 13b-b1-c384
  # one context split at the rollout's 384-token table (no merge kernel; the default makes 2)
  bench rollout_b1_split1 60 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"min_split_tokens": 512}'
  bench rollout_b1_split1_fused 60 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"min_split_tokens": 512, "fuse_rope": 1}'
  light_kernel_rows
  finish
fi
if [[ "$names" == *" linear "* ]]; then  # the decode step's projections through kernels/decode_linear.py (alone)
  # (ours first: the defaults' rollouts were timed on the leases before, 4,957 and 131.4 tok/s; again if time is left)
  names="$names linear_tests linear sampling rollout_b64_linear rollout_b64_linear_pdl rollout_b1_linear "
  names="$names rollout_b1_linear_pdl rollout_b64_cublas rollout_b1_cublas rollout_b1_linear_nonorm linear_sweep "
  # (test_sampling: top-k's floor, kth_largest, which every rollout now takes: the recipe samples from the top 50;
  # test_decode_linear: also a chain of projections in a CUDA graph with programmatic dependent launch)
  step linear_tests 90 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $xdist $per_test \
    tests/kernels/test_decode_linear.py tests/kernels/test_sampling.py tests/kernels/test_paged_attention.py \
    tests/kernels/test_rotary.py
  bench linear 90 "$PY" bench/bench_decode_linear.py  # ours against cuBLAS, each 13B projection at batch 1, 8, 64
  # (batch 1, 64 and 256: the top-50 and top-p floors against torch, rows in parts against one program a row)
  bench sampling 60 "$PY" bench/bench_sampling.py --no-compile
  bench rollout_b64_linear 150 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"linear": 1}' \
    --profile "$(mktemp -d)/rollout_b64_trace.json"
  # decode_config's pdl: the decode kernels (projections, paged attention) by programmatic dependent launch
  bench rollout_b64_linear_pdl 80 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"linear": 1, "pdl": 1}'
  bench rollout_b1_linear 60 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"linear": 1}'
  bench rollout_b1_linear_pdl 60 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"linear": 1, "pdl": 1}'
  bench rollout_b64_cublas 100 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
    --prompt-len 128 --gen-len 256 --no-hf  # cuBLAS and the separate kernels (the default), same machine
  bench rollout_b1_cublas 60 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf
  bench rollout_b1_linear_nonorm 60 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"linear": 1, "norm_rows": 0}'  # layer 0's norm apart
  bench linear_sweep 200 "$PY" bench/bench_decode_linear.py --rows 64 1 --sweep --budget-s 150
  finish
fi
if [[ "$names" == *" next "* ]]; then  # the next lease's first call: what decides the opt-in switches (alone)
  names="$names next_tests rollout_b64_linear rollout_b64_linear_pdl rollout_b64_cublas rope_attention_tma "
  names="$names rollout_b1_linear rollout_b1_linear_pdl rollout_b1_cublas rollout_b1_pdl linear sampling "
  names="$names grad_sums train_tests gluon_tests pingpong_tests linear_sweep rope_sweep "
  # (the Gluon forward's tests apart, later and under their own short cap: a kernel new to the GPU may hang)
  step next_tests 100 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $xdist $per_test \
    tests/kernels/test_decode_linear.py tests/kernels/test_paged_attention.py tests/kernels/test_sampling.py \
    tests/kernels/test_rope_attention.py -k "not gluon"
  # the training side built without a GPU, on one: weight grads into their fp32 sums, the MLP's recomputed
  # activation, the parameter all-gather's side stream (NCCL, one rank)
  step train_tests 60 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/engine/test_gpu.py \
    -k "straight_into_fp32_sums or recomputed_activation or parameter_gather"
  for b in 64 1; do
    bench "rollout_b${b}_linear" 120 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights \
      --batch $b --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"linear": 1}'
    bench "rollout_b${b}_linear_pdl" 70 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights \
      --batch $b --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"linear": 1, "pdl": 1}'
    bench "rollout_b${b}_cublas" 70 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights \
      --batch $b --prompt-len 128 --gen-len 256 --no-hf  # the defaults, same machine
    # (issue 4's one check between the two batches: ours by TMA / by pointer loads / SDPA)
    # (and dq by the dk/dv kernel's atomic adds: rope_attention_bwd.DQ_ATOMIC, and the three kernels warp-specialised:
    # the WARP_SPEC switches, each checked against the reference first and its configs autotuned here, BOUNDED ones too)
    [ "$b" = 64 ] && bench rope_attention_tma 220 "$PY" bench/bench_rope_attention.py --no-compile
  done
  bench rollout_b1_pdl 60 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf --decode-config '{"pdl": 1}'  # the default path's kernels by PDL
  bench linear 60 "$PY" bench/bench_decode_linear.py  # ours against cuBLAS, each 13B projection at batch 1, 8, 64
  # (batch 1, 64 and 256: the top-50 and top-p floors against torch, rows in parts against one program a row)
  bench sampling 60 "$PY" bench/bench_sampling.py --no-compile
  # the training step's weight grads straight into their fp32 sums (engine/grad_sums.py, on by default where the
  # device's torch has the fp32-out GEMM): each projection's grad GEMM into its sum against the bf16 grad + add
  bench grad_sums 40 "$PY" bench/bench_grad_sums.py
  # rope_attention.GLUON_FWD's forward, rope_attention_bwd.GLUON_DKDV's dk/dv and GLUON_DQ's dq against float64
  # (poisoned outputs, non-finite neighbours, the backward)
  step gluon_tests 60 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/kernels/test_rope_attention.py \
    -k "gluon and not pingpong and not producer"
  # (the warp-specialised forms, attention_gluon.PINGPONG and BWD_PRODUCER, apart: a barrier phase wrong hangs
# them, and only their own step)
  step pingpong_tests 45 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/kernels/test_rope_attention.py \
    -k "pingpong or producer"
  bench linear_sweep 100 "$PY" bench/bench_decode_linear.py --rows 64 1 --sweep --budget-s 80
  bench rope_sweep 150 "$PY" bench/bench_rope_attention.py --sweep
  finish
fi
if [[ "$names" == *" tma "* ]]; then  # the attention's inner tiles by tensor descriptor (alone)
  names="$names tma_tests rope_attention_tma gluon_tests pingpong_tests rope_sweep "
  step tma_tests 90 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $xdist $per_test \
    tests/kernels/test_rope_attention.py -k "not gluon"
  # ours (TMA), ours by pointer loads, SDPA flash / cuDNN with and without HF's rotary, dense and packed
  bench rope_attention_tma 210 "$PY" bench/bench_rope_attention.py --no-compile
  step gluon_tests 60 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/kernels/test_rope_attention.py \
    -k "gluon and not pingpong and not producer"
  # (the warp-specialised forms, attention_gluon.PINGPONG and BWD_PRODUCER, apart: a barrier phase wrong hangs
# them, and only their own step)
  step pingpong_tests 45 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/kernels/test_rope_attention.py \
    -k "pingpong or producer"
  bench rope_sweep 220 "$PY" bench/bench_rope_attention.py --sweep
  finish
fi
if [[ "$names" == *" gluon "* ]]; then  # issue 4's Gluon kernels alone (~5 minutes warm): tests, rows, their sweep
  names="$names gluon_tests pingpong_tests rope_gluon rope_sweep_gluon "
  step gluon_tests 60 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/kernels/test_rope_attention.py \
    -k "gluon and not pingpong and not producer"
  step pingpong_tests 45 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/kernels/test_rope_attention.py \
    -k "pingpong or producer"
  # ours at its defaults, the Gluon rows (each checked first; "in Triton" ones once a Gluon switch is on), SDPA's
  bench rope_gluon 150 "$PY" bench/bench_rope_attention.py --no-compile --no-mixed --only Gluon Triton SDPA
  bench rope_sweep_gluon 120 "$PY" bench/bench_rope_attention.py --sweep --sweep-gluon
  finish
fi
if [[ "$names" == *" long "* ]]; then  # the fused decode step where it should win: long contexts (~3 min warm)
  names="$names rollout_long_unfused rollout_long_fused "
  bench rollout_long_unfused 150 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 32 \
    --prompt-len 512 --gen-len 1024 --no-hf  # (its KV, 40 GB, fits beside the weights on an H100 too)
  bench rollout_long_fused 120 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 32 \
    --prompt-len 512 --gen-len 1024 --no-hf --decode-config '{"fuse_rope": 1}'
  finish
fi
if [[ "$names" == *" check "* ]]; then  # a lease's last minutes: the defaults a sweep changed, and what failed
  names="$names rollout_b64_default paged_default gpu_test_offload rollout_b1_default "
  # (on a fresh machine the rollout compiles and autotunes every kernel first: 60 s did not reach its first timing)
  bench rollout_b64_default 150 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
    --prompt-len 128 --gen-len 256 --no-hf --profile "$(mktemp -d)/rollout_b64_trace.json"  # decode_config's pick
  bench paged_default 40 "$PY" bench/bench_paged_attention.py --no-compile --shapes 13b-b64-c384 13b-b8-c4096 \
    70b-gqa8-b32-c2048
  step gpu_test_offload 45 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $per_test tests/engine/test_gpu.py \
    -k idle_model_weights_free
  bench rollout_b1_default 90 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
    --prompt-len 128 --gen-len 256 --no-hf
  light_kernel_rows
  finish
fi
bench rope_attention 150 "$PY" bench/bench_rope_attention.py "${light[@]}"      # issue 4's figures
bench rollout_b64 150 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
  --prompt-len 128 --gen-len 256                                                # issue 5's figures (HF dynamic cache)
bench rollout_b1 100 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 1 \
  --prompt-len 128 --gen-len 256
bench paged_attention 60 "$PY" bench/bench_paged_attention.py "${light[@]}"
[ "$first" = 1 ] && light=(--skip-compile)
bench logprob 60 "$PY" bench/bench_logprob.py "${light[@]}"
bench grad_sums 40 "$PY" bench/bench_grad_sums.py   # weight grads into their fp32 sums against bf16 grad + add
step gpu_tests 210 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $xdist $per_test tests/engine/test_gpu.py
step kernel_tests 300 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs $xdist $per_test tests/kernels -k "not gluon"
step gluon_tests 60 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/kernels/test_rope_attention.py \
  -k "gluon and not pingpong and not producer"
# (the warp-specialised forms, attention_gluon.PINGPONG and BWD_PRODUCER, apart: a barrier phase wrong hangs
# them, and only their own step)
step pingpong_tests 45 env TULU_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs tests/kernels/test_rope_attention.py \
  -k "pingpong or producer"
bench offload 90 "$PY" bench/bench_offload.py   # PCIe rates, a streamed Adam step, the offload settings' cost
bench gae 40 "$PY" bench/bench_gae.py
bench compile 150 "$PY" bench/bench_compile.py   # a cold start's autotuning: one compile thread against many
bench rmsnorm_swiglu 60 "$PY" bench/bench_rmsnorm_swiglu.py
bench sampling 40 "$PY" bench/bench_sampling.py
bench rope_sweep 240 "$PY" bench/bench_rope_attention.py --sweep   # every launch variant: which tiles to keep
bench paged_attention_fp8 60 "$PY" bench/bench_paged_attention.py --kv-dtype fp8 --no-compile  # half the KV bytes
sweep_shapes="13b-b64-c384 13b-b8-c4096 13b-b256-c1024 70b-gqa8-b32-c2048"
bench paged_sweep 180 "$PY" bench/bench_paged_attention.py --sweep --no-compile --shapes $sweep_shapes  # decode_config
bench paged_sweep_fp8 180 "$PY" bench/bench_paged_attention.py --sweep --no-compile --kv-dtype fp8 --shapes $sweep_shapes
bench rollout_b64_hf_static 200 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
  --prompt-len 128 --gen-len 256 --hf-static                                    # + HF's static cache (~70 s more)
bench rollout_b64_sync 100 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
  --prompt-len 128 --gen-len 256 --no-overlap --no-hf   # what the overlapped scheduler buys
bench rollout_b64_fp8 100 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 64 \
  --prompt-len 128 --gen-len 256 --kv-cache-dtype fp8 --no-hf   # half the KV bytes per decode step
bench rollout_ppo_like 150 "$PY" bench/rollout_throughput.py --model llama2-13b --random-weights --batch 256 \
  --max-num-seqs 64 --prompt-len 128 --gen-len 256 --stop-tokens 160   # admissions mid-run: mixed steps
bench ppo_step 240 "$PY" bench/ppo_step.py --model llama2-7b --random-weights --num-layers 8 --rollout-batch-size 64 \
  --train-batch-size 16 --prompt-len 256 --max-new-tokens 256 --iterations 2  # the 3rd: graphs replayed? then the
  # peers' iteration on the same shapes (transformers' generate, eager passes, AdamW: bench/peer_ppo.py)
bench ppo_step_no_sums 240 "$PY" bench/ppo_step.py --model llama2-7b --random-weights --num-layers 8 \
  --rollout-batch-size 64 --train-batch-size 16 --prompt-len 256 --max-new-tokens 256 --iterations 2 \
  --no-peer --no-grad-sums   # the A/B of engine/grad_sums.py: every weight grad in bf16, then the hook's fp32 add
bench ppo_step_offload 240 "$PY" bench/ppo_step.py --model llama2-7b --random-weights --num-layers 8 \
  --rollout-batch-size 64 --train-batch-size 16 --prompt-len 256 --max-new-tokens 256 --iterations 2 \
  --no-peer --offload-optimizer rollouts --offload-idle-models rollouts   # the optimizer state and the idle models' weights in
  # host memory during rollouts: what the copies cost per phase, and whether the decode graphs still replay
bench ppo_step_resident 240 "$PY" bench/ppo_step.py --model llama2-7b --random-weights --num-layers 8 \
  --rollout-batch-size 64 --train-batch-size 16 --prompt-len 256 --max-new-tokens 256 --iterations 2 \
  --no-peer --offload-optimizer always   # the state in host memory throughout: what streaming it through each update costs
bench ppo_save 200 "$PY" bench/ppo_step.py --model llama2-7b --random-weights --num-layers 2 --rollout-batch-size 16 \
  --train-batch-size 8 --prompt-len 128 --max-new-tokens 64 --no-peer --save-to /tmp/tulu-ppo-save   # a checkpoint
  # (~19 GB: two 7B-wide models of 2 layers, their fp32 masters and Adam moments) before the run goes on and in the
  # background: the run's wait each way (the device-to-host copy) against the disk's rate
finish
