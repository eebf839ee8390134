"""``softmax_loss`` under ``torch.autocast``: the op has an Autocast kernel (CPU and CUDA)
that runs it with autocast off, in the dtype of its inputs, so a backend's own products
(the reference backend's matmuls) are not lowered to bfloat16.

Checked on the CPU backends (reference, cpu): under ``torch.autocast("cpu",
dtype=torch.bfloat16)`` the loss is float32 and the loss and both vector gradients equal
the call without autocast (``atol = rtol = 1e-6``); a bfloat16 tower's output (a Linear
layer under autocast) over an float32 table gives the loss of its output cast to float32,
and the gradient reaches the layer's float32 weight.
"""

import pytest
import torch

import adaptau

CPU_BACKENDS = [b for b in adaptau.available_backends("cpu") if b != "triton"]
B, N, D, M = 8, 50, 16, 10


def _inputs():
    g = torch.Generator().manual_seed(0)
    user = torch.randn(B, D, generator=g)
    items = torch.randn(N, D, generator=g)
    pos = torch.randint(0, N, (B,), generator=g)
    neg = torch.randint(0, N, (B, M), generator=g)
    return user, items, pos, {"perrow": neg, "shared": neg[0].clone(), "inbatch": None}


def test_autocast_kernels_are_registered():
    for op in ("adaptau::softmax_loss_forward", "adaptau::softmax_loss_backward"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)


@pytest.mark.parametrize("mode", ("perrow", "shared", "inbatch"))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_runs_in_the_input_dtype(backend, mode):
    user, items, pos, negs = _inputs()
    results = []
    for autocast in (False, True):
        u = user.clone().requires_grad_(True)
        it = items.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = adaptau.softmax_loss(
                u, it, pos, negs[mode], 5.0, 7.0, backend=backend, include_pos=True, reduction="none"
            )
            grads = torch.autograd.grad(loss.sum(), (u, it))
        assert loss.dtype == torch.float32
        assert not any(torch.isnan(t).any() for t in (loss, *grads))
        results.append((loss, *grads))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_tower_over_fp32_table(backend):
    user, items, pos, negs = _inputs()
    tower = torch.nn.Linear(D, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tower(user)
        assert out.dtype == torch.bfloat16
        loss = adaptau.softmax_loss(out, items, pos, negs["shared"], 5.0, 5.0, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32
    want = adaptau.softmax_loss(out.detach().float(), items, pos, negs["shared"], 5.0, 5.0, backend=backend)
    torch.testing.assert_close(loss.detach(), want, atol=1e-6, rtol=1e-6)
    assert tower.weight.grad is not None and tower.weight.grad.dtype == torch.float32
    assert torch.isfinite(tower.weight.grad).all() and tower.weight.grad.abs().sum() > 0
