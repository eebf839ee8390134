"""Paper-shape correctness check and timings of adaptau's backends, for ``gpu_check.sh``.

    python benchmarks/gpu_paper_shape.py check --out DIR            # GPU, paper shape
    python benchmarks/gpu_paper_shape.py time  --out DIR
    python benchmarks/gpu_paper_shape.py all --device cpu --B 64 --M 32 --N 500 --out DIR

``check``: every fused backend usable on the device (``available_backends``, the reference
excluded; ``triton`` in both item-gradient modes) computes the loss and the user, item and
temperature gradients of one step at the shape; each is compared with the reference
backend run in float64 on the same (rounded) inputs. fp32 and bf16. One line per backend
and dtype is appended to ``DIR/check.tsv`` as soon as it is known; the exit status is 1
when any comparison is over its tolerance or raised.

``time``: forward + backward of one step, median of timed repetitions (CUDA events on a
GPU, ``perf_counter`` on the CPU), with peak memory on a GPU. Order: the adaptau backends,
then eager PyTorch, then ``torch.compile`` (its compilation is the slowest part and goes
last, so a run cut short keeps the other rows). Each row is appended to
``DIR/paper_shape.md`` and flushed when it is measured. On a GPU the card's
device-to-device copy bandwidth is measured first and each row reports the minimal HBM
bytes of the step against it.

The same script runs on the CPU (``--device cpu``, small sizes) as a dry run of the GPU
step: the backends are then ``cpu`` / ``triton`` (under ``TRITON_INTERPRET=1``) and the
timings are CPU timings, not GPU figures.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import adaptau  # noqa: E402

TOL = {torch.float32: 2e-4, torch.bfloat16: 5e-2}  # max |x - ref| / max(|ref|, 1e-6)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("check", "time", "all"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=2048)
    p.add_argument("--M", type=int, default=1024)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--N", type=int, default=40981)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per row")
    p.add_argument(
        "--impls",
        default="adaptau,eager,compile",
        help="which timing groups, in this order: adaptau, eager, compile",
    )
    p.add_argument("--out", default=".")
    return p.parse_args(argv)


def make_inputs(args, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(args.device)
    B, M, D, N = args.B, args.M, args.D, args.N
    return {
        "user": torch.randn(B, D, generator=g).to(dev, dtype),
        "items": torch.randn(N, D, generator=g).to(dev, dtype),
        "pos": torch.randint(0, N, (B,), generator=g).to(dev),
        "neg": torch.randint(0, N, (B, M), generator=g).to(dev),
        "alpha": torch.full((B,), 10.0, device=dev),
        "beta": (10.0 + torch.rand(B, generator=g)).to(dev),
    }


def backend_kinds(device):
    kinds = []
    for b in adaptau.available_backends(device):
        if b == "triton":
            kinds += ["triton:atomic", "triton:segment"]
        elif b != "reference":
            kinds.append(b)
    return kinds


def run_backend(kind, x, dtype=None, grads=True):
    """One forward + backward of ``kind``; returns (loss, grads of user/items/alpha/beta)."""
    backend, _, mode = kind.partition(":")
    if backend == "triton":
        from adaptau import kernels

        kernels.set_item_grad_mode(mode or "atomic")
    dtype = dtype or x["user"].dtype
    user = x["user"].detach().to(dtype, copy=True).requires_grad_(grads)
    items = x["items"].detach().to(dtype, copy=True).requires_grad_(grads)
    alpha = x["alpha"].to(torch.float64 if dtype == torch.float64 else torch.float32, copy=True)
    beta = x["beta"].to(alpha.dtype, copy=True)
    alpha.requires_grad_(grads)
    beta.requires_grad_(grads)
    loss = adaptau.softmax_loss(user, items, x["pos"], x["neg"], alpha, beta, backend=backend)
    if not grads:
        return loss, ()
    loss.backward()
    return loss.detach(), (user.grad, items.grad, alpha.grad, beta.grad)


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def check(args):
    path = os.path.join(args.out, "check.tsv")
    new = not os.path.exists(path)
    ok = True
    with open(path, "a") as fh:
        if new:
            fh.write(
                "backend\tdtype\tshape\tloss_err\tuser_grad_err\titem_grad_err\t"
                "alpha_grad_err\tbeta_grad_err\ttol\tstatus\n"
            )
            fh.flush()
        shape = f"B={args.B} M={args.M} D={args.D} N={args.N} {args.device}"
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            x = make_inputs(args, dtype)
            ref_loss, ref_grads = run_backend("reference", x, torch.float64)
            for kind in backend_kinds(args.device):
                try:
                    loss, grads = run_backend(kind, x)
                    errs = [rel_err(loss, ref_loss)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
                    good = all(math.isfinite(e) and e <= TOL[dtype] for e in errs)
                    status = "ok" if good else "OVER_TOL"
                    cells = [f"{e:.2e}" for e in errs]
                except Exception as exc:  # report it and go on with the next backend
                    good, status = False, f"ERROR {type(exc).__name__}: {str(exc)[:200]}"
                    cells = ["nan"] * 5
                ok &= good
                line = "\t".join([kind, dname, shape, *cells, f"{TOL[dtype]:g}", status])
                print(line, flush=True)
                fh.write(line + "\n")
                fh.flush()
            del x, ref_grads
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return ok


def eager_loss(user, items, pos, neg, alpha, beta):
    u = F.normalize(user, dim=-1)
    it = F.normalize(items, dim=-1)
    s_pos = (u * it[pos]).sum(-1)
    s_neg = torch.einsum("bd,bmd->bm", u, it[neg])
    lse = torch.logsumexp(beta.unsqueeze(1) * s_neg, dim=1)
    return (lse - alpha * s_pos).float().mean()


class Timer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median(self, fn, reps, warmup=2):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def peak_mib(self, fn):
        if not self.cuda:
            return math.nan
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def step_fn(kind, x, compiled):
    user = x["user"].detach().requires_grad_(True)
    items = x["items"].detach().requires_grad_(True)
    alpha, beta = x["alpha"], x["beta"]

    def fn():
        user.grad = None
        items.grad = None
        if kind in ("eager", "compile"):
            f = compiled if kind == "compile" else eager_loss
            loss = f(user, items, x["pos"], x["neg"], alpha.to(user.dtype), beta.to(user.dtype))
        else:
            backend, _, mode = kind.partition(":")
            if backend == "triton":
                from adaptau import kernels

                kernels.set_item_grad_mode(mode or "atomic")
            loss = adaptau.softmax_loss(user, items, x["pos"], x["neg"], alpha, beta, backend=backend)
        loss.backward()

    return fn


def copy_bandwidth(timer):
    n = 1 << 28  # 1 GiB of fp32
    a = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
    b = torch.empty_like(a)
    t = timer.median(lambda: b.copy_(a), reps=10)
    a = b = None  # (free the 2 GiB before the next step)
    torch.cuda.empty_cache()
    return 2 * n * 4 / t


def timings(args):
    timer = Timer(args.device)
    path = os.path.join(args.out, "paper_shape.md")
    B, M, D, N = args.B, args.M, args.D, args.N
    copy_bw = copy_bandwidth(timer) if timer.cuda else math.nan
    groups = args.impls.split(",")
    compiled = torch.compile(eager_loss) if "compile" in groups else None
    ok = True
    with open(path, "a") as fh:

        def emit(line):
            print(line, flush=True)
            fh.write(line + "\n")
            fh.flush()

        dev_name = torch.cuda.get_device_name(0) if timer.cuda else "CPU (dry run, not a GPU figure)"
        emit(
            f"Device: {dev_name}; copy bandwidth {copy_bw / 1e12:.3f} TB/s; B={B} M={M} D={D} "
            f"N={N}, per-row negatives, normalize; median of {args.reps} fwd+bwd steps."
        )
        emit("")
        emit("| impl | dtype | fwd+bwd ms | peak MiB | floor GB/s | % copy BW | first call s |")
        emit("|---|---|---|---|---|---|---|")
        dnames = args.dtypes.split(",")
        inputs = {d: make_inputs(args, getattr(torch, d)) for d in dnames}
        measured = {d: {} for d in dnames}
        # group by group (adaptau, eager, compile), each in every dtype: compile comes last
        for grp in groups:
            kinds = backend_kinds(args.device) if grp == "adaptau" else [grp]
            for dname in dnames:
                x = inputs[dname]
                es = x["user"].element_size()
                floor_bytes = 2 * (N * D * es + B * D * es + B * M * 8 + B * 8) + N * D * es + B * D * es
                for kind in kinds:
                    try:
                        fn = step_fn(kind, x, compiled)
                        t0 = time.perf_counter()
                        fn()  # compilation / JIT outside the timing
                        timer.sync()
                        first = time.perf_counter() - t0
                        t = timer.median(fn, args.reps if kind != "compile" else max(args.reps // 2, 3))
                        mem = timer.peak_mib(fn)
                    except Exception as exc:  # keep the row, go on
                        ok = False
                        emit(f"| {kind} | {dname} | FAILED {type(exc).__name__}: {str(exc)[:120]} | | | | |")
                        continue
                    measured[dname][kind] = t
                    emit(
                        f"| {kind} | {dname} | {t * 1e3:.3f} | {mem:.1f} | "
                        f"{floor_bytes / t / 1e9:.0f} | {100 * floor_bytes / t / copy_bw:.1f} | "
                        f"{first:.1f} |"
                    )
                    if timer.cuda:
                        torch.cuda.empty_cache()
        emit("")
        for dname in dnames:
            m = measured[dname]
            for k, t in m.items():
                if k not in ("eager", "compile"):
                    emit(
                        f"- {k} {dname}: {m.get('eager', math.nan) / t:.1f}x eager, "
                        f"{m.get('compile', math.nan) / t:.1f}x compile"
                    )
        emit("")
    return ok


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ok = True
    if args.what in ("check", "all"):
        ok &= check(args)
    if args.what in ("time", "all"):
        ok &= timings(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
