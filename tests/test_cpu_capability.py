"""CPU capabilities: the dispatcher, its control and the per-capability builds.

The whole operator contract per capability (every negative mode, float32/float64/bfloat16/
float16, D = 1, 3, 17, 64, 100, 257, duplicates, determinism across 1, 2 and 3 threads)
is tests/test_cpu_backend.py, which runs every test once per capability this CPU has
(the ``cpu_capability`` fixture of conftest.py). Here:
  * ``adaptau.cpu_capability()`` and ``ADAPTAU_CPU_CAPABILITY`` (each in a fresh process:
    the level is chosen at the first call);
  * a level above the CPU's, or an unknown name, is a ValueError, not a crash. On a CPU
    with every level, "above the CPU" is simulated with ADAPTAU_TEST_CPU_MAX, which lowers
    the detected level and nothing else (the check that refuses the level is the same);
  * the per-capability helpers (all_finite, the sampling kernels, compact_indices) agree with the
    default level: integer results bitwise, float sums within rounding;
  * the binary: shared code (outside the AVX2 / AVX512 namespaces) that uses AVX
    instructions is only ever called from kernels of a capability that has them.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import adaptau
from adaptau.loss import ops

from conftest import CPU_CAPABILITIES, REPO_ROOT

SUPPORTED = ops._cpu_capabilities()

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="the adaptau C++ extension is not built")


def run_python(script, **env_vars):
    """Runs `script` in a fresh interpreter (cwd: the repository) with env_vars added (a value
    of None removes the variable); returns the CompletedProcess."""
    env = dict(os.environ)
    env.pop("ADAPTAU_CPU_CAPABILITY", None)
    env.pop("ADAPTAU_TEST_CPU_MAX", None)
    for k, v in env_vars.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )


SMALL_CALL = """
    import torch, adaptau
    g = torch.Generator().manual_seed(0)
    user = torch.randn(6, 5, generator=g); items = torch.randn(20, 5, generator=g)
    pos = torch.randint(0, 20, (6,), generator=g); neg = torch.randint(0, 20, (6, 4), generator=g)
"""


def test_default_is_the_highest_supported_level():
    res = run_python("import adaptau; print(adaptau.cpu_capability())")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == SUPPORTED[-1]
    assert set(SUPPORTED) <= set(CPU_CAPABILITIES) and SUPPORTED[0] == "default"


@pytest.mark.parametrize("level", CPU_CAPABILITIES)
def test_environment_forces_a_supported_level(level):
    if level not in SUPPORTED:
        pytest.skip(f"this CPU supports {', '.join(SUPPORTED)}, not {level}")
    res = run_python(
        SMALL_CALL
        + """
    loss = adaptau.softmax_loss(user, items, pos, neg, 5.0, 5.0, backend="cpu")
    ref = adaptau.softmax_loss(user.double(), items.double(), pos, neg, 5.0, 5.0, backend="reference")
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), (loss, ref)
    print(adaptau.cpu_capability())
    """,
        ADAPTAU_CPU_CAPABILITY=level,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == level


def _above_cases():
    """(lowered CPU maximum or None for the real one, requested level above it)."""
    order = list(CPU_CAPABILITIES)
    cases = []
    for top in SUPPORTED:
        for want in order[order.index(top) + 1 :]:
            cases.append((None if top == SUPPORTED[-1] else top, want))
    return cases


@pytest.mark.parametrize(
    "cpu_max,level", _above_cases(), ids=[f"cpu_max={m or 'real'}-ask={w}" for m, w in _above_cases()]
)
def test_level_above_the_cpu_is_a_python_error(cpu_max, level):
    """The first call raises ValueError naming the level and the CPU's; the process lives on."""
    res = run_python(
        SMALL_CALL
        + """
    for attempt in range(2):  # and again on the next call
        try:
            adaptau.softmax_loss(user, items, pos, neg, 5.0, 5.0, backend="cpu")
        except ValueError as exc:
            print("ValueError:", exc)
        else:
            raise SystemExit("no error")
    try:
        adaptau.cpu_capability()
    except ValueError as exc:
        print("ValueError:", exc)
    else:
        raise SystemExit("no error")
    print("alive")
    """,
        ADAPTAU_CPU_CAPABILITY=level,
        ADAPTAU_TEST_CPU_MAX=cpu_max,
    )
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "alive"
    errors = [line for line in lines if line.startswith("ValueError:")]
    assert len(errors) == 3
    top = cpu_max or SUPPORTED[-1]
    for line in errors:
        assert f"ADAPTAU_CPU_CAPABILITY='{level}'" in line and f"at most {top}" in line, line


def test_unknown_level_is_a_python_error():
    res = run_python(
        SMALL_CALL
        + """
    try:
        adaptau.softmax_loss(user, items, pos, neg, 5.0, 5.0, backend="cpu")
    except ValueError as exc:
        print("ValueError:", exc)
    """,
        ADAPTAU_CPU_CAPABILITY="avx1024",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "is not a CPU capability; use one of default, avx2, avx512" in res.stdout, res.stdout


def test_setter_refuses_a_level_above_the_cpu():
    res = run_python(
        """
    import adaptau
    from adaptau.loss import ops
    print(adaptau.cpu_capability())
    try:
        ops._set_cpu_capability("avx2")
    except ValueError as exc:
        print("ValueError:", exc)
    print(adaptau.cpu_capability())
    """,
        ADAPTAU_TEST_CPU_MAX="default",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "default" and lines[-1] == "default"
    assert "_set_cpu_capability='avx2'" in lines[1] and "at most default" in lines[1]


# --------------------------------------------------------- per-capability helper kernels
def _at(level, f):
    before = ops._set_cpu_capability(level)
    try:
        return f()
    finally:
        ops._set_cpu_capability(before or SUPPORTED[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_finds_every_non_finite_position(cpu_capability, dtype):
    for n in [0, 1, 7, 8, 15, 16, 17, 31, 33, 100]:
        x = torch.randn(n, dtype=dtype)
        assert torch.ops.adaptau.all_finite(x)
        for pos in range(n):
            for bad in (float("nan"), float("inf"), float("-inf")):
                y = x.clone()
                y[pos] = bad
                assert not torch.ops.adaptau.all_finite(y), (n, pos, bad)


def test_sampling_and_compact_kernels_match_the_default_level(cpu_capability, seed):
    def sample():
        return (
            torch.ops.adaptau.uniform_negatives(37, 19, 1001, seed),
            torch.ops.adaptau.dropout_mask(13, 29, 0.3, seed),
        )

    neg, mask = sample()
    neg0, mask0 = _at("default", sample)
    assert torch.equal(neg, neg0) and torch.equal(mask, mask0)
    idx = torch.randint(0, 300, (70000,))
    assert torch.equal(torch.ops.adaptau.item_counts(idx, 300), torch.bincount(idx, minlength=300))
    for dtype in (torch.int32, torch.int64):
        pos, neg = torch.randint(0, 5000, (40,), dtype=dtype), torch.randint(0, 5000, (40, 90), dtype=dtype)
        got = torch.ops.adaptau.compact_indices(pos, neg, 5000)
        want = torch.unique(torch.cat([pos, neg.flatten()]).long())
        assert torch.equal(got[0], want)
        assert torch.equal(want[got[1].long()], pos.long()) and torch.equal(want[got[2].long()], neg.long())
        for a, b in zip(got, _at("default", lambda: torch.ops.adaptau.compact_indices(pos, neg, 5000))):
            assert torch.equal(a, b)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        for D in (1, 3, 17, 64):
            w = torch.randn(300, D, dtype=dtype)
            counts = torch.randint(0, 4, (300,))
            grad = torch.randn(300, D, dtype=dtype)
            want_grad = grad.double() + 0.25 * counts[:, None].double() * w.double()
            want = float((counts.double() * (w.double() ** 2).sum(1)).sum())
            got = torch.ops.adaptau.add_l2_rows_(grad, w, counts, 0.25)
            assert abs(got - want) <= tol * abs(want)
            torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------- binary
def _level_of_instruction(line):
    """0: baseline x86-64; 1: AVX/AVX2 (VEX); 2: AVX-512 (zmm, mask or upper 16 registers)."""
    if "%zmm" in line or re.search(r"%k[0-7]\b", line) or re.search(r"%[xy]mm(1[6-9]|2\d|3[01])\b", line):
        return 2
    if "%ymm" in line or re.search(r"\tv[a-z]", line):
        return 1
    return 0


def _level_of_function(name):
    if "adaptau::cpu::AVX512::" in name or "7adaptau3cpu6AVX512" in name:
        return 2
    if "adaptau::cpu::AVX2::" in name or "7adaptau3cpu4AVX2" in name:
        return 1
    return 0


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("objdump") is None,
    reason="needs an x86-64 build and objdump",
)
def test_shared_code_with_avx_is_only_called_by_kernels_that_have_it():
    """The glue and the default kernels are compiled without AVX, the AVX2 kernels without
    AVX-512. Functions outside the capability namespaces (inline functions of torch and the
    standard library, emitted by every object that calls them) keep the copy of the first
    object linked: a copy with AVX instructions must be called only from functions of a
    capability that has them, or an older CPU would crash on it."""
    so = adaptau._extension.load().__file__
    dis = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True, check=True
    ).stdout
    head = re.compile(r"^([0-9a-f]+) <(.*)>:$")
    call = re.compile(r"\t(?:call|jmp)\s+([0-9a-f]+) <")
    need = {}  # address of a function outside the namespaces -> level its code needs
    names = {}
    level_of = {}  # function address -> its namespace level
    calls = []  # (caller address, callee address)
    cur = None
    for line in dis.splitlines():
        m = head.match(line)
        if m:
            cur = int(m.group(1), 16)
            names[cur] = m.group(2)
            level_of[cur] = _level_of_function(m.group(2))
            continue
        if cur is None:
            continue
        lvl = _level_of_instruction(line)
        if level_of[cur] == 0 or lvl > level_of[cur]:
            if lvl > 0:
                need[cur] = max(need.get(cur, 0), lvl)
        c = call.search(line)
        if c:
            calls.append((cur, int(c.group(1), 16)))
    assert level_of, "no functions disassembled"
    # A capability namespace's own code never exceeds its level.
    over = [names[a] for a, lvl in need.items() if level_of[a] > 0]
    assert not over, f"kernels using instructions above their capability: {over[:5]}"
    bad = [
        (names[caller], names[callee])
        for caller, callee in calls
        if callee in need and level_of[caller] < need[callee] and caller != callee
    ]
    assert not bad, f"baseline-level callers of AVX code: {bad[:5]}"
    # The baseline part of the extension really is baseline: its glue has no AVX at all.
    glue = [
        names[a]
        for a in need
        if level_of[a] == 0 and "adaptau::cpu::" in names[a] and "::DEFAULT::" not in names[a]
    ]
    assert not glue, f"glue compiled with AVX: {glue[:5]}"


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs the aarch64 cross compiler (Debian/Ubuntu: g++-aarch64-linux-gnu)",
)
def test_the_sources_compile_for_aarch64():
    """Off x86-64 the build has the default kernels only: every C++ source compiles for
    aarch64 (syntax and template instantiation; setup.py leaves the AVX files out there,
    and they compile to nothing)."""
    from torch.utils.cpp_extension import include_paths
    import sysconfig

    flags = [
        "-std=c++17",
        "-fopenmp",
        "-fsyntax-only",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-I{sysconfig.get_paths()['include']}",
    ]
    flags += [f"-I{p}" for p in include_paths()]
    sources = sorted((REPO_ROOT / "csrc").glob("*.cpp")) + sorted((REPO_ROOT / "csrc" / "cpu").glob("*.cpp"))
    assert any("softmax_loss_kernel_default" in s.name for s in sources)
    for src in sources:
        res = subprocess.run(["aarch64-linux-gnu-g++", *flags, str(src)], capture_output=True, text=True)
        assert res.returncode == 0, f"{src.name}:\n{res.stderr[-3000:]}"
