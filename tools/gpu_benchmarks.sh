#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in the order they were taken, so a lent
# machine reproduces them in one or two calls. Logs go to ${OUT:-/tmp/jaxdit_bench}.
#   bash tools/gpu_benchmarks.sh kernels   # correctness of cudnn/pallas, attention sweep
#   bash tools/gpu_benchmarks.sh train     # DiT-XL/2 train step: jaxdit backends vs PyTorch
#   bash tools/gpu_benchmarks.sh mfu       # not yet run: the next candidates for the 45% goal
#   bash tools/gpu_benchmarks.sh moe       # not yet run: Expert Race top-k and expert compute
# Optional wheels (grain, ml-collections, diffusers, ...) are installed from .whl/ if present.
set -uo pipefail
stage=${1:?usage: gpu_benchmarks.sh kernels|fused|step|train|mfu|moe}
out=${OUT:-/tmp/jaxdit_bench}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true

run() {  # run <seconds> <log name> <command...>
  local limit=$1 name=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | grep -v "^W\|^I[0-9]" | tee "$out/$name.log" | grep -E "^\||device|step|compile|failing|Error|error" 
}

case $stage in
  kernels)
    run 150 check python3 tools/check_attention.py --backends cudnn,pallas
    run 330 attention python3 tools/bench_attention.py --image_tokens 256,1024,4096 \
      --head_dims 64,96 --batch 8 --backends xla,cudnn,pallas \
      --pallas_blocks 128,128,64,64,4,2 --pallas_blocks 128,64,64,64,4,3 \
      --pallas_blocks 64,64,64,64,4,2 --pallas_blocks 128,128,128,64,8,2
    ;;
  fused)  # the fused (atomic dQ) backward against cuDNN and the two-kernel backward
    run 150 check_fused python3 tools/check_attention.py --backends pallas \
      --blocks 64,64,64,64,4,2,1
    run 150 profile_xl python3 tools/bench_train_step.py --config experiments/race_dit.py:XL-dense \
      --batch 128 --optim adamw --remat dots --attn_impl cudnn --steps 5 --profile_top 25
    run 240 attention_fused python3 tools/bench_attention.py --image_tokens 1024,4096 \
      --head_dims 64,96 --batch 8 --backends cudnn,pallas \
      --pallas_blocks 64,64,64,64,4,2 --pallas_blocks 64,64,64,64,4,2,1 \
      --pallas_blocks 64,64,64,128,8,2,1 --pallas_blocks 128,64,128,128,8,3,1
    ;;
  step)  # where the DiT-XL/2 step goes (profile) and what the optimizer-side options cost
    xl="python3 tools/bench_train_step.py --config experiments/race_dit.py:XL-dense \
      --optim adamw --remat dots --attn_impl cudnn --steps 5"
    run 150 profile_step $xl --batch 128 --profile_top 30
    run 110 step_noskip $xl --batch 128 --config.optim.skip_nonfinite=False
    run 150 step_b256 $xl --batch 256
    ;;
  train)
    run 120 check_rest python3 tools/check_attention.py --backends pallas --only fp32,packed
    cfg=experiments/race_dit.py:XL-dense
    for impl in cudnn pallas; do
      run 150 "train_$impl" python3 tools/bench_train_step.py --config $cfg --batch 128 \
        --optim adamw --remat dots --attn_impl $impl --steps 8
    done
    run 150 train_torch python3 tools/bench_torch_dit.py --size XL --batch 128 --compile
    ;;
  mfu)  # DiT-XL/2 step variants the profile points at (elementwise passes, 27% of the step):
        # no remat (PyTorch's step needs 45.8 GiB without checkpointing) and cuBLASLt GEMM
        # epilogues (bias + GELU fused into the matmul)
    xl="python3 tools/bench_train_step.py --config experiments/race_dit.py:XL-dense \
      --optim adamw --attn_impl cudnn --steps 5 --batch 128"
    run 150 mfu_dots $xl --remat dots
    run 150 mfu_none $xl --remat none
    run 150 mfu_dots_lt env XLA_FLAGS=--xla_gpu_enable_cublaslt=true $xl --remat dots
    run 150 mfu_none_lt env XLA_FLAGS=--xla_gpu_enable_cublaslt=true $xl --remat none
    ;;
  moe)  # one GPU: top-k compute (no interconnect) and grouped (ragged_dot) vs dense experts
    for w in 384 1152; do
      run 200 "moe_w$w" python3 tools/bench_moe.py --devices 1 --batch 64 --tokens 256 \
        --experts 32 --k 4 --width $w
    done
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
