"""Two (or more) builds of adaptau side by side: the cpu backend's forward+backward at one shape.

Two builds of the extension cannot share a process (both register torch.ops.adaptau), so
each build runs in its own processes, taking turns: --rounds rounds, each starting one
process per build that times --repeats steps after --warmup; the table gives each build's
median over all its steps, and its ratio to the first build. A build is NAME=DIR[:VAR=VALUE,...]:
DIR is put first on PYTHONPATH (a checkout with its extension built in place) and the
variables are set for its processes, e.g.

    python benchmarks/bench_builds.py --build native=/tmp/old-native \\
        --build avx2=.:ADAPTAU_CPU_CAPABILITY=avx2 --build avx512=.:ADAPTAU_CPU_CAPABILITY=avx512

Writes --out (markdown) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CHILD = r"""
import json, sys, time, torch, adaptau
B, M, D, N, threads, warmup, repeats = map(int, sys.argv[1:8])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
user = torch.randn(B, D, generator=g).requires_grad_(); items = torch.randn(N, D, generator=g).requires_grad_()
pos = torch.randint(0, N, (B,), generator=g); neg = torch.randint(0, N, (B, M), generator=g)
def step():
    user.grad = items.grad = None
    t = time.perf_counter()
    adaptau.softmax_loss(user, items, pos, neg, 5.0, 5.0, backend="cpu").backward()
    return time.perf_counter() - t
for _ in range(warmup):
    step()
times = [step() for _ in range(repeats)]
capability = getattr(adaptau, "cpu_capability", lambda: None)()  # (a build without it: None)
print(json.dumps({"times": times, "capability": capability, "file": adaptau.__file__}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", required=True, help="NAME=DIR[:VAR=VALUE,...]")
    ap.add_argument("--shape", default="2048,1024,64,40981", help="B,M,D,N (per-row negatives)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="")
    _common.add_pause_argument(ap)
    args = ap.parse_args()
    builds = []
    for spec in args.build:
        name, rest = spec.split("=", 1)
        path, _, env_part = rest.partition(":")
        env = dict(kv.split("=", 1) for kv in env_part.split(",") if kv)
        builds.append((name, os.path.abspath(path), env))
    B, M, D, N = map(int, args.shape.split(","))
    times = {name: [] for name, _, _ in builds}
    info = {}
    with _common.paused(args.pause) as pids:
        measure_rounds(args, builds, (B, M, D, N), times, info)
    first = statistics.median(times[builds[0][0]])
    lines = (
        [
            f"# adaptau builds side by side: cpu backend, per-row B={B} M={M} D={D} N={N}, "
            f"{args.threads} threads",
            "",
            f"- {_common.machine_line()}",
            f"- {_common.paused_line(args.pause, pids)}",
            f"- {args.rounds} rounds, each one process per build in turn ({args.repeats} timed steps after "
            f"{args.warmup} warm-up); medians over all steps of a build",
            f"- Command: `python {' '.join(sys.argv)}`",
        ]
        + ([f"- {args.note}"] if args.note else [])
        + [""]
    )
    lines += _common.markdown_table(
        ["build", "kernels", "fwd+bwd ms (median)", "min ms", "vs first"],
        [
            (
                name,
                info[name][0] or "n/a (no cpu_capability)",
                f"{1e3 * statistics.median(times[name]):.2f}",
                f"{1e3 * min(times[name]):.2f}",
                f"{first / statistics.median(times[name]):.3f}x",
            )
            for name, _, _ in builds
        ],
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def measure_rounds(args, builds, shape, times, info) -> None:
    """``args.rounds`` rounds, each running one process per build in turn."""
    B, M, D, N = shape
    for r in range(args.rounds):
        for name, path, env in builds:
            e = dict(os.environ, PYTHONPATH=path, **env)
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(B),
                    str(M),
                    str(D),
                    str(N),
                    str(args.threads),
                    str(args.warmup),
                    str(args.repeats),
                ],
                env=e,
                cwd="/",
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[name] += res["times"]
            info[name] = (res["capability"], res["file"])
            print(f"round {r}: {name:10s} median {1e3 * statistics.median(res['times']):7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
