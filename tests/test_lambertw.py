"""adaptau.lambertw against scipy / mpmath on a dense grid over [−1/e, 1000]."""

import math

import mpmath
import numpy as np
import pytest
import scipy.special
import torch

from adaptau import lambertw

INV_E = math.exp(-1.0)


def exact(values):
    mpmath.mp.dps = 40
    return np.array(
        [float(mpmath.re(mpmath.lambertw(max(mpmath.mpf(float(v)), -1 / mpmath.e)))) for v in values]
    )


@pytest.mark.parametrize("dtype,rel_tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_dense_grid_against_scipy(dtype, rel_tol):
    grid = np.concatenate(
        [
            np.linspace(-0.36, 1000.0, 400001),
            np.geomspace(1e-30, 1e3, 20001),
            -np.geomspace(1e-30, 0.36, 20001),
        ]
    )
    x = torch.tensor(grid, dtype=dtype)
    xd = x.double().numpy()  # the value actually represented in dtype
    w = lambertw(x)
    assert w.dtype == dtype
    ref = scipy.special.lambertw(xd).real
    rel = np.abs(w.double().numpy() - ref) / np.maximum(np.abs(ref), 1e-300)
    assert np.isfinite(w.numpy()).all()
    assert rel.max() <= rel_tol, f"max relative error {rel.max():.3g} at x={xd[rel.argmax()]!r}"


@pytest.mark.parametrize("dtype,abs_tol", [(torch.float32, 1e-3), (torch.float64, 1e-7)])
def test_near_branch_point_against_mpmath(dtype, abs_tol):
    grid = np.concatenate([np.linspace(-INV_E, -0.36, 1501), -INV_E + np.geomspace(1e-17, 1e-3, 300)])
    x = torch.tensor(grid, dtype=dtype)
    xd = x.double().numpy()
    err = np.abs(lambertw(x).double().numpy() - exact(xd))
    assert err.max() <= abs_tol, f"max abs error {err.max():.3g} at x={xd[err.argmax()]!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_values(dtype):
    x = torch.tensor([-INV_E, 0.0, math.e, float("inf")], dtype=dtype)
    w = lambertw(x)
    assert w[0].item() == -1.0
    assert w[1].item() == 0.0
    assert abs(w[2].item() - 1.0) < 1e-6
    assert math.isinf(w[3].item())
    # one rounding step below −1/e in the input's dtype is still the branch point
    below = torch.nextafter(torch.tensor(-INV_E, dtype=dtype), torch.tensor(-1.0, dtype=dtype))
    assert lambertw(below).item() == -1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clearly_below_domain_raises(dtype):
    with pytest.raises(ValueError, match="below -1/e"):
        lambertw(torch.tensor([0.0, -0.3680], dtype=dtype))


def test_rejects_integer_tensor():
    with pytest.raises(TypeError):
        lambertw(torch.tensor([1, 2]))


def test_shape_preserved_and_identity():
    x = torch.rand(3, 4, 5, dtype=torch.float64) * 50 - 0.3
    w = lambertw(x)
    assert w.shape == x.shape
    torch.testing.assert_close(w * torch.exp(w), x, rtol=1e-13, atol=1e-15)
