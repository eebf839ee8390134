"""``adaptau train | eval | bench`` — the command line.

Settings come, lowest priority first, from the defaults of :class:`adaptau.train.TrainConfig`,
``--preset NAME``, ``--config FILE`` (YAML or JSON) and the flags given on the command line.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["main", "build_parser"]


def _bool_pair(parser: argparse.ArgumentParser, name: str, dest: str, help_on: str, help_off: str):
    parser.add_argument(f"--{name}", dest=dest, action="store_const", const=True, default=None, help=help_on)
    parser.add_argument(f"--no-{name}", dest=dest, action="store_const", const=False, help=help_off)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .sampling import SAMPLERS
    from .config import PRESETS

    S = argparse.SUPPRESS  # flags not given stay out of the namespace (config/preset win)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=S,
        help="folder or file (LightGCN text folder, CSV/TSV, RecBole "
        ".inter) or a dataset name under $ADAPTAU_DATA / ../shared/data; default: the "
        "embedded synthetic dataset ('synthetic', or 'synthetic:num_users=N,num_items=M')",
    )
    g.add_argument(
        "--protocol",
        choices=["clean", "paper"],
        default=S,
        help="clean: train on train, select on valid, report test once (default); "
        "paper: train on train+valid, select the epoch on test (the paper's code)",
    )
    g.add_argument(
        "--split",
        choices=["random", "time"],
        default=S,
        help="how a single interaction file is split per user: random (seeded, 80/10/10) "
        "or time (the latest interaction to test, the one before to valid)",
    )
    g.add_argument(
        "--valid-fraction",
        type=float,
        default=S,
        help="share of each user's train items carved out as valid when the data has none",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["mf", "lightgcn"], default=S)
    g.add_argument("--layers", type=int, default=S, help="LightGCN layers (default 3)")
    g.add_argument("--dim", type=int, default=S, help="embedding size (default 64)")
    g.add_argument("--dropout", type=float, default=S, help="MF: dropout on batch user rows")
    g.add_argument("--init-std", type=float, default=S)
    g = p.add_argument_group("loss and temperature")
    g.add_argument(
        "--tau",
        choices=["adaptive", "global", "fixed"],
        default=S,
        help="adaptive: Adap-τ (default); global: Adap-τ-0; fixed: 1/--tau-value",
    )
    g.add_argument("--tau-value", type=float, default=S, help="temperature of --tau fixed (default 0.1)")
    _bool_pair(
        g,
        "normalize",
        "normalize",
        "cosine scores (default)",
        "inner-product scores (the un-normalized baseline; use with --tau fixed --tau-value 1)",
    )
    g.add_argument(
        "--rank",
        choices=["auto", "cosine", "dot"],
        default=S,
        help="scores used for ranking at evaluation (auto: as in training)",
    )
    g.add_argument("--negatives", type=int, default=S, help="negatives per row (default 128)")
    g.add_argument("--sampler", choices=list(SAMPLERS), default=S)
    g.add_argument("--pop-gamma", type=float, default=S, help="popularity sampler exponent γ")
    g.add_argument(
        "--mixed-pool",
        choices=["uniform", "popularity"],
        default=S,
        help="--sampler mixed: in-batch negatives plus --negatives shared ones drawn "
        "uniformly (default) or by popularity, each source with its logQ",
    )
    g.add_argument(
        "--hard-negatives",
        type=int,
        default=S,
        metavar="H",
        help="--sampler mixed: also H per-row hard negatives, the best-scoring of 8·H "
        "uniform candidates under the current model (default 0)",
    )
    _bool_pair(
        g,
        "include-pos",
        "include_pos",
        "put the positive in the denominator",
        "leave the positive out of the denominator (default, the paper's code)",
    )
    _bool_pair(
        g,
        "remove-hits",
        "remove_hits",
        "drop negatives equal to the row's positive",
        "keep accidental hits (default)",
    )
    g.add_argument("--backend", choices=["auto", "reference", "cpu", "triton", "cuda"], default=S)
    g.add_argument("--warmup", type=int, default=S, help="Adap-τ warm-up epochs")
    g.add_argument("--base", default=S, help="'mean' or a quantile level in (0,1)")
    g.add_argument("--smoothing", type=float, default=S, help="Adap-τ t2")
    g.add_argument("--active-quantile", type=float, default=S)
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=S)
    g.add_argument("--lr", type=float, default=S)
    g.add_argument("--l2", type=float, default=S)
    g.add_argument(
        "--sparse-grad",
        nargs="?",
        const="sparse-adam",
        choices=["off", "sparse-adam", "adagrad"],
        default=S,
        help="MF: sparse gradients for both tables, so only the touched rows are "
        "updated (bare flag: SparseAdam; 'adagrad': Adagrad)",
    )
    g.add_argument("--epochs", type=int, default=S)
    g.add_argument(
        "--patience",
        type=int,
        default=S,
        help="evaluations without improvement before stopping (0: off); with --tau "
        "adaptive/global, evaluations during the warm-up do not count",
    )
    g.add_argument("--eval-every", type=int, default=S)
    g.add_argument("--topk", default=S, help="cut-offs, comma-separated (default 20)")
    g.add_argument("--metric", default=S, help="selection metric (default recall@<first K>)")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--device", default=S, help="auto | cpu | cuda | cuda:N")
    g.add_argument(
        "--threads",
        type=int,
        default=S,
        help="CPU threads for torch and the kernels (default 0: torch's default)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="the paper's hyper-parameters")
    g.add_argument("--name", default=S, help="run name (folder runs/<name>)")
    g.add_argument("--out", default=S, help="run folder (default runs/<name>)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace the run files of an --out folder that already holds a run",
    )
    g.add_argument("--progress", choices=["auto", "on", "off"], default=S)
    g = p.add_argument_group("distributed")
    g.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train with N local worker processes (torch.distributed.run; gloo on CPU, "
        "NCCL on GPU); --batch-size stays the global batch. Several machines: "
        "torchrun --nnodes … -m adaptau train …",
    )
    g.add_argument(
        "--shard-tables",
        choices=["off", "row-wise"],
        default=S,
        help="MF: row-wise shard the user and item tables over the ranks with TorchRec "
        "(EmbeddingCollection under DistributedModelParallel, fused optimizer named by "
        "--sparse-grad: adagrad on CPU or CUDA, sparse-adam on CUDA); needs the "
        "[torchrec] extra",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptau", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,bench}")
    p = sub.add_parser(
        "train",
        help="train a model (default: MF + Adap-τ on synthetic data)",
        description="Train MF or LightGCN with the fused softmax loss and Adap-τ.",
    )
    _add_train_flags(p)
    e = sub.add_parser("eval", help="re-evaluate a saved run")
    e.add_argument("--run", required=True, help="run folder")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best")
    e.add_argument("--data", default=None, help="override the dataset path of the run")
    e.add_argument(
        "--by-degree",
        type=int,
        default=0,
        metavar="G",
        help="also report test metrics for G groups of users, by their number of training interactions",
    )
    b = sub.add_parser(
        "bench", help="run the kernel benchmark suite (benchmarks/bench_kernels.py)", add_help=False
    )
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed on to bench_kernels.py")
    return parser


def resolve_config(ns: argparse.Namespace):
    """TrainConfig from defaults < preset < config file < flags."""
    from .config import PRESETS, TrainConfig, load_config_file

    cfg = TrainConfig()
    preset = getattr(ns, "preset", None)
    file_values: Dict[str, Any] = {}
    if getattr(ns, "config", None):
        file_values = load_config_file(ns.config)
        preset = preset or file_values.pop("preset", None)
        file_values.pop("preset", None)
    if preset:
        cfg.update(PRESETS[preset], where=f"preset {preset}")
    if file_values:
        cfg.update(file_values, where=f"--config {ns.config}")
    skip = {"command", "config", "preset", "resume", "overwrite", "nproc", "_argv"}
    flags = {k: v for k, v in vars(ns).items() if k not in skip and v is not None}
    cfg.update(flags, where="flags")
    return cfg


def find_bench_script() -> Optional[Path]:
    """benchmarks/bench_kernels.py next to the package's repository, or under the cwd."""
    repo = Path(__file__).resolve().parents[2]  # <repo>/adaptau/train/cli.py
    for root in (repo, Path.cwd(), *Path.cwd().parents):
        cand = root / "benchmarks" / "bench_kernels.py"
        if cand.is_file():
            return cand
    return None


def _strip_nproc(argv: List[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _cmd_train(ns: argparse.Namespace) -> int:
    from . import distributed as dist

    if ns.nproc is not None and ns.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {ns.nproc}")
    if ns.nproc and ns.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return dist.launch(_strip_nproc(ns._argv), ns.nproc)
    try:
        return _train_worker(ns)
    finally:
        dist.shutdown()


def _train_worker(ns: argparse.Namespace) -> int:
    from .config import read_run_config
    from .trainer import train

    if ns.resume:
        cfg = read_run_config(ns.resume, flag="--resume")
        skip = {"command", "config", "preset", "resume", "overwrite", "nproc", "_argv"}
        cfg.update({k: v for k, v in vars(ns).items() if k not in skip and v is not None}, where="flags")
        cfg.out = ns.resume
    else:
        cfg = resolve_config(ns)
    summary = train(cfg, resume=ns.resume, overwrite=bool(ns.overwrite))
    if summary.get("status") == "diverged":
        print(f"adaptau train: stopped: {summary.get('message')}", file=sys.stderr)
        return 3
    return 0


def _cmd_eval(ns: argparse.Namespace) -> int:
    from .trainer import evaluate_run

    evaluate_run(ns.run, checkpoint=ns.checkpoint, data=ns.data, by_degree=ns.by_degree)
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    script = find_bench_script()
    if script is None:
        print(
            "adaptau bench: benchmarks/bench_kernels.py not found (looked next to the adaptau "
            "package and under the current directory); run it from a checkout of the "
            "repository",
            file=sys.stderr,
        )
        return 2
    argv = sys.argv
    sys.argv = [str(script)] + [a for a in ns.args if a != "--"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = argv
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:  # pass everything after 'bench' through untouched
        ns = argparse.Namespace(command="bench", args=args[1:])
    else:
        ns = parser.parse_args(args)
        ns._argv = args[1:]
    if ns.command is None:
        parser.print_help()
        return 2
    from .data import DataError

    try:
        if ns.command == "train":
            return _cmd_train(ns)
        if ns.command == "eval":
            return _cmd_eval(ns)
        return _cmd_bench(ns)
    except (DataError, OSError, ValueError) as exc:  # (RunWriteError, FileNotFoundError)
        print(f"adaptau {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adaptau {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
