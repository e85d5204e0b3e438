"""The exactly-once index's cost must not grow with the span of a device's seqs (issue 10, item 6):
a device that sent 1M sparse seqs made every lookup of its next batch read all of its ranges, and the
one writer thread slowed down for every device. Work is counted in SQLite VM steps, not seconds.
The model check (known/add agree with a set) runs against both backends."""

from __future__ import annotations

import os
import random

import pytest

from lepton.cloud._index import SqliteIndex, open_index


def _steps(index: SqliteIndex, fn) -> int:  # noqa: ANN001
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    index._db.set_progress_handler(tick, 1)
    try:
        fn()
    finally:
        index._db.set_progress_handler(None, 1)
    return count[0]


@pytest.fixture
def sparse(tmp_path):
    index = SqliteIndex(tmp_path / "index.sqlite")
    with index.transaction():  # 100,000 single-seq ranges, 1,000 apart, for the hostile device
        index._db.executemany("INSERT INTO ranges VALUES ('evil', ?, ?)",
                              [(i * 1000, i * 1000) for i in range(100_000)])
        index.add("cam-1", range(0, 5000))
    yield index
    index.close()


def test_lookup_cost_does_not_grow_with_the_span(sparse):
    with sparse.transaction():
        narrow = _steps(sparse, lambda: sparse.known("evil", [5000, 5001]))
        wide = _steps(sparse, lambda: sparse.known("evil", [5000, 99_999_000]))
        honest = _steps(sparse, lambda: sparse.known("cam-1", range(5000, 5032)))
        assert sparse.known("evil", [5000, 5001, 99_999_000, 99_999_001]) == {5000, 99_999_000}
    assert wide <= 3 * narrow + 50, (narrow, wide)
    assert honest < 500, honest


def test_known_and_add_agree_with_a_set(tmp_path, fleet, index_url):
    index = open_index(tmp_path / fleet, index_url)  # both backends: SQLite and a real PostgreSQL
    rng = random.Random(3)
    truth: set[int] = set()
    for _ in range(200):
        batch = {rng.randrange(0, 3000) for _ in range(rng.randrange(1, 40))}
        if rng.random() < 0.3:
            start = rng.randrange(0, 3000)
            batch |= set(range(start, start + rng.randrange(1, 100)))
        with index.transaction():
            known = index.known("d", batch)
            assert known == batch & truth
            index.add("d", batch - known)
        truth |= batch
    assert index.count() == len(truth)
    ranges = index.ranges("d")
    assert all(b + 1 < c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False))  # merged
    index.close()


def _open_at(path: str, start: float, results) -> None:  # noqa: ANN001 - a multiprocessing queue
    import time

    time.sleep(max(0.0, start - time.time()))  # every process opens at the same moment
    try:
        index = SqliteIndex(path)
        with index.transaction():  # the write lock too, as a worker's first batch takes it
            index.add(f"d{os.getpid()}", [0])
        index.close()
        results.put(None)
    except Exception as exc:  # reported to the test, which fails on it
        results.put(repr(exc))


def test_processes_opening_a_new_index_at_once_all_succeed(tmp_path):
    """Two workers of one folder (or a worker and its store child) starting together used to fail with
    "database is locked": the race to switch a new file to WAL bypasses SQLite's busy handler."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("fork")
    errors = []
    for attempt in range(30):
        results = ctx.Queue()
        path = str(tmp_path / f"d{attempt}" / "index.sqlite")
        (tmp_path / f"d{attempt}").mkdir()
        start = time.time() + 0.1
        procs = [ctx.Process(target=_open_at, args=(path, start, results)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        errors += [e for e in (results.get(timeout=10) for _ in procs) if e is not None]
        assert all(p.exitcode == 0 for p in procs)
    assert errors == []
