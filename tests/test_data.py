"""Loaders (LightGCN text, CSV/TSV, RecBole .inter), bad data, name resolution, protocols."""

import random

import numpy as np
import pytest

from adaptau.train.data import (
    DataError,
    carve_split,
    csr_pairs,
    load_dataset,
    load_interactions,
    load_lightgcn,
    make_synthetic,
    prepare,
    resolve_data,
)


def write(path, text):
    path.write_text(text)
    return path


def pairs(m):
    u, i = csr_pairs(m)
    return sorted(zip(u.tolist(), i.tolist()))


# ------------------------------------------------------------------------------ LightGCN
@pytest.fixture
def lgcn(tmp_path):
    write(tmp_path / "train.txt", "0 1 2 3\n1 0 4 4\n\n3 2\n")  # user 1 lists item 4 twice
    write(tmp_path / "valid.txt", "0 4\n1 2\n")
    write(tmp_path / "test.txt", "0 0\n1 3\n2 5\n")  # user 2: test only
    return tmp_path


def test_lightgcn_folder(lgcn):
    ds = load_lightgcn(lgcn)
    assert (ds.num_users, ds.num_items) == (4, 6)
    assert pairs(ds.train) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 4), (3, 2)]
    assert pairs(ds.valid) == [(0, 4), (1, 2)]
    assert pairs(ds.test) == [(0, 0), (1, 3), (2, 5)]
    assert ds.duplicates == {"train": 1}
    notes = " ".join(ds.notes)
    assert "1 duplicate" in notes and "no train items" in notes
    s = ds.stats()
    assert s["train"] == 6 and s["users_without_train"] == 1
    assert s["duplicates_dropped"] == {"train": 1}


def test_lightgcn_without_valid(tmp_path):
    write(tmp_path / "train.txt", "0 0 1\n1 1\n")
    write(tmp_path / "test.txt", "0 2\n")
    ds = load_dataset(str(tmp_path))
    assert ds.valid is None and ds.num_items == 3


@pytest.mark.parametrize(
    "content, line, needle",
    [
        ("0 1 2\n1 x 3\n", 2, "item id 'x'"),
        ("0 1\n1 2\n-3 4\n", 3, "negative user id -3"),
        ("0 1 -2\n", 1, "negative item id -2"),
        ("0 1\n1.5 2\n", 2, "user id '1.5'"),
        ("0 1\n1 +7\n", 2, "item id '+7'"),
        ("0 1_0\n", 1, "item id '1_0'"),
        ("0 1\n\u0663 2\n", 2, "user id '\u0663'"),  # an Arabic-Indic digit
    ],
)
def test_lightgcn_malformed(tmp_path, content, line, needle):
    write(tmp_path / "train.txt", content)
    write(tmp_path / "test.txt", "0 1\n")
    with pytest.raises(DataError) as err:
        load_lightgcn(tmp_path)
    assert f"train.txt:{line}:" in str(err.value)
    assert needle in str(err.value)


def test_lightgcn_bom_and_non_utf8(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbf0 1 2\n1 0\n")  # a UTF-8 BOM
    write(tmp_path / "test.txt", "0 0\n")
    ds = load_lightgcn(tmp_path)
    assert pairs(ds.train) == [(0, 1), (0, 2), (1, 0)]
    (tmp_path / "test.txt").write_bytes(b"0 0\n1 \xff\xfe\n")
    with pytest.raises(DataError, match=r"test.txt:\d+: not UTF-8 text"):
        load_lightgcn(tmp_path)


def test_lightgcn_empty_and_missing(tmp_path):
    write(tmp_path / "train.txt", "\n\n")
    write(tmp_path / "test.txt", "0 1\n")
    with pytest.raises(DataError, match="train.txt: the file is empty"):
        load_lightgcn(tmp_path)
    (tmp_path / "test.txt").unlink()
    with pytest.raises(DataError, match="no test.txt"):
        load_lightgcn(tmp_path)


def test_lightgcn_no_train_pairs(tmp_path):
    write(tmp_path / "train.txt", "0\n1\n")
    write(tmp_path / "test.txt", "0 1\n")
    with pytest.raises(DataError, match="no training interactions"):
        load_lightgcn(tmp_path)


# -------------------------------------------------------------------------- CSV / TSV
def test_csv_header_string_ids(tmp_path):
    lines = ["user,item,rating"]
    rng = np.random.RandomState(0)
    for u in range(30):
        for i in rng.choice(20, size=8, replace=False):
            lines.append(f"user{u:02d},song-{i},5")
    lines.append("user00,song-999,1")
    lines.append(lines[1])  # a duplicate
    f = write(tmp_path / "inter.csv", "\n".join(lines) + "\n")
    ds = load_interactions(f, seed=3)
    assert ds.num_users == 30 and ds.num_items == 21
    assert ds.user_ids[0] == "user00" and "song-999" in ds.item_ids
    assert ds.duplicates == {"all": 1}
    total = ds.train.nnz + ds.valid.nnz + ds.test.nnz
    assert total == 30 * 8 + 1
    assert ds.valid.nnz > 0 and ds.test.nnz > 0
    # per-user split: every user keeps train items
    assert (np.diff(ds.train.indptr) > 0).all()
    # seeded: identical again, different with another seed
    again = load_interactions(f, seed=3)
    assert pairs(again.test) == pairs(ds.test)
    assert pairs(load_interactions(f, seed=4).test) != pairs(ds.test)


def test_tsv_no_header_numeric_ids_sorted_numerically(tmp_path):
    f = write(tmp_path / "x.tsv", "10\t7\n2\t7\n10\t3\n2\t100\n")
    ds = load_interactions(f)
    assert ds.user_ids == ["2", "10"] and ds.item_ids == ["3", "7", "100"]


def test_csv_header_detected_without_known_names(tmp_path):
    f = write(tmp_path / "x.csv", "who,what\n1,2\n3,4\n")
    ds = load_interactions(f)
    assert ds.user_ids == ["1", "3"]


def test_csv_quoted_and_columns_by_name(tmp_path):
    f = write(tmp_path / "x.csv", 'item_id,timestamp,user_id\n"a,b",1,u1\nc,2,u2\n')
    ds = load_interactions(f)
    assert ds.user_ids == ["u1", "u2"] and ds.item_ids == ["a,b", "c"]


def test_csv_malformed_line(tmp_path):
    f = write(tmp_path / "x.csv", "user,item\n1,2\n3\n")
    with pytest.raises(DataError, match=r"x.csv:3: expected at least 2 fields"):
        load_interactions(f)
    f = write(tmp_path / "y.csv", "user,item\n1,2\n,4\n")
    with pytest.raises(DataError, match=r"y.csv:3: empty user id"):
        load_interactions(f)
    f = write(tmp_path / "z.csv", "")
    with pytest.raises(DataError, match="empty"):
        load_interactions(f)
    f = write(tmp_path / "h.csv", "user,item\n")
    with pytest.raises(DataError, match="header but no interactions"):
        load_interactions(f)


def test_recbole_inter(tmp_path):
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    text += "".join(f"{u}\t{i}\t1\t{u * 10 + i}\n" for u in range(12) for i in range(u % 4, u % 4 + 6))
    f = write(tmp_path / "ml.inter", text)
    ds = load_dataset(str(f))
    assert ds.num_users == 12 and ds.num_items == 9
    bad = write(tmp_path / "bad.inter", "rating:float\ttimestamp:float\n1\t2\n")
    with pytest.raises(DataError, match="no user_id / item_id field"):
        load_interactions(bad)


def test_folder_of_split_files(tmp_path):
    write(tmp_path / "d.train.inter", "user_id:token\titem_id:token\nA\tx\nA\ty\nB\tx\n")
    write(tmp_path / "d.test.inter", "user_id:token\titem_id:token\nA\tz\nB\ty\n")
    ds = load_dataset(str(tmp_path))
    assert ds.valid is None and ds.num_users == 2 and ds.num_items == 3
    assert ds.test.nnz == 2 and ds.train.nnz == 3


# ---------------------------------------------------------------------------- resolution
def test_resolve_by_name(tmp_path, monkeypatch, lgcn):
    monkeypatch.setenv("ADAPTAU_DATA", str(lgcn.parent))
    assert resolve_data(lgcn.name) == lgcn.resolve()
    with pytest.raises(DataError, match="not found"):
        resolve_data("no-such-dataset-xyz")


# ----------------------------------------------------------------------------- protocols
def test_protocols(lgcn):
    ds = load_lightgcn(lgcn)
    clean = prepare(ds, "clean")
    assert clean.select_name == "valid" and clean.select is ds.valid
    assert pairs(clean.test_exclude) == sorted(set(pairs(ds.train)) | set(pairs(ds.valid)))
    paper = prepare(ds, "paper")
    assert paper.select_name == "test" and "TEST" in paper.note
    assert pairs(paper.train) == sorted(set(pairs(ds.train)) | set(pairs(ds.valid)))
    with pytest.raises(ValueError):
        prepare(ds, "other")


def test_clean_protocol_carves_valid():
    ds = make_synthetic(200, 100, seed=1)
    ds.valid = None
    s = prepare(ds, "clean", seed=5, valid_fraction=0.2)
    train, valid = set(pairs(s.train)), set(pairs(s.select))
    assert not train & valid
    assert train | valid == set(pairs(ds.train))
    assert 0.1 < len(valid) / ds.train.nnz < 0.3
    assert "carved" in s.note


def test_carve_split_deterministic_and_keeps_train():
    rng = np.random.RandomState(0)
    u = rng.randint(0, 50, size=600)
    i = rng.randint(0, 1000, size=600)
    a = carve_split(u, i, (0.1, 0.1), seed=1)
    b = carve_split(u, i, (0.1, 0.1), seed=1)
    for (au, ai), (bu, bi) in zip(a, b):
        assert (au == bu).all() and (ai == bi).all()
    assert sum(p[0].size for p in a) == 600
    assert set(a[0][0].tolist()) == set(u.tolist())  # every user keeps a train pair


def test_synthetic_is_deterministic():
    a = make_synthetic(300, 200, seed=9)
    b = make_synthetic(300, 200, seed=9)
    assert pairs(a.train) == pairs(b.train) and pairs(a.test) == pairs(b.test)
    pop = np.asarray(a.train.sum(0)).ravel()
    assert pop.max() > 2.5 * np.median(pop)  # skewed popularity


def test_movielens_ratings_dat_is_read(tmp_path):
    """MovieLens' ``user::item::rating::timestamp`` lines, no header."""
    rows = [(u, i, 4, 1000 * u + t) for u in range(1, 7) for t, i in enumerate(range(10, 16))]
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{ts}\n" for u, i, r, ts in rows))
    ds = load_dataset(str(tmp_path / "ratings.dat"))
    assert (ds.num_users, ds.num_items) == (6, 6)
    assert list(ds.user_ids) == [str(u) for u in range(1, 7)]


def test_a_folder_with_one_inter_file_is_split_like_a_file(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"u{u}\ti{(u + k) % 9}\t5\t{100 * k + u}" for u in range(8) for k in range(5)]
    (folder / "shop.inter").write_text("\n".join(lines) + "\n")
    ds = load_dataset(str(folder))
    assert ds.name == "shop" and ds.num_users == 8 and ds.num_items == 9
    assert sum(getattr(ds, s).nnz for s in ("train", "valid", "test")) == 40


def test_split_time_leaves_the_latest_interactions_out(tmp_path):
    """--split time: per user, the latest interaction is test and the one before is valid
    (RecBole's TO ordering, leave-one-out), whatever the order of the file's rows."""
    rows = []
    for u in range(5):
        for k, t in enumerate([30, 10, 50, 20, 40][: 3 + u % 3]):
            rows.append((u, 10 * u + k, t))
    random.Random(0).shuffle(rows)
    (tmp_path / "log.csv").write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    ds = load_dataset(str(tmp_path / "log.csv"), split="time")
    latest = {}
    for u, i, t in rows:
        latest.setdefault(u, []).append((t, i))
    for split, rank in (("test", -1), ("valid", -2)):
        users, items = csr_pairs(getattr(ds, split))
        got = {ds.user_ids[a]: ds.item_ids[b] for a, b in zip(users.tolist(), items.tolist())}
        assert got == {str(u): str(sorted(v)[rank][1]) for u, v in latest.items()}
    with pytest.raises(DataError, match="needs a timestamp column"):
        (tmp_path / "plain.csv").write_text("user,item\n1,2\n1,3\n")
        load_dataset(str(tmp_path / "plain.csv"), split="time")
