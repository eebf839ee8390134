"""benchmarks/reproduce.py --report-only: the summary of an unfinished run folder."""

import argparse
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
    assert (
        reproduce.partial_summary(reproduce.run_history(tmp_path / "missing"), "paper", "recall@20") is None
    )
    _write(tmp_path / "empty", [])
    assert reproduce.partial_summary(reproduce.run_history(tmp_path / "empty"), "paper", "recall@20") is None
    _write(tmp_path / "noeval", [{"epoch": 0, "loss": 1.0, "seconds": 5}])
    s = reproduce.partial_summary(reproduce.run_history(tmp_path / "noeval"), "paper", "recall@20")
    assert s["epochs_run"] == 1 and s["best_epoch"] is None and s["test"] is None


TINY = "synthetic:num_users=120,num_items=80"


def _cell(reproduce, **over):
    from adaptau.train import TrainConfig

    return TrainConfig().update(
        dict(dict(data=TINY, dim=8, batch_size=64, negatives=8, epochs=2, progress="off", seed=3), **over)
    )


def test_a_setting_the_saved_config_predates_counts_as_its_default(reproduce):
    cfg = _cell(reproduce)
    saved = json.loads(json.dumps({k: getattr(cfg, k) for k in type(cfg).fields()}))
    assert reproduce.settings_differ(saved, cfg) == []
    del saved["hard_negatives"]  # a run folder written before the setting existed
    assert reproduce.settings_differ(saved, cfg) == []
    saved["lr"] = cfg.lr * 2
    assert reproduce.settings_differ(saved, cfg) == ["lr"]
    saved["lr"], saved["epochs"] = cfg.lr, 999  # the budget may change
    assert reproduce.settings_differ(saved, cfg) == []


def test_a_cell_is_continued_or_set_aside_never_deleted(reproduce, tmp_path):
    """Rerunning a cell continues it (also when its config.json lacks a newer setting); with
    other settings the old folder is kept beside the new one, files intact."""
    import argparse

    args = argparse.Namespace(fresh=False, verbose=False)
    logs = []
    folder = tmp_path / "cell"
    reproduce.run_cell("cell", _cell(reproduce, epochs=1), folder, args, logs.append)
    config = json.loads((folder / "config.json").read_text())
    del config["hard_negatives"]
    (folder / "config.json").write_text(json.dumps(config))
    reproduce.run_cell("cell", _cell(reproduce, epochs=2), folder, args, logs.append)
    assert any("continuing" in m for m in logs), logs
    assert [r["epoch"] for r in reproduce.run_history(folder)] == [0, 1]
    before = (folder / "last.pt").read_bytes()
    reproduce.run_cell("cell", _cell(reproduce, epochs=1, lr=0.05), folder, args, logs.append)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("cell.set-aside-")]
    assert len(kept) == 1 and (kept[0] / "last.pt").read_bytes() == before, logs
    assert any("['lr']" in m for m in logs) and any(str(kept[0]) in m for m in logs), logs
    assert [r["epoch"] for r in reproduce.run_history(folder)] == [0]


def test_collect_keeps_the_most_final_run_of_each_cell(reproduce, tmp_path):
    keys = [
        "dataset",
        "model",
        "protocol",
        "rule",
        "recall@20",
        "ndcg@20",
        "select_recall@20",
        "best_epoch",
        "epochs_run",
        "status",
        "s_per_epoch",
        "lr",
        "warmup",
        "folder",
    ]

    def write(machine, rows):
        (tmp_path / machine).mkdir()
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
        (tmp_path / machine / "reproduction_gowalla.csv").write_text("\n".join(lines) + "\n")

    cell = dict(dataset="gowalla", model="lightgcn", protocol="paper")
    write(
        "cpu-a",
        [
            dict(
                cell,
                rule="adaptive",
                **{"recall@20": 0.19, "ndcg@20": 0.16},
                best_epoch=90,
                epochs_run=140,
                status="early-stopped",
            ),
            dict(
                cell,
                rule="global",
                **{"recall@20": 0.18, "ndcg@20": 0.15},
                best_epoch=50,
                epochs_run=60,
                status="in progress",
            ),
        ],
    )
    write(
        "cpu-b",
        [
            dict(
                cell,
                rule="adaptive",
                **{"recall@20": 0.17, "ndcg@20": 0.14},
                best_epoch=200,
                epochs_run=210,
                status="in progress",
            ),
            dict(
                cell,
                rule="global",
                **{"recall@20": 0.185, "ndcg@20": 0.152},
                best_epoch=70,
                epochs_run=80,
                status="in progress",
            ),
        ],
    )
    text = "\n".join(reproduce.collect(tmp_path, tmp_path / "reproduction.md"))
    assert (tmp_path / "reproduction.md").read_text() == text + "\n"
    row = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| lightgcn")}
    assert "0.1900 | 0.1901 | 0.1600 | 0.1590 | 90 | 140 | converged | [cpu-a]" in row["Adap-τ (adaptive)"]
    assert (
        "0.1850 | 0.1841 | 0.1520 | 0.1526 | 70 | 80 | **not converged** | [cpu-b]"
        in row["Adap-τ-0 (global)"]
    )
    assert (
        "lightgcn: Adap-τ ≥ Adap-τ-0 on both metrics" in text
        and "provisional: Adap-τ-0 not converged" in text
    )
    assert "lightgcn Adap-τ against its target (≥ 0.1863 Recall@20, ≥ 0.1558 NDCG@20): met" in text


def test_collect_lists_a_variant_apart_from_the_cell_it_varies(reproduce, tmp_path):
    """A variant's converged run never takes the place of the cell it varies (here the cell
    itself is still running); it is listed in its own table under that cell's group."""
    keys = ["dataset", "model", "protocol", "rule", "recall@20", "ndcg@20", "best_epoch"]
    keys += ["epochs_run", "status", "s_per_epoch", "variant"]
    main = ["ml-1m", "mf", "paper", "adaptive", 0.21, 0.20, 80, 90, "in progress", 10, ""]
    varied = ["ml-1m", "mf", "paper", "adaptive", 0.28, 0.26, 300, 350, "early-stopped", 10, "mean-t2"]
    for machine, row in (("cpu-a", main), ("cpu-b", varied)):
        (tmp_path / machine).mkdir()
        lines = [",".join(keys), ",".join(map(str, row))]
        (tmp_path / machine / "reproduction_ml-1m.csv").write_text("\n".join(lines) + "\n")
    text = "\n".join(reproduce.collect(tmp_path, tmp_path / "reproduction.md"))
    main_rows = [line for line in text.splitlines() if line.startswith("| mf |")]
    assert len(main_rows) == 1 and "0.2100" in main_rows[0] and "**not converged** | [cpu-a]" in main_rows[0]
    assert "Variants (ml-1m, paper protocol)" in text
    variant_rows = [line for line in text.splitlines() if line.startswith("| mean-t2 |")]
    assert len(variant_rows) == 1
    assert "| mf | Adap-τ (adaptive) | 0.2800 | 0.2600 | 300 | 350 | converged | [cpu-b]" in variant_rows[0]


def test_rule_comparison_plots_both_runs(reproduce, tmp_path):
    """compare_rules writes one figure per (dataset, model, protocol) whose Adap-τ and Adap-τ-0
    runs both have evaluations, and lists it; a cell with one rule only gets none."""
    for rule, tau in (("adaptive", (0.05, 0.1, 0.2)), ("global", (0.1, 0.1, 0.1))):
        folder = tmp_path / f"lastfm-mf-paper-{rule}"
        folder.mkdir()
        records = [
            {"epoch": e, "loss": 5.0 - 0.1 * e, "tau_min": tau[0], "tau_median": tau[1], "tau_max": tau[2]}
            | ({"metrics": {"recall@20": 0.01 * e, "ndcg@20": 0.008 * e}} if e % 2 else {})
            for e in range(6)
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = argparse.Namespace(runs=str(tmp_path), out=str(tmp_path / "report.md"), curves=[])
    cells = [("lastfm", "mf", "paper", "adaptive"), ("lastfm", "mf", "paper", "global")]
    cells += [("lastfm", "lightgcn", "paper", "adaptive")]
    reproduce.compare_rules(cells, args)
    assert args.curves == [("lastfm-mf-paper: Adap-τ against Adap-τ-0", "report_lastfm-mf-paper_rules.png")]
    png = tmp_path / "report_lastfm-mf-paper_rules.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_variant_gets_its_own_run_folders_and_report(reproduce, capsys):
    """--variant NAME: run folders under runs/reproduce-NAME and a report named after it by
    default, so a variant never continues, sets aside or overwrites the cells it varies."""
    cells = ["--datasets", "ml-1m", "--models", "mf", "--protocols", "paper", "--rules", "adaptive"]
    assert reproduce.main(cells + ["--variant", "mean-t2", "--set", "mf.base=mean", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(pathlib.Path("runs/reproduce-mean-t2/ml-1m-mf-paper-adaptive"))
    assert out[1].startswith("report: ") and out[1].endswith("reproduction_ml-1m_mf_mean-t2.md")
    assert reproduce.main(cells + ["--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(pathlib.Path("runs/reproduce/ml-1m-mf-paper-adaptive"))
    assert out[1].endswith("reproduction_ml-1m_mf.md")
    with pytest.raises(SystemExit):
        reproduce.main(cells + ["--variant", "a b", "--dry-run"])
    assert "--variant must be" in capsys.readouterr().err


def test_the_report_names_the_command_that_wrote_it(reproduce, tmp_path):
    """The report's Command line repeats the grid it was given (without --note texts)."""
    tau = {"w0": 5.0, "tau_min": 0.2, "tau_median": 0.2, "tau_max": 0.2}
    recs = [{"epoch": e, "loss": 1.0, "seconds": 3.0, **tau} for e in range(3)]
    recs[2]["metrics"] = {"recall@20": 0.2, "ndcg@20": 0.1}
    _write(tmp_path / "runs" / "lastfm-mf-paper-adaptive", recs)
    out = tmp_path / "report.md"
    grid = ["--datasets", "lastfm", "--models", "mf", "--protocols", "paper", "--rules", "adaptive"]
    folders = ["--runs", str(tmp_path / "runs"), "--out", str(out)]
    argv = grid + ["--report-only"] + folders
    assert reproduce.main(argv + ["--note", "a note, not a command"]) == 0
    command = next(line for line in out.read_text().splitlines() if line.startswith("Command: "))
    assert command == f"Command: `python benchmarks/reproduce.py {' '.join(argv)}`  "
    train = next(line for line in out.read_text().splitlines() if line.startswith("Training command: "))
    assert train.startswith(f"Training command: `python benchmarks/reproduce.py {' '.join(grid + folders)}` ")
