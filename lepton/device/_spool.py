"""The device's store-and-forward spool: every sample is on disk before it is published, until acked.

Why SQLite in WAL mode rather than append-only segment files:

* **Atomic by construction.** Allocating a seq, inserting the sample and (when full) dropping the oldest
  happen in one transaction; a ``kill -9`` at any instant leaves either all of it or none of it. Segment
  files need their own torn-write detection, checksums and compaction to get the same.
* **Acks arrive out of order** (ranges from several workers, resends); deleting an arbitrary range is one
  indexed ``DELETE`` here, where segments would need tombstones and rewriting.
* **One file, in the standard library**, readable with the ``sqlite3`` shell when debugging a field device.
* WAL lets the committer write while the publisher reads.

**Group commit, power-loss safe by default.** :meth:`Spool.append_nowait` gives the sample its seq and
queues it in memory; the spool's committer thread writes every queued sample in one transaction every
``commit_ms`` milliseconds (or as soon as ``commit_every`` are queued), with ``synchronous=FULL``: one
fsync of the WAL per transaction, not per sample. Only committed rows exist for :meth:`read_after`, so
nothing is published before it is durable, and :meth:`wait_for_seq` wakes on commits. A power cut
loses at most the samples captured in the last ``commit_ms`` (never published, never acknowledged:
as if the camera had not taken them). :meth:`append` waits for its commit. ``fsync=False``
(``--no-fsync``) keeps ``synchronous=NORMAL``: it still survives a crash or ``kill -9`` of the process,
but a power cut can lose committed samples (SQLite WAL then fsyncs only at checkpoints).

**Acks cost no fsync.** An ack's transaction (delete the acknowledged rows, save ``next_seq``) is
written to the WAL with ``synchronous=NORMAL``; the next sample commit's fsync of the same WAL makes it
durable with everything before it (a WAL replays a prefix of its transactions). A power cut in between
can only bring acknowledged samples back: they are sent again and the cloud, which stores by
``(device, seq)`` once, ignores the duplicates; the restored rows hold their seqs, so ``next_seq`` never
goes back. So fsyncs per sample = sample commits per sample. The publisher acks with
:meth:`Spool.ack_nowait`: the committer deletes the queued ranges first thing in its next sample
commit's transaction (so they are fsynced with it), or in an ack transaction of its own at once when no
sample is queued; the publisher thus never waits on the writing connection while a commit fsyncs.
:meth:`Spool.ack` deletes in the caller's thread and returns the count.

**Queue bound.** Capture may queue up to ``16 * commit_every`` samples (at least 4,096) or 16 MiB
before append waits: while one commit fsyncs (several ms on a loaded disk) capture fills the next, and
a smaller bound made the fsync time the throughput cap (about 1,024 samples per fsync before).

**Threads and who owns what.** Three threads use a spool: the device's *capture* thread appends,
the spool's own *committer* writes, the *publisher* reads and acks (and the main thread closes). Every
mutable field has one owner or one lock:

* ``_db`` (the writing connection) and ``_db_bytes``, ``_db_next`` (what the table holds, and one past
  the highest seq it ever held): under ``_db_lock``, which serialises every use of the connection
  (committer writes, publisher deletes, close).
* ``_rdb``, a second connection only for reading (:meth:`read_after`, :meth:`count_through`,
  :meth:`seqs`): under ``_rdb_lock``. WAL lets it read while the committer writes and fsyncs, so the
  publisher never waits for a commit; it sees a transaction only once it is committed, and with
  ``synchronous=FULL`` SQLite publishes a commit to readers only after the WAL's fsync returned.
* ``_pending``, ``_first_pending_at``, ``_next_seq``, ``_last_appended``, ``_bytes``, ``_depth``: under
  ``_cond``; written by capture (append, skip), the committer (commit, drop-oldest) and the publisher (ack).
* ``_ack_queue``, ``_acks_applying``: under ``_cond``; filled by :meth:`ack_nowait` (publisher), taken by
  the committer. ``acked_total``, ``last_ack_at``: under ``_cond``, by whoever deleted (committer, ack).
* ``_durable_next``, ``_dropped``, ``_dropped_through``, ``commits``, ``_commit_error``,
  ``_committer_done``: written by the committer only, under ``_cond``.
* ``_closing`` (by :meth:`interrupt` and :meth:`close`) and ``_stopping`` (by :meth:`close`): under
  ``_cond``.
* everything else (paths, limits, policy, the lock file): set in ``__init__``, read-only after.

The properties (``depth``, ``bytes``, ``dropped``, ...) read memory only, never the database, so a
status report costs no SQL on whatever thread builds it. Lock order: ``_db_lock`` is never taken while
holding ``_cond``.

The next seq is one past the highest seq ever stored: the highest row still in the table, or the value
saved in ``meta`` in the same transaction that deletes rows (acks, drops). So it only grows, and a
restarted device never reuses a seq even when every earlier sample was acknowledged and deleted, while a
sample costs one ``INSERT`` (atomic alone in autocommit mode), not a read-modify-write of a counter.

The spool is bounded in bytes (the stored sample sizes); when full it either drops the oldest samples
(counted, persisted, reported) or blocks capture until acks free room. A lock file keeps two processes
from sharing one spool.
"""

from __future__ import annotations

import builtins  # the property Spool.bytes hides the type inside the class
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from lepton.errors import ConfigError, SpoolFull
from lepton.protocol import Sample, decode_tensor, encode_sample_body

log = logging.getLogger(__name__)

__all__ = ["Spool", "SpoolFull", "SpooledSample", "ON_FULL_POLICIES"]

ON_FULL_POLICIES = ("drop-oldest", "block")
DB_NAME = "spool.sqlite3"
LOCK_NAME = "spool.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq      INTEGER PRIMARY KEY,
    ts       REAL    NOT NULL,
    pipeline TEXT,
    size     INTEGER NOT NULL,
    body     BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('next_seq', 0), ('dropped', 0), ('schema', 1);
"""


def _open_private(path: Path) -> int:
    """Open (creating) ``path`` read-write with mode 0600, whatever the umask or an older file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class SpooledSample:
    """A sample as stored: ``body`` is msgpack ``{"x": TENSOR, "y": label, "meta": ...}``."""

    seq: int
    ts: float
    pipeline: str | None
    body: bytes

    def to_sample(self) -> Sample:
        item = msgpack.unpackb(self.body, raw=False)
        return Sample(
            seq=self.seq, ts=self.ts, x=decode_tensor(item["x"]), y=item.get("y"), meta=item.get("meta")
        )


class Spool:
    """A bounded, crash-safe queue of samples keyed by seq.

    >>> import tempfile
    >>> with Spool(tempfile.mkdtemp(), max_bytes=1 << 20) as spool:
    ...     spool.append(np.zeros(4, np.float32), 7), spool.append(np.ones(4, np.float32), 8)
    ...     spool.ack([(0, 0)]), spool.depth, spool.next_seq
    (0, 1)
    (1, 1, 2)
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        on_full: str = "drop-oldest",
        fsync: bool = True,
        commit_ms: float = 5.0,
        commit_every: int = 256,
    ) -> None:
        if on_full not in ON_FULL_POLICIES:
            raise ConfigError(f"on_full must be one of {', '.join(ON_FULL_POLICIES)}, got {on_full!r}")
        if not isinstance(max_bytes, int) or max_bytes < 256:
            raise ConfigError(f"spool max_bytes must be an int >= 256, got {max_bytes!r}")
        if commit_ms < 0 or commit_every < 1:
            raise ConfigError("spool commit_ms must be >= 0 and commit_every >= 1")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = _open_private(self.directory / LOCK_NAME)
        except OSError as exc:
            raise ConfigError(
                f"cannot use spool directory {str(self.directory)!r}: {exc.strerror}; "
                "pass a writable --spool DIR"
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise ConfigError(
                f"spool {str(self.directory)!r} is in use by another device process; stop it or "
                "pass another --spool DIR"
            ) from None
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.path = self.directory / DB_NAME
        # One lock, three conditions, so each wake-up reaches only the threads it concerns: an append
        # wakes the committer once per commit (not per sample) and nobody else; a commit or an ack wakes
        # the publisher and the drain (_cond) and blocked appends (_room).
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # commits, acks, wake(), close: durable_next, depth
        self._commit_cv = threading.Condition(lock)  # the committer: samples queued, close
        self._room = threading.Condition(lock)  # blocked appends: bytes freed, commits done, closing
        self._db_lock = threading.RLock()
        self._rdb_lock = threading.Lock()
        self._closing = False  # wakes blocked appends (stop)
        self._stopping = False  # the committer writes what is queued and exits (close)
        self.fsync = fsync
        self.commit_ms = commit_ms
        self.commit_every = commit_every
        #: samples (and bytes) queued at most before append waits for the committer. While one commit's
        #: fsync runs, capture queues the next commit: the queue must hold what capture makes during an
        #: fsync (several ms on a loaded disk), or the fsync time caps the throughput at this / fsync.
        self._max_pending = max(16 * commit_every, 4096)
        self._max_pending_bytes = max(16 * 1024 * 1024, 2 * commit_every * 1024)
        self._pending_bytes = 0
        self._pending: list[tuple[int, float, str | None, int, bytes]] = []
        self._first_pending_at = 0.0
        self._commit_error: str | None = None
        self.commits = 0
        self._ack_queue: list[Sequence[int]] = []  # ranges for the committer (ack_nowait), under _cond
        self._acks_applying = False  # the committer took ranges and has not applied them yet
        #: samples removed by acks since the spool was opened, and when (perf_counter) acks last removed any
        self.acked_total = 0
        self.last_ack_at: float | None = None
        try:
            # Samples are the device's data: 0600 whatever the umask. SQLite (default 0644) gives its
            # -wal and -shm files the database file's mode, so creating that one first covers all three;
            # files of an older version are tightened here too.
            os.close(_open_private(self.path))
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f"{self.path}{suffix}", 0o600)
        except OSError as exc:
            os.close(self._lock_fd)
            raise ConfigError(
                f"cannot use spool database {str(self.path)!r}: {exc.strerror}; pass a writable --spool DIR"
            ) from None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            self._rdb = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._rdb.execute("PRAGMA query_only=1")
            self._bytes, self._depth = self._db.execute(
                "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM samples"
            ).fetchone()
            self._dropped = int(self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0])
            self._db_bytes = self._bytes  # what the table holds (committer and ack, under _db_lock)
            # The next seq is one past the highest seq ever stored: still in `samples`, or saved in
            # meta by ack()/drop before the rows that held it were deleted.
            self._next_seq = int(
                self._db.execute(
                    "SELECT MAX((SELECT value FROM meta WHERE key='next_seq'), "
                    "COALESCE((SELECT MAX(seq) + 1 FROM samples), 0))"
                ).fetchone()[0]
            )
        except sqlite3.DatabaseError as exc:
            os.close(self._lock_fd)
            raise ConfigError(
                f"spool database {str(self.path)!r} is unreadable ({exc}); move it aside to start "
                "a fresh spool (its unacknowledged samples would be lost)"
            ) from None
        self._durable_next = self._next_seq
        self._last_appended = self._next_seq - 1  # the newest seq given to a stored sample (flush waits for it)
        self._db_next = self._next_seq
        self._dropped_through = -1  # the highest seq drop-oldest deleted since the spool was opened
        if self._depth:
            log.info(
                "spool %s: %d unacknowledged samples (%d bytes) from a previous run",
                self.path,
                self._depth,
                self._bytes,
            )
        self._committer = threading.Thread(target=self._commit_loop, name="lepton-spool-commit", daemon=True)
        self._committer.start()

    # -- counters (memory only: no SQL) -------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Samples captured and not yet acknowledged (queued for commit included)."""
        return self._depth

    @property
    def durable_next(self) -> int:
        """Every seq below this is committed (on disk, and fsynced unless ``fsync=False``)."""
        return self._durable_next

    @property
    def pending(self) -> int:
        """Samples queued in memory for the next commit."""
        return len(self._pending)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def next_seq(self) -> int:
        """The seq the next append gets; only grows, across restarts too."""
        return self._next_seq

    @property
    def dropped(self) -> int:
        """Samples dropped by the drop-oldest policy over the spool's whole life (persisted in meta)."""
        return self._dropped

    @property
    def dropped_through(self) -> int:
        """The highest seq the drop-oldest policy deleted since this spool was opened (-1: none).

        Drop-oldest deletes the oldest samples, so every seq up to this one left unacknowledged.
        """
        return self._dropped_through

    # -- writing ------------------------------------------------------------------------------------
    @staticmethod
    def encode_body(
        x: np.ndarray, y: int | str | None = None, meta: dict[str, Any] | None = None
    ) -> builtins.bytes:
        # The protocol's per-sample body: the publisher splices it into envelopes as it is.
        return encode_sample_body(x, y, meta)

    def append(
        self,
        x: np.ndarray,
        y: int | str | None = None,
        *,
        ts: float | None = None,
        meta: dict[str, Any] | None = None,
        pipeline: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Store one sample and return its seq once it is committed (see :meth:`append_nowait`)."""
        seq = self.append_nowait(x, y, ts=ts, meta=meta, pipeline=pipeline, timeout=timeout)
        self.wait_durable(seq)
        return seq

    def append_nowait(
        self,
        x: np.ndarray,
        y: int | str | None = None,
        *,
        ts: float | None = None,
        meta: dict[str, Any] | None = None,
        pipeline: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Give the sample its seq and queue it for the next group commit; return the seq.

        It is on disk within ``commit_ms`` (:meth:`wait_durable` waits for it) and never published
        before. When full: ``drop-oldest`` deletes the oldest samples in the commit's transaction;
        ``block`` waits up to ``timeout`` seconds (forever when None) for acks to free room, else
        raises SpoolFull.
        """
        body = self.encode_body(x, y, meta)
        return self.append_block([body], ts=[time.time() if ts is None else ts], pipeline=pipeline,
                                 timeout=timeout)

    def append_many(
        self,
        xs: Sequence[np.ndarray],
        ys: Sequence[int | str | None] | None = None,
        *,
        ts: Sequence[float] | None = None,
        pipeline: str | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """:meth:`append_nowait` of each sample in order, under one lock acquisition; return their seqs."""
        labels = ys if ys is not None else [None] * len(xs)
        bodies = [self.encode_body(x, y) for x, y in zip(xs, labels, strict=True)]
        if ts is None:
            now = time.time()
            ts = [now] * len(bodies)
        first = self.append_block(bodies, ts=ts, pipeline=pipeline, timeout=timeout)
        return list(range(first, first + len(bodies)))

    def append_block(
        self,
        bodies: Sequence[builtins.bytes | None],
        *,
        ts: Sequence[float],
        pipeline: str | None = None,
        timeout: float | None = None,
        partial: bool = False,
    ) -> int:
        """Queue encoded sample bodies (:meth:`encode_body`) with consecutive seqs; return the first seq.

        A ``None`` body uses up its seq without storing a sample (:meth:`skip_seq`). The same as
        :meth:`append_nowait` (or :meth:`skip_seq`) of each in order, with one lock acquisition and one
        hand-off to the committer for the whole block. Raises SpoolFull like :meth:`append_nowait`; the
        bodies before the one that failed are queued then (:attr:`next_seq` says how far it got).
        ``partial``: when room must be waited for after some bodies went in, return instead of waiting
        (:attr:`next_seq` says how far it got), so the caller can count those first and call again.
        """
        with self._cond:
            first = self._next_seq
            pending = self._pending
            for body, t in zip(bodies, ts, strict=True):
                seq = self._next_seq
                if body is None:
                    self._next_seq = seq + 1
                    continue
                size = len(body)
                if size > self.max_bytes:
                    raise SpoolFull(
                        f"one sample of {size} bytes exceeds the whole spool ({self.max_bytes} bytes); "
                        "raise --spool-max-mb"
                    )
                if (
                    (self.on_full == "block" and self._bytes + size > self.max_bytes)
                    or len(pending) >= self._max_pending
                    or (pending and self._pending_bytes >= self._max_pending_bytes)
                ):
                    if partial and seq > first:
                        return first
                    self._wait_for_room(size, timeout)
                    pending = self._pending  # the committer took the old list while we waited
                if not pending:
                    self._first_pending_at = time.monotonic()
                pending.append((seq, t, pipeline, size, body))
                self._pending_bytes += size
                self._next_seq = seq + 1
                self._last_appended = seq
                self._bytes += size
                self._depth += 1
                if len(pending) in (1, self.commit_every):  # the first starts the commit clock
                    self._commit_cv.notify()
            return first

    def _wait_for_room(self, size: int, timeout: float | None) -> None:
        """(Holding ``_cond``) wait until a sample of ``size`` bytes may be queued; SpoolFull on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def wait(why: str) -> None:
            if self._closing:
                raise SpoolFull("spool is closing")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise SpoolFull(f"{why} for {timeout}s")
            self._room.wait(0.5 if left is None else min(left, 0.5))

        if self.on_full == "block":
            while self._bytes + size > self.max_bytes:
                wait(f"spool full ({self._bytes} of {self.max_bytes} bytes)")
        while len(self._pending) >= self._max_pending or (  # the disk is slower than capture
            self._pending and self._pending_bytes >= self._max_pending_bytes
        ):
            wait("spool commits are behind")

    def skip_seq(self) -> int:
        """Use up the next seq without storing a sample (one the upload policy leaves out); return it.

        The gap is legal (docs/protocol.md). A skipped seq is not written to disk: after a power cut it
        may be given again, to a sample that is stored; it was never stored itself, so no seq is ever
        stored twice.
        """
        with self._cond:
            seq = self._next_seq
            self._next_seq = seq + 1
            return seq

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until ``seq`` is committed; False on timeout or when the spool closed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._durable_next > seq or self._committer_done, timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every sample appended so far is committed (skipped seqs have nothing to commit)."""
        return self.wait_durable(self._last_appended, timeout)

    # -- the committer thread -----------------------------------------------------------------------
    _committer_done = False

    def _commit_loop(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while not self._pending and not self._ack_queue and not self._stopping:
                    self._commit_cv.wait()
                if not self._pending and not self._ack_queue:
                    self._committer_done = True
                    self._cond.notify_all()
                    self._room.notify_all()
                    return
                if self._pending:  # queued acks wait for the commit clock too, and ride in its transaction
                    due = self._first_pending_at + self.commit_ms / 1000
                    while (len(self._pending) < self.commit_every and not self._stopping
                           and (left := due - time.monotonic()) > 0):
                        self._commit_cv.wait(left)
                batch = self._pending
                self._pending = []
                self._pending_bytes = 0
                acks, self._ack_queue = self._ack_queue, []
                self._acks_applying = bool(acks)
            try:
                dropped, freed, dropped_through, removed, ack_freed = self._write(batch, acks)
            except sqlite3.Error as exc:  # disk full, I/O error: keep the rows queued and retry
                with self._cond:
                    self._pending = batch + self._pending
                    self._ack_queue = acks + self._ack_queue
                    self._acks_applying = False
                    self._pending_bytes = sum(r[3] for r in self._pending)
                    self._first_pending_at = time.monotonic()
                    if self._commit_error is None:
                        log.error("spool %s: commit failed (%s); retrying", self.path, exc)
                    self._commit_error = str(exc)
                if self._stopping and backoff > 2:
                    log.error("spool %s: closing with %d samples never committed", self.path, len(batch))
                    with self._cond:
                        self._committer_done = True
                        self._cond.notify_all()
                        self._room.notify_all()
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.05
            with self._cond:
                self._commit_error = None
                self._acks_applying = False
                self._count_acked(removed, ack_freed)
                if batch:
                    self._durable_next = batch[-1][0] + 1
                    self.commits += 1
                self._bytes -= freed
                self._depth -= dropped
                self._dropped += dropped
                if dropped_through is not None:
                    self._dropped_through = max(self._dropped_through, dropped_through)
                self._cond.notify_all()
                self._room.notify_all()
            if dropped:
                log.warning("spool full (%d bytes): dropped the %d oldest unacknowledged samples",
                            self.max_bytes, dropped)

    def _write(
        self, batch: list[tuple[int, float, str | None, int, builtins.bytes]], acks: list[Sequence[int]]
    ) -> tuple[int, int, int | None, int, int]:
        """One transaction for the queued ack ranges, then ``batch`` (drop-oldest included).

        Returns (dropped, freed bytes, the highest seq dropped or None, acked, freed by acks). Without
        samples it is an ack transaction alone: no fsync of its own (module docstring).
        """
        if not batch:
            return (0, 0, None, *self._ack_now(acks))
        size = sum(r[3] for r in batch)
        with self._db_lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                removed, ack_freed = self._delete_ranges(db, acks, batch[-1][0] + 1) if acks else (0, 0)
                dropped, freed, last_dropped = 0, 0, None
                need = self._db_bytes - ack_freed + size - self.max_bytes
                if need > 0:
                    for seq_, sz in db.execute("SELECT seq, size FROM samples ORDER BY seq"):
                        if freed >= need:
                            break
                        freed += sz
                        dropped += 1
                        last_dropped = seq_
                    if last_dropped is not None:
                        db.execute("DELETE FROM samples WHERE seq <= ?", (last_dropped,))
                rows = batch
                while need - freed > 0 and len(rows) > 1:  # one commit bigger than the whole spool
                    freed += rows[0][3]
                    dropped += 1
                    last_dropped = rows[0][0]
                    rows = rows[1:]
                db.executemany(
                    "INSERT INTO samples(seq, ts, pipeline, size, body) VALUES (?, ?, ?, ?, ?)", rows
                )
                if dropped:
                    db.execute(
                        "UPDATE meta SET value = ? WHERE key='next_seq' AND value < ?",
                        (batch[-1][0] + 1, batch[-1][0] + 1),
                    )
                    db.execute("UPDATE meta SET value = value + ? WHERE key='dropped'", (dropped,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._db_bytes += size - freed - ack_freed
            self._db_next = batch[-1][0] + 1
        return dropped, freed, last_dropped, removed, ack_freed

    def ack(self, ranges: Iterable[Sequence[int]]) -> int:
        """Delete the samples whose seq falls in any inclusive ``(first, last)`` range; return how many.

        The caller waits for the delete (and for the committer's current transaction, which holds the
        writing connection through its fsync); :meth:`ack_nowait` does not.
        """
        removed, freed = self._ack_now(list(ranges))
        with self._cond:
            self._count_acked(removed, freed)
            if removed:
                self._cond.notify_all()
                self._room.notify_all()
        return removed

    def ack_nowait(self, ranges: Iterable[Sequence[int]]) -> None:
        """Queue ranges for the committer, which deletes what they cover in its next transaction.

        The publisher's way to ack: it never waits for a commit's fsync. The next sample commit applies
        them (at most ``commit_ms`` later), or at once when none is queued; :attr:`acked_total`,
        :attr:`depth` and :attr:`bytes` count them once they are deleted, :meth:`flush_acks` waits for that.
        """
        with self._cond:
            self._ack_queue.extend(ranges)
            self._commit_cv.notify()

    def flush_acks(self, timeout: float | None = None) -> bool:
        """Wait until every range given to :meth:`ack_nowait` so far is applied; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (not self._ack_queue and not self._acks_applying) or self._committer_done, timeout
            )

    def _count_acked(self, removed: int, freed: int) -> None:
        """(Holding ``_cond``) acks deleted ``removed`` samples of ``freed`` bytes."""
        self._bytes -= freed
        self._depth -= removed
        if removed:
            self.acked_total += removed
            self.last_ack_at = time.perf_counter()

    def _ack_now(self, ranges: list[Sequence[int]]) -> tuple[int, int]:
        """An ack transaction of its own (no fsync); returns (samples removed, bytes freed)."""
        with self._db_lock:
            db = self._db
            if self.fsync:  # an ack's delete needs no fsync of its own (module docstring)
                db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                # _db_next, not _durable_next: the committer raises that one only after it released _db_lock.
                removed, freed = self._delete_ranges(db, ranges, self._db_next)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                if self.fsync:
                    db.execute("PRAGMA synchronous=FULL")
            self._db_bytes -= freed
        return removed, freed

    @staticmethod
    def _delete_ranges(db: sqlite3.Connection, ranges: list[Sequence[int]], next_seq: int) -> tuple[int, int]:
        """(In a transaction, holding ``_db_lock``) delete the ranges; return (removed, bytes freed).

        Saves ``next_seq`` first: the rows about to go may hold the highest seq.
        """
        db.execute("UPDATE meta SET value = ? WHERE key='next_seq' AND value < ?", (next_seq, next_seq))
        removed = freed = 0
        for first, last in ranges:
            n, sz = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM samples WHERE seq BETWEEN ? AND ?", (first, last)
            ).fetchone()
            if n:
                db.execute("DELETE FROM samples WHERE seq BETWEEN ? AND ?", (first, last))
                removed += n
                freed += sz
        return removed, freed

    # -- reading ------------------------------------------------------------------------------------
    def read_after(self, seq: int, limit: int) -> list[SpooledSample]:
        """Up to ``limit`` stored samples with a seq greater than ``seq``, oldest first."""
        with self._rdb_lock:  # committed rows only: nothing is published before it is durable
            rows = self._rdb.execute(
                "SELECT seq, ts, pipeline, body FROM samples WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            ).fetchall()
        return [SpooledSample(r[0], r[1], r[2], r[3]) for r in rows]

    def count_through(self, seq: int) -> int:
        """How many stored samples have a seq <= ``seq`` (one SQL count; the publisher's window keeps its
        own in-flight count in memory, see :mod:`lepton.device._window`)."""
        with self._rdb_lock:
            return int(self._rdb.execute("SELECT COUNT(*) FROM samples WHERE seq <= ?", (seq,)).fetchone()[0])

    def seqs(self) -> list[int]:
        """Committed seqs (call :meth:`flush` first to include the queued ones)."""
        with self._rdb_lock:
            return [r[0] for r in self._rdb.execute("SELECT seq FROM samples ORDER BY seq")]

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until samples are committed or acked, :meth:`wake` is called, or ``timeout`` passes."""
        with self._cond:
            self._cond.wait(timeout)

    def wait_for_seq(self, seq: int, timeout: float) -> bool:
        """Sleep until a sample with ``seq`` (or a later one) was appended, or ``timeout`` passes.

        Unlike :meth:`wait_for_change` this does not return on every commit or ack, so a publisher
        waiting to fill a batch of 32 wakes once, not once per commit.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._durable_next > seq or self._closing, timeout)

    def wake(self) -> None:
        """Wake :meth:`wait_for_change` sleepers (e.g. acks arrived to be applied)."""
        with self._cond:
            self._cond.notify_all()

    # -- life cycle ---------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Wake a blocked :meth:`append` so it raises SpoolFull (used at shutdown)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._room.notify_all()

    def close(self) -> None:
        with self._cond:
            if self._db is None:
                return
            self._closing = True
            self._stopping = True  # the committer writes what is queued, then exits
            self._cond.notify_all()
            self._commit_cv.notify_all()
            self._room.notify_all()
        self._committer.join()
        with self._rdb_lock:
            if self._rdb is not None:
                self._rdb.close()
                self._rdb = None  # type: ignore[assignment]
        with self._db_lock:
            if self._db is None:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # a reader elsewhere: the WAL is simply kept, still consistent
                log.debug("spool checkpoint skipped: %s", exc)
            self._db.close()
            self._db = None  # type: ignore[assignment]
            os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
