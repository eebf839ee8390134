"""CI: smoke test of an installed adaptau wheel, run outside the source tree.

Checks that adaptau and its extension load from site-packages (not from a checkout), that
nothing of the build machine's CPU is assumed (every capability the CPU has is present),
and that each of them matches the float64 reference on a small case of every negative mode.
Exit status 0 when all hold.
"""

import os
import sys
import sysconfig

import torch

import adaptau
from adaptau import _extension
from adaptau.loss import ops

site = os.path.realpath(sysconfig.get_paths()["purelib"])
for name, path in (
    ("adaptau", adaptau.__file__),
    ("adaptau._C", getattr(_extension.load(), "__file__", None)),
):
    if path is None:
        sys.exit(f"{name} did not load: {_extension.IMPORT_ERROR!r}")
    if not os.path.realpath(path).startswith(site + os.sep):
        sys.exit(f"{name} loaded from {path}, not from {site}")

levels = ops._cpu_capabilities()
if levels[:1] != ["default"]:
    sys.exit(f"unexpected capabilities {levels}")
g = torch.Generator().manual_seed(0)
B, N, D, M = 9, 40, 17, 6
user, items = torch.randn(B, D, generator=g), torch.randn(N, D, generator=g)
pos = torch.randint(0, N, (B,), generator=g)
negs = {
    "per_row": torch.randint(0, N, (B, M), generator=g),
    "shared": torch.randint(0, N, (M,), generator=g),
    "in_batch": None,
}


def loss_and_grads(backend, dtype, neg):
    u = user.detach().to(dtype).requires_grad_()
    it = items.detach().to(dtype).requires_grad_()
    loss = adaptau.softmax_loss(u, it, pos, neg, 5.0, 7.0, backend=backend)
    loss.backward()
    return [loss.detach().double(), u.grad.double(), it.grad.double()]


for level in levels:
    ops._set_cpu_capability(level)
    for mode, neg in negs.items():
        got = loss_and_grads("cpu", torch.float32, neg)
        want = loss_and_grads("reference", torch.float64, neg)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    print(f"adaptau wheel smoke test: {level} matches the reference (per_row, shared, in_batch)")
print(
    f"adaptau wheel smoke test: ok, loaded from {os.path.dirname(adaptau.__file__)}, "
    f"capabilities {', '.join(levels)}"
)
