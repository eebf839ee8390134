"""Datasets for the trainer: loaders, name resolution, protocols.

Formats
-------
* **LightGCN text** (a folder with ``train.txt``, optional ``valid.txt``, ``test.txt``): one
  line per user, ``user item item ...``, 0-based non-negative integer ids separated by
  whitespace. ``n_users`` / ``n_items`` = 1 + the largest id seen in any split.
* **CSV / TSV** interaction files (``.csv``, ``.tsv``, ``.txt`` with a delimiter): one
  ``user,item[,…]`` pair per line; the delimiter (tab, comma, semicolon, ``|`` or spaces)
  and a header line are detected. Ids are arbitrary strings and are remapped to
  ``0 … n−1`` (numeric ids in numeric order, others in sorted order); the mapping travels
  with the :class:`Dataset` (``user_ids`` / ``item_ids``) and the trainer saves it in the
  run folder.
* **RecBole atomic files** (``.inter``): a tab-separated header ``user_id:token
  item_id:token …`` followed by rows; ids are remapped like CSV ids.

A single interaction file is split per user into train / valid / test (seeded, 80/10/10
by default). A folder may instead hold ``train.*``, ``valid.*`` (optional) and ``test.*``
files of one format (e.g. ``train.csv``/``test.csv`` or RecBole's
``name.train.inter``/``name.test.inter``).

Bad data raises :class:`DataError` naming ``file:line`` and what was wrong (malformed
line, negative or non-integer id in the LightGCN format, empty file). Duplicate
(user, item) pairs inside a split are dropped and counted; users without train items are
counted and reported in :attr:`Dataset.notes`.

Protocols (:func:`prepare`)
---------------------------
* ``clean``: train on train, select on valid (carved from train, seeded, when the dataset
  has no valid split), report test once.
* ``paper``: train on train ∪ valid, select the epoch on **test** (as the Adap-τ public code
  does; reports must say so).
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

from .synthetic import synthetic_interactions

__all__ = [
    "DataError",
    "Dataset",
    "Split",
    "load_dataset",
    "load_lightgcn",
    "load_interactions",
    "make_synthetic",
    "resolve_data",
    "data_roots",
    "prepare",
    "pairs_to_csr",
    "csr_pairs",
    "carve_split",
]

SPLITS = ("train", "valid", "test")
_INTERACTION_EXTS = (".csv", ".tsv", ".inter", ".dat")
#: How a single interaction file is split per user (``--split``).
SPLIT_RULES = ("random", "time")
#: Header names of the user and the item column, as stems: a name matches when, lower-cased
#: and without a ``:type`` suffix, an ``_id``/``id`` suffix and a plural ``s``, it is one of them
#: (``user_id``, ``UserID``, ``customer``, ``songs``, ``movie_id:token`` ...).
_USER_COLUMNS = (
    "user",
    "u",
    "uid",
    "customer",
    "visitor",
    "client",
    "member",
    "account",
    "person",
    "reader",
    "listener",
    "viewer",
    "buyer",
    "player",
)
_ITEM_COLUMNS = (
    "item",
    "i",
    "iid",
    "movie",
    "product",
    "artist",
    "business",
    "track",
    "book",
    "song",
    "video",
    "article",
    "venue",
    "poi",
    "location",
    "sku",
    "game",
    "recipe",
    "post",
    "news",
    "film",
    "show",
    "restaurant",
    "hotel",
    "app",
)


_TIME_COLUMNS = ("timestamp", "time", "ts", "datetime", "date", "unixtime")


def _column_is(name: str, stems: Sequence[str]) -> bool:
    stem = re.sub(r"[\s_-]*ids?$", "", name.split(":", 1)[0]) or name
    return stem in stems or (stem.endswith("s") and stem[:-1] in stems)


class DataError(ValueError):
    """A data file is missing, empty or malformed (the message names file:line)."""


# ------------------------------------------------------------------------------ containers
def pairs_to_csr(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> sp.csr_matrix:
    """Binary CSR ``[num_users, num_items]`` from pair arrays (duplicates collapse to 1)."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    data = np.ones(users.shape[0], dtype=np.float32)
    m = sp.csr_matrix((data, (users, items)), shape=(num_users, num_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def csr_pairs(m: sp.csr_matrix) -> Tuple[np.ndarray, np.ndarray]:
    """``(users, items)`` int64 arrays of the non-zeros of a CSR matrix, row-major."""
    m = m.tocsr()
    users = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    return users, m.indices.astype(np.int64)


def _union(a: sp.csr_matrix, b: Optional[sp.csr_matrix]) -> sp.csr_matrix:
    if b is None:
        return a
    m = (a + b).tocsr()
    m.data[:] = 1.0
    m.sort_indices()
    return m


@dataclass
class Dataset:
    """Interactions as binary CSR matrices ``[num_users, num_items]``.

    ``user_ids`` / ``item_ids`` hold the original id string of each index when the
    loader remapped ids (CSV, RecBole), else ``None`` (ids are the indices).
    ``notes`` collects what the loader dropped or noticed (duplicates, empty users).
    """

    name: str
    num_users: int
    num_items: int
    train: sp.csr_matrix
    test: sp.csr_matrix
    valid: Optional[sp.csr_matrix] = None
    source: str = ""
    user_ids: Optional[List[str]] = None
    item_ids: Optional[List[str]] = None
    notes: List[str] = field(default_factory=list)
    duplicates: Dict[str, int] = field(default_factory=dict)

    def stats(self) -> Dict[str, object]:
        """Sizes and densities for logs and ``summary.json``."""
        out: Dict[str, object] = {
            "name": self.name,
            "source": self.source,
            "num_users": self.num_users,
            "num_items": self.num_items,
        }
        for split in SPLITS:
            m = getattr(self, split)
            out[split] = int(m.nnz) if m is not None else None
        train_rows = np.diff(self.train.indptr)
        out["users_without_train"] = int((train_rows == 0).sum())
        out["density"] = float(self.train.nnz) / max(1, self.num_users * self.num_items)
        out["duplicates_dropped"] = dict(self.duplicates)
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"Dataset({self.name!r}: {self.num_users} users, {self.num_items} items, "
            f"train {s['train']}, valid {s['valid']}, test {s['test']})"
        )


@dataclass
class Split:
    """What the trainer uses under a protocol (see :func:`prepare`)."""

    protocol: str
    train: sp.csr_matrix  # the interactions trained on
    select: sp.csr_matrix  # the split the epoch is selected on
    select_exclude: sp.csr_matrix  # masked when ranking for ``select``
    select_name: str  # "valid" or "test"
    test: sp.csr_matrix  # reported once (== select under the paper protocol)
    test_exclude: sp.csr_matrix  # masked when ranking for ``test``
    note: str = ""


# ----------------------------------------------------------------------- LightGCN format
def _lightgcn_id(path: Path, lineno: int, col: int, tok: str) -> int:
    """One id of a LightGCN line: plain ASCII digits only (``int`` would also take ``+7``,
    ``1_0`` and non-ASCII digits, which are not ids in this format)."""
    what = "user" if col == 0 else "item"
    if tok.isascii() and tok.isdigit():
        return int(tok)
    if tok.startswith("-") and tok[1:].isascii() and tok[1:].isdigit():
        raise DataError(f"{path}:{lineno}: negative {what} id {int(tok)} (field {col + 1})")
    raise DataError(
        f"{path}:{lineno}: {what} id {tok!r} (field {col + 1}) is not an integer; "
        "the LightGCN format is 'user item item ...' with 0-based integer ids"
    )


def _text_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, text) of a UTF-8 file, decoded line by line so that a byte that is not
    UTF-8 is a DataError naming its file and line; a leading BOM is dropped."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line)"
                ) from None
            yield lineno, (text[1:] if lineno == 1 and text.startswith("\ufeff") else text)


def _read_lightgcn_file(path: Path) -> Tuple[np.ndarray, np.ndarray, int, set]:
    """Pairs of one LightGCN text file; returns users, items, duplicates, users listed."""
    users: List[int] = []
    items: List[int] = []
    listed = set()
    nonblank = 0
    for lineno, line in _text_lines(path):
        tokens = line.split()
        if not tokens:
            continue
        nonblank += 1
        ids = [_lightgcn_id(path, lineno, col, tok) for col, tok in enumerate(tokens)]
        user = ids[0]
        listed.add(user)
        users.extend([user] * (len(ids) - 1))
        items.extend(ids[1:])
    if nonblank == 0:
        raise DataError(f"{path}: the file is empty")
    u = np.asarray(users, dtype=np.int64)
    i = np.asarray(items, dtype=np.int64)
    return u, i, nonblank, listed


def _first_of_pairs(users: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """Positions of each distinct (user, item) pair's first occurrence, in order."""
    key = users * np.int64(num_items) + items
    _, first = np.unique(key, return_index=True)
    first.sort()
    return first


def _dedupe(users: np.ndarray, items: np.ndarray, num_items: int) -> Tuple[np.ndarray, np.ndarray, int]:
    if users.size == 0:
        return users, items, 0
    first = _first_of_pairs(users, items, num_items)
    return users[first], items[first], int(users.size - first.size)


#: How many ids of a LightGCN file's id space may go unused before loading is refused: the
#: ids index the embedding tables directly, so a stray large id would allocate its rows.
MAX_UNUSED_IDS = 1 << 20


def _check_dense_ids(what: str, size: int, ids: Dict[str, np.ndarray], files: Dict[str, Path]) -> None:
    """DataError naming the file of the largest id when the ids 0..size-1 are mostly unused."""
    used = np.unique(np.concatenate([a for a in ids.values()])).size
    if size - used <= max(used, MAX_UNUSED_IDS):
        return
    split = max(ids, key=lambda s: ids[s].max(initial=-1))
    line = _line_of(files[split], what, size - 1)
    raise DataError(
        f"{files[split]}:{line}: {what} id {size - 1} would make a table of {size:,} rows "
        f"for {used:,} distinct ids; LightGCN-format ids index the tables directly and "
        "must be dense (0..N-1): renumber them, or give a CSV/TSV file, whose ids are remapped"
    )


def _line_of(path: Path, what: str, value: int) -> int:
    """The first line of a LightGCN file holding ``value`` as a user (field 1) or an item."""
    tok = str(value)
    for lineno, line in _text_lines(path):
        fields = line.split()
        if (fields[:1] == [tok]) if what == "user" else (tok in fields[1:]):
            return lineno
    return 0


def load_lightgcn(folder: os.PathLike, name: Optional[str] = None) -> Dataset:
    """Load a LightGCN-format folder (``train.txt``, optional ``valid.txt``, ``test.txt``)."""
    folder = Path(folder)
    files = {s: folder / f"{s}.txt" for s in SPLITS}
    for required in ("train", "test"):
        if not files[required].is_file():
            raise DataError(
                f"{folder}: no {required}.txt (the LightGCN format needs train.txt "
                "and test.txt, valid.txt is optional)"
            )
    raw = {}
    for split in SPLITS:
        if files[split].is_file():
            raw[split] = _read_lightgcn_file(files[split])
    num_users = 1 + max(int(max(r[0].max(initial=-1), max(r[3], default=-1))) for r in raw.values())
    num_items = 1 + max(int(r[1].max(initial=-1)) for r in raw.values())
    if num_items <= 0:
        raise DataError(f"{folder}: no interactions in any split")
    for what, col, size in (("user", 0, num_users), ("item", 1, num_items)):
        _check_dense_ids(what, size, {s: r[col] for s, r in raw.items()}, files)
    ds = _assemble(
        name or folder.name,
        str(folder),
        num_users,
        num_items,
        {s: (r[0], r[1], files[s]) for s, r in raw.items()},
    )
    return ds


def _assemble(
    name: str,
    source: str,
    num_users: int,
    num_items: int,
    pairs: Dict[str, Tuple[np.ndarray, np.ndarray, Path]],
    user_ids=None,
    item_ids=None,
) -> Dataset:
    mats: Dict[str, sp.csr_matrix] = {}
    dups: Dict[str, int] = {}
    notes: List[str] = []
    for split, (u, i, path) in pairs.items():
        u, i, ndup = _dedupe(u, i, num_items)
        if ndup:
            dups[split] = ndup
            notes.append(f"{path}: dropped {ndup} duplicate (user, item) pairs")
        mats[split] = pairs_to_csr(u, i, num_users, num_items)
    if mats["train"].nnz == 0:
        raise DataError(f"{pairs['train'][2]}: no training interactions")
    train_rows = np.diff(mats["train"].indptr)
    for split in ("valid", "test"):
        if split in mats:
            rows = np.diff(mats[split].indptr)
            orphans = int(((rows > 0) & (train_rows == 0)).sum())
            if orphans:
                notes.append(
                    f"{orphans} users have {split} items but no train items "
                    "(they are still ranked, from their initial embeddings)"
                )
    no_train = int((train_rows == 0).sum())
    if no_train:
        notes.append(f"{no_train} of {num_users} users have no train items")
    return Dataset(
        name=name,
        num_users=num_users,
        num_items=num_items,
        train=mats["train"],
        valid=mats.get("valid"),
        test=mats["test"],
        source=source,
        user_ids=user_ids,
        item_ids=item_ids,
        notes=notes,
        duplicates=dups,
    )


# -------------------------------------------------------------- CSV / TSV / RecBole files
def _sniff_delimiter(path: Path, first: str) -> Optional[str]:
    if "::" in first:  # MovieLens ratings.dat: user::item::rating::timestamp
        return "::"
    if path.suffix == ".inter" or "\t" in first:
        return "\t"
    for d in (",", ";", "|"):
        if d in first:
            return d
    return None  # whitespace


def _split_line(line: str, delim: Optional[str]) -> List[str]:
    if delim is None:
        return line.split()
    if delim == "::":
        return [f.strip() for f in line.rstrip("\r\n").split("::")]
    if delim == "," and '"' in line:
        return next(csv.reader(io.StringIO(line)))
    return [f.strip() for f in line.rstrip("\r\n").split(delim)]


def _is_int(tok: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", tok.strip()) is not None


def _time_column(fields: List[str]) -> Optional[int]:
    """The index of a header's timestamp column (``timestamp``, ``timestamp:float`` ...), or None."""
    names = [f.strip().strip('"').lower().split(":", 1)[0] for f in fields]
    return next((k for k, n in enumerate(names) if n in _TIME_COLUMNS), None)


def _header_columns(fields: List[str], path: Path) -> Optional[Tuple[int, int]]:
    """Column indices of user and item if ``fields`` is a header line, else None."""
    names = [f.strip().strip('"').lower() for f in fields]
    bare = [n.split(":", 1)[0] for n in names]
    typed = any(":" in n for n in names) or path.suffix == ".inter"
    ucol = next((k for k, n in enumerate(bare) if _column_is(n, _USER_COLUMNS)), None)
    icol = next((k for k, n in enumerate(bare) if _column_is(n, _ITEM_COLUMNS)), None)
    if ucol is not None and icol is not None and ucol != icol:
        return ucol, icol
    if typed:
        if ucol is None:
            ucol = next((k for k, n in enumerate(bare) if "user" in n), None)
        if icol is None:
            icol = next((k for k, n in enumerate(bare) if "item" in n), None)
        if ucol is None or icol is None:
            raise DataError(f"{path}:1: header {fields} has no user_id / item_id field")
        return ucol, icol
    return None


def _read_interaction_file(path: Path) -> Tuple[List[str], List[str], Optional[np.ndarray]]:
    """Raw (user, item) id strings of a CSV/TSV/RecBole/MovieLens file (header detected), and
    the rows' timestamps as float64 when the file has them (a ``timestamp`` header column,
    or the fourth field of MovieLens' ``user::item::rating::timestamp``), else None."""
    body = [(n, ln) for n, ln in _text_lines(path) if ln.strip() and not ln.lstrip().startswith("#")]
    if not body:
        raise DataError(f"{path}: the file is empty")
    delim = _sniff_delimiter(path, body[0][1])
    first = _split_line(body[0][1], delim)
    cols = _header_columns(first, path)
    start, tcol = 0, None
    if cols is not None:
        start, tcol = 1, _time_column(first)
    else:
        # no recognizable names: a header if its first two fields are non-integers while
        # the following rows' are integers
        nxt = [_split_line(ln, delim) for _, ln in body[1:6]]
        if (
            len(first) >= 2
            and not (_is_int(first[0]) and _is_int(first[1]))
            and nxt
            and all(len(f) >= 2 and _is_int(f[0]) and _is_int(f[1]) for f in nxt)
        ):
            start = 1
            tcol = _time_column(first)
        cols = (0, 1)
        if delim == "::" and len(first) >= 4:
            tcol = 3
    if start == 1 and len(body) == 1:
        raise DataError(f"{path}: the file has a header but no interactions")
    ucol, icol = cols
    need = max(ucol, icol) + 1
    users: List[str] = []
    items: List[str] = []
    times: List[float] = []
    for lineno, line in body[start:]:
        fields = _split_line(line, delim)
        if len(fields) < need:
            raise DataError(
                f"{path}:{lineno}: expected at least {need} fields (user, item), "
                f"got {len(fields)}: {line.strip()!r}"
            )
        u, i = fields[ucol].strip(), fields[icol].strip()
        if not u or not i:
            raise DataError(f"{path}:{lineno}: empty {'user' if not u else 'item'} id: {line.strip()!r}")
        users.append(u)
        items.append(i)
        if tcol is not None:
            try:
                times.append(float(fields[tcol]))
            except (IndexError, ValueError):
                raise DataError(
                    f"{path}:{lineno}: timestamp (field {tcol + 1}) is not a number: {line.strip()!r}"
                ) from None
    return users, items, (np.asarray(times, dtype=np.float64) if tcol is not None else None)


def _id_order(ids: Sequence[str]) -> List[str]:
    uniq = set(ids)
    if all(_is_int(x) for x in uniq):
        return sorted(uniq, key=lambda x: int(x))
    return sorted(uniq)


def carve_split(
    users: np.ndarray, items: np.ndarray, fractions: Sequence[float], seed: int, min_keep: int = 1
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Split pairs per user, at random (seeded): part 0 keeps the rest, parts 1.. take
    ``round(f·n_u)`` of each user's pairs (at least one when a user has ≥ 3 pairs), never
    leaving fewer than ``min_keep`` pairs in part 0."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    rng = np.random.RandomState(seed)
    order = np.lexsort((rng.random_sample(users.size), users))
    su, si = users[order], items[order]
    counts = np.bincount(su, minlength=int(su.max(initial=-1)) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(su.size) - starts[su]
    n = counts[su]
    part = np.zeros(su.size, dtype=np.int64)
    upper = np.zeros(su.size, dtype=np.int64)
    available = np.maximum(n - min_keep, 0)
    for k, f in enumerate(fractions, 1):
        take = np.where(n >= 3, np.maximum(1, np.rint(f * n)), np.rint(f * n)).astype(np.int64)
        lower = upper
        upper = np.minimum(lower + take, available)
        part[(rank >= lower) & (rank < upper)] = k
    return [(su[part == k], si[part == k]) for k in range(len(fractions) + 1)]


def leave_last_out(
    users: np.ndarray, items: np.ndarray, times: np.ndarray
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Split pairs per user by time (RecBole's ``TO`` ordering, leave-one-out): each user's
    latest pair goes to test and the one before it to valid (users with at least 3 pairs;
    ties in time keep file order); the rest is train."""
    order = np.lexsort((np.arange(users.size), times, users))  # by user, then time, then row
    u, i = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    counts = np.diff(np.r_[starts, u.size])
    last = starts + counts - 1
    part = np.zeros(u.size, dtype=np.int64)
    long_enough = counts >= 3
    part[last[long_enough]] = 2
    part[last[long_enough] - 1] = 1
    return [(u[part == k], i[part == k]) for k in range(3)]


def _single_interaction_file(folder: Path) -> Optional[Path]:
    """The one interaction file of a folder without train/test files: ``<folder>.inter``
    (RecBole), ``ratings.*`` (MovieLens), or the folder's only interaction file."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _INTERACTION_EXTS)
    for pick in (
        [p for p in found if p.name == folder.name + ".inter"],
        [p for p in found if p.stem == "ratings"],
        found,
    ):
        if len(pick) == 1:
            return pick[0]
    return None


def load_interactions(
    path: os.PathLike,
    name: Optional[str] = None,
    *,
    seed: int = 0,
    split_fractions: Tuple[float, float] = (0.1, 0.1),
    split: str = "random",
) -> Dataset:
    """Load a CSV/TSV/RecBole ``.inter``/MovieLens ``::`` file, split per user into
    train/valid/test (``split="random"``: seeded, ``split_fractions`` of each user's pairs
    to valid and test; ``"time"``: :func:`leave_last_out` by the file's timestamps), or a
    folder of ``train.*``/``valid.*``/``test.*`` interaction files, or a folder with one
    interaction file (``<folder>.inter``, ``ratings.dat``)."""
    if split not in SPLIT_RULES:
        raise DataError(f"--split must be one of {SPLIT_RULES}, got {split!r}")
    path = Path(path)
    if path.is_dir() and not any(
        p.is_file() and p.suffix in _INTERACTION_EXTS and p.stem.split(".")[-1] in SPLITS
        for p in path.iterdir()
    ):
        single = _single_interaction_file(path)
        if single is not None:
            return load_interactions(
                single, name or path.name, seed=seed, split_fractions=split_fractions, split=split
            )
    if path.is_dir():
        if split != "random":
            raise DataError(
                f"{path}: --split {split} is for a single interaction file; this folder "
                "has its own train/test files"
            )
        files: Dict[str, Path] = {}
        for split in SPLITS:
            hits = sorted(
                p
                for p in path.iterdir()
                if p.is_file()
                and p.suffix in _INTERACTION_EXTS
                and (p.stem == split or p.stem.endswith("." + split))
            )
            if len(hits) > 1:
                raise DataError(f"{path}: several {split} files: {[h.name for h in hits]}")
            if hits:
                files[split] = hits[0]
        if "train" not in files or "test" not in files:
            raise DataError(f"{path}: expected train.* and test.* interaction files")
        raw = {s: _read_interaction_file(p)[:2] for s, p in files.items()}
        all_users = [u for r in raw.values() for u in r[0]]
        all_items = [i for r in raw.values() for i in r[1]]
    else:
        files = {}
        all_users, all_items, times = _read_interaction_file(path)
        if split == "time" and times is None:
            raise DataError(
                f"{path}: --split time needs a timestamp column (a header field named "
                f"one of {', '.join(_TIME_COLUMNS)}, or MovieLens' user::item::rating::timestamp)"
            )
    user_ids = _id_order(all_users)
    item_ids = _id_order(all_items)
    umap = {x: k for k, x in enumerate(user_ids)}
    imap = {x: k for k, x in enumerate(item_ids)}
    nu, ni = len(user_ids), len(item_ids)
    if files:
        pairs = {
            s: (
                np.fromiter((umap[x] for x in raw[s][0]), np.int64, len(raw[s][0])),
                np.fromiter((imap[x] for x in raw[s][1]), np.int64, len(raw[s][1])),
                p,
            )
            for s, p in files.items()
        }
    else:
        u = np.fromiter((umap[x] for x in all_users), np.int64, len(all_users))
        i = np.fromiter((imap[x] for x in all_items), np.int64, len(all_items))
        if split == "time":  # the latest time of a repeated pair counts
            order = np.argsort(-times, kind="stable")
            u, i, times = u[order], i[order], times[order]
        keep = _first_of_pairs(u, i, ni)
        ndup = int(u.size - keep.size)
        u, i = u[keep], i[keep]
        if split == "time":
            parts = leave_last_out(u, i, times[keep])
        else:
            parts = carve_split(u, i, split_fractions, seed)
        pairs = {s: (pu, pi, path) for s, (pu, pi) in zip(SPLITS, parts)}
        ds = _assemble(name or path.stem, str(path), nu, ni, pairs, user_ids, item_ids)
        if ndup:
            ds.duplicates["all"] = ndup
            ds.notes.insert(0, f"{path}: dropped {ndup} duplicate (user, item) pairs")
        if split == "time":
            ds.notes.append(
                "split per user by time: the latest interaction to test, the one "
                "before to valid (users with at least 3)"
            )
        else:
            ds.notes.append(
                f"split per user at random (seed {seed}): "
                f"valid {split_fractions[0]:.0%}, test {split_fractions[1]:.0%}"
            )
        return ds
    return _assemble(name or path.name, str(path), nu, ni, pairs, user_ids, item_ids)


def make_synthetic(num_users: int = 5000, num_items: int = 3000, *, seed: int = 2023, **options) -> Dataset:
    """The embedded synthetic dataset (:mod:`adaptau.train.synthetic`): the pairs of
    :func:`~adaptau.train.synthetic.synthetic_interactions` (``options``: its other keywords),
    split per user 80/10/10 with seed ``seed + 1``."""
    u, i = synthetic_interactions(num_users, num_items, seed=seed, **options)
    parts = carve_split(u, i, (0.1, 0.1), seed + 1)
    pairs = {s: (pu, pi, "synthetic") for s, (pu, pi) in zip(SPLITS, parts)}
    name = "synthetic" if (num_users, num_items) == (5000, 3000) else f"synthetic-{num_users}x{num_items}"
    ds = _assemble(name, f"adaptau.synthetic(seed={seed})", num_users, num_items, pairs)
    ds.notes.append("synthetic: latent-factor taste + power-law item popularity, split per user 80/10/10")
    return ds


# --------------------------------------------------------------------------- resolution
def data_roots() -> List[Path]:
    """Folders searched for named datasets: ``$ADAPTAU_DATA`` (``os.pathsep``-separated),
    then ``../shared/data`` relative to the working directory, then relative to the
    repository holding this package."""
    roots: List[Path] = []
    env = os.environ.get("ADAPTAU_DATA")
    if env:
        roots += [Path(p) for p in env.split(os.pathsep) if p]
    roots.append(Path.cwd() / ".." / "shared" / "data")
    roots.append(
        Path(__file__).resolve().parents[3] / "shared" / "data"
    )  # this file: <repo>/adaptau/train/data.py
    out = []
    for r in roots:
        if r not in out:
            out.append(r)
    return out


def resolve_data(spec: str) -> Path:
    """A path for ``--data``: an existing file or folder, or a dataset name found under
    :func:`data_roots`."""
    p = Path(os.path.expanduser(spec))
    if p.exists():
        return p
    if os.sep not in spec and "/" not in spec:
        for root in data_roots():
            cand = root / spec
            if cand.exists():
                return cand.resolve()
    tried = ", ".join(str(r) for r in data_roots())
    raise DataError(
        f"dataset {spec!r} not found: not a path, and not a folder under "
        f"$ADAPTAU_DATA or the default roots ({tried})"
    )


def load_dataset(spec: Optional[str] = None, *, seed: int = 0, split: str = "random") -> Dataset:
    """Load ``spec`` (path or name); ``None``/``"synthetic"`` gives the embedded synthetic set.
    ``split`` (``random`` | ``time``) is how a single interaction file is split."""
    if spec is None or spec == "synthetic" or spec.startswith("synthetic:"):
        kwargs = {}
        if spec and spec.startswith("synthetic:"):
            for part in spec.split(":", 1)[1].split(","):
                if part:
                    k, v = part.split("=")
                    kwargs[k.strip()] = int(v)
        return _no_split_rule(make_synthetic(**kwargs), split)
    path = resolve_data(spec)
    if path.is_dir():
        if (path / "train.txt").is_file():
            return _no_split_rule(load_lightgcn(path), split)
        return load_interactions(path, seed=seed, split=split)
    if path.suffix == ".txt" and path.name in ("train.txt", "test.txt", "valid.txt"):
        return _no_split_rule(load_lightgcn(path.parent), split)
    return load_interactions(path, seed=seed, split=split)


def _no_split_rule(ds: Dataset, split: str) -> Dataset:
    if split != "random":
        raise DataError(
            f"{ds.source or ds.name}: --split {split} is for a single interaction "
            "file with timestamps; this dataset comes split"
        )
    return ds


# ---------------------------------------------------------------------------- protocols
def prepare(ds: Dataset, protocol: str = "clean", *, seed: int = 0, valid_fraction: float = 0.1) -> Split:
    """Choose train / selection / test matrices for ``protocol`` ("clean" or "paper")."""
    if protocol == "clean":
        train, valid = ds.train, ds.valid
        note = "clean protocol: trained on train, epoch selected on valid, test reported once"
        if valid is None:
            u, i = csr_pairs(ds.train)
            (tu, ti), (vu, vi) = carve_split(u, i, (valid_fraction,), seed)
            train = pairs_to_csr(tu, ti, ds.num_users, ds.num_items)
            valid = pairs_to_csr(vu, vi, ds.num_users, ds.num_items)
            note += (
                f" (no valid split in the data: carved {valid.nnz} pairs, "
                f"{valid_fraction:.0%} per user, seed {seed}, out of train)"
            )
        return Split("clean", train, valid, train, "valid", ds.test, _union(train, valid), note)
    if protocol == "paper":
        train = _union(ds.train, ds.valid)
        note = (
            "paper protocol: trained on train ∪ valid and the epoch selected on TEST, as the "
            "Adap-τ public code does (test figures are optimistic)"
        )
        return Split("paper", train, ds.test, train, "test", ds.test, train, note)
    raise ValueError(f"protocol must be 'clean' or 'paper', got {protocol!r}")
