"""The exactly-once index in PostgreSQL, for ingest workers on several machines (``--index URL``).

Same write protocol and guarantees as :class:`~lepton.cloud._index.SqliteIndex` (commit before rename;
a file committed but not renamed is finished by the next transaction of any worker, since the list of
such files lives in the database), with one difference: a worker's batch locks only the devices in it,
so workers of a ``$share`` group write batches of different devices at the same time.

Locking, and why it never deadlocks. Every transaction first takes the dataset's *global* advisory
lock: shared for a batch (``transaction(devices=...)``), exclusive for whole-index work (start-up
recovery, compaction: ``transaction()``). A batch then takes one exclusive advisory lock per device,
all in one statement, in ascending key order. Every transaction acquires its locks in the same total
order (global first, then device keys ascending) and takes no other lock it could wait for: the file
rows it updates are taken with ``FOR UPDATE SKIP LOCKED`` (a row another transaction is marking visible
is left to it) and the rows it inserts are new. So no cycle of waits can form. Under READ COMMITTED
each statement sees every transaction committed before it, so once a device's lock is held its ranges
are exactly what earlier writers committed.

The exclusive global lock is what makes recovery safe while other workers run: it waits until no batch
is between writing its ``.tmp`` and committing, so an uncommitted ``.tmp`` it finds is an orphan.

Schema (created on first use; one database holds many datasets, keyed by the fleet folder's name):

- ``lepton_ranges(dataset, device, first, last)``, primary key ``(dataset, device, first)``: stored
  seqs as merged inclusive ranges, as in SQLite.
- ``lepton_files(dataset, name, rows, bytes, created, visible)``, primary key ``(dataset, name)``.
- ``lepton_index_schema(version)``.

psycopg is imported here only; ``lepton.device`` never imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any

from lepton.cloud._index import SampleIndex
from lepton.errors import ConfigError
from lepton.protocol import MAX_SEQ, seqs_to_ranges

log = logging.getLogger(__name__)

__all__ = ["PostgresIndex", "SCHEMA_VERSION", "is_postgres_url", "redact_url"]

SCHEMA_VERSION = 1
_SCHEMES = ("postgresql", "postgres")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lepton_index_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS lepton_ranges (
    dataset text NOT NULL, device text NOT NULL, first bigint NOT NULL, last bigint NOT NULL,
    PRIMARY KEY (dataset, device, first));
CREATE TABLE IF NOT EXISTS lepton_files (
    dataset text NOT NULL, name text NOT NULL, rows bigint NOT NULL, bytes bigint NOT NULL,
    created double precision NOT NULL, visible boolean NOT NULL DEFAULT false,
    PRIMARY KEY (dataset, name));
CREATE INDEX IF NOT EXISTS lepton_files_invisible ON lepton_files (dataset) WHERE NOT visible;
"""


def is_postgres_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in _SCHEMES


def redact_url(url: str) -> str:
    """``url`` without its password (in the authority or as ``?password=``): safe to print or store."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        auth, host = netloc.rsplit("@", 1)
        netloc = f"{auth.split(':', 1)[0]}@{host}"
    query = urllib.parse.urlencode(
        [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key. A collision only makes two devices share a lock."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresIndex(SampleIndex):
    """The index of one dataset (``dataset``: the fleet folder's name) in a PostgreSQL database.

    ``url`` is a libpq URI, ``postgresql://USER@HOST[:PORT]/DB``; the password comes from the URL,
    ``$PGPASSWORD`` or ``~/.pgpass`` (libpq's environment variables apply). It is never logged: errors
    name the URL without it.

    Example (needs a server)::

        index = PostgresIndex("postgresql://lepton@db/lepton", dataset="f1")
        with index.transaction(devices=["cam-1"]):
            index.known("cam-1", [0, 1, 2])        # set()
    """

    def __init__(self, url: str, *, dataset: str, connect_timeout: float = 10.0) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                "--index postgresql://... needs psycopg: pip install 'lepton[postgres]'"
            ) from None
        if not is_postgres_url(url):
            raise ConfigError(
                f"--index {redact_url(url)!r} is not a PostgreSQL URL; "
                "use postgresql://USER@HOST[:PORT]/DATABASE (password in $PGPASSWORD)"
            )
        self._psycopg = psycopg
        self.transient_errors = (psycopg.OperationalError,)
        self.url = url
        self.shown_url = redact_url(url)
        self.dataset = dataset
        self._connect_timeout = connect_timeout
        self._global_key = _key(dataset, "")
        #: devices locked by the open transaction; None: the whole index (exclusive).
        self._locked: frozenset[str] | None = None
        self._in_tx = False
        self._conn: Any = None
        self._connect(first=True)

    # -- connection ---------------------------------------------------------------------------------
    def _connect(self, *, first: bool = False) -> None:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(1, int(self._connect_timeout)),
                application_name="lepton-index",
            )
        except psycopg.Error as exc:
            reason = self._clean(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            if not first:
                raise
            raise ConfigError(
                f"cannot open the PostgreSQL index {self.shown_url}: {reason}; check --index "
                "(postgresql://USER@HOST[:PORT]/DATABASE), that the server runs, and $PGPASSWORD"
            ) from None
        self._conn = conn
        with conn.transaction():
            # Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog: one at a time.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_key("lepton-index-schema"),))
            conn.execute(_SCHEMA)
            row = conn.execute("SELECT max(version) FROM lepton_index_schema").fetchone()
            if row[0] is None:
                conn.execute("INSERT INTO lepton_index_schema VALUES (%s)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise ConfigError(
                    f"the PostgreSQL index {self.shown_url} has schema version {row[0]}; this Lepton "
                    f"knows {SCHEMA_VERSION}: upgrade Lepton"
                )

    def _clean(self, text: str) -> str:
        password = urllib.parse.urlsplit(self.url).password
        return text.replace(password, "***") if password else text

    # -- transactions ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, devices: Iterable[str] | None = None) -> Iterator[None]:
        """``devices=None``: exclusive over the dataset (recovery, compaction). With ``devices``:
        shared over the dataset, exclusive over these devices only; :meth:`known` and :meth:`add`
        may then be called for them alone."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._connect()  # the server restarted or the network dropped: a fresh session
        conn = self._conn
        with conn.transaction():
            if devices is None:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._global_key,))
                self._locked = None
            else:
                locked = frozenset(devices)
                keys = sorted({_key(self.dataset, d) for d in locked})
                conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._global_key,))
                if keys:  # unnest returns the array's order: ascending, the one order everyone uses
                    conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (keys,))
                self._locked = locked
            self._in_tx = True
            try:
                yield
            finally:
                self._in_tx = False
                self._locked = None

    def _check(self, device: str) -> None:
        if not self._in_tx:
            raise RuntimeError("PostgresIndex: call this inside index.transaction()")
        if self._locked is not None and device not in self._locked:
            raise RuntimeError(f"PostgresIndex: device {device!r} is not locked by this transaction")

    # -- ranges ---------------------------------------------------------------------------------------
    def _touching(self, device: str, runs: list[list[int]], *, touch: int) -> list[tuple[int, int]]:
        """Stored ranges of ``device`` that intersect (``touch=0``) or touch (``touch=1``) a run, sorted.
        One bounded lookup per run (the left neighbour, then ranges starting inside), one round trip."""
        los = [lo for lo, _ in runs]
        his = [min(hi + touch, MAX_SEQ) for _, hi in runs]
        rows = self._conn.execute(
            """
            SELECT DISTINCT r.first, r.last FROM unnest(%(lo)s::bigint[], %(hi)s::bigint[]) AS q(lo, hi)
            CROSS JOIN LATERAL (
                (SELECT first, last FROM lepton_ranges
                 WHERE dataset = %(ds)s AND device = %(dev)s AND first <= q.lo
                 ORDER BY first DESC LIMIT 1)
                UNION ALL
                (SELECT first, last FROM lepton_ranges
                 WHERE dataset = %(ds)s AND device = %(dev)s AND first > q.lo AND first <= q.hi)
            ) AS r
            WHERE r.last >= q.lo - %(touch)s
            ORDER BY r.first
            """,
            {"lo": los, "hi": his, "ds": self.dataset, "dev": device, "touch": touch},
        ).fetchall()
        return [(a, b) for a, b in rows]

    def known(self, device: str, seqs: Iterable[int]) -> set[int]:
        self._check(device)
        want = set(seqs)
        if not want:
            return set()
        found: set[int] = set()
        runs = seqs_to_ranges(want)
        spans = self._touching(device, runs, touch=0)
        for lo, hi in runs:
            for a, b in spans:
                a, b = max(a, lo), min(b, hi)
                if a <= b:
                    found.update(range(a, b + 1))
        return found & want

    def add(self, device: str, seqs: Iterable[int]) -> None:
        self._check(device)
        runs = seqs_to_ranges(seqs)
        if not runs:
            return
        existing = self._touching(device, runs, touch=1)
        # Stored ranges never touch each other, so merging the runs with the ranges that touch them
        # gives ranges that touch nothing else stored.
        merged: list[list[int]] = []
        for a, b in sorted([*map(tuple, runs), *existing]):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        conn = self._conn
        if existing:
            conn.execute(
                "DELETE FROM lepton_ranges WHERE dataset = %s AND device = %s AND first = ANY(%s)",
                (self.dataset, device, [a for a, _ in existing]),
            )
        conn.execute(
            "INSERT INTO lepton_ranges (dataset, device, first, last) "
            "SELECT %s, %s, f, l FROM unnest(%s::bigint[], %s::bigint[]) AS t(f, l)",
            (self.dataset, device, [a for a, _ in merged], [b for _, b in merged]),
        )

    def add_rows(self, rows: Iterable[tuple[str, int]]) -> None:
        by_device: dict[str, list[int]] = {}
        for device, seq in rows:
            by_device.setdefault(device, []).append(seq)
        for device in sorted(by_device):
            self.add(device, by_device[device])

    def ranges(self, device: str) -> list[tuple[int, int]]:
        """Every stored range of ``device`` (for tools and tests)."""
        return [
            (a, b)
            for a, b in self._conn.execute(
                "SELECT first, last FROM lepton_ranges WHERE dataset = %s AND device = %s ORDER BY first",
                (self.dataset, device),
            )
        ]

    # -- files ----------------------------------------------------------------------------------------
    def add_file(self, name: str, *, rows: int, size: int, visible: bool = False) -> None:
        self._conn.execute(
            "INSERT INTO lepton_files (dataset, name, rows, bytes, created, visible) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (dataset, name) DO UPDATE SET "
            "rows = excluded.rows, bytes = excluded.bytes, created = excluded.created, "
            "visible = excluded.visible",
            (self.dataset, name, rows, size, time.time(), visible),
        )

    def remove_files(self, names: Iterable[str]) -> None:
        names = list(names)
        if names:
            self._conn.execute(
                "DELETE FROM lepton_files WHERE dataset = %s AND name = ANY(%s)", (self.dataset, names)
            )

    def mark_visible(self, names: Iterable[str]) -> None:
        names = sorted(set(names))
        if not names:
            return
        # SKIP LOCKED: a row locked by another transaction is being marked (or removed) by it; waiting
        # for it is the one wait that could close a cycle, and skipping leaves at worst a file still
        # listed as invisible, which the next transaction finishes again (a no-op) and marks.
        self._conn.execute(
            "UPDATE lepton_files SET visible = true WHERE dataset = %s AND name IN ("
            " SELECT name FROM lepton_files WHERE dataset = %s AND name = ANY(%s) AND NOT visible"
            " FOR UPDATE SKIP LOCKED)",
            (self.dataset, self.dataset, names),
        )

    def invisible_files(self) -> list[str]:
        return [
            n
            for (n,) in self._conn.execute(
                "SELECT name FROM lepton_files WHERE dataset = %s AND NOT visible ORDER BY name",
                (self.dataset,),
            )
        ]

    def file_names(self) -> set[str]:
        rows = self._conn.execute("SELECT name FROM lepton_files WHERE dataset = %s", (self.dataset,))
        return {n for (n,) in rows}

    def count(self) -> int:
        row = self._conn.execute(
            "SELECT coalesce(sum(last - first + 1), 0) FROM lepton_ranges WHERE dataset = %s",
            (self.dataset,),
        ).fetchone()
        return int(row[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
