"""The scripts in examples/ run, on tiny settings, and do what they say."""

import importlib.util
import math


from conftest import REPO_ROOT


def _example(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_tower_learns():
    losses = _example("two_tower").main(["--steps", "40", "--batch", "128", "--negatives", "128"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(math.isfinite(x) for x in losses) and last < first - 0.2, (first, last)


def test_popularity_logq_gives_popular_items_back_their_due():
    """Popularity negatives without logQ over-penalize popular items, so the corrected run
    puts fewer tail items in its top 20."""
    share = _example("popularity_logq").main(["--epochs", "2"])
    assert 0.0 < share["with logQ"] < share["without logQ"] <= 1.0, share


def test_resume_and_evaluate(tmp_path):
    out = _example("resume_and_evaluate").main(
        ["--out", str(tmp_path / "run"), "--data", "synthetic:num_users=240,num_items=160"]
    )
    assert out["summary"]["status"] == "completed" and out["summary"]["epochs_run"] == 4
    assert set(out["metrics"]) == {"valid", "test"} and out["metrics"]["test"]["recall@20"] > 0
