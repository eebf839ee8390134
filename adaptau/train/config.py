"""The trainer's settings: :class:`TrainConfig` (every knob of a run, named as the CLI flags),
their coercion and validation, the paper's presets, and config files."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from .data import SPLIT_RULES
from .evaluate import METRICS
from .sampling import MIXED_POOLS, SAMPLERS

__all__ = [
    "TrainConfig",
    "PRESETS",
    "coerce_setting",
    "load_config_file",
    "read_run_config",
    "resolve_device",
    "SPARSE_OPTIMIZERS",
    "SHARDINGS",
]

#: ``--sparse-grad`` values: off (dense gradients, Adam) or the optimizer of sparse ones.
SPARSE_OPTIMIZERS = ("off", "sparse-adam", "adagrad")

#: ``--shard-tables`` values: off (each process holds both tables) or TorchRec's row-wise
#: sharding (:mod:`adaptau.train.sharded`).
SHARDINGS = ("off", "row-wise")


#: The largest --seed: the negative sampler's generator is seeded with seed + a small offset,
#: which must stay a valid 64-bit seed.
MAX_SEED = 2**62

#: (field, low, high, low included): the finite ranges of the float settings.
_RANGES = (
    ("init_std", 0.0, math.inf, False),
    ("l2", 0.0, math.inf, True),
    ("dropout", 0.0, 1.0, True),
    ("pop_gamma", -math.inf, math.inf, False),
    ("valid_fraction", 0.0, 1.0, False),
    ("tau_value", 0.0, math.inf, False),
    ("smoothing", 0.0, math.inf, False),
    ("active_quantile", 0.0, 1.0, False),
)

_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _as_int(value: Any) -> Optional[int]:
    """``value`` as an int when it is one (a YAML int, an integral float, or digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _as_float(value: Any) -> Optional[float]:
    """``value`` as a float (YAML reads ``1e-3``, without a dot, as a string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def coerce_setting(name: str, value: Any, where: str = "config") -> Any:
    """``value`` of the setting ``name`` as its field's type, from a flag, a YAML/JSON file or
    a Python caller. Numbers written as strings are taken (``lr: 1e-3``), booleans accept
    true/false/yes/no/on/off/1/0, ``topk`` a list or a comma string; anything else is a
    one-line ValueError naming ``where`` and the key (``epochs: true`` is not an epoch count)."""
    kind = _FIELD_KINDS[name]
    out: Any = None
    if value is None and kind in ("str?", "float?"):
        return None
    if kind == "bool":
        if isinstance(value, bool):
            out = value
        elif isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            out = str(value).strip().lower() in _TRUE_WORDS
        expected = "true or false"
    elif kind == "int":
        out, expected = _as_int(value), "an integer"
    elif kind in ("float", "float?"):
        out, expected = _as_float(value), "a number"
    elif kind in ("str", "str?"):
        out = value if isinstance(value, str) else None
        expected = "a string"
    elif kind == "topk":
        parts = (
            value.split(",")
            if isinstance(value, str)
            else value
            if isinstance(value, (list, tuple))
            else [value]
        )
        ints = [_as_int(v) for v in parts]
        out = None if not ints or any(v is None for v in ints) else ints
        expected = "a list of integers (or '10,20')"
    else:  # base: 'mean' or a quantile level
        out = "mean" if value == "mean" else _as_float(value)
        expected = "'mean' or a number in (0, 1)"
    if out is None:
        raise ValueError(f"{where}: {name.replace('_', '-')}: expected {expected}, got {value!r}")
    return out


@dataclass
class TrainConfig:
    """Every knob of a run. Field names match the CLI flags (``--batch-size`` → batch_size)."""

    data: Optional[str] = None  # path, dataset name, or None = embedded synthetic
    protocol: str = "clean"  # "clean" | "paper"
    model: str = "mf"  # "mf" | "lightgcn"
    layers: int = 3  # LightGCN propagation layers
    dim: int = 64
    dropout: float = 0.0  # MF: dropout on the user rows of a batch
    init_std: float = 0.1
    tau: str = "adaptive"  # "adaptive" | "global" | "fixed"
    tau_value: float = 0.1  # the temperature of --tau fixed
    normalize: bool = True  # False: inner-product scores (baseline)
    rank: str = "auto"  # ranking scores: "cosine" | "dot" | "auto" (= training)
    negatives: int = 128
    sampler: str = "uniform"
    pop_gamma: float = 0.75  # popularity sampler exponent
    mixed_pool: str = "uniform"  # sampler "mixed": its shared pool, "uniform" | "popularity"
    hard_negatives: int = 0  # sampler "mixed": per-row hard negatives (0: none)
    include_pos: bool = False
    remove_hits: bool = False
    backend: str = "auto"
    batch_size: int = 1024
    lr: float = 1e-2
    l2: float = 1e-6
    sparse_grad: str = "off"  # MF only: "sparse-adam" | "adagrad" update the touched rows
    shard_tables: str = "off"  # MF only: "row-wise" = TorchRec row-wise sharded tables
    epochs: int = 20
    patience: int = 5  # evaluations without improvement before stopping (0: off;
    # with tau adaptive/global, none during the warm-up)
    eval_every: int = 1
    topk: List[int] = field(default_factory=lambda: [20])
    metric: Optional[str] = None  # selection metric, default recall@<first topk>
    seed: int = 2023
    device: str = "auto"
    threads: int = 0  # CPU threads of torch and the kernels (0: torch's default)
    warmup: int = 5
    base: Union[str, float] = "mean"
    smoothing: float = 1.0
    active_quantile: float = 0.2
    valid_fraction: float = 0.1
    split: str = "random"  # a single interaction file: "random" | "time"
    name: Optional[str] = None
    out: Optional[str] = None
    progress: str = "auto"  # "auto" | "on" | "off"

    @classmethod
    def fields(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def update(self, values: Dict[str, Any], where: str = "config") -> "TrainConfig":
        """Set fields from ``values`` (names with ``-`` or ``_``), each coerced to its type
        by :func:`coerce_setting`; ValueError (one line, naming ``where`` and the key) for
        an unknown key or a value of the wrong type."""
        known = set(self.fields())
        for key, value in values.items():
            k = str(key).replace("-", "_")
            if k not in known:
                raise ValueError(f"{where}: unknown setting {key!r}; known: {sorted(known)}")
            setattr(self, k, coerce_setting(k, value, where))
        return self

    def validate(self) -> None:
        if self.protocol not in ("clean", "paper"):
            raise ValueError(f"--protocol must be clean or paper, got {self.protocol!r}")
        if self.model not in ("mf", "lightgcn"):
            raise ValueError(f"--model must be mf or lightgcn, got {self.model!r}")
        if self.tau not in ("adaptive", "global", "fixed"):
            raise ValueError(f"--tau must be adaptive, global or fixed, got {self.tau!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.split not in SPLIT_RULES:
            raise ValueError(f"--split must be one of {SPLIT_RULES}, got {self.split!r}")
        if self.rank not in ("auto", "cosine", "dot"):
            raise ValueError(f"--rank must be auto, cosine or dot, got {self.rank!r}")
        for name in ("dim", "batch_size", "epochs", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.shard_tables not in SHARDINGS:
            raise ValueError(f"--shard-tables must be one of {SHARDINGS}, got {self.shard_tables!r}")
        if self.shard_tables != "off" and self.model != "mf":
            raise ValueError(
                "--shard-tables is for MF: LightGCN propagates over the whole graph "
                "every step, so its tables stay replicated (train it with --nproc N "
                "and no --shard-tables)"
            )
        if self.sparse_grad not in SPARSE_OPTIMIZERS:
            raise ValueError(f"--sparse-grad must be one of {SPARSE_OPTIMIZERS}, got {self.sparse_grad!r}")
        if self.sparse_grad != "off" and self.model != "mf":
            raise ValueError(
                "--sparse-grad is for MF: LightGCN propagates over the whole graph, so "
                "its table gradients are dense (it trains with dense Adam)"
            )
        if self.shard_tables != "off" and self.sampler == "mixed":
            raise ValueError(
                "--shard-tables takes one negative source (uniform, popularity, shared, "
                "exclude or in-batch), not --sampler mixed"
            )
        if self.shard_tables != "off" and self.sparse_grad == "off":
            raise ValueError(
                "--shard-tables trains with TorchRec's fused optimizer: name it with "
                "--sparse-grad adagrad (EXACT_ADAGRAD, CPU or CUDA) or --sparse-grad "
                "sparse-adam (fused Adam, CUDA only)"
            )
        if self.sampler in ("in-batch", "mixed") and self.batch_size < 2:
            raise ValueError(f"--sampler {self.sampler} needs --batch-size >= 2")
        if self.hard_negatives < 0 or (self.hard_negatives and self.sampler != "mixed"):
            raise ValueError(
                f"--hard-negatives must be >= 0 and is for --sampler mixed, got "
                f"{self.hard_negatives} with --sampler {self.sampler}"
            )
        if self.mixed_pool not in MIXED_POOLS:
            raise ValueError(f"--mixed-pool must be one of {MIXED_POOLS}, got {self.mixed_pool!r}")
        if not self.topk or min(self.topk) < 1:
            raise ValueError(f"--topk must be positive, got {self.topk}")
        for name, low, high, closed in _RANGES:
            value = getattr(self, name)
            inside = low < value < high or (closed and value == low)
            if not (math.isfinite(value) and inside):
                bounds = f"{'[' if closed else '('}{low:g}, {high:g})"
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a finite number in {bounds}, got {value}"
                )
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**62], got {self.seed}")
        if min(self.layers, self.warmup, self.patience, self.threads) < 0:
            name = next(n for n in ("layers", "warmup", "patience", "threads") if getattr(self, n) < 0)
            raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        metric, _, k = self.selection_metric.partition("@")
        if metric not in METRICS or not k.isdigit() or int(k) not in self.topk:
            raise ValueError(
                f"--metric {self.selection_metric!r}: expected <metric>@<K> with metric one "
                f"of {', '.join(METRICS)} and K one of --topk {self.topk}"
            )
        resolve_device(self.device, check_only=True)

    @property
    def selection_metric(self) -> str:
        return self.metric or f"recall@{self.topk[0]}"

    @property
    def rank_cosine(self) -> bool:
        return self.normalize if self.rank == "auto" else self.rank == "cosine"


def _field_kinds() -> Dict[str, str]:
    """Each TrainConfig field's kind for :func:`coerce_setting`, from its annotation."""
    table = {
        "bool": "bool",
        "int": "int",
        "float": "float",
        "str": "str",
        "Optional[str]": "str?",
        "Optional[float]": "float?",
        "List[int]": "topk",
        "Union[str, float]": "base",
    }
    return {f.name: table[str(f.type)] for f in dataclasses.fields(TrainConfig)}


_FIELD_KINDS = _field_kinds()


#: Hyper-parameters of the paper's Gowalla runs (docs/reproduction.md). The epoch
#: budget / patience are ours (the paper's logs ran 309–366 epochs for MF, 142–152 for
#: LightGCN with early stopping).
PRESETS: Dict[str, Dict[str, Any]] = {
    "gowalla-mf-paper": dict(
        data="gowalla",
        protocol="paper",
        model="mf",
        dim=64,
        batch_size=2048,
        negatives=1024,
        sampler="uniform",
        lr=1e-4,
        l2=1e-9,
        dropout=0.1,
        tau="adaptive",
        warmup=100,
        base=0.9,
        smoothing=0.25,
        epochs=1000,
        eval_every=5,
        patience=10,
        topk=[20],
        rank="cosine",
    ),
    "gowalla-lightgcn-paper": dict(
        data="gowalla",
        protocol="paper",
        model="lightgcn",
        layers=3,
        dim=64,
        batch_size=2048,
        sampler="in-batch",
        lr=1e-3,
        l2=1e-5,
        tau="adaptive",
        warmup=100,
        base="mean",
        smoothing=0.6,
        epochs=1000,
        eval_every=5,
        patience=10,
        topk=[20],
        rank="dot",
    ),
}


def load_config_file(path: str) -> Dict[str, Any]:
    """A YAML or JSON mapping of config fields."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    import yaml

    try:
        text = p.read_text(encoding="utf-8")
        values = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise ValueError(f"--config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--config {path}{where}: not valid YAML: {what}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(values).__name__}")
    return values


def resolve_device(name: str, check_only: bool = False) -> Optional[torch.device]:
    """The torch.device of ``--device`` (auto | cpu | cuda | cuda:N); ValueError (one line)
    for another name or a CUDA device this machine lacks. ``check_only``: validate the name
    without querying CUDA."""
    if name == "auto":
        return None if check_only else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if check_only:
        return None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return dev


def read_run_config(run: Union[str, Path], flag: str = "--run") -> TrainConfig:
    """The TrainConfig saved in a run folder's ``config.json``. FileNotFoundError or
    ValueError (one line, naming the file) when it is missing, not JSON, or not settings."""
    cfg_path = Path(run) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{flag} {run}: no config.json (is it a run folder?)")
    try:
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not a readable run config ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{cfg_path}: not a run config (a JSON object of settings)")
    return TrainConfig().update(
        {k: v for k, v in saved.items() if not str(k).startswith("_")}, where=str(cfg_path)
    )
