"""The package layout: adaptau.loss / adaptau.train, the old flat paths as
deprecation shims, the backend contract's constants stated once, one importer of _C."""

import ast
import importlib
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest

import adaptau
import adaptau.loss._contract as contract
from adaptau._deprecated import MOVED

PACKAGE = pathlib.Path(adaptau.__file__).resolve().parent
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_importing_the_loss_imports_no_trainer_module():
    script = textwrap.dedent("""
        import sys, warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import adaptau
            adaptau.softmax_loss, adaptau.AdapTau, adaptau.AdapTauLoss, adaptau.lambertw
            import adaptau.loss
        print(" ".join(sorted(m for m in sys.modules if m.startswith("adaptau"))))
        print(" ".join(m for m in ("scipy", "matplotlib", "yaml") if m in sys.modules))
        print(" | ".join(str(w.message) for w in caught
                         if issubclass(w.category, DeprecationWarning) and "adaptau" in str(w.message)))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    modules, heavy, deprecated = (res.stdout.splitlines() + ["", "", ""])[:3]
    modules = modules.split()
    assert "adaptau.loss.ops" in modules
    assert [m for m in modules if m == "adaptau.train" or m.startswith("adaptau.train.")] == []
    assert not [m for m in modules if m in MOVED], "the loss imported a deprecation shim"
    assert heavy.split() == []
    assert deprecated == ""


def test_lazy_trainer_names_come_from_adaptau_train():
    from adaptau.train import Trainer, TrainConfig
    from adaptau.train.data import load_dataset
    from adaptau.train.evaluate import full_ranking

    assert adaptau.Trainer is Trainer and adaptau.TrainConfig is TrainConfig
    assert adaptau.load_dataset is load_dataset and adaptau.full_ranking is full_ranking


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_is_the_new_module(old):
    new = MOVED[old]
    short = old.rsplit(".", 1)[1]
    assert (PACKAGE / f"{short}.py").read_text().count(f'moved(__name__, "{new}")') == 1
    module = importlib.import_module(new)
    for how in ("import", "from", "attribute"):
        sys.modules.pop(old, None)  # so the shim runs again
        adaptau.__dict__.pop(short, None)
        with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated.*import {new}") as rec:
            if how == "import":
                got = importlib.import_module(old)
            elif how == "from":
                got = getattr(__import__("adaptau", fromlist=[short]), short)
            else:
                got = getattr(adaptau, short)
        assert got is module and sys.modules[old] is module and getattr(adaptau, short) is module
        assert all(w.filename == __file__ for w in rec if issubclass(w.category, DeprecationWarning))
    with warnings.catch_warnings():  # aliased now: no second warning
        warnings.simplefilter("error")
        assert importlib.import_module(old) is module


def test_old_cli_path_still_runs_as_a_program():
    res = subprocess.run(
        [sys.executable, "-m", "adaptau.cli", "--help"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage: adaptau" in res.stdout
    assert "DeprecationWarning: python -m adaptau.cli is deprecated" in res.stderr


def test_contract_constants_are_stated_once():
    from adaptau.loss import ops, reference

    for name in ("NEG_PER_ROW", "NEG_SHARED", "NEG_IN_BATCH"):
        assert getattr(ops, name) is getattr(contract, name)
        assert getattr(reference, name) is getattr(contract, name)
    assert (contract.NEG_PER_ROW, contract.NEG_SHARED, contract.NEG_IN_BATCH) == (0, 1, 2)
    assert reference.NORM_EPS is contract.NORM_EPS and contract.NORM_EPS == 1e-12
    assert ops.accumulation_dtype is contract.accumulation_dtype
    assert reference.accumulation_dtype is contract.accumulation_dtype
    assert ops._FLOAT_DTYPES is contract.FLOAT_DTYPES
    assert ops._INDEX_DTYPES is contract.INDEX_DTYPES
    assert ops._REDUCTIONS is contract.REDUCTIONS
    assert "Backend contract" in contract.__doc__


def test_cpp_contract_constants_agree():
    """csrc/contract.h states the same values for C++/CUDA (adaptau::contract_constants)."""
    import torch

    from adaptau import _extension

    if not _extension.has_op("contract_constants"):
        pytest.skip("the built extension predates adaptau::contract_constants (or is missing)")
    assert list(torch.ops.adaptau.contract_constants()) == [
        contract.NEG_PER_ROW,
        contract.NEG_SHARED,
        contract.NEG_IN_BATCH,
        contract.NORM_EPS,
        contract.MAX_INVERSE_TEMPERATURE,
    ]


def test_triton_kernels_use_the_contract_constants():
    from adaptau import kernels

    if not kernels.AVAILABLE:
        pytest.skip("Triton is not importable here")
    triton_loss = importlib.import_module("adaptau.kernels.softmax_loss")
    for name in ("NEG_PER_ROW", "NEG_SHARED", "NEG_IN_BATCH", "NORM_EPS"):
        assert getattr(triton_loss, name) is getattr(contract, name)
    assert triton_loss._acc_dtype is contract.accumulation_dtype


def _imports_C(path: pathlib.Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name == "adaptau._C" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            if node.module == "adaptau._C" or (node.module in (None, "adaptau") and "_C" in names):
                return True
            if node.level and node.module and node.module.split(".")[-1] == "_C":
                return True
    return False


def test_only_extension_module_imports_C():
    importers = [p.relative_to(PACKAGE).as_posix() for p in sorted(PACKAGE.rglob("*.py")) if _imports_C(p)]
    assert importers == ["_extension.py"]


def test_synthetic_generator_does_not_import_data():
    import adaptau.train.synthetic as synthetic
    from adaptau.train.data import Dataset, make_synthetic

    assert "from .data" not in (PACKAGE / "train" / "synthetic.py").read_text().split("def __getattr__")[0]
    u, i = synthetic.synthetic_interactions(50, 40, seed=3)
    assert u.shape == i.shape and u.dtype.kind == "i"
    assert synthetic.make_synthetic is make_synthetic  # the old name still resolves
    ds = make_synthetic(50, 40, seed=3)
    assert isinstance(ds, Dataset)


def _sources():
    roots = ("adaptau", "kernels", "csrc", "benchmarks")
    suffixes = (".py", ".cpp", ".h", ".cu", ".cuh")
    for root in roots:
        for path in sorted((REPO_ROOT / root).rglob("*")):
            if path.suffix in suffixes and path.is_file() and "build" not in path.parts:
                yield path


def test_no_source_file_is_over_900_lines():
    """Files a reader can hold in mind: every source file stays at 900 lines or fewer."""
    long = {
        str(p.relative_to(REPO_ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > 900
    }
    assert not long, f"split these by seam: {long}"


def test_no_python_class_is_over_300_lines():
    """A class does one job: none in the package, kernels or benchmarks is over 300 lines."""
    big = {}
    for path in _sources():
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                    big[f"{path.relative_to(REPO_ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not big, f"split these classes: {big}"
