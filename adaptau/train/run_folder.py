"""A run folder's files: :class:`RunFolder` (the folder of one run and its files by name),
the run lock, atomic writes that never leave a partial file or a temp file behind, appended
log lines, and JSON.

A run folder (``--out``, default ``runs/<name>``) holds

* ``config.json``   the resolved configuration (plus protocol note, dataset statistics)
* ``metrics.jsonl`` one JSON object per epoch (loss, w₀, τ range, seconds, metrics when evaluated)
* ``last.pt``       everything needed to resume: model, optimizer, controller, RNG states
* ``best.pt``       the model and controller of the best evaluation so far
* ``summary.json``  best_epoch, valid and test metrics, seconds_per_epoch, world_size, data, backend
* ``train.log``     the log lines, ``curves.png``, ``tau_hist.png``, ``tau_activity.png``
* ``users.tsv`` / ``items.tsv``  the id mapping when the loader remapped ids

``last.pt`` and ``best.pt`` are written by :class:`adaptau.train.checkpoints.Checkpointer`.
Every file is written atomically (temp file in the same folder, fsync, ``os.replace``).
A folder that already holds a run is refused unless the run is resumed or ``overwrite``
is given, and a running trainer holds an exclusive lock on ``.lock`` in its folder, so two
runs never write one folder; temp files that a killed run left behind are removed when the
next run takes the lock.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from . import plots

__all__ = [
    "RUN_FILES",
    "RunFolder",
    "choose_run_folder",
    "write_run_config",
    "RunLock",
    "RunWriteError",
    "atomic_save",
    "atomic_write_text",
    "append_line",
    "dumps",
]


#: The files a run writes into its folder (``--overwrite`` removes exactly these).
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "last.pt",
    "best.pt",
    "summary.json",
    "train.log",
    "eval.json",
    "curves.png",
    "tau_hist.png",
    "tau_activity.png",
)


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` for the life of the trainer (the OS drops
    it when the process dies, so a killed run never leaves the folder locked)."""

    def __init__(self, folder: Path) -> None:
        import fcntl

        self.path = Path(folder) / ".lock"
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "?"
            self._fh.close()
            raise ValueError(
                f"{folder} is in use by another adaptau run (pid {holder}); "
                "wait for it, or choose another --out"
            ) from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        for stale in Path(folder).glob(".*.tmp-*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        """Drop the lock (closing the file does); idempotent."""
        if not self._fh.closed:
            self._fh.close()


class RunWriteError(OSError):
    """A run-folder file could not be written (a full disk, say); one line naming the file.
    The file's previous version is intact and no temp file is left behind."""


def _write_failed(path: Path, exc: BaseException) -> RunWriteError:
    cause: Optional[BaseException] = exc
    while cause is not None and not getattr(cause, "strerror", None):  # torch.save wraps the OSError
        cause = cause.__context__
    reason = (
        cause.strerror if cause is not None else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    )
    try:
        room = f" ({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free on its disk)"
    except OSError:
        room = ""
    kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
    return RunWriteError(f"cannot write {path}: {reason}{room}; {kept}")


def _replace_atomically(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """``write(fh)`` into a temp file beside ``path``, fsync, ``os.replace``, fsync the folder.
    On any failure the temp file is removed; an I/O failure (``torch.save`` reports a full
    disk as a RuntimeError) becomes a :class:`RunWriteError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):
            raise _write_failed(path, exc) from None
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``
    (:class:`RunWriteError` when it cannot be written)."""
    _replace_atomically(Path(path), lambda fh: torch.save(obj, fh), "wb")


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path``; on failure the file is cut back to its
    previous length and :class:`RunWriteError` is raised."""
    with open(path, "a", encoding="utf-8") as fh:
        size = fh.tell()
        try:
            fh.write(line + "\n")
            fh.flush()
        except OSError as exc:
            try:
                fh.truncate(size)
            except OSError:
                pass
            raise _write_failed(path, exc) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:class:`RunWriteError` when it cannot be written)."""
    _replace_atomically(Path(path), lambda fh: fh.write(text), "w")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def dumps(obj) -> str:
    """``obj`` as indented JSON; numpy scalars and paths become numbers and strings."""
    return json.dumps(obj, indent=2, default=_json_default)


def _new_run_folder(cfg, dataset_name: str) -> Path:
    """``--out``, or ``runs/<name>`` (``--name`` or dataset-model-tau[-paper]), numbered when
    that name holds a run."""
    if cfg.out:
        return Path(cfg.out)
    base = f"{dataset_name}-{cfg.model}-{cfg.tau}" + ("" if cfg.protocol == "clean" else "-paper")
    out = Path("runs") / (cfg.name or base)
    if (out / "last.pt").exists() or (out / "config.json").exists():
        k = 1
        while Path(f"{out}-{k}").exists():
            k += 1
        out = Path(f"{out}-{k}")
    return out


def choose_run_folder(
    cfg,
    dataset_name: str,
    *,
    resume: Optional[str],
    overwrite: bool,
    world_size: int = 1,
    is_main: bool = True,
) -> Path:
    """The run's folder, created: ``resume`` (which must hold a ``last.pt``), or a new one
    (:func:`_new_run_folder`), refused when it already holds a run unless ``overwrite``.
    Collective when ``world_size > 1``: rank 0 picks and every rank gets its choice."""
    if resume:
        out = Path(resume)
        if not (out / "last.pt").is_file():
            raise FileNotFoundError(f"--resume {resume}: no last.pt in that folder")
        return out
    if world_size > 1:  # rank 0 picks the folder (the default name probes the disk)
        from . import distributed as dist

        out = Path(dist.broadcast_object(str(_new_run_folder(cfg, dataset_name)) if is_main else None))
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
        return out
    out = _new_run_folder(cfg, dataset_name)
    used = [f for f in RUN_FILES if (out / f).exists()]
    if used and not overwrite:
        raise ValueError(
            f"--out {out} already holds a run ({', '.join(used)}): continue it "
            f"with --resume {out}, replace it with --overwrite, or choose "
            "another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_run_config(out: Path, cfg, protocol_note: str, dataset) -> None:
    """``config.json`` (the settings, the protocol note, the dataset's statistics, the
    versions) and, when the loader remapped ids, ``users.tsv`` / ``items.tsv``."""
    import dataclasses

    from .. import __version__

    payload = {
        **dataclasses.asdict(cfg),
        "_protocol_note": protocol_note,
        "_dataset": dataset.stats(),
        "_adaptau_version": __version__,
        "_torch_version": torch.__version__,
    }
    atomic_write_text(out / "config.json", dumps(payload))
    for side, ids in (("users", dataset.user_ids), ("items", dataset.item_ids)):
        if ids is not None and not (out / f"{side}.tsv").exists():
            atomic_write_text(
                out / f"{side}.tsv", "index\tid\n" + "".join(f"{k}\t{x}\n" for k, x in enumerate(ids))
            )


class RunFolder:
    """The folder of one run and its files by name: the log, ``config.json``,
    ``metrics.jsonl``, ``summary.json`` and the plots (``last.pt`` / ``best.pt``: see
    :class:`adaptau.train.checkpoints.Checkpointer`).

    Only rank 0 writes: on other ranks (``is_main`` False) the writing methods do nothing.
    ``echo`` receives every log line (``print`` by default).
    """

    def __init__(self, path: Path, *, is_main: bool = True, echo: Callable[[str], Any] = print) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.echo = echo
        self.lock: Optional[RunLock] = None

    @classmethod
    def open(
        cls,
        cfg,
        dataset_name: str,
        *,
        resume: Optional[str] = None,
        overwrite: bool = False,
        world_size: int = 1,
        is_main: bool = True,
        echo: Callable[[str], Any] = print,
    ) -> "RunFolder":
        """The run's folder (:func:`choose_run_folder`), locked by rank 0 (:class:`RunLock`);
        with ``overwrite`` and no ``resume``, the files of the run it held are removed."""
        folder = cls(
            choose_run_folder(
                cfg, dataset_name, resume=resume, overwrite=overwrite, world_size=world_size, is_main=is_main
            ),
            is_main=is_main,
            echo=echo,
        )
        if is_main:
            folder.lock = RunLock(folder.path)
            if overwrite and not resume:
                for name in RUN_FILES:
                    (folder.path / name).unlink(missing_ok=True)
        return folder

    def release(self) -> None:
        """Drop the run lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()

    def log(self, msg: str) -> None:
        """Echo ``msg`` and append it to ``train.log``."""
        if self.is_main:
            self.echo(msg)
            append_line(self.path / "train.log", msg)

    def write_config(self, cfg, protocol_note: str, dataset) -> None:
        """``config.json`` and the id mappings (:func:`write_run_config`)."""
        if self.is_main:
            write_run_config(self.path, cfg, protocol_note, dataset)

    def append_metrics(self, record: Dict[str, Any]) -> None:
        """One epoch's record as a line of ``metrics.jsonl``."""
        if self.is_main:
            append_line(self.path / "metrics.jsonl", json.dumps(record, default=_json_default))

    def rewrite_metrics(self, history: List[Dict[str, Any]]) -> None:
        """``metrics.jsonl`` holding exactly ``history`` (a resumed run drops the lines of
        epochs after its checkpoint)."""
        if self.is_main:
            atomic_write_text(
                self.path / "metrics.jsonl",
                "".join(json.dumps(h, default=_json_default) + "\n" for h in history),
            )

    def read_summary(self) -> Optional[Dict[str, Any]]:
        """``summary.json``, or None when it is missing or not a JSON object."""
        try:
            summary = json.loads((self.path / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """``summary.json``."""
        if self.is_main:
            atomic_write_text(self.path / "summary.json", dumps(summary))

    def write_plots(
        self, history: List[Dict[str, Any]], metric: str, tau_snapshots, user_scale: torch.Tensor, activity
    ) -> None:
        """``curves.png``, ``tau_hist.png`` and ``tau_activity.png``; a failure is logged as a
        warning, never raised (the plots are a convenience)."""
        if not self.is_main:
            return
        try:
            plots.run_plots(history, metric, tau_snapshots, user_scale, activity, self.path)
        except Exception as exc:
            self.log(f"warning: plotting failed: {exc!r}")
