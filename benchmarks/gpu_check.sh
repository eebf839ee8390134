#!/usr/bin/env bash
# One-shot GPU check of adaptau's GPU backends (triton, cuda), sized to finish in 5 minutes
# on one H200 (overall deadline 300 s, ADAPTAU_GPU_CHECK_BUDGET_S).
#
#   PYTHON=python3 OUT=/tmp/out ADAPTAU_DATA=$PWD/.gpudata bash benchmarks/gpu_check.sh
#
# Python: $PYTHON, else `python`, else python3 -- the image's own torch/Triton (the
# repository's .venv is for the CPU dev machine and is not used).
#
# Steps, in order, each under its cap; the caps add up to 295 s < 300 s. "expected" is the
# GPU time estimated from the CPU stand-in (see docs/gpu.md, "Running the GPU check"):
#
#   step          cap   expected  what
#   env           10 s    ~3 s    nvidia-smi, torch/Triton versions
#   build         75 s   ~45 s    pip install -e . (CUDA extension, card's arch only);
#                                 CPU stand-in: the CPU-only build (ADAPTAU_NO_CUDA=1, 6 C++
#                                 files, ninja) took 108 s on 2 shared cores, ~220 core-s:
#                                 ~15-30 s on 16 cores; the .cu adds one nvcc -O3 compile
#                                 (8 s here) and the CUDA glue one more torch-header file
#   build_nocuda  30 s   (only when the CUDA build failed) the same with ADAPTAU_NO_CUDA=1;
#                                 the Triton backend needs no extension and runs either way
#   check         35 s   ~20 s    paper shape, every fused backend vs the float64 reference,
#                                 fp32 + bf16 (benchmarks/gpu_paper_shape.py check); the time
#                                 is Triton's JIT (~16 kernels, ~1 s each, as the sm_90
#                                 compile test measures them) plus the float64 reference
#   time          65 s   ~40 s    paper-shape fwd+bwd timings: adaptau backends, then eager,
#                                 then torch.compile (~25 s of compilation per dtype, as on
#                                 the CPU stand-in); each row appended to paper_shape.md
#   tests         50 s   ~30 s    tests/test_triton_backend.py -k "gpu and (float32 or
#                                 bfloat16)" (pytest-xdist -n 8 when the image has it)
#   train         30 s   ~15 s    one Gowalla MF epoch (gowalla-mf-paper) when
#                                 $ADAPTAU_DATA holds the carried data; else skipped
#
# The CPU dry run below (2 shared cores, B=32 M=16 N=200, Triton interpreted, build skipped)
# took: env 1 s, check 6 s, time 29 s (torch.compile's first calls 3-5 s), tests 3 s (56
# fp32 + bf16 GPU tests selected, all skipped: no GPU) -- 41 s in all. CPU times, no GPU figures.
#
# Files in $OUT (the device tool returns at most 8): summary.md (step table, test tally,
# check and timing tables; printed last), check.tsv and paper_shape.md (written row by row,
# so a run cut short keeps what it measured) and gpu_check.tgz (every step's log, packed
# again after each step).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/adaptau_gpu_check.XXXXXX")   # logs; packed into $OUT
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3; fi
BUDGET=${ADAPTAU_GPU_CHECK_BUDGET_S:-300}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
STEPS="$WORK/steps.tsv"
: > "$STEPS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# paper-shape sizes; a CPU dry run passes smaller ones, e.g.
#   ADAPTAU_GPU_CHECK_SKIP_BUILD=1 TRITON_INTERPRET=1 ADAPTAU_GPU_CHECK_SHAPE="--device cpu
#   --B 32 --M 16 --N 200 --reps 2" PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
SHAPE_ARGS=${ADAPTAU_GPU_CHECK_SHAPE:-}

remaining() { echo $((DEADLINE - $(date +%s))); }

write_summary() {
  {
    echo "# adaptau GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s of ${BUDGET} s)"
    echo
    echo "| step | status | seconds | cap |"
    echo "|---|---|---|---|"
    while IFS=$'\t' read -r name status secs cap; do echo "| $name | $status | $secs | $cap |"; done < "$STEPS"
    echo
    grep -hE "(passed|failed|skipped|error)" "$WORK/tests.log" 2>/dev/null | tail -n 1 | sed 's/^/tests: /'
    if [[ -f "$OUT/check.tsv" ]]; then echo; echo '```'; cat "$OUT/check.tsv"; echo '```'; fi
    [[ -f "$OUT/paper_shape.md" ]] && { echo; cat "$OUT/paper_shape.md"; }
    [[ -f "$WORK/train.log" ]] && { echo; echo "train (last lines):"; tail -n 5 "$WORK/train.log"; }
  } > "$OUT/summary.md"
  tar czf "$OUT/gpu_check.tgz.part" -C "$WORK" . 2>/dev/null && mv "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz"
}

# run_step NAME CAP_SECONDS COMMAND...   (stdout+stderr -> $WORK/NAME.log); sets STEP_RC
run_step() {
  local name=$1 cap=$2; shift 2
  local left; left=$(remaining)
  if (( left < 5 )); then
    echo "[gpu_check] $name: skipped (overall deadline reached)"
    printf '%s\tSKIPPED (deadline)\t0\t%s\n' "$name" "$cap" >> "$STEPS"
    STEP_RC=125
    write_summary
    return 0
  fi
  (( cap > left - 2 )) && cap=$((left - 2))
  echo "[gpu_check] $name (cap ${cap}s) ..."
  local t0; t0=$(date +%s)
  timeout --signal=TERM --kill-after=3 "$cap" "$@" > "$WORK/$name.log" 2>&1
  STEP_RC=$?
  local dt=$(( $(date +%s) - t0 )) status=ok
  if (( STEP_RC == 124 || STEP_RC == 137 )); then status="TIMEOUT"
  elif (( STEP_RC != 0 )); then status="FAILED(rc=$STEP_RC)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$cap" >> "$STEPS"
  echo "[gpu_check] $name: $status in ${dt}s"
  tail -n 3 "$WORK/$name.log" | sed 's/^/    /'
  write_summary
  return 0
}

# ---------------------------------------------------------------------- env
run_step env 10 bash -c "nvidia-smi -L; $PY -c \"
import sys, torch
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, 'sm', f'{p.major}.{p.minor}', 'SMs', p.multi_processor_count)
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton: not importable:', e)
\""

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; p=torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null || echo "9.0")
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# ---------------------------------------------------------------------- build
BUILD=("$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
if [[ "${ADAPTAU_GPU_CHECK_SKIP_BUILD:-}" == 1 ]]; then   # a CPU dry run of this script
  printf 'build\tSKIPPED (ADAPTAU_GPU_CHECK_SKIP_BUILD=1)\t0\t75\n' >> "$STEPS"
  STEP_RC=0
else
  run_step build 75 "${BUILD[@]}"
fi
if (( STEP_RC != 0 )) && [[ "${ADAPTAU_NO_CUDA:-}" != 1 ]]; then
  echo "[gpu_check] CUDA build failed: going on with ADAPTAU_NO_CUDA=1 (Triton needs no extension)"
  export ADAPTAU_NO_CUDA=1
  run_step build_nocuda 30 "${BUILD[@]}"
fi

# ---------------------------------------------------------------------- correctness, timings
# shellcheck disable=SC2086
run_step check 35 "$PY" benchmarks/gpu_paper_shape.py check --out "$OUT" $SHAPE_ARGS
# shellcheck disable=SC2086
run_step time 65 "$PY" benchmarks/gpu_paper_shape.py time --out "$OUT" $SHAPE_ARGS

# ---------------------------------------------------------------------- tests (fp32 + bf16)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
run_step tests 50 "$PY" -m pytest -q -rs "${XDIST[@]}" -p no:cacheprovider \
  -k "gpu and (float32 or bfloat16)" tests/test_triton_backend.py

# ---------------------------------------------------------------------- one trainer epoch
if [[ -n "${ADAPTAU_DATA:-}" ]] && "$PY" -c "import adaptau.train.data as d; d.resolve_data('gowalla')" >/dev/null 2>&1; then
  run_step train 30 "$PY" -m adaptau train --preset gowalla-mf-paper --device cuda \
    --epochs 1 --eval-every 1 --patience 0 --progress off --out "$WORK/train_mf"
  rm -f "$WORK"/train_mf/*.pt
else
  printf 'train\tSKIPPED (no Gowalla data under $ADAPTAU_DATA)\t0\t30\n' >> "$STEPS"
fi

write_summary
rm -rf "$WORK"
echo
cat "$OUT/summary.md"
