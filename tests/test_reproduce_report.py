"""benchmarks/reproduce.py --report-only: the summary of an unfinished run folder."""
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_partial_summary_best_so_far(reproduce, tmp_path):
    recs = [{"epoch": e, "loss": 1.0, "seconds": s} for e, s in zip(range(7), (30, 20, 22, 21, 25, 90, 23))]
    recs[1]["metrics"] = {"recall@20": 0.10, "ndcg@20": 0.08}
    recs[3]["metrics"] = {"recall@20": 0.12, "ndcg@20": 0.07}
    recs[5]["metrics"] = {"recall@20": 0.12, "ndcg@20": 0.09}  # a tie: the earlier epoch wins
    # a resumed run repeats epoch 6; the last record counts
    recs.append({"epoch": 6, "loss": 1.0, "seconds": 24, "metrics": {"recall@20": 0.11, "ndcg@20": 0.2}})
    _write(tmp_path / "run", recs)
    s = reproduce.partial_summary(reproduce.run_history(tmp_path / "run"), "paper", "recall@20")
    assert s["status"] == "in progress" and s["epochs_run"] == 7 and s["best_epoch"] == 3
    assert s["test"] == {"recall@20": 0.12, "ndcg@20": 0.07} == s["valid"]
    assert s["seconds_per_epoch"] == 24  # median of the 7 epochs (the repeated one counted once)
    clean = reproduce.partial_summary(reproduce.run_history(tmp_path / "run"), "clean", "ndcg@20")
    assert clean["test"] is None and clean["best_epoch"] == 6  # valid only until the run ends


def test_partial_summary_empty(reproduce, tmp_path):
    assert reproduce.partial_summary(reproduce.run_history(tmp_path / "missing"), "paper", "recall@20") is None
    _write(tmp_path / "empty", [])
    assert reproduce.partial_summary(reproduce.run_history(tmp_path / "empty"), "paper", "recall@20") is None
    _write(tmp_path / "noeval", [{"epoch": 0, "loss": 1.0, "seconds": 5}])
    s = reproduce.partial_summary(reproduce.run_history(tmp_path / "noeval"), "paper", "recall@20")
    assert s["epochs_run"] == 1 and s["best_epoch"] is None and s["test"] is None
