"""Shared pytest fixtures.

Random inputs use a fresh seed each run (printed on failure via the ``seed`` fixture's
value in the test id/report); set ADAPTAU_TEST_SEED to replay one.
"""

import os
import pathlib
import random

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
    """``$ADAPTAU_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("ADAPTAU_DATA")
    return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def seed(request):
    value = int(os.environ.get("ADAPTAU_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                print(f"\n[{item.nodeid}] replay with ADAPTAU_TEST_SEED={value}")


CPU_CAPABILITIES = ("default", "avx2", "avx512")
_CPU_CAPABILITY_NEEDS = {"avx2": "AVX2 and FMA", "avx512": "AVX-512 F/BW/DQ/VL"}


@pytest.fixture(params=CPU_CAPABILITIES)
def cpu_capability(request, monkeypatch):
    """Runs the test with the ``cpu`` backend's kernels at one CPU capability (and, through
    ``ADAPTAU_CPU_CAPABILITY``, any subprocess it starts); skips, saying why, a level this
    CPU or build lacks. The level before the test is restored after it."""
    from adaptau.loss import ops

    level = request.param
    supported = ops._cpu_capabilities()
    if not supported:
        pytest.skip("the adaptau C++ extension is not built")
    if level not in supported:
        pytest.skip(
            f"the {level} kernels need a CPU with {_CPU_CAPABILITY_NEEDS[level]} (and an x86-64 "
            f"build); this one supports {', '.join(supported)}"
        )
    before = ops._set_cpu_capability(level)
    monkeypatch.setenv("ADAPTAU_CPU_CAPABILITY", level)
    yield level
    ops._set_cpu_capability(before or supported[-1])


def train_in_one_process(settings):
    """``(trainer, summary)`` of one in-process run of ``TrainConfig(**settings)`` at one
    thread (the comparison point of the multi-process tests), quiet."""
    from adaptau.train import TrainConfig, Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(TrainConfig(**settings), log=lambda msg: None)
        summary = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return trainer, summary


def metrics_close(a, b, tol):
    """Recall@20 and NDCG@20 of two metric dicts within ``tol``."""
    return all(abs(a[k] - b[k]) <= tol for k in ("recall@20", "ndcg@20"))
