"""The spool is power-loss safe by default through group commit (issue 13, item 1): one fsync per
transaction of many samples, counted with strace, and no sample visible to the publisher before its
transaction is committed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np

from lepton.device import Spool
from lepton.testing import count_syscalls
from tests.conftest import missing_component

SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from lepton.device import Spool
    path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    x = np.zeros(64, np.float32)
    with Spool(path, fsync=(mode != "nofsync")) as spool:
        for i in range(n):
            if mode == "each":
                spool.append(x, i % 10)        # waits for its own commit: one fsync per sample
            else:
                spool.append_nowait(x, i % 10)  # the device's capture path: group commit
        spool.flush()
        assert spool.durable_next == n and spool.commits >= 1
        if mode == "acked":
            for i in range(n):
                assert spool.ack([(i, i)]) == 1  # one ack transaction per sample, the worst case
    """
)


def _syncs(tmp_path, mode: str, n: int) -> int:
    if shutil.which("strace") is None:
        missing_component("strace not found (apt-get install -y strace): it counts the spool's fsyncs")
    out = subprocess.run(
        ["strace", "-f", "-qq", "-c", "-e", "trace=fsync,fdatasync", sys.executable, "-c", SCRIPT,
         str(tmp_path / mode), mode, str(n)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return count_syscalls(out.stderr)


def test_group_commit_costs_a_fraction_of_an_fsync_per_sample(tmp_path):
    n = 2000
    grouped = _syncs(tmp_path, "grouped", n)
    each = _syncs(tmp_path, "each", 300)
    # One fsync per sample when each append waits for its own commit (what --fsync cost before)...
    assert each >= 300, each
    # ...and a handful for 2,000 samples captured back to back with group commit.
    assert 1 <= grouped <= n / 20, grouped


def test_acks_add_no_fsync_of_their_own(tmp_path):
    n = 300
    appended = _syncs(tmp_path, "grouped", n)
    acked = _syncs(tmp_path, "acked", n)  # the same, then 300 ack transactions
    # An ack's delete rides on the next sample commit's WAL fsync (lepton/device/_spool.py): 300 ack
    # transactions add none (close's checkpoint may sync the database once more than before).
    assert acked - appended <= 2, (appended, acked)


def test_no_sample_is_readable_before_its_commit(tmp_path):
    with Spool(tmp_path, commit_ms=300, commit_every=10_000) as spool:
        seqs = [spool.append_nowait(np.full(4, i, np.float32), i) for i in range(50)]
        assert seqs == list(range(50))
        # Captured (depth counts it), but not committed: the publisher cannot see it yet.
        assert spool.depth == 50 and spool.durable_next == 0
        assert spool.read_after(-1, 100) == []
        assert not spool.wait_for_seq(0, 0.05)  # the publisher is not woken for uncommitted samples
        assert spool.flush(5)
        rows = spool.read_after(-1, 100)
        assert [r.seq for r in rows] == seqs and spool.durable_next == 50
        assert [int(r.to_sample().x[0]) for r in rows] == seqs


def test_close_commits_what_is_queued_and_reopen_continues(tmp_path):
    with Spool(tmp_path, commit_ms=10_000, commit_every=10_000) as spool:
        for i in range(20):
            spool.append_nowait(np.zeros(4, np.float32), i)
    with Spool(tmp_path) as spool:
        assert spool.seqs() == list(range(20)) and spool.next_seq == 20


def test_drop_oldest_in_group_commit_keeps_the_bound(tmp_path):
    body = len(Spool.encode_body(np.zeros(64, np.float32), 1))
    with Spool(tmp_path, max_bytes=body * 30, commit_ms=50) as spool:
        for _ in range(100):
            spool.append_nowait(np.zeros(64, np.float32), 1)
        spool.flush(5)
        assert spool.bytes <= body * 30 and spool.depth == len(spool.seqs()) <= 30
        assert spool.seqs()[-1] == 99 and spool.dropped == 100 - spool.depth


def test_no_fsync_keeps_normal_sync(tmp_path):
    with Spool(tmp_path / "a", fsync=False) as spool:
        assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with Spool(tmp_path / "b") as spool:
        assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the default
