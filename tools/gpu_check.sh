#!/usr/bin/env bash
# The one-command GPU check (issue 10, section 5; docs/cuda.md "The GPU check"). On a machine with a CUDA GPU,
# from a fresh checkout or one carrying a build:
#
#     tools/gpu_check.sh             run every step; results and one-page summary.md under $OUT
#     tools/gpu_check.sh --dry-run   print the plan (steps, commands, shapes, budgets and their sizing); no GPU
#
# Every step runs under its own `timeout`; a failing step is recorded in $OUT/summary.md and the next one runs;
# the exit status is 1 if any step failed. Nothing is installed (the GPU machine may have no network): torch,
# pytest, hypothesis, numpy, setuptools and ninja must already be there, and compute-sanitizer for its two steps.
# Environment: OUT (default gpu-check-results), PYTHON (default python, else python3), GPU_CHECK_BUDGET_S (the
# whole run, default 480 = 8 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu-check-results}
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
TOTAL_BUDGET=${GPU_CHECK_BUDGET_S:-480}

# ---------------------------------------------------------------------------------------------- the plan
# name | budget in seconds | how the budget was sized | command
# Budgets are for an H100-class GPU with 16 CPU cores; they sum to 465 s, 15 s below the 8 minutes for the
# summary. A budget marked "+" is elastic: what earlier steps leave unused (a reused build leaves ~140 s) goes to
# the elastic steps, half to the first, the rest to the last, which gets all that remains.
STEPS=(
"preflight|15|imports torch and queries the device: ~5 s|\$PYTHON tools/gpu_check.py preflight"
"build|150|reused when ckd_ext/_C*.so loads and runs on this GPU (~10 s); else setup.py build_ext for this GPU's architecture only, MAX_JOBS = cores: measured on our 2-core CPU machine, nvcc took 38 s for cuda_backend.cu at one architecture (100 s for two) and the slowest C++ file 102 s under load, all files compile in parallel, + link and ptxas report|build_step"
"test_cuda|60|tests/test_cuda.py: 272 small cases (N <= 257, C <= 4099) with float64 oracles on the CPU, ~0.1 s each, + ~10 s collection; fails if none passed|test_step"
"memcheck|60|compute-sanitizer --tool memcheck over tools/gpu_check.py ops --check run: 48 tiny forward+backward calls (8 configurations x fp32/bf16/fp16 x {64x128 mean, 37x30 masked none}); the sanitizer's start with torch ~20-30 s, kernels 10-100x slower on kilobytes|sanitizer_step memcheck"
"racecheck|60|the same calls under --tool racecheck (shared-memory hazards; slower per kernel, same tiny shapes)|sanitizer_step racecheck"
"sync_debug|20|96 calls (8 configurations x fp32/bf16 x mask/no mask x mean/sum/none), forward and backward, each under torch.cuda.set_sync_debug_mode(\"error\"); tiny shapes, ~5 s of start-up|\$PYTHON tools/gpu_check.py ops --check sync --dtypes float32,bfloat16"
"cuda_graph|20|8 captures (CKD student / teacher anchor, BicKD, KD x fp32/bf16, masked mean): capture, replay on new inputs, eager comparison; tiny shapes|\$PYTHON tools/gpu_check.py ops --check graph --dtypes float32,bfloat16"
"peaks|15|one 8192^3 bf16 GEMM and a 1 GiB copy, 13 runs each: < 1 s of GPU time + start-up|\$PYTHON tools/gpu_check.py peaks --json \$OUT/peaks.json"
"ddp_nccl|5+|the distributed losses on NCCL, when the machine has 2 GPUs: torchrun --nproc-per-node 2 -m ckd_ext.demos.classify --ddp --device cuda, CKD and BicKD, one epoch of the digits demo, with --global-negatives gather and ring (~20 s each: start-up, the teacher, two students); with one GPU it records that NCCL needs two and passes, with none it fails like every GPU step|ddp_step"
"bench|65+|benchmarks/run.py, shape group gpu-tokens, providers ckd_ext, eager (the reference under bf16 autocast), floor, mode full: 27 cases in one worker, 1 warm-up + 1 memory run + 2-5 timed calls (2 s cap) each; a case is cut at 20 s and everything left at the step's deadline is recorded as 'deadline'|bench_step bench gpu-tokens ckd_ext,eager,floor 20"
"bench_lm|0+|benchmarks/run.py, shape group gpu-lm (16384 tokens, V = 128256, H = 2048 / 4096, bf16), providers fused_linear and ckd_ext (logits materialised, then the fused op), CKD and KD: 4 cases; gets the time the bench step left, cases cut at 20 s|bench_step bench_lm gpu-lm fused_linear,ckd_ext 20"
"bench_compiled|0+|the compiled provider (torch.compile of the same autocast reference, inductor): ~20-40 s of compilation per (loss, shape); gets the time the earlier steps left (at least 0 s: with a fresh build it may get none), cases cut at 45 s, the rest recorded as 'deadline'|bench_step bench_compiled gpu-tokens compiled 45"
)

field() { local IFS='|'; read -r -a parts <<<"$1"; echo "${parts[$2]}"; }

print_plan() {
  echo "GPU check plan: $(( ${#STEPS[@]} )) steps, whole run within ${TOTAL_BUDGET} s, results in \$OUT (default gpu-check-results)"
  echo "Python: $PYTHON (nothing is installed; the preflight step fails clearly without torch or a GPU)"
  echo "Benchmark shapes (benchmarks/cases.py, group gpu-tokens):"
  "$PYTHON" - <<'EOF' || echo "  (could not read benchmarks/cases.py)"
import sys; sys.path.insert(0, ".")
from benchmarks.cases import SHAPES
seen = []
for s in SHAPES:
    if s.group == "gpu-tokens" and (s.name, s.N, s.C, s.dtype) not in seen:
        seen.append((s.name, s.N, s.C, s.dtype))
        print(f"  {s.name}: {s.N} x {s.C} {s.dtype}, losses " + ",".join(x.loss for x in SHAPES if x.name == s.name))
EOF
  local total=0 i=1
  for s in "${STEPS[@]}"; do
    local name budget why cmd
    name=$(field "$s" 0); budget=$(field "$s" 1); why=$(field "$s" 2); cmd=$(field "$s" 3)
    total=$(( total + ${budget%+} ))
    printf '%2d. step %-15s budget %4s s\n    command: %s\n    sizing:  %s\n' "$i" "$name" "$budget" "$(expand "$cmd")" "$why"
    i=$(( i + 1 ))
  done
  echo "Sum of fixed budgets: ${total} s of ${TOTAL_BUDGET} s; the last step gets the remainder at run time."
}

# What a step's command word stands for, spelled out for the plan.
expand() {
  case "$1" in
    test_step) echo "\$PYTHON -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs (and at least one test passed)" ;;
    build_step) echo "\$PYTHON tools/gpu_check.py extension || TORCH_CUDA_ARCH_LIST=\$(\$PYTHON tools/gpu_check.py arch) CKD_EXT_CUDA=on CKD_EXT_EMULATED=0 MAX_JOBS=\$(nproc) \$PYTHON setup.py build_ext --inplace, then the extension check again" ;;
    sanitizer_step*) echo "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool ${1#sanitizer_step } --error-exitcode 1 \$PYTHON tools/gpu_check.py ops --check run --dtypes float32,bfloat16,float16" ;;
    ddp_step) echo "for mode in gather ring: \$PYTHON -m torch.distributed.run --standalone --nproc-per-node 2 -m ckd_ext.demos.classify --ddp --device cuda --global-negatives \$mode --methods ckd,bickd --epochs 1 --teacher-epochs 1 --seeds 0 --quiet (needs 2 GPUs; NCCL checked in its output)" ;;
    bench_step*) set -- $1; echo "\$PYTHON benchmarks/run.py --device cuda --only shape=$3 --only mode=full --only provider=$4 --isolate batch --timeout $5 --deadline <step budget - 5> --warmup 1 --min-reps 2 --reps 5 --max-seconds 2 --no-plots --out \$OUT/$2" ;;
    *) echo "$1" ;;
  esac
}

# ---------------------------------------------------------------------------------------------- the steps
build_step() {
  if "$PYTHON" tools/gpu_check.py extension; then
    echo "reusing the build in the tree"
    return 0
  fi
  local arch
  arch=$("$PYTHON" tools/gpu_check.py arch) || return 1
  echo "building for TORCH_CUDA_ARCH_LIST=$arch"
  TORCH_CUDA_ARCH_LIST="$arch" CKD_EXT_CUDA=on CKD_EXT_EMULATED=0 MAX_JOBS=$(nproc) \
    "$PYTHON" setup.py build_ext --inplace || return 1
  "$PYTHON" tools/gpu_check.py extension
}

test_step() {
  "$PYTHON" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/test_cuda.out"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || return "$rc"
  grep -Eq '[0-9]+ passed' "$OUT/test_cuda.out" || { echo "no test passed (all skipped?)"; return 1; }
}

sanitizer_step() {
  local sanitizer
  sanitizer=$("$PYTHON" -c "import sys; sys.path.insert(0, 'tools'); from gpu_check import find_sanitizer; print(find_sanitizer() or '')")
  if [ -z "$sanitizer" ]; then
    echo "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*): the $1 step cannot run"
    return 1
  fi
  # Without the caching allocator every tensor is its own allocation, so an access past a tensor's end is outside
  # any allocation, which memcheck reports (inside a cached block it would not).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$1" --error-exitcode 1 \
    "$PYTHON" tools/gpu_check.py ops --check run --dtypes float32,bfloat16,float16
}

ddp_step() {  # both global modes on 2 GPUs over NCCL (the same code path as gloo's, tested on every commit)
  local gpus mode
  gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  if [ "$gpus" -eq 0 ]; then echo "torch sees no CUDA device"; return 1; fi
  if [ "$gpus" -lt 2 ]; then echo "skipped: $gpus GPU, NCCL across ranks needs 2"; return 0; fi
  for mode in gather ring; do
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m ckd_ext.demos.classify --ddp --device cuda \
      --global-negatives "$mode" --methods ckd,bickd --epochs 1 --teacher-epochs 1 --seeds 0 --quiet \
      --out "$OUT/ddp_$mode" > "$OUT/ddp_$mode.txt" 2>&1 || { tail -n 20 "$OUT/ddp_$mode.txt"; return 1; }
    grep -q "(nccl)" "$OUT/ddp_$mode.txt" || { echo "the $mode run did not use NCCL"; return 1; }
    cat "$OUT/ddp_$mode.txt"
  done
}

bench_step() {  # bench_step OUTDIR SHAPES PROVIDERS CASE_TIMEOUT  (STEP_BUDGET from the runner)
  local deadline=$(( STEP_BUDGET - 5 ))
  if [ "$deadline" -lt 5 ]; then
    echo "no time left for this step (${STEP_BUDGET} s)"
    return 1
  fi
  "$PYTHON" benchmarks/run.py --device cuda --only shape="$2" --only mode=full --only provider="$3" \
    --isolate batch --timeout "$4" --deadline "$deadline" --warmup 1 --min-reps 2 --reps 5 --max-seconds 2 \
    --no-plots --out "$OUT/$1" || return 1
  "$PYTHON" tools/gpu_check.py bench-check "$OUT/$1"
}

run_step() {  # run_step NAME BUDGET COMMAND: under `timeout`, log in $OUT/NAME.log, one line in steps.tsv
  local name=$1 budget=$2 cmd=$3 start rc status
  start=$(date +%s)
  echo "=== $name (budget ${budget} s): $(expand "$cmd")"
  STEP_BUDGET=$budget PYTHON=$PYTHON OUT=$OUT timeout --kill-after=5 "$budget" \
    bash -c "$(declare -f build_step test_step sanitizer_step ddp_step bench_step); $cmd" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status="failed (timeout after ${budget} s)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" "$budget" "$name.log" >>"$OUT/steps.tsv"
  echo "    $status in $(( $(date +%s) - start )) s (log: $OUT/$name.log)"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    | /'
}

if [ "${1:-}" = "--dry-run" ]; then
  print_plan
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: tools/gpu_check.sh [--dry-run]" >&2
  exit 2
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_check: '$PYTHON -c \"import torch\"' failed: torch must already be installed (this check installs nothing; set PYTHON=...)" >&2
  exit 1
fi

mkdir -p "$OUT"
printf 'step\tstatus\tseconds\tbudget\tlog\n' >"$OUT/steps.tsv"
started=$(date +%s)
n=${#STEPS[@]}
for i in "${!STEPS[@]}"; do
  s=${STEPS[$i]}
  name=$(field "$s" 0); budget=$(field "$s" 1); cmd=$(field "$s" 3)
  left=$(( TOTAL_BUDGET - 15 - ($(date +%s) - started) ))
  if [ "$i" -eq $(( n - 1 )) ]; then
    budget=$left                                   # the last step takes what is left
  elif [ "${budget%+}" != "$budget" ]; then
    later=0                                        # fixed budgets of this and the later steps
    for t in "${STEPS[@]:$i}"; do b=$(field "$t" 1); later=$(( later + ${b%+} )); done
    slack=$(( left - later ))
    budget=$(( ${budget%+} + (slack > 0 ? slack / 2 : 0) ))
  fi
  [ "$budget" -gt "$left" ] && budget=$left          # no step may overrun the whole budget
  [ "$budget" -lt 1 ] && budget=1
  run_step "$name" "$budget" "$cmd"
done

"$PYTHON" tools/gpu_check.py summary --out "$OUT" >/dev/null || echo "gpu_check: the summary failed" >&2
echo "summary: $OUT/summary.md ($(( $(date +%s) - started )) s)"
if grep -q 'failed' <(cut -f2 "$OUT/steps.tsv" | tail -n +2); then
  exit 1
fi
exit 0
