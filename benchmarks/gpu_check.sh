#!/usr/bin/env bash
# One-shot GPU check for adaptau's GPU backends (triton, cuda) on a machine with an NVIDIA GPU.
#
#   PYTHON=python OUT=./gpu-results bash benchmarks/gpu_check.sh
#
# Uses the image's torch/Triton (the python it finds: $PYTHON, else `python`, else python3;
# the repository's .venv is for the CPU dev machine and is NOT used). Steps, each under its own
# time cap and all under one overall deadline (default 520 s; ADAPTAU_GPU_CHECK_BUDGET_S):
#   1. environment (nvidia-smi, versions)
#   2. build the CUDA extension: pip install --no-build-isolation -e .  (TORCH_CUDA_ARCH_LIST
#      defaults to the card's arch so nvcc compiles one target)
#   3. GPU tests: every GPU backend vs the float64 reference, fp32/bf16/fp16 (+fp64), both
#      Triton item-gradient modes (tests/test_triton_backend.py -k gpu; pytest-xdist when the
#      image has it: ~180 Triton specializations compile on a fresh machine)
#   4. device-to-device copy bandwidth of the card
#   5. paper-shape check (B=2048, M=1024, D=64, N=40981): fwd+bwd time, peak memory and
#      achieved bytes/s of triton (atomic, segment) / cuda vs eager PyTorch and torch.compile
#   6. trainer epochs on the GPU: Gowalla MF (the paper's preset) and LightGCN, 2 epochs each
#      with Adap-τ active from epoch 2, when the data is found ($ADAPTAU_DATA; the device
#      machine has no ../shared, so the caller carries the files)
#   7. compute-sanitizer memcheck on the CUDA backend's GPU tests (when available)
#   8. benchmarks/bench_kernels.py --device cuda (the kernel suite)
#   9. compute-sanitizer racecheck (when time is left)
# Logs and tables are written under gpu-results/work; after every step they are packed again into
# $OUT/gpu_check.tgz (so a run cut short still returns what it did), and summary.md is
# written to $OUT and printed last. Two files in $OUT: the device tool returns at most 8.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK="$ROOT/gpu-results/work"   # outside $OUT: the device tool returns at most 8 files
rm -rf "$WORK"
mkdir -p "$WORK"
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3; fi
BUDGET=${ADAPTAU_GPU_CHECK_BUDGET_S:-520}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY="$WORK/steps.tsv"
: > "$SUMMARY"

remaining() { echo $((DEADLINE - $(date +%s))); }

write_summary() {
  {
    echo "# adaptau GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s)"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    while IFS=$'\t' read -r name status secs; do echo "| $name | $status | $secs |"; done < "$SUMMARY"
    echo
    grep -hE "(passed|failed|skipped|error)" "$WORK/tests_gpu.log" 2>/dev/null | tail -n 1 | sed 's/^/tests_gpu: /'
    echo
    [[ -f "$WORK/paper_shape.md" ]] && cat "$WORK/paper_shape.md"
    [[ -f "$WORK/train.md" ]] && { echo; cat "$WORK/train.md"; }
  } > "$OUT/summary.md"
  tar czf "$OUT/gpu_check.tgz.part" -C "$WORK" . 2>/dev/null && mv "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz"
}

# run_step NAME CAP_SECONDS COMMAND...   (stdout+stderr -> $WORK/NAME.log)
run_step() {
  local name=$1 cap=$2; shift 2
  local left; left=$(remaining)
  if (( left < 15 )); then
    echo "[gpu_check] $name: skipped (overall deadline reached)"
    printf '%s\tSKIPPED (deadline)\t0\n' "$name" >> "$SUMMARY"
    return 0
  fi
  (( cap > left - 5 )) && cap=$((left - 5))
  echo "[gpu_check] $name (cap ${cap}s) ..."
  local t0 rc; t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$cap" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT(${cap}s)"
  elif (( rc != 0 )); then status="FAILED(rc=$rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$SUMMARY"
  echo "[gpu_check] $name: $status in ${dt}s (log: work/$name.log)"
  tail -n 3 "$WORK/$name.log" | sed 's/^/    /'
  write_summary
  return 0
}

# ---------------------------------------------------------------------- 1. environment
run_step env 30 bash -c "nvidia-smi; echo; $PY - <<'EOF'
import sys, torch
print('python', sys.version)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, 'sm', f'{p.major}.{p.minor}', 'SMs', p.multi_processor_count,
          'mem GiB', round(p.total_memory / 2**30, 1))
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton: not importable:', e)
EOF
command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo 'compute-sanitizer: not found'"

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; p=torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null || echo "9.0")
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# ---------------------------------------------------------------------------- 2. build
run_step build 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
run_step backends 60 "$PY" -c "
import adaptau, torch
b = adaptau.available_backends('cuda')
print('available_backends(cuda) =', b)
assert 'triton' in b, 'triton backend missing for CUDA tensors'
assert 'cuda' in b, 'cuda backend missing: the extension was not built with CUDA'
"

# ------------------------------------------------------------------------------ 3. tests
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
run_step tests_gpu 200 "$PY" -m pytest -q -rs "${XDIST[@]}" -k "gpu" tests/test_triton_backend.py \
  -p no:cacheprovider --junitxml="$WORK/tests_gpu.xml"

# ----------------------------------------------------------- 4+5. bandwidth, paper shape
run_step paper_shape 150 "$PY" - "$WORK" <<'EOF'
import json, math, statistics, sys, time
import torch
import torch.nn.functional as F
import adaptau

out_dir = sys.argv[1]
dev = torch.device("cuda")
props = torch.cuda.get_device_properties(0)

def timed(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)

# 4. device-to-device copy bandwidth (bytes read + bytes written per second)
n = 1 << 28  # 1 GiB of fp32
x = torch.empty(n, dtype=torch.float32, device=dev).fill_(1.0)
y = torch.empty_like(x)
t_copy = timed(lambda: y.copy_(x), reps=20)
copy_bw = 2 * x.numel() * 4 / t_copy
del x, y
torch.cuda.empty_cache()
print(f"copy bandwidth: {copy_bw / 1e12:.3f} TB/s (2 x 1 GiB / {t_copy * 1e3:.3f} ms)")

# 5. paper shape
B, M, D, N = 2048, 1024, 64, 40981
g = torch.Generator(device=dev).manual_seed(0)

def eager_loss(user, items, pos, neg, alpha, beta):
    u = F.normalize(user, dim=-1)
    it = F.normalize(items, dim=-1)
    s_pos = (u * it[pos]).sum(-1)
    s_neg = torch.einsum("bd,bmd->bm", u, it[neg])
    lse = torch.logsumexp(beta.unsqueeze(1) * s_neg, dim=1)
    return (lse - alpha * s_pos).float().mean()

compiled_loss = torch.compile(eager_loss)

def make(dtype):
    user = torch.randn(B, D, device=dev, generator=g).to(dtype).requires_grad_(True)
    items = torch.randn(N, D, device=dev, generator=g).to(dtype).requires_grad_(True)
    pos = torch.randint(0, N, (B,), device=dev, generator=g)
    neg = torch.randint(0, N, (B, M), device=dev, generator=g)
    alpha = torch.full((B,), 10.0, device=dev)
    beta = torch.full((B,), 10.0, device=dev)
    return user, items, pos, neg, alpha, beta

def step_fn(kind, inputs):
    user, items, pos, neg, alpha, beta = inputs
    def fn():
        user.grad = None; items.grad = None
        if kind == "eager":
            loss = eager_loss(user, items, pos, neg, alpha.to(user.dtype), beta.to(user.dtype))
        elif kind == "compile":
            loss = compiled_loss(user, items, pos, neg, alpha.to(user.dtype), beta.to(user.dtype))
        else:
            backend, _, mode = kind.partition(":")
            if backend == "triton":
                from adaptau import kernels
                kernels.set_item_grad_mode(mode or "atomic")
            loss = adaptau.softmax_loss(user, items, pos, neg, alpha, beta, backend=backend)
        loss.backward()
    return fn

def peak_mib(fn):
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20

usable = adaptau.available_backends("cuda")
rows = []
for dtype in (torch.float32, torch.bfloat16):
    inputs = make(dtype)
    es = inputs[0].element_size()
    # minimal HBM traffic of fwd+bwd: table, users, indices read twice; grads written once
    floor_bytes = 2 * (N * D * es + B * D * es + B * M * 8 + B * 8) + N * D * es + B * D * es
    gather_bytes = 2 * B * M * D * es  # per-pair item-row loads (fwd + bwd), mostly from L2
    kinds = ["eager", "compile"]
    if "triton" in usable:
        kinds += ["triton:atomic", "triton:segment"]
    if "cuda" in usable:
        kinds += ["cuda"]
    res = {}
    for kind in kinds:
        fn = step_fn(kind, inputs)
        try:
            fn(); torch.cuda.synchronize()  # compile / JIT outside the timing
            t = timed(fn, reps=10 if kind in ("eager", "compile") else 20)
            mem = peak_mib(fn)
            res[kind] = (t, mem)
        except Exception as exc:  # keep going: report the failure in the table
            print(f"{kind} {dtype}: FAILED {type(exc).__name__}: {exc}")
            res[kind] = (math.nan, math.nan)
        torch.cuda.empty_cache()
    t_e, m_e = res["eager"]
    t_c, m_c = res["compile"]
    for kind, (t, mem) in res.items():
        rows.append({
            "impl": kind, "dtype": str(dtype).replace("torch.", ""), "ms": t * 1e3,
            "x_eager": t_e / t, "x_compile": t_c / t, "peak_mib": mem,
            "mem_frac_eager": mem / m_e if m_e else math.nan,
            "floor_GBps": floor_bytes / t / 1e9, "pct_copy_bw": 100 * floor_bytes / t / copy_bw,
            "gather_TBps": gather_bytes / t / 1e12,
        })
    del inputs
    torch.cuda.empty_cache()

hdr = ("| impl | dtype | fwd+bwd ms | x eager | x compile | peak MiB | peak/eager | "
       "floor bytes GB/s | % copy BW | gathered TB/s |")
lines = [f"Device: {props.name}; copy bandwidth {copy_bw / 1e12:.3f} TB/s; shape B={B} M={M} "
         f"D={D} N={N}, per-row negatives, normalize, scale 10; medians of CUDA-event timings.",
         "Targets (fp32, fused): >=10x eager, >=3x compile, peak <= 1/20 of eager.", "",
         hdr, "|" + "---|" * 10]
for r in rows:
    lines.append(f"| {r['impl']} | {r['dtype']} | {r['ms']:.3f} | {r['x_eager']:.1f} | "
                 f"{r['x_compile']:.1f} | {r['peak_mib']:.1f} | {r['mem_frac_eager']:.4f} | "
                 f"{r['floor_GBps']:.0f} | {r['pct_copy_bw']:.1f} | {r['gather_TBps']:.2f} |")
text = "\n".join(lines)
print(text)
with open(f"{out_dir}/paper_shape.md", "w") as fh:
    fh.write(text + "\n")
with open(f"{out_dir}/paper_shape.json", "w") as fh:
    json.dump({"copy_bw_Bps": copy_bw, "rows": rows}, fh, indent=1)
EOF

# ------------------------------------------------------------- 6. trainer epochs on the GPU
if "$PY" -c "import adaptau.train.data as d; d.resolve_data('gowalla')" >/dev/null 2>&1; then
  TRAIN_COMMON=(--device cuda --epochs 2 --eval-every 1 --patience 0 --warmup 1 --progress off)
  run_step train_mf 120 "$PY" -m adaptau train --preset gowalla-mf-paper "${TRAIN_COMMON[@]}" \
    --out "$WORK/train_mf"
  run_step train_lightgcn 90 "$PY" -m adaptau train --preset gowalla-lightgcn-paper \
    "${TRAIN_COMMON[@]}" --out "$WORK/train_lightgcn"
  rm -f "$WORK"/train_*/*.pt
  "$PY" - "$WORK" > "$WORK/train.md" 2>&1 <<'EOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
print("| run (Gowalla, CUDA) | epoch | train s | eval s | test recall@20 |")
print("|---|---|---|---|---|")
for name in ("train_mf", "train_lightgcn"):
    f = work / name / "metrics.jsonl"
    if not f.exists():
        print(f"| {name} | no metrics.jsonl | | | |")
        continue
    for line in f.read_text().splitlines():
        r = json.loads(line)
        rec = (r.get("metrics") or {}).get("recall@20", float("nan"))
        print(f"| {name} | {r['epoch']} | {r['seconds']:.2f} | {r.get('eval_seconds', float('nan'))} | {rec:.4f} |")
EOF
else
  printf 'train\tSKIPPED (Gowalla not found: set ADAPTAU_DATA)\t0\n' >> "$SUMMARY"
fi

# ------------------------------------------------------------------ 7. compute-sanitizer
SANITIZER=$(command -v compute-sanitizer || true)
[[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
SAN_K="test_gpu_backend and cuda and atomic and float32 and (perrow or inbatch or shared-no-normalize)"
if [[ -n "$SANITIZER" ]]; then
  run_step sanitizer_memcheck 75 "$SANITIZER" --tool memcheck --error-exitcode 99 \
    --target-processes all "$PY" -m pytest -q -x -p no:cacheprovider -k "$SAN_K" \
    tests/test_triton_backend.py
else
  printf 'sanitizer\tSKIPPED (compute-sanitizer not found)\t0\n' >> "$SUMMARY"
fi

# -------------------------------------------------------------- 8. the benchmark suite
# shellcheck disable=SC2086
run_step bench_kernels 170 "$PY" benchmarks/bench_kernels.py --device cuda \
  --out-dir "$WORK/bench" ${BENCH_ARGS:---quick}

# ------------------------------------------------------------ 9. racecheck, if time is left
if [[ -n "$SANITIZER" ]]; then
  run_step sanitizer_racecheck 60 "$SANITIZER" --tool racecheck --error-exitcode 99 \
    "$PY" -m pytest -q -x -p no:cacheprovider \
    -k "test_gpu_backend and cuda and atomic and float32 and perrow-empty" tests/test_triton_backend.py
fi

write_summary
echo
cat "$OUT/summary.md"
