"""The fused CPU backend (csrc/softmax_loss_cpu.cpp, kernels in csrc/cpu/) against the float64 reference.

Every comparison runs the reference backend on float64 copies of the inputs and checks
the loss, raw, lse and every gradient (user, items, pos_scale, neg_scale). Every test runs
once per CPU capability (default, avx2, avx512: the ``cpu_capability`` fixture of
conftest.py), skipping the levels this CPU lacks; the same tolerances hold for each.

Tolerances (relative to the magnitude ``scale = max(1, max|reference|)`` of each output):
  * float32 kernel vs float64 reference: rtol 1e-4, atol 1e-5·scale (inverse temperatures
    up to ~10; at 1e4 a float32 cosine error of ~1e-7 becomes ~1e-3 in a logit, so those
    cases use rtol = atol/scale = 5e-3);
  * float64 kernel: rtol 1e-10, atol 1e-10·scale;
  * normalize=False with float32 (the option grid): atol 1e-4·scale, because the logits
    are raw dot products there (~50 in magnitude), not cosines;
  * D = 1 with float32: atol 1e-3·scale (the normalization's Jacobian is 0 in theory and
    float32 rounding leaves ~1e-7·g/||x||);
  * bfloat16/float16 inputs (upcast to float32 inside, gradients cast back): compared with
    the reference on the *rounded* inputs, rtol/atol 2e-2 (the gradients are rounded).
Non-finite values never pass: every output is asserted finite first (lse may be -inf only
for an empty row, which is checked on its own).
"""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import adaptau

pytestmark = [
    pytest.mark.usefixtures("cpu_capability"),
    pytest.mark.skipif(
        "cpu" not in adaptau.available_backends("cpu"),
        reason="the adaptau C++ CPU kernel is not built (adaptau._C missing or without a CPU kernel)",
    ),
]

MODES = ("per_row", "shared", "in_batch")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(gen, B, N, D, M, mode, *, index_dtype=torch.int64, scale_hi=5.0):
    user = torch.randn(B, D, generator=gen, dtype=torch.float64)
    items = torch.randn(N, D, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, N, (B,), generator=gen).to(index_dtype)
    if mode == "per_row":
        neg = torch.randint(0, N, (B, M), generator=gen).to(index_dtype)
    elif mode == "shared":
        neg = torch.randint(0, N, (M,), generator=gen).to(index_dtype)
    else:
        neg = None
    alpha = torch.rand(B, generator=gen, dtype=torch.float64) * scale_hi + 0.5
    beta = torch.rand(B, generator=gen, dtype=torch.float64) * scale_hi + 0.5
    logq = torch.randn(N, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, generator=gen, dtype=torch.float64)
    return dict(user=user, items=items, pos=pos, neg=neg, alpha=alpha, beta=beta, logq=logq, weight=weight)


def run(backend, inp, dtype, *, use_logq=True, return_raw=True, **options):
    """Loss, raw (None without return_raw) and all gradients of sum(weight * loss) for one
    backend and dtype."""
    acc = _acc(dtype)
    user = inp["user"].detach().to(dtype).clone().requires_grad_()
    items = inp["items"].detach().to(dtype).clone().requires_grad_()
    alpha = inp["alpha"].detach().to(acc).clone().requires_grad_()
    beta = inp["beta"].detach().to(acc).clone().requires_grad_()
    logq = inp["logq"].to(acc) if use_logq else None
    out = adaptau.softmax_loss(
        user,
        items,
        inp["pos"],
        inp["neg"],
        alpha,
        beta,
        neg_logq=logq,
        reduction="none",
        return_raw=return_raw,
        backend=backend,
        **options,
    )
    loss, raw = out if return_raw else (out, None)
    (loss * inp["weight"].to(loss.dtype)).sum().backward()
    return dict(
        loss=loss.detach(),
        raw=raw,
        grad_user=user.grad,
        grad_items=items.grad,
        grad_alpha=alpha.grad,
        grad_beta=beta.grad,
    )


def reference(inp, *, rounded_from=None, **kw):
    """The float64 reference (optionally on inputs rounded to a low-precision dtype)."""
    if rounded_from is not None:
        inp = dict(
            inp, user=inp["user"].to(rounded_from).double(), items=inp["items"].to(rounded_from).double()
        )
    return run("reference", inp, torch.float64, **kw)


def assert_matches(out, ref, dtype, *, rtol=None, atol=None, what=""):
    if rtol is None:
        rtol = 1e-10 if dtype == torch.float64 else 1e-4
    if atol is None:
        atol = 1e-10 if dtype == torch.float64 else 1e-5
    for key, expected in ref.items():
        got = out[key]
        assert got is not None, f"{what}: {key} missing"
        assert torch.isfinite(got).all(), f"{what}: {key} is not finite: {got}"
        assert got.shape == expected.shape, f"{what}: {key} shape {got.shape} != {expected.shape}"
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
        torch.testing.assert_close(
            got.double(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {key}: {m}"
        )


# ------------------------------------------------------------------------- option grid
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_every_option_combination(seed, mode, dtype):
    gen = torch.Generator().manual_seed(seed)
    for index_dtype, (include_pos, normalize, remove_hits, use_logq) in itertools.product(
        (torch.int64, torch.int32), itertools.product((False, True), repeat=4)
    ):
        # N small so duplicates and accidental hits are frequent.
        inp = make_inputs(gen, 6, 9, 12, 7, mode, index_dtype=index_dtype)
        opts = dict(
            include_pos=include_pos,
            normalize=normalize,
            remove_accidental_hits=remove_hits,
            use_logq=use_logq,
        )
        out = run("cpu", inp, dtype, **opts)
        # normalize=False: logits are dot products (|logit| up to ~50 here, not bounded by
        # the cosine), so float32 exp(logit - lse) carries ~|logit|·6e-8 absolute error.
        tol = dict(atol=1e-4) if (not normalize and dtype == torch.float32) else {}
        assert_matches(out, reference(inp, **opts), dtype, **tol, what=f"{mode} {index_dtype} {opts}")


@pytest.mark.parametrize("D", [1, 3, 17, 64, 100, 257])
@pytest.mark.parametrize("mode", MODES)
def test_odd_shapes(seed, mode, D):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 1), (1, 5), (3, 1), (5, 33)] if mode != "in_batch" else [(2, 0), (5, 0), (37, 0)]
    for B, M in shapes:
        inp = make_inputs(gen, B, 23, D, M, mode)
        for dtype in (torch.float32, torch.float64):
            out = run("cpu", inp, dtype, include_pos=B % 2 == 1)
            # D = 1: the normalization's Jacobian is exactly 0 in theory; float32 leaves
            # g·(1 - x̂²)/||x|| ~ 1e-7·g/||x||, so allow 1e-3 absolute there.
            tol = dict(atol=1e-3) if (D == 1 and dtype == torch.float32) else {}
            assert_matches(
                out,
                reference(inp, include_pos=B % 2 == 1),
                dtype,
                **tol,
                what=f"{mode} B={B} M={M} D={D} {dtype}",
            )


@pytest.mark.parametrize("mode", MODES)
def test_larger_shapes_cross_chunks_and_tiles(seed, mode):
    # Enough items and rows for several item chunks, row blocks, GEMM tiles and threads.
    gen = torch.Generator().manual_seed(seed)
    inp = make_inputs(gen, 150, 5000, 32, 300, mode)
    for dtype in (torch.float32, torch.float64):
        out = run("cpu", inp, dtype, include_pos=True, remove_accidental_hits=True)
        assert_matches(
            out,
            reference(inp, include_pos=True, remove_accidental_hits=True),
            dtype,
            what=f"{mode} large {dtype}",
        )


# ------------------------------------------------------------------- special inputs
@pytest.mark.parametrize("mode", MODES)
def test_duplicate_users_and_negatives(seed, mode):
    gen = torch.Generator().manual_seed(seed)
    inp = make_inputs(gen, 8, 4, 16, 12, mode)  # 4 items: every negative repeats
    inp["user"][4:] = inp["user"][:4]  # duplicate user rows ...
    inp["pos"][4:] = inp["pos"][:4]  # ... with the same positives
    for dtype in (torch.float32, torch.float64):
        out = run("cpu", inp, dtype)
        assert_matches(out, reference(inp), dtype, what=f"{mode} duplicates {dtype}")
    # duplicated users through an embedding lookup: gradients accumulate in the table
    table = inp["user"][:4].float().clone().requires_grad_()
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    grads = []
    for backend in ("cpu", "reference"):
        table.grad = None
        loss = adaptau.softmax_loss(
            table[ids], inp["items"].float(), inp["pos"], inp["neg"], 3.0, 4.0, backend=backend
        )
        loss.backward()
        grads.append(table.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_zero_vectors(seed, mode):
    gen = torch.Generator().manual_seed(seed)
    inp = make_inputs(gen, 6, 10, 8, 5, mode)
    inp["user"][1] = 0.0
    inp["items"][inp["pos"][2]] = 0.0
    inp["items"][3] = 0.0
    for dtype in (torch.float32, torch.float64):
        for normalize in (True, False):
            out = run("cpu", inp, dtype, normalize=normalize)
            assert_matches(
                out,
                reference(inp, normalize=normalize),
                dtype,
                what=f"{mode} zeros normalize={normalize} {dtype}",
            )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1e2, 1e4])
def test_high_inverse_temperature(seed, mode, temperature):
    gen = torch.Generator().manual_seed(seed)
    inp = make_inputs(gen, 6, 40, 16, 9, mode)
    inp["alpha"] = inp["alpha"] / inp["alpha"].max() * temperature
    inp["beta"] = inp["beta"] / inp["beta"].max() * temperature
    for dtype in (torch.float32, torch.float64):
        for include_pos in (False, True):
            out = run("cpu", inp, dtype, include_pos=include_pos)
            tol = {} if dtype == torch.float64 else dict(rtol=5e-3, atol=5e-3)
            assert_matches(
                out,
                reference(inp, include_pos=include_pos),
                dtype,
                **tol,
                what=f"{mode} 1/tau={temperature} {dtype}",
            )


@pytest.mark.parametrize(
    "dtype,beta",
    [(torch.float32, 40.0), (torch.float32, 40.5), (torch.float64, 300.0), (torch.float64, 301.0)],
)
def test_fixed_reference_boundary(seed, dtype, beta):
    # Normalized, no logq, no hit removal, |beta| <= 40 (float32) / 300 (float64): the kernel
    # uses exp(beta*s - |beta|) with no running max and keeps those exps for the backward;
    # just above the bound it uses the running max. Both sides, with the smallest exps the
    # bound allows: rows 0-3 see only negatives near the opposite of the user's vector
    # (cosines near -1, one exactly -1), so every exp is near e^(-2|beta|).
    gen = torch.Generator().manual_seed(seed)
    B, D, M, extra = 8, 16, 37, 100
    inp = make_inputs(gen, B, B * M + B + extra, D, M, "per_row")
    user = inp["user"]
    opposite = -user[:, None, :] + 0.05 * torch.randn(B, M, D, generator=gen, dtype=torch.float64)
    inp["items"][: B * M] = opposite.reshape(B * M, D)
    inp["items"][B * M : B * M + B] = -2.0 * user
    neg = torch.arange(B * M).view(B, M)
    neg[:, 0] = B * M + torch.arange(B)  # cosine exactly -1
    neg[4:] = torch.randint(0, inp["items"].shape[0], (B - 4, M), generator=gen)
    inp["neg"] = neg
    inp["beta"] = torch.full((B,), beta, dtype=torch.float64)
    inp["beta"][5] = -beta  # |beta| is what the bound is about
    for include_pos in (False, True):
        out = run("cpu", inp, dtype, use_logq=False, include_pos=include_pos)
        assert_matches(
            out,
            reference(inp, use_logq=False, include_pos=include_pos),
            dtype,
            what=f"beta={beta} {dtype} include_pos={include_pos}",
        )


def test_empty_denominator_rows():
    # Row 0: every negative is the positive and is removed -> loss 0, lse -inf, no gradient.
    torch.manual_seed(0)
    user = torch.randn(3, 8)
    items = torch.randn(5, 8)
    pos = torch.tensor([2, 0, 1])
    neg = torch.tensor([[2, 2, 2], [1, 3, 4], [2, 0, 0]])
    for mode_neg, mode in ((neg, 0), (torch.tensor([2, 2]), 1)):
        if mode == 1:
            pos = torch.tensor([2, 2, 1])
        scale = torch.full((3,), 5.0)
        loss, lse, _ = torch.ops.adaptau.fused_forward(
            user, items, pos, mode_neg, scale, scale, None, mode, False, True, True, False
        )
        assert loss[0] == 0 and lse[0] == float("-inf")
        assert torch.isfinite(loss).all()
        gu, gi, ga, gb = torch.ops.adaptau.fused_backward(
            torch.ones(3), user, items, pos, mode_neg, scale, scale, None, lse, mode, False, True, True, True
        )
        assert (gu[0] == 0).all() and ga[0] == 0 and gb[0] == 0
        for g in (gu, gi, ga, gb):
            assert torch.isfinite(g).all()
        u = user.clone().requires_grad_()
        it = items.clone().requires_grad_()
        ref_u = user.double().requires_grad_()
        ref_it = items.double().requires_grad_()
        adaptau.softmax_loss(
            u, it, pos, mode_neg, 5.0, 5.0, remove_accidental_hits=True, backend="cpu", reduction="sum"
        ).backward()
        adaptau.softmax_loss(
            ref_u,
            ref_it,
            pos,
            mode_neg,
            5.0,
            5.0,
            remove_accidental_hits=True,
            backend="reference",
            reduction="sum",
        ).backward()
        torch.testing.assert_close(u.grad.double(), ref_u.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(it.grad.double(), ref_it.grad, rtol=1e-4, atol=1e-6)


def test_non_contiguous_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, D, M = 5, 30, 12, 7
    user_big = torch.randn(B, 2 * D, generator=gen)
    items_t = torch.randn(D, N, generator=gen)
    neg_big = torch.randint(0, N, (M, B), generator=gen)
    pos_big = torch.randint(0, N, (2 * B,), generator=gen)
    scale_big = torch.rand(2 * B, generator=gen) + 1
    args = (user_big[:, ::2], items_t.t(), pos_big[::2], neg_big.t(), scale_big[::2], 3.0)
    assert not all(a.is_contiguous() for a in args[:5])
    got = adaptau.softmax_loss(*args, backend="cpu", reduction="none")
    want = adaptau.softmax_loss(
        *(a.contiguous() if torch.is_tensor(a) else a for a in args), backend="cpu", reduction="none"
    )
    ref = adaptau.softmax_loss(
        args[0].double(),
        args[1].double(),
        args[2],
        args[3],
        args[4].double(),
        3.0,
        backend="reference",
        reduction="none",
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_inputs_upcast(seed, mode, dtype):
    gen = torch.Generator().manual_seed(seed)
    inp = make_inputs(gen, 6, 20, 16, 9, mode)
    out = run("cpu", inp, dtype)
    assert out["grad_user"].dtype == dtype and out["grad_items"].dtype == dtype
    assert out["loss"].dtype == torch.float32
    assert_matches(
        out, reference(inp, rounded_from=dtype), dtype, rtol=2e-2, atol=2e-2, what=f"{mode} {dtype}"
    )


# ------------------------------------------------------------------------ determinism
# torch.compile(fullgraph=True) with backend="cpu": tests/test_compile.py (every CPU backend).


@pytest.mark.parametrize("mode", MODES)
def test_bitwise_deterministic_across_runs_and_thread_counts(seed, mode):
    gen = torch.Generator().manual_seed(seed)
    inp = make_inputs(gen, 300, 3000, 64, 200, mode)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            results.append(run("cpu", inp, torch.float32, include_pos=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for key in results[0]:
            assert torch.equal(results[0][key], other[key]), f"{mode}: {key} differs"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_logq", [False, True])
def test_return_raw_does_not_change_loss_or_gradients(seed, mode, use_logq):
    # The trainer skips return_raw when the temperature rule does not read raw losses
    # (AdapTau.needs_raw_loss): that must not change what it trains on, to the bit.
    gen = torch.Generator().manual_seed(seed)
    inp = make_inputs(gen, 150, 2000, 64, 300, mode)
    with_raw = run("cpu", inp, torch.float32, use_logq=use_logq)
    without = run("cpu", inp, torch.float32, use_logq=use_logq, return_raw=False)
    assert without["raw"] is None
    for key, value in with_raw.items():
        if key != "raw":
            assert torch.isfinite(value).all(), f"{mode}: {key} not finite"
            assert torch.equal(value, without[key]), f"{mode}: {key} differs without return_raw"


@pytest.mark.parametrize("neg_mode", [0, 1, 2], ids=["per_row", "shared", "in_batch"])
def test_saved_state_is_only_reused_by_the_same_call(neg_mode):
    """The forward keeps what the backward needs (per-row: its sort, scores and states;
    shared / in-batch: the candidates and every score), keyed on the inputs' identities and
    version counters: a backward with other tensors (or the same tensor changed in place)
    must recompute, never reuse stale scores."""
    gen = torch.Generator().manual_seed(7)
    B, M, N, D = 5, 7, 11, 6
    user, items = torch.randn(B, D, generator=gen), torch.randn(N, D, generator=gen)
    pos = torch.randint(0, N, (B,), generator=gen)
    neg = {
        0: torch.randint(0, N, (B, M), generator=gen),
        1: torch.randint(0, N, (M,), generator=gen),
        2: torch.zeros(0, dtype=torch.long),
    }[neg_mode]
    a, b = torch.full((B,), 3.0), torch.full((B,), 4.0)
    g = torch.rand(B, generator=gen)
    op_f, op_b = torch.ops.adaptau.fused_forward, torch.ops.adaptau.fused_backward

    def grads(u, it, backend):
        loss, lse, _ = (
            op_f(u, it, pos, neg, a, b, None, neg_mode, False, True, False, False)
            if backend == "cpu"
            else adaptau.loss.reference.forward(
                u, it, pos, neg, a, b, None, neg_mode, False, True, False, False
            )
        )
        bwd = op_b if backend == "cpu" else adaptau.loss.reference.backward
        return bwd(
            g.to(u.dtype),
            u,
            it,
            pos,
            neg,
            a.to(u.dtype),
            b.to(u.dtype),
            None,
            lse,
            neg_mode,
            False,
            True,
            False,
            True,
        )

    op_f(user, items, pos, neg, a, b, None, neg_mode, False, True, False, False)  # leaves a saved state
    other = items * 1.5 + 0.3
    lse_other = op_f(user, other, pos, neg, a, b, None, neg_mode, False, True, False, False)[1]
    # the first call's state is in the cache; a backward for `other` must not use it
    got = op_b(g, user, other, pos, neg, a, b, None, lse_other, neg_mode, False, True, False, True)
    want = grads(user.double(), other.double(), "reference")
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-5)
    # same tensor object, changed in place after the forward: version differs -> recompute
    it2 = items.clone()
    lse2 = op_f(user, it2, pos, neg, a, b, None, neg_mode, False, True, False, False)[1]
    it2.mul_(-2.0)
    lse2 = adaptau.loss.reference.forward(
        user.double(),
        it2.double(),
        pos,
        neg,
        a.double(),
        b.double(),
        None,
        neg_mode,
        False,
        True,
        False,
        False,
    )[1].float()
    got = op_b(g, user, it2, pos, neg, a, b, None, lse2, neg_mode, False, True, False, True)
    want = grads(user.double(), it2.double(), "reference")
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-5)


def test_gemm_modes_saved_scores_match_recomputed_bitwise(tmp_path):
    """Shared / in-batch: the backward from the forward's kept scores gives bitwise the
    results of the backward that recomputes them (ADAPTAU_CPU_PLAN_CACHE=0), also with row
    and column tiles that do not divide the sizes; and scores larger than
    ADAPTAU_CPU_SAVED_SCORES_BYTES are not kept (the recomputed path, same results)."""
    script = textwrap.dedent("""
        import sys, torch, adaptau
        torch.manual_seed(3)
        out = []
        for neg in (torch.randint(0, 300, (37,)), None):
            for D in (24, 64, 5):
                user = torch.randn(43, D, requires_grad=True); items = torch.randn(300, D, requires_grad=True)
                pos = torch.randint(0, 300, (43,))
                b = (torch.rand(43) * 4 + 1).requires_grad_()
                loss = adaptau.softmax_loss(user, items, pos, neg, 4.0, b, include_pos=True,
                                            neg_logq=torch.randn(300) * 0.5, backend="cpu",
                                            reduction="sum")
                loss.backward()
                out += [loss.detach(), user.grad, items.grad, b.grad]
        torch.save(out, sys.argv[1])
    """)
    results = []
    for i, env in enumerate(
        [
            {},
            dict(ADAPTAU_CPU_PLAN_CACHE="0"),
            dict(ADAPTAU_CPU_SAVED_SCORES_BYTES="64"),
            dict(ADAPTAU_CPU_ROW_BLOCK="5", ADAPTAU_CPU_COL_BLOCK="16"),
        ]
    ):
        path = str(tmp_path / f"out{i}.pt")
        subprocess.run(
            [sys.executable, "-c", script, path], check=True, env={**os.environ, **env}, timeout=300
        )
        results.append(torch.load(path))
    for other in results[1:3]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)
    # other tiles: other sums, the same values to rounding
    for x, y in zip(results[0], results[3]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_inference_mode_forward():
    """Inference tensors have no version counter: the forward runs, nothing is cached."""
    torch.manual_seed(0)
    user, items = torch.randn(4, 8), torch.randn(20, 8)
    pos, neg = torch.randint(0, 20, (4,)), torch.randint(0, 20, (4, 6))
    want = adaptau.softmax_loss(user.double(), items.double(), pos, neg, 2.0, 2.0, backend="reference")
    with torch.inference_mode():
        got = adaptau.softmax_loss(user, items, pos, neg, 2.0, 2.0, backend="cpu")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_op_level_checks():
    user, items = torch.randn(3, 4), torch.randn(5, 4)
    pos = torch.tensor([0, 1, 2])
    s = torch.ones(3)
    # the op itself raises Python's IndexError (ops.py leaves index checks to this kernel)
    with pytest.raises(IndexError, match=r"neg\[0, 1\] = 9 is out of range"):
        torch.ops.adaptau.fused_forward(
            user, items, pos, torch.tensor([[0, 9], [1, 1], [2, 2]]), s, s, None, 0, False, True, False, False
        )
    with pytest.raises(IndexError, match=r"pos\[1\] = -1 is out of range"):
        torch.ops.adaptau.fused_forward(
            user,
            items,
            torch.tensor([0, -1, 2]),
            torch.tensor([1, 2]),
            s,
            s,
            None,
            1,
            False,
            True,
            False,
            False,
        )
    with pytest.raises(RuntimeError, match="per-row neg"):
        torch.ops.adaptau.fused_forward(
            user, items, pos, torch.tensor([[0, 1]]), s, s, None, 0, False, True, False, False
        )
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        torch.ops.adaptau.fused_forward(
            user.int(), items.int(), pos, torch.tensor([0]), s, s, None, 1, False, True, False, False
        )


SMALL_TUNING = dict(
    ADAPTAU_CPU_CHUNK_BYTES="1",
    ADAPTAU_CPU_MAX_PAIRS="100",
    ADAPTAU_CPU_ROW_BLOCK="4",
    ADAPTAU_CPU_COL_BLOCK="16",
    ADAPTAU_CPU_GROUPS="3",
    ADAPTAU_CPU_SORT_ROWS="3",
)


@pytest.mark.parametrize(
    "tuning",
    [
        SMALL_TUNING,
        dict(ADAPTAU_CPU_PLAN_CACHE="0"),
        dict(ADAPTAU_CPU_SORT_ROWS="1", ADAPTAU_CPU_GROUPS="1"),
        dict(ADAPTAU_CPU_MAX_PAIRS="16"),
    ],
    ids=["small-blocks", "no-saved-state", "one-row-sort-one-group", "row-blocks-of-max-pairs"],
)
def test_tuning_paths_match_reference(tuning):
    """Tiny chunks, row blocks, sort blocks, tiles and groups; the backward without the
    forward's saved state (recomputed); and blocks of max_pairs rows with one negative each,
    where the chunking must stop at one chunk for the whole table (rather than grow the
    chunk to 2^31 rows and fail allocating its buffer). Set before the library reads them."""
    script = textwrap.dedent("""
        import torch, adaptau
        torch.manual_seed(0)
        for neg in (torch.randint(0, 300, (40, 25)), torch.randint(0, 300, (40, 1)),
                    torch.randint(0, 300, (25,)), None):
            user = torch.randn(40, 24); items = torch.randn(300, 24)
            pos = torch.randint(0, 300, (40,))
            logq = torch.randn(300) * 0.5
            beta = torch.rand(40) * 4 + 1
            if neg is not None and neg.dim() == 2:
                neg[::2, :3] = pos[::2, None]  # accidental hits to remove (every other row)
            out = []
            for backend, dt in (("cpu", torch.float32), ("reference", torch.float64)):
                u = user.to(dt).clone().requires_grad_(); it = items.to(dt).clone().requires_grad_()
                b = beta.to(dt).clone().requires_grad_()
                loss, raw = adaptau.softmax_loss(u, it, pos, neg, 4.0, b, include_pos=True,
                                                 neg_logq=logq.to(dt), remove_accidental_hits=True,
                                                 backend=backend, reduction="sum", return_raw=True)
                loss.backward()
                out.append((loss.detach().double(), raw.detach().double(), u.grad.double(),
                            it.grad.double(), b.grad.double()))
            for a, b in zip(*out):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, **tuning)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
