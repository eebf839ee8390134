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
