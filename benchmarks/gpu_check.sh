#!/usr/bin/env bash
# The one prepared command for a lent GPU (H100/H200; torch 2.11, triton 3.6): bf16-aware
# correctness checks and the benchmarks against the anchors, in one call. Each step has its
# own time cap, so a slow or failing step cannot take the others' numbers with it; logs and
# JSON land in $OUT (8 files at most come back).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#
# Liger-Kernel and Cut Cross-Entropy are not on that machine's image: their wheels travel in
# .whl/ (git-ignored) and are installed into /tmp/site here.
#
# The first step ("warm") fills the compile caches on all cores before anything is timed:
# each benchmark runs once with CAPTURE=..., recording the compile requests of its kernel
# launches without compiling or launching them, and benchmarks/precompile.py compiles them
# in parallel into Triton's on-disk cache; beside it the loss benchmark runs its
# torch.compile competitors once (WARM_COMPILED=1) to fill Inductor's caches. The timed
# steps then load their kernels instead of compiling them one by one, and their sweeps'
# budgets go to timing. The "ncu" step then reads the hardware counters of each main kernel
# (one launch each, Nsight Compute): what the warps wait on, which the timings cannot say.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
# Import the package from the source tree: kernels/ is installed as odmt_components.kernels,
# so link it there the way the install mapping does (this copy of the tree is disposable).
[ -e odmt_components/kernels ] || ln -s ../kernels odmt_components/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS COMMAND...: run with a cap, keep the log, show its tail
  local name=$1 limit=$2
  shift 2
  echo "=== $name (cap ${limit}s)"
  local started=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-30}" "$OUT/$name.log"
  echo "=== $name rc=$rc in $((SECONDS - started))s"
}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  echo "kernel $(uname -r); $( (ncu --version 2>/dev/null || echo 'no ncu on PATH') | tail -n 1)"
} 2>&1 | tee "$OUT/setup.log"

warm() {  # capture the benchmarks' compile requests, compile them in parallel (see above)
  local cap=${CAP_WARM:-120} started=$SECONDS specs=/tmp/odmt_specs pids=() compiled=""
  mkdir -p "$specs"
  rm -f "$specs"/*.json "$specs"/*.log
  echo "=== warm (cap ${cap}s)"
  # only the benchmarks this call's STEPS run: each one's kernels take cores for a minute or more
  local benches=()
  case " $STEPS " in *" attention "*) benches+=(attention) ;; esac
  case " $STEPS " in *" loss "*) benches+=(inbatch_loss) ;; esac
  case " $STEPS " in *" step "*) benches+=(odmt_step) ;; esac
  if [ -z "${SKIP_COMPILE:-}" ] && [[ " ${benches[*]} " == *" inbatch_loss "* ]]; then
    WARM_COMPILED=1 timeout -k 10 "$cap" python3 benchmarks/bench_inbatch_loss.py >"$specs/compiled.log" 2>&1 &
    compiled=$!  # ($! is unbound under set -u while no job was started)
  fi
  for bench in "${benches[@]}"; do
    CAPTURE="$specs/$bench.json" timeout -k 10 "$((cap / 2))" python3 "benchmarks/bench_$bench.py" \
      >"$specs/capture_$bench.log" 2>&1 &
    pids+=($!)
  done
  if [ ${#pids[@]} -gt 0 ]; then
    wait "${pids[@]}"
    tail -n 3 "$specs"/capture_*.log
    timeout -k 10 "$((cap - (SECONDS - started)))" python3 benchmarks/precompile.py "$specs"/*.json
  fi
  if [ -n "$compiled" ]; then
    wait "$compiled"
    echo "torch.compile competitors warmed (rc=$?):"
    tail -n 3 "$specs/compiled.log"
  fi
  echo "=== warm done in $((SECONDS - started))s"
}

# Both kernel families changed after Run 5 (untimed): the attention first (persistent short
# kernels at D = 64, split backward at 384, nearest to its targets), then the loss.
STEPS="${STEPS:-warm attention loss ncu tests step}"
for s in $STEPS; do
  case $s in
    warm) warm 2>&1 | tee -a "$OUT/setup.log" ;;
    # each benchmark stops its tile sweep at SWEEP_BUDGET_S seconds; the default leaves the
    # step's cap 45 s for the last sweep entry's compile and the table
    # FlexAttention is off unless FLEX=1: its compile and ~55 ms calls at D = 384 took most of
    # Run 4's attention step; Runs 2 and 4 measured it (never the fastest anchor)
    attention)
      FLEX="${FLEX:-0}" SWEEP_BUDGET_S="${SWEEP_BUDGET_S:-$((${CAP_ATTENTION:-180} - 45))}" \
        step bench_attention "${CAP_ATTENTION:-180}" python3 benchmarks/bench_attention.py ;;
    loss)
      SWEEP_BUDGET_S="${SWEEP_BUDGET_S:-$((${CAP_LOSS:-220} - 45))}" \
        step bench_inbatch_loss "${CAP_LOSS:-220}" python3 benchmarks/bench_inbatch_loss.py ;;
    # hardware counters of each main kernel, one launch each (benchmarks/profile_kernels.py):
    # after the benchmarks, whose runs left every kernel it launches in the compile cache;
    # writes ncu.log and ncu_raw.csv (Firecracker machines, the H100s; not gVisor's H200s)
    # gVisor (kernel 4.4.0, the H200s) lets ncu read no counters: the step would only cost;
    # the profiled program starts no case in the last 30 s of the cap (ncu's report and the
    # export come after it exits)
    ncu)
      if [[ "$(uname -r)" == 4.4.0* ]]; then
        echo "=== ncu skipped: gVisor runtime ($(uname -r)), no hardware counters there"
      else
        NCU_DEADLINE_S=$((${CAP_NCU:-100} - 30)) \
          step ncu "${CAP_NCU:-100}" python3 benchmarks/profile_kernels.py profile "$OUT"
      fi ;;
    # the sm_90 compile tests are for GPU-less CI (the benchmarks compile everything there)
    tests) HYPOTHESIS_PROFILE=gpu step kernel_tests "${CAP_TESTS:-90}" python3 -m pytest ${TESTS:-tests/kernels} -q -x \
      -p no:cacheprovider --ignore=tests/kernels/test_kernels_compile.py ;;
    step) step bench_odmt_step "${CAP_STEP:-100}" python3 benchmarks/bench_odmt_step.py ;;
  esac
done
