"""The SQLite spool: ack ranges, bounds and policies, persistence of seq, and kill -9 safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from lepton.device import Spool, SpoolFull
from lepton.errors import ConfigError


def x(i: int) -> np.ndarray:
    return np.full((1, 8, 8), i, np.float32)


def test_append_read_ack_roundtrip(tmp_path):
    with Spool(tmp_path) as spool:
        seqs = [spool.append(x(i), y=i % 10, ts=1000.0 + i, pipeline="p1") for i in range(10)]
        assert seqs == list(range(10)) and spool.depth == 10
        rows = spool.read_after(3, limit=4)
        assert [r.seq for r in rows] == [4, 5, 6, 7]
        sample = rows[0].to_sample()
        assert sample.seq == 4 and sample.y == 4 and sample.ts == 1004.0 and rows[0].pipeline == "p1"
        np.testing.assert_array_equal(sample.x, x(4))
        assert spool.ack([(0, 2), (5, 5), (100, 200)]) == 4  # unknown seqs are ignored
        assert spool.ack([(0, 2)]) == 0  # a duplicate ack removes nothing
        assert spool.seqs() == [3, 4, 6, 7, 8, 9]
        assert spool.count_through(6) == 3
        assert spool.depth == 6 and spool.bytes == sum(len(r.body) for r in spool.read_after(-1, 100))


def test_seq_is_never_reused_after_everything_was_acked_and_reopened(tmp_path):
    with Spool(tmp_path) as spool:
        for i in range(5):
            spool.append(x(i))
        spool.ack([(0, 4)])
        assert spool.depth == 0
    with Spool(tmp_path) as spool:
        assert spool.next_seq == 5
        assert spool.append(x(9)) == 5


def test_drop_oldest_keeps_the_bound_and_counts(tmp_path):
    size = len(Spool.encode_body(x(0)))
    with Spool(tmp_path, max_bytes=size * 10 + 5, on_full="drop-oldest") as spool:
        for i in range(25):
            spool.append(x(i))
        assert spool.depth == 10 and spool.bytes <= spool.max_bytes
        assert spool.seqs() == list(range(15, 25))
        assert spool.dropped == 15
    with Spool(tmp_path, max_bytes=size * 10 + 5) as spool:
        assert spool.dropped == 15  # persisted, so status keeps reporting it
        assert spool.dropped_through == -1  # since this open: nothing


def test_dropped_through_tells_the_publisher_which_seqs_left_unacknowledged(tmp_path):
    size = len(Spool.encode_body(x(0)))
    with Spool(tmp_path, max_bytes=size * 4, on_full="drop-oldest") as spool:
        for i in range(4):
            spool.append(x(i))
        assert spool.dropped_through == -1
        spool.append(x(4))
        assert spool.dropped_through == 0 and spool.seqs() == [1, 2, 3, 4]
        for i in range(10):  # one group commit larger than the whole spool drops inside the batch too
            spool.append_nowait(x(i))
        spool.flush()
        assert spool.seqs() == [11, 12, 13, 14] and spool.dropped_through == 10 and spool.dropped == 11


def test_counters_are_memory_reads_not_sql(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append(x(0))
        db, spool._db = spool._db, None  # any SQL now fails
        try:
            assert (spool.depth, spool.bytes, spool.dropped, spool.next_seq, spool.durable_next) == (
                1, len(Spool.encode_body(x(0))), 0, 1, 1
            )
        finally:
            spool._db = db


def test_an_ack_racing_the_committer_still_persists_next_seq(tmp_path):
    # The committer raises durable_next only after it released the database: an ack in between must
    # not save the older value as next_seq, or deleting every row would let a restart reuse seqs.
    with Spool(tmp_path) as spool:
        for i in range(5):
            spool.append(x(i))
        spool._durable_next = 0  # as if the committer had not yet published its last commit
        assert spool.ack([(0, 4)]) == 5
        spool._durable_next = 5
    with Spool(tmp_path) as spool:
        assert spool.next_seq == 5


def test_block_policy_waits_for_acks(tmp_path):
    size = len(Spool.encode_body(x(0)))
    with Spool(tmp_path, max_bytes=size * 3, on_full="block") as spool:
        for i in range(3):
            spool.append(x(i))
        with pytest.raises(SpoolFull):
            spool.append(x(3), timeout=0.2)
        done = []
        t = threading.Thread(target=lambda: done.append(spool.append(x(3))))
        t.start()
        time.sleep(0.2)
        assert not done  # still blocked: nothing acked
        spool.ack([(0, 0)])
        t.join(5)
        assert done == [3] and spool.dropped == 0 and spool.seqs() == [1, 2, 3]
        blocked = threading.Thread(target=lambda: pytest.raises(SpoolFull, spool.append, x(4)))
        blocked.start()
        spool.interrupt()  # shutdown wakes a blocked capture
        blocked.join(5)
        assert not blocked.is_alive()


def test_one_process_per_spool(tmp_path):
    with Spool(tmp_path):
        with pytest.raises(ConfigError, match="in use by another device process"):
            Spool(tmp_path)
    Spool(tmp_path).close()  # released on close


def test_bad_settings_and_unreadable_database(tmp_path):
    with pytest.raises(ConfigError, match="on_full"):
        Spool(tmp_path, on_full="drop-newest")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "spool.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="move it aside"):
        Spool(tmp_path / "bad")
    with Spool(tmp_path / "small", max_bytes=1024) as spool:
        with pytest.raises(SpoolFull, match="exceeds the whole spool"):
            spool.append(np.zeros(4096, np.float32))


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from lepton.device import Spool
    spool = Spool(sys.argv[1])
    i = 0
    while True:
        seq = spool.append(np.full(64, i, np.float32), y=i, ts=float(i))
        print(seq, flush=True)
        if seq % 3 == 0 and seq:
            spool.ack([(seq - 1, seq - 1)])  # acks arrive while capturing; a kill may land anywhere
        i += 1
""")


@pytest.mark.slow
def test_kill_9_while_writing_loses_nothing_committed_and_never_reuses_a_seq(tmp_path):
    committed: list[int] = []
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        lines = []
        deadline = time.monotonic() + 30
        while len(lines) < 300 + 100 * round_ and time.monotonic() < deadline:
            lines.append(int(proc.stdout.readline()))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rest = proc.stdout.read().split()
        printed = lines + [int(s) for s in rest]
        assert printed == list(range(printed[0], printed[0] + len(printed)))
        if committed:
            assert printed[0] > committed[-1]  # the restarted writer continued after the last seq
        committed.extend(printed)
        with Spool(tmp_path) as spool:
            stored = set(spool.seqs())
            acked = {s - 1 for s in committed if s % 3 == 0 and s}  # what the writer may have deleted
            # Every seq printed (= committed) is either still stored or was acked by the writer itself.
            assert set(committed) - acked <= stored
            assert spool.next_seq > committed[-1]
            for row in spool.read_after(-1, 5):
                sample = row.to_sample()
                assert sample.x.shape == (64,) and float(sample.x[0]) == sample.y


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_spool_files_are_private_whatever_the_umask(tmp_path, umask):
    """Samples (and the WAL/SHM beside them) are the device's data: never readable by other local users."""
    directory = tmp_path / "spool"
    old = os.umask(umask)
    try:
        spool = Spool(directory, fsync=False)
    finally:
        os.umask(old)
    try:
        spool.append(x(1), y=1)
        assert spool.flush(timeout=30)
        deadline = time.monotonic() + 30
        while not (directory / "spool.sqlite3-wal").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        names = ["spool.sqlite3", "spool.sqlite3-wal", "spool.sqlite3-shm", "spool.lock"]
        modes = {n: (directory / n).stat().st_mode & 0o777 for n in names}
        assert modes == dict.fromkeys(names, 0o600)
        assert directory.stat().st_mode & 0o077 == 0
    finally:
        spool.close()


def test_an_existing_world_readable_spool_is_made_private_on_open(tmp_path):
    with Spool(tmp_path, fsync=False) as spool:
        spool.append(x(1), y=1)
    for name in ("spool.sqlite3", "spool.lock"):
        (tmp_path / name).chmod(0o644)  # what earlier versions created
    with Spool(tmp_path, fsync=False) as spool:
        assert spool.depth == 1
        assert {n: (tmp_path / n).stat().st_mode & 0o777 for n in ("spool.sqlite3", "spool.lock")} == {
            "spool.sqlite3": 0o600, "spool.lock": 0o600}


def test_ack_nowait_is_deleted_by_the_committer_alone_or_with_the_next_commit(tmp_path):
    with Spool(tmp_path, commit_ms=1) as spool:
        for i in range(10):
            spool.append(np.full(4, i, np.float32), i)
        spool.ack_nowait([(0, 2), (100, 200)])  # nothing queued to commit: an ack transaction at once
        assert spool.flush_acks(5)
        assert spool.acked_total == 3 and spool.depth == 7 and spool.seqs() == list(range(3, 10))
        seq = spool.append_nowait(np.zeros(4, np.float32), 0)
        spool.ack_nowait([(3, 4)])  # rides in the transaction that commits seq 10
        assert spool.flush() and spool.flush_acks(5)
        assert spool.seqs() == [*range(5, 10), seq] and spool.acked_total == 5 and spool.last_ack_at
    with Spool(tmp_path) as spool:  # deleted on disk, and next_seq kept
        assert spool.depth == 6 and spool.next_seq == 11
        assert spool.ack([(5, 10)]) == 6 and spool.acked_total == 6
