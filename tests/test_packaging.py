"""Packaging: one version, metadata in pyproject.toml, an sdist that carries what the build
needs, and a loss that imports without the trainer's extras."""

import subprocess
import sys
import tarfile
import textwrap
import tomllib

import pytest

import adaptau
from conftest import REPO_ROOT


def test_the_version_has_one_source():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert "version" in project["dynamic"] and "version" not in project
    assert "version=" not in (REPO_ROOT / "setup.py").read_text()
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    assert f"## {adaptau.__version__}" in changelog


def test_the_loss_needs_torch_alone():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch"]
    script = textwrap.dedent("""
        import sys
        for name in ("numpy", "scipy", "matplotlib", "tqdm", "yaml"):
            sys.modules[name] = None  # as if not installed: importing it raises
        import torch, adaptau
        users, items = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 2, 3, 4, 5])
        loss_fn = adaptau.AdapTauLoss(users, items, num_items=10, warmup=0)
        u = torch.nn.Embedding(4, 8)
        i = torch.nn.Embedding(10, 8)
        for epoch in range(2):
            loss_fn.begin_epoch(epoch, u.weight.detach(), i.weight.detach())
            loss = loss_fn(u(users[:4]), i.weight, items[:4], torch.randint(0, 10, (4, 5)),
                           users[:4])
            loss.backward()
        assert torch.isfinite(loss)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_sdist_carries_the_sources_the_build_needs(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the sdist is built from the tracked files")
    src = tmp_path / "src"
    for name in tracked.stdout.splitlines():
        if (REPO_ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO_ROOT / name).read_bytes())
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
            str(tmp_path / "dist"),
        ],
        cwd=src,
        capture_output=True,
        text=True,
        env={"ADAPTAU_NO_EXTENSION": "1", "PATH": ""},
    )
    assert build.returncode == 0, build.stderr[-3000:]
    name = build.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "dist" / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    headers = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "csrc").rglob("*.h")}
    kernels = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "kernels").glob("*.py")}
    assert headers and kernels
    needed = (
        headers
        | kernels
        | {
            "LICENSE",
            "README.md",
            "CHANGELOG.md",
            "pyproject.toml",
            "setup.py",
            "adaptau/py.typed",
            "csrc/cuda/softmax_loss_kernels.cu",
        }
    )
    assert needed <= members, sorted(needed - members)
