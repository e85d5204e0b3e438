"""The dataset contract: schema, atomic files, readable by pyarrow/pandas/DuckDB without Lepton, the
exactly-once index's crash recovery, and compaction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from lepton.cloud import SCHEMA, Dataset, decode_x, samples_to_table, write_parquet_atomic
from lepton.cloud._dataset import REPLACES_KEY, new_file_name, write_parquet_synced
from lepton.cloud._index import SqliteIndex, compact, recover
from lepton.protocol import Sample


def _samples(first: int, n: int, *, label=True) -> list[Sample]:  # noqa: ANN001
    return [
        Sample(
            seq=s,
            ts=1.7e9 + s,
            x=np.arange(6, dtype=np.float32).reshape(2, 3) + s,
            y=(s % 10) if label else None,
            meta={"cam": "a"} if s % 2 else None,
        )
        for s in range(first, first + n)
    ]


def _store(root, fleet, device, first, n, *, pipeline="p1", label=True):  # noqa: ANN001
    """Store like the worker does: under the index lock, new rows only."""
    ddir = root / fleet
    (ddir / "data").mkdir(parents=True, exist_ok=True)
    idx = SqliteIndex(ddir / "index.sqlite")
    try:
        with idx.transaction():
            known = idx.known(device, range(first, first + n))
            rows = [(device, pipeline, s) for s in _samples(first, n, label=label) if s.seq not in known]
            name = new_file_name("t")
            write_parquet_atomic(ddir / "data" / name, samples_to_table(rows, received_at=1.8e9))
            idx.add_rows((device, s.seq) for _, _, s in rows)
            idx.add_file(name, rows=len(rows), size=1, visible=True)
        return name
    finally:
        idx.close()


def test_schema_round_trip_and_lepton_reader(tmp_path):
    _store(tmp_path, "f1", "cam-1", 0, 20)
    _store(tmp_path, "f1", "cam-2", 0, 5, pipeline="p2", label=False)
    (tmp_path / "f1" / "data" / ".part-in-progress.parquet.tmp").write_bytes(b"garbage")  # readers ignore it

    ds = Dataset(tmp_path, "f1")
    table = ds.read_table()

    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert len(ds.files()) == 2 and ds.count() == 25 and table.num_rows == 25
    row = [r for r in table.to_pylist() if r["device"] == "cam-1" and r["seq"] == 7][0]
    assert row["label"] == "7" and row["pipeline"] == "p1" and row["ts"] == 1.7e9 + 7
    assert row["received_at"] == 1.8e9 and json.loads(row["meta"]) == {"cam": "a"}
    np.testing.assert_array_equal(
        decode_x(row["dtype"], row["shape"], row["x"]), np.arange(6, dtype=np.float32).reshape(2, 3) + 7
    )
    assert ds.read_table(columns=["seq"], filter_pipeline="p2").num_rows == 5
    batches = list(ds.iter_batches(batch_size=8, columns=["device", "seq"], filter_pipeline="p1"))
    assert sum(b.num_rows for b in batches) == 20 and batches[0].schema.names == ["device", "seq"]
    st = ds.stats()
    assert st["samples"] == 25 and st["devices"] == {"cam-1": 20, "cam-2": 5}
    assert st["labels"]["(none)"] == 5 and st["pipelines"] == {"p1": 20, "p2": 5}
    assert st["tensor_bytes"] == 25 * 24 and st["files"] == 2


def test_readable_without_lepton_by_pyarrow_pandas_duckdb(tmp_path):
    _store(tmp_path, "f1", "cam-1", 0, 30)
    _store(tmp_path, "f1", "cam-1", 30, 30)
    (tmp_path / "f1" / "data" / ".x.parquet.tmp").write_bytes(b"half-written")
    # A fresh interpreter that never imports lepton.
    code = textwrap.dedent(f"""
        import sys, duckdb, numpy as np, pandas as pd, pyarrow.parquet as pq
        d = {str(tmp_path / "f1" / "data")!r}
        t = pq.read_table(d)
        df = pd.read_parquet(d)
        n, distinct, labels = duckdb.sql(
            f"SELECT count(*), count(DISTINCT (device, seq)), count(DISTINCT label) FROM '{{d}}/*.parquet'"
        ).fetchall()[0]
        r = df[df.seq == 42].iloc[0]
        x = np.frombuffer(r["x"], dtype=np.dtype(r["dtype"]).newbyteorder("<")).reshape(list(r["shape"]))
        assert "lepton" not in sys.modules
        print(t.num_rows, len(df), n, distinct, labels, float(x[1, 2]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["60", "60", "60", "60", "10", "47.0"]


def test_index_drops_duplicates_and_counts(tmp_path):
    _store(tmp_path, "f1", "cam-1", 0, 10)
    _store(tmp_path, "f1", "cam-1", 5, 10)  # 5..9 again: only 10..14 are new
    ds = Dataset(tmp_path, "f1")
    seqs = sorted(ds.read_table(columns=["seq"]).column("seq").to_pylist())
    assert seqs == list(range(15))
    idx = SqliteIndex(tmp_path / "f1" / "index.sqlite")
    assert idx.count() == 15 and idx.known("cam-1", [0, 14, 15, 10**12]) == {0, 14}
    assert idx.known("cam-1", [0, 10**12, 3]) == {0, 3}  # sparse query path
    idx.close()


def test_recovery_finishes_committed_and_removes_orphans(tmp_path):
    ddir = tmp_path / "f1"
    data = ddir / "data"
    data.mkdir(parents=True)
    idx = SqliteIndex(ddir / "index.sqlite")
    # A writer committed file A but died before renaming its .tmp; another died before committing B.
    a, b = new_file_name("w"), new_file_name("w")
    with idx.transaction():
        write_parquet_synced(data / f".{a}.tmp", samples_to_table([("d", None, s) for s in _samples(0, 4)]))
        idx.add_rows(("d", s) for s in range(4))
        idx.add_file(a, rows=4, size=1)
    write_parquet_synced(data / f".{b}.tmp", samples_to_table([("d", None, s) for s in _samples(4, 4)]))
    # A file the index never saw (e.g. copied in), holding seqs 2..5: 2 and 3 are already stored.
    c = new_file_name("x")
    write_parquet_atomic(data / c, samples_to_table([("d", None, s) for s in _samples(2, 4)]))

    done = recover(idx, ddir)

    assert done == {"finished": 1, "orphans_removed": 1, "registered": 1, "duplicates_dropped": 2}
    assert sorted(os.listdir(data)) == sorted([a, c])
    seqs = sorted(Dataset(tmp_path, "f1").read_table(columns=["seq"]).column("seq").to_pylist())
    assert seqs == [0, 1, 2, 3, 4, 5]
    assert idx.invisible_files() == [] and idx.count() == 6
    idx.close()


def test_compaction_merges_exactly_once_and_cli(tmp_path):
    for k in range(6):
        _store(tmp_path, "f1", "cam-1", k * 10, 10)
    before = sorted(Dataset(tmp_path, "f1").read_table(columns=["seq"]).column("seq").to_pylist())

    out = subprocess.run(
        [sys.executable, "-m", "lepton", "dataset", "compact", str(tmp_path), "--fleet", "f1", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )

    report = json.loads(out.stdout)["f1"]
    assert report["files_merged"] == 6 and report["files_written"] == 1 and report["rows"] == 60
    ds = Dataset(tmp_path, "f1")
    files = ds.files()
    assert len(files) == 1 and files[0].name.startswith("compact-")
    assert sorted(ds.read_table(columns=["seq"]).column("seq").to_pylist()) == before == list(range(60))
    assert len(json.loads(pq.read_schema(files[0]).metadata[REPLACES_KEY])) == 6
    stats = subprocess.run(
        [sys.executable, "-m", "lepton", "dataset", "stats", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(stats.stdout)["f1"]["samples"] == 60


def test_interrupted_compaction_is_finished_and_hidden(tmp_path):
    names = [_store(tmp_path, "f1", "cam-1", k * 10, 10) for k in range(3)]
    ddir, data = tmp_path / "f1", tmp_path / "f1" / "data"
    idx = SqliteIndex(ddir / "index.sqlite")
    # Simulate a compaction that crashed after its commit and rename, before deleting its sources.
    table = Dataset(tmp_path, "f1").read_table()
    merged = new_file_name("c", prefix="compact-")
    with idx.transaction():
        write_parquet_synced(
            data / f".{merged}.tmp", table, metadata={REPLACES_KEY: json.dumps(names).encode()}
        )
        idx.remove_files(names)
        idx.add_file(merged, rows=30, size=1)
    os.replace(data / f".{merged}.tmp", data / merged)

    # Readers through Lepton already see each sample once...
    assert Dataset(tmp_path, "f1").count() == 30
    # ...and the next writer (here a compaction run) finishes the job.
    compact(ddir, index=idx)
    assert sorted(os.listdir(data)) == [merged]
    assert idx.invisible_files() == []
    idx.close()


def test_dataset_cli_errors_are_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lepton", "dataset", "stats", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--data" in out.stderr


@pytest.mark.parametrize("bad", ["", "a/b"])
def test_bad_fleet_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        Dataset(tmp_path, bad)


def test_range_index_matches_a_set_model(tmp_path):
    """The range-merging index answers exactly like a plain set, whatever the insertion order."""
    import random

    from lepton.protocol import MAX_SEQ

    rng = random.Random(3)
    idx = SqliteIndex(tmp_path / "index.sqlite")
    model: dict[str, set[int]] = {"a": set(), "b": set()}
    universe = [*range(0, 400), *range(10**12, 10**12 + 50), MAX_SEQ - 3, MAX_SEQ - 1, MAX_SEQ]
    for _ in range(120):
        dev = rng.choice("ab")
        batch = set(rng.sample(universe, rng.randint(1, 30)))
        with idx.transaction():
            known = idx.known(dev, batch)
            assert known == batch & model[dev]
            idx.add_rows((dev, s) for s in batch - known)
        model[dev] |= batch
    for dev in "ab":
        assert idx.known(dev, universe) == model[dev]
        ranges = idx.ranges(dev)
        assert all(
            b < c - 1 for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False)
        )  # merged: no touching ranges
        assert sum(b - a + 1 for a, b in ranges) == len(model[dev])
    assert idx.count() == len(model["a"]) + len(model["b"])
    idx.close()
