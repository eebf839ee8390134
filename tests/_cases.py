"""The case table of the backend tests: inputs for every negative mode and option, the
float64 reference's results, and the comparison. Shared by the Triton interpreter tests,
the GPU tests, the CUDA host emulation and the sm_90 compile check.

Tolerances (elementwise, ``|got - ref| <= atol + rtol * scale`` where ``scale`` is the
largest ``|ref|`` of the element's row for 2-D gradients and ``|ref|`` itself otherwise):

* float32: loss/lse/raw ``atol = 2e-6 * max(1, max inverse temperature)``, ``rtol = 1e-5``;
  gradients ``atol = 1e-6``, ``rtol = 1e-4 * max(1, max inverse temperature / 1000)``
  (a logit error of ε moves a softmax weight by ε relative; fp32 cosines carry ~1e-7,
  so at inverse temperature 1e4 the measured gradient error is ~2e-4 relative).
* float64 inputs (Triton computes float64 in float64): ``atol = 1e-10``, ``rtol = 1e-9``.
* bfloat16 / float16 (GPU only): loss ``atol = 1e-4·max(1, scale)``, gradients
  ``rtol = 3e-2`` (bf16) / ``8e-3`` (fp16): outputs are rounded to the input dtype and
  the ``tl.dot`` tiles take the softmax weights in that dtype (flash-attention practice).

NaN never passes: any NaN in an output fails the case; ``-inf`` must match exactly.
"""

from __future__ import annotations

import zlib

# ---------------------------------------------------------------------------- the cases
# mode: 0 per-row [B, M], 1 shared [M], 2 in-batch. Defaults: B=5, N=13, D=8, M=6,
# normalize=True, scale=5 (inverse temperatures in scale·[0.5, 1.5)), int64 indices.
_MODES = {0: "perrow", 1: "shared", 2: "inbatch"}


def _cases():
    cases = {}
    for mode, mname in _MODES.items():
        base = {"mode": mode}
        variants = {
            "base": {},
            "include_pos": {"include_pos": True},
            "logq": {"logq": True},
            "remove_hits": {"remove_hits": True, "force_hits": True},
            "all_options": {"include_pos": True, "logq": True, "remove_hits": True, "force_hits": True},
            "no_normalize": {"normalize": False},
            "no_normalize_all": {
                "normalize": False,
                "include_pos": True,
                "logq": True,
                "remove_hits": True,
                "force_hits": True,
            },
            "empty_rows": {"remove_hits": True, "empty_rows": True},
            "duplicates": {"dup": True},
            "zero_vectors": {"zero_vec": True},
            "zero_vectors_no_normalize": {"zero_vec": True, "normalize": False},
            "large_scale": {"scale": 1e4, "logq": True},
            "large_scale_include_pos": {"scale": 1e4, "include_pos": True},
            "int32": {"index_dtype": "int32", "remove_hits": True, "force_hits": True},
            "odd_dim": {"D": 37},
            # D=1: the normalized vectors are ±1, the reference user/item gradients exactly
            # 0, and fp32 leaves ~1e-7·|pre-Jacobian gradient|·(1/||x||): absolute floor
            "one_dim": {"D": 1, "grad_atol": 1e-4},
            "float64": {"dtype": "float64", "include_pos": True, "logq": True},
        }
        if mode == 0:
            variants["many_negatives"] = {"B": 3, "D": 16, "M": 300, "logq": True, "dup": True}
        elif mode == 1:
            variants["many_negatives"] = {"B": 70, "M": 150, "D": 20, "dup": True}
        else:
            variants["many_rows"] = {"B": 75, "N": 40, "D": 20, "remove_hits": True}
        for vname, opts in variants.items():
            cases[f"{mname}-{vname}"] = {**base, **opts}
    cases["api-autograd-perrow"] = {"mode": 0, "api": True, "include_pos": True, "logq": True}
    cases["api-autograd-shared"] = {"mode": 1, "api": True, "remove_hits": True, "force_hits": True}
    cases["api-autograd-inbatch"] = {"mode": 2, "api": True}
    return cases


CASES = _cases()
ITEM_GRAD_MODES = ("atomic", "segment")


# ------------------------------------------------------------------- inputs, comparison
def make_inputs(name, spec, device="cpu", dtype=None):
    """Deterministic inputs for a case (CPU float tensors, then moved/cast)."""
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    mode = spec["mode"]
    B, N, D, M = (spec.get(k, d) for k, d in (("B", 5), ("N", 13), ("D", 8), ("M", 6)))
    if spec.get("empty_rows") and mode == 2:
        B = 3
    user = torch.randn(B, D, generator=gen, dtype=torch.float64)
    items = torch.randn(N, D, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, N, (B,), generator=gen)
    if mode == 0:
        neg = torch.randint(0, N, (B, M), generator=gen)
    elif mode == 1:
        neg = torch.randint(0, N, (M,), generator=gen)
    else:
        neg = torch.empty(0, dtype=torch.int64)
    if spec.get("force_hits"):
        if mode == 0:
            neg[:, ::3] = pos[:, None]
        elif mode == 1:
            neg[0], neg[-1] = pos[0], pos[1]
        else:
            pos[1] = pos[0]
    if spec.get("empty_rows"):
        if mode == 0:  # rows 0 and 2: every negative is the positive
            neg[0, :] = pos[0]
            neg[2, :] = pos[2]
        elif mode == 1:  # rows 0 and 1 share the positive that is every negative
            pos[1] = pos[0]
            neg[:] = pos[0]
        else:  # all positives equal: every row is empty
            pos[:] = pos[0]
    if spec.get("dup"):
        if mode == 0:
            neg[:, 1] = neg[:, 0]
            neg[1] = neg[0]
            pos[1] = pos[0]
            neg[0, 2] = pos[3 % B]
        elif mode == 1:
            neg[2] = neg[0]
            neg[3] = pos[0]
            pos[1] = pos[0]
        else:
            pos[2] = pos[0]
    if spec.get("zero_vec"):
        user[1] = 0
        items[pos[0]] = 0
        if mode == 0:
            items[neg[2, 1]] = 0
        elif mode == 1:
            items[neg[1]] = 0
    scale = spec.get("scale", 5.0)
    alpha = scale * (0.5 + torch.rand(B, generator=gen, dtype=torch.float64))
    beta = scale * (0.5 + torch.rand(B, generator=gen, dtype=torch.float64))
    logq = (2 * torch.randn(N, generator=gen, dtype=torch.float64)) if spec.get("logq") else None
    grad_loss = torch.randn(B, generator=gen, dtype=torch.float64)
    index_dtype = getattr(torch, spec.get("index_dtype", "int64"))
    dtype = dtype or getattr(torch, spec.get("dtype", "float32"))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    user, items = user.to(dtype), items.to(dtype)  # the backend's inputs (rounded)
    out = dict(
        user=user,
        items=items,
        pos=pos.to(index_dtype),
        neg=neg.to(index_dtype),
        alpha=alpha.to(acc),
        beta=beta.to(acc),
        logq=None if logq is None else logq.to(acc),
        grad_loss=grad_loss.to(acc),
    )
    return {k: (None if v is None else v.to(device)) for k, v in out.items()}


def tolerances(dtype_name, scale):
    big = max(1.0, scale)
    if dtype_name == "float64":
        return {"out": (1e-10 * big, 1e-9), "grad": (1e-10, 1e-9)}
    if dtype_name == "float32":
        return {"out": (2e-6 * big, 1e-5), "grad": (1e-6, 1e-4 * max(1.0, scale / 1e3))}
    if dtype_name == "bfloat16":
        return {"out": (1e-4 * big, 1e-4), "grad": (1e-5, 3e-2)}
    return {"out": (1e-4 * big, 1e-4), "grad": (1e-5, 8e-3)}  # float16


def compare(label, got, ref, atol, rtol):
    """None when ``got`` matches ``ref`` (see module docstring), else a message."""
    import torch

    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        return f"{label}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    if torch.isnan(got).any():
        return f"{label}: NaN at {torch.isnan(got).nonzero()[0].tolist()}"
    if torch.isnan(ref).any():
        return f"{label}: the reference has NaN (bad case)"
    ref_inf, got_inf = torch.isinf(ref), torch.isinf(got)
    if not torch.equal(ref_inf, got_inf) or not torch.equal(got[got_inf], ref[ref_inf]):
        return f"{label}: infinities differ (got {got.tolist()}, ref {ref.tolist()})"
    fin = ~ref_inf
    if not fin.any():
        return None
    scale = ref.abs()
    if ref.dim() == 2:
        scale = scale.amax(dim=1, keepdim=True).expand_as(ref)
    err = (got - ref).abs()
    bound = atol + rtol * scale
    bad = fin & (err > bound)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        w = tuple(where)
        return (
            f"{label}: |got-ref| = {float(err[w]):.3e} > {float(bound[w]):.3e} at {where} "
            f"(got {float(got[w]):.8g}, ref {float(ref[w]):.8g}; "
            f"max err {float(err[fin].max()):.3e})"
        )
    return None


def _reference_results(x, spec, include_pos, normalize, remove_hits):
    import torch
    from adaptau.loss import reference

    d64 = {k: (None if v is None else (v.double() if v.is_floating_point() else v)) for k, v in x.items()}
    mode = spec["mode"]
    loss, lse, raw = reference.forward(
        d64["user"],
        d64["items"],
        d64["pos"],
        d64["neg"],
        d64["alpha"],
        d64["beta"],
        d64["logq"],
        mode,
        include_pos,
        normalize,
        remove_hits,
        True,
    )
    grads = reference.backward(
        d64["grad_loss"],
        d64["user"],
        d64["items"],
        d64["pos"],
        d64["neg"],
        d64["alpha"],
        d64["beta"],
        d64["logq"],
        lse,
        mode,
        include_pos,
        normalize,
        remove_hits,
        True,
    )
    assert all(torch.isfinite(g).all() for g in grads)
    return (loss, lse, raw) + tuple(grads)


OUT_NAMES = ("loss", "lse", "raw", "grad_user", "grad_items", "grad_pos_scale", "grad_neg_scale")


def check_backend_functions(name, spec, fwd, bwd, device="cpu", dtype=None):
    """Run a backend's forward/backward on a case; return a list of failure messages."""
    x = make_inputs(name, spec, device, dtype)
    include_pos = bool(spec.get("include_pos", False))
    normalize = bool(spec.get("normalize", True))
    remove_hits = bool(spec.get("remove_hits", False))
    mode = spec["mode"]
    loss, lse, raw = fwd(
        x["user"],
        x["items"],
        x["pos"],
        x["neg"],
        x["alpha"],
        x["beta"],
        x["logq"],
        mode,
        include_pos,
        normalize,
        remove_hits,
        True,
    )
    grads = bwd(
        x["grad_loss"],
        x["user"],
        x["items"],
        x["pos"],
        x["neg"],
        x["alpha"],
        x["beta"],
        x["logq"],
        lse,
        mode,
        include_pos,
        normalize,
        remove_hits,
        True,
    )
    got = (loss, lse, raw) + tuple(grads)
    ref = _reference_results(x, spec, include_pos, normalize, remove_hits)
    dname = str(x["user"].dtype).replace("torch.", "")
    tol = tolerances(dname, float(max(x["alpha"].abs().max(), x["beta"].abs().max())))
    if "grad_atol" in spec:
        tol["grad"] = (spec["grad_atol"], tol["grad"][1])
    problems = []
    expected_dtypes = [x["alpha"].dtype] * 3 + [x["user"].dtype, x["items"].dtype] + [x["alpha"].dtype] * 2
    for i, (label, g, r) in enumerate(zip(OUT_NAMES, got, ref)):
        if g.dtype != expected_dtypes[i]:
            problems.append(f"{label}: dtype {g.dtype}, expected {expected_dtypes[i]}")
            continue
        atol, rtol = tol["out"] if i < 3 else tol["grad"]
        msg = compare(label, g, r, atol, rtol)
        if msg:
            problems.append(msg)
    return problems


def check_public_api(name, spec, backend, device="cpu", dtype=None):
    """adaptau.softmax_loss(backend=...) + autograd vs the reference backend in float64."""
    import adaptau

    x = make_inputs(name, spec, device, dtype)
    kwargs = dict(
        include_pos=bool(spec.get("include_pos", False)),
        normalize=bool(spec.get("normalize", True)),
        neg_logq=x["logq"],
        remove_accidental_hits=bool(spec.get("remove_hits")),
        reduction="none",
        return_raw=True,
    )
    neg = None if spec["mode"] == 2 else x["neg"]

    def run(cast, backend_name):
        leaves = [cast(x[k]).detach().requires_grad_(True) for k in ("user", "items", "alpha", "beta")]
        kw = dict(kwargs)
        if kw["neg_logq"] is not None:
            kw["neg_logq"] = cast(kw["neg_logq"])
        loss, raw = adaptau.softmax_loss(
            leaves[0], leaves[1], x["pos"], neg, leaves[2], leaves[3], backend=backend_name, **kw
        )
        (loss * cast(x["grad_loss"])).sum().backward()
        return [loss, raw] + [t.grad for t in leaves]

    got = run(lambda t: t, backend)
    ref = run(lambda t: t.double(), "reference")
    dname = str(x["user"].dtype).replace("torch.", "")
    tol = tolerances(dname, float(max(x["alpha"].abs().max(), x["beta"].abs().max())))
    labels = ("loss", "raw", "grad_user", "grad_items", "grad_pos_scale", "grad_neg_scale")
    problems = []
    for i, (label, g, r) in enumerate(zip(labels, got, ref)):
        atol, rtol = tol["out"] if i < 2 else tol["grad"]
        msg = compare(label, g, r, atol, rtol)
        if msg:
            problems.append(msg)
    return problems


GPU_CASES = {
    "perrow": {
        "mode": 0,
        "B": 64,
        "N": 300,
        "D": 64,
        "M": 200,
        "logq": True,
        "include_pos": True,
        "dup": True,
    },
    "perrow-hits-odd-dim": {
        "mode": 0,
        "B": 33,
        "N": 50,
        "D": 37,
        "M": 70,
        "remove_hits": True,
        "force_hits": True,
    },
    "perrow-empty": {"mode": 0, "B": 9, "N": 20, "D": 32, "M": 10, "remove_hits": True, "empty_rows": True},
    "shared": {
        "mode": 1,
        "B": 150,
        "N": 400,
        "D": 64,
        "M": 130,
        "remove_hits": True,
        "force_hits": True,
        "dup": True,
    },
    "shared-no-normalize": {"mode": 1, "B": 40, "N": 100, "D": 24, "M": 70, "normalize": False, "logq": True},
    "inbatch": {"mode": 2, "B": 140, "N": 90, "D": 64, "logq": True},
    "inbatch-large-scale": {"mode": 2, "B": 40, "N": 500, "D": 128, "scale": 1e3, "include_pos": True},
}
GPU_DTYPES = ("float32", "bfloat16", "float16")
