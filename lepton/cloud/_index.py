"""The exactly-once index: which ``(device, seq)`` are stored, and which data files exist.

One index per dataset folder ``{root}/{fleet}/``, shared by every worker (and ``lepton dataset compact``)
writing there. The write protocol, for one batch, all under the index's exclusive lock:

1. finish files other writers committed but did not make visible (crash between commit and rename);
2. drop the seqs already stored;
3. write the Parquet file as ``.NAME.tmp`` and fsync it;
4. insert the rows and the file (``visible=0``) and COMMIT (the lock is released);
5. rename ``.NAME.tmp`` -> ``NAME``, fsync the folder; the file is marked visible in the next
   transaction.

Committing before the rename means the index never claims a sample that is not durably on disk, and a
visible file never holds a sample the index does not know, so a crash anywhere leaves at worst a
committed ``.tmp`` that the next transaction (any worker's) renames. An uncommitted ``.tmp`` is an
orphan and is deleted at start-up.

The store sits behind :class:`SampleIndex`: SQLite here (one machine), PostgreSQL in
:mod:`lepton.cloud._index_pg` for workers spread over several machines (``open_index(dir, url)``).
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from lepton.cloud._dataset import COMPACT_PREFIX, DATA_DIR, REPLACES_KEY, fsync_dir
from lepton.errors import ConfigError
from lepton.protocol import MAX_SEQ, seqs_to_ranges

log = logging.getLogger(__name__)

__all__ = ["SampleIndex", "SqliteIndex", "finish_file", "network_filesystem", "open_index"]

#: Written in a dataset folder indexed in PostgreSQL: names the backend and the URL (no password), so
#: a tool that opens the folder without ``--index`` (compaction, another worker) uses the same index
#: instead of starting an empty SQLite one beside it.
INDEX_MARKER = "index.json"


class SampleIndex(abc.ABC):
    """Abstract exactly-once index. All methods but :meth:`transaction` must be called inside it."""

    #: Exceptions of this backend that say "try again later" (locked, server gone): the ingest worker
    #: retries the batch on them, as on OSError.
    transient_errors: tuple[type[Exception], ...] = ()

    @abc.abstractmethod
    def transaction(self, devices: Iterable[str] | None = None) -> contextlib.AbstractContextManager[None]:
        """Transaction: commits on success, rolls back on error. ``devices=None`` excludes every other
        writer. With ``devices`` (a batch names the devices it holds) a backend may exclude only
        writers of those devices, and :meth:`known`/:meth:`add` are then called for them alone."""

    @abc.abstractmethod
    def known(self, device: str, seqs: Iterable[int]) -> set[int]:
        """The subset of ``seqs`` already stored for ``device``."""

    @abc.abstractmethod
    def add(self, device: str, seqs: Iterable[int]) -> None:
        """Record ``seqs`` of ``device`` as stored (none of them known)."""

    def add_rows(self, rows: Iterable[tuple[str, int]]) -> None:
        """Record ``(device, seq)`` pairs as stored (none of them known)."""
        by_device: dict[str, list[int]] = {}
        for device, seq in rows:
            by_device.setdefault(device, []).append(seq)
        for device, seqs in by_device.items():
            self.add(device, seqs)

    @abc.abstractmethod
    def add_file(self, name: str, *, rows: int, size: int, visible: bool = False) -> None: ...

    @abc.abstractmethod
    def remove_files(self, names: Iterable[str]) -> None: ...

    @abc.abstractmethod
    def mark_visible(self, names: Iterable[str]) -> None: ...

    @abc.abstractmethod
    def invisible_files(self) -> list[str]:
        """Files committed but not yet marked visible."""

    @abc.abstractmethod
    def file_names(self) -> set[str]: ...

    @abc.abstractmethod
    def count(self) -> int:
        """Number of stored samples."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class SqliteIndex(SampleIndex):
    """SQLite (WAL, synchronous=FULL) index at ``{dataset_dir}/index.sqlite``.

    ``BEGIN IMMEDIATE`` takes SQLite's write lock, which serialises workers of one folder, even in
    different processes. Do not put the folder on a network filesystem: SQLite locking needs a local one.

    Stored seqs are kept as inclusive ranges per device (``ranges(device, first, last)``), merged on
    insert: devices number their samples 0, 1, 2..., so a device's history is a handful of rows and a
    batch costs a few statements instead of one B-tree insert per sample (the worker's hottest cost
    when it was per sample). Out-of-order or sparse seqs still work; they just make more ranges.
    """

    transient_errors = (sqlite3.OperationalError,)

    def __init__(self, path: str | Path, *, busy_timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _refuse_network_filesystem(self.path.parent)
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        # Two processes opening a new index at once (two workers of one folder, or a worker and its
        # store child) race to switch it to WAL: the loser gets "database is locked" at once, without
        # SQLite's busy handler, so the set-up is retried here for as long as a busy lock is waited for.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                self._set_up()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    self._db.close()
                    raise
                time.sleep(0.02)

    def _set_up(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS ranges (
                device TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
                PRIMARY KEY (device, first)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS files (
                name TEXT PRIMARY KEY, rows INTEGER NOT NULL, bytes INTEGER NOT NULL,
                created REAL NOT NULL, visible INTEGER NOT NULL DEFAULT 0);
            CREATE INDEX IF NOT EXISTS files_invisible ON files (visible) WHERE visible = 0;
            """
        )

    @contextlib.contextmanager
    def transaction(self, devices: Iterable[str] | None = None) -> Iterator[None]:
        # One write lock for the whole file: ``devices`` changes nothing here.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _ranges_within(self, device: str, lo: int, hi: int) -> list[tuple[int, int]]:
        """Stored ranges of ``device`` that intersect or touch ``[lo, hi]``, sorted."""
        db = self._db
        out = []
        left = db.execute(
            "SELECT first, last FROM ranges WHERE device=? AND first<=? ORDER BY first DESC LIMIT 1",
            (device, lo),
        ).fetchone()
        if left is not None and left[1] >= lo - 1:
            out.append(left)
        out.extend(
            db.execute(
                "SELECT first, last FROM ranges WHERE device=? AND first>? AND first<=? ORDER BY first",
                (device, lo, hi),
            )
        )
        return out

    def known(self, device: str, seqs: Iterable[int]) -> set[int]:
        # One bounded lookup per run of consecutive wanted seqs: the work follows the batch (and the
        # stored ranges inside its runs), never the span between its smallest and largest seq. A
        # device that sends sparse seqs 10**12 apart costs two lookups, not a scan of its history.
        want = set(seqs)
        if not want:
            return set()
        found: set[int] = set()
        for lo, hi in seqs_to_ranges(want):
            spans = self._ranges_within(device, lo, hi)
            for a, b in spans:
                a, b = max(a, lo), min(b, hi)
                if a <= b:
                    found.update(range(a, b + 1))
        return found & want

    def add(self, device: str, seqs: Iterable[int]) -> None:
        db = self._db
        for first, last in seqs_to_ranges(seqs):
            # Merge with every stored range that overlaps or touches [first, last].
            merged = self._ranges_within(device, first, min(last + 1, MAX_SEQ))
            if merged:
                first = min(first, merged[0][0])
                last = max(last, max(b for _, b in merged))
                db.executemany(
                    "DELETE FROM ranges WHERE device=? AND first=?", [(device, a) for a, _ in merged]
                )
            db.execute("INSERT INTO ranges (device, first, last) VALUES (?, ?, ?)", (device, first, last))

    def ranges(self, device: str) -> list[tuple[int, int]]:
        """Every stored range of ``device`` (for tools and tests)."""
        return list(
            self._db.execute("SELECT first, last FROM ranges WHERE device=? ORDER BY first", (device,))
        )

    def add_file(self, name: str, *, rows: int, size: int, visible: bool = False) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO files (name, rows, bytes, created, visible) VALUES (?, ?, ?, ?, ?)",
            (name, rows, size, time.time(), int(visible)),
        )

    def remove_files(self, names: Iterable[str]) -> None:
        self._db.executemany("DELETE FROM files WHERE name=?", [(n,) for n in names])

    def mark_visible(self, names: Iterable[str]) -> None:
        self._db.executemany("UPDATE files SET visible=1 WHERE name=?", [(n,) for n in names])

    def invisible_files(self) -> list[str]:
        return [n for (n,) in self._db.execute("SELECT name FROM files WHERE visible=0")]

    def file_names(self) -> set[str]:
        return {n for (n,) in self._db.execute("SELECT name FROM files")}

    def count(self) -> int:
        return int(self._db.execute("SELECT total(last - first + 1) FROM ranges").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def finish_file(data_dir: Path, name: str, *, own: bool = False) -> str:
    """Make a committed file visible: rename its ``.tmp`` if needed, then delete the sources a compacted
    file replaces. Safe to run concurrently with the file's own writer. Returns ``"renamed"`` when it
    finished an interrupted writer's rename, ``"present"`` when the file was already in place, and
    ``"missing"`` when neither it nor its ``.tmp`` exists (logged loudly: it should not happen)."""
    final = data_dir / name
    tmp = data_dir / f".{name}.tmp"
    state = "present"
    if not final.exists():
        try:
            os.replace(tmp, final)
            fsync_dir(data_dir)
            state = "renamed"
            if not own:
                log.warning("finished committed file %s left by an interrupted writer", name)
        except FileNotFoundError:
            if not final.exists():
                log.error("index lists %s but neither it nor its .tmp exists", name)
                return "missing"
    if name.startswith(COMPACT_PREFIX):
        import pyarrow.parquet as pq

        raw = (pq.read_schema(final).metadata or {}).get(REPLACES_KEY)
        removed = False
        for src in json.loads(raw) if raw else []:
            with contextlib.suppress(FileNotFoundError):
                (data_dir / src).unlink()
                removed = True
        if removed:
            fsync_dir(data_dir)
    return state


def recover(index: SampleIndex, dataset_dir: Path) -> dict[str, int]:
    """Start-up recovery, inside one index transaction: finish committed files, delete orphan ``.tmp``
    files, and register visible data files the index does not know (dropping rows it already has).
    Returns counts of what it did."""
    import pyarrow.parquet as pq

    from lepton.cloud._dataset import write_parquet_atomic

    data_dir = dataset_dir / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    done = {"finished": 0, "orphans_removed": 0, "registered": 0, "duplicates_dropped": 0}
    with index.transaction():
        pending = index.invisible_files()
        for name in pending:
            if finish_file(data_dir, name) == "renamed":
                done["finished"] += 1
        index.mark_visible(pending)
        known_files = index.file_names()
        for entry in sorted(os.listdir(data_dir)):
            if entry.startswith(".") and entry.endswith(".tmp"):
                if entry[1:-4] not in known_files:
                    (data_dir / entry).unlink(missing_ok=True)
                    done["orphans_removed"] += 1
                continue
            if entry.startswith(".") or not entry.endswith(".parquet") or entry in known_files:
                continue
            # A data file the index never saw (copied in, or an index restored from backup).
            path = data_dir / entry
            table = pq.read_table(path)
            keep = []
            rows: list[tuple[str, int]] = []
            devices = table.column("device").to_pylist()
            seqs = table.column("seq").to_pylist()
            seen: set[tuple[str, int]] = set()
            by_device: dict[str, set[int]] = {}
            for d, s in zip(devices, seqs, strict=True):
                by_device.setdefault(d, set()).add(s)
            already = {d: index.known(d, s) for d, s in by_device.items()}
            for i, (d, s) in enumerate(zip(devices, seqs, strict=True)):
                if s in already[d] or (d, s) in seen:
                    continue
                seen.add((d, s))
                keep.append(i)
                rows.append((d, s))
            dropped = table.num_rows - len(keep)
            if dropped:
                done["duplicates_dropped"] += dropped
                log.warning("%s holds %d samples already stored; rewriting it without them", entry, dropped)
                if keep:
                    write_parquet_atomic(path, table.take(keep))
                else:
                    path.unlink()
                    fsync_dir(data_dir)
                    continue
            index.add_rows(rows)
            index.add_file(entry, rows=len(rows), size=path.stat().st_size, visible=True)
            done["registered"] += 1
    if any(done.values()):
        log.warning("recovered dataset %s: %s", dataset_dir, done)
    return done


def open_index(dataset_dir: str | Path, url: str | None = None) -> SampleIndex:
    """The index of a dataset folder ``{root}/{fleet}``: SQLite (``index.sqlite``) by default, the
    PostgreSQL database ``url`` (``postgresql://USER@HOST[:PORT]/DB``) otherwise. A folder once indexed
    in PostgreSQL records it (``index.json``, no password), so ``url=None`` then opens that database
    again (password from ``$PGPASSWORD``), and a SQLite index is refused there."""
    dataset_dir = Path(dataset_dir)
    marker = dataset_dir / INDEX_MARKER
    recorded = None
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())["url"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{marker} is unreadable ({exc}); fix it or pass --index URL") from None
    if url is None and recorded is None:
        return SqliteIndex(dataset_dir / "index.sqlite")
    from lepton.cloud._index_pg import PostgresIndex, is_postgres_url, redact_url

    chosen = url if url is not None else recorded
    assert chosen is not None  # both None returned the SQLite index above
    if not is_postgres_url(chosen):
        scheme = chosen.split("://", 1)[0] if "://" in chosen else chosen
        raise ConfigError(
            f"--index must be postgresql://USER@HOST[:PORT]/DATABASE (got {scheme!r}); "
            "leave it out for the SQLite index in the dataset folder"
        )
    index = PostgresIndex(chosen, dataset=dataset_dir.name)
    if recorded is None or redact_url(chosen) != recorded:
        if recorded is not None:
            log.warning("dataset %s was indexed in %s; now %s", dataset_dir, recorded, redact_url(chosen))
        elif (dataset_dir / "index.sqlite").exists():
            log.warning("dataset %s has a SQLite index; PostgreSQL %s takes over (its files are registered "
                        "at start-up): stop every worker that still uses the SQLite one",
                        dataset_dir, redact_url(chosen))
        from lepton._fs import write_atomic

        dataset_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps({"backend": "postgresql", "url": redact_url(chosen)}).encode())
    return index


#: Filesystem types (``/proc/mounts``) whose locking SQLite cannot rely on: network and cluster
#: filesystems, where WAL's shared memory is not shared between machines and locks may be advisory.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "ocfs2", "gfs2", "fuse.sshfs", "sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone",
    "fuse.glusterfs", "fuse.ceph-fuse", "fuse.juicefs", "fuse.goofys", "fuse.davfs", "davfs",
})


def network_filesystem(path: str | Path, mounts: str | None = None) -> str | None:
    """The filesystem type of ``path`` if it is a network filesystem (see :data:`NETWORK_FILESYSTEMS`),
    else None. ``mounts`` is the text of ``/proc/mounts`` (read when None; None off Linux)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, best_type = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes space, tab, newline and backslash as octal (\040 ...).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type if best_type in NETWORK_FILESYSTEMS else None


def _refuse_network_filesystem(folder: Path) -> None:
    fs = network_filesystem(folder)
    if fs is not None:
        raise ConfigError(
            f"{folder} is on a network filesystem ({fs}): SQLite's locks do not work there, so workers "
            "could store a sample twice or corrupt the index; keep the index on a local disk, or pass "
            "--index postgresql://USER@HOST/DB (the dataset folder may then be a shared mount)"
        )


def compact(
    dataset_dir: str | Path,
    *,
    small_rows: int = 50_000,
    max_rows: int = 500_000,
    index: SampleIndex | None = None,
) -> dict[str, int]:
    """Merge data files of fewer than ``small_rows`` rows into ``compact-*.parquet`` files of at most
    ``max_rows`` rows. Safe while workers write: it holds the index lock while it reads the sources and
    writes the merged file, commits the swap in the index, then renames the merged file into place and
    deletes the sources. The merged file lists the sources it replaces (``lepton.replaces``), so a crash
    after the commit is finished by the next writer (:func:`finish_file`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lepton.cloud._dataset import COMPACT_PREFIX, new_file_name, write_parquet_synced

    dataset_dir = Path(dataset_dir)
    data_dir = dataset_dir / DATA_DIR
    own = index is None
    index = index or open_index(dataset_dir)
    merged: list[str] = []
    result = {"files_before": 0, "files_merged": 0, "files_written": 0, "rows": 0}
    try:
        recover(index, dataset_dir)
        with index.transaction():
            pending = index.invisible_files()
            for name in pending:
                finish_file(data_dir, name)
            index.mark_visible(pending)
            sizes = {}
            for name in sorted(index.file_names()):
                if (data_dir / name).exists():
                    sizes[name] = pq.read_metadata(data_dir / name).num_rows
            result["files_before"] = len(sizes)
            small = [n for n, rows in sizes.items() if rows < small_rows]
            groups: list[list[str]] = [[]]
            total = 0
            for name in small:
                if groups[-1] and total + sizes[name] > max_rows:
                    groups.append([])
                    total = 0
                groups[-1].append(name)
                total += sizes[name]
            for group in groups:
                if len(group) < 2:
                    continue
                table = pa.concat_tables([pq.read_table(data_dir / n) for n in group])
                name = new_file_name("c", prefix=COMPACT_PREFIX)
                tmp = data_dir / f".{name}.tmp"
                size = write_parquet_synced(tmp, table, metadata={REPLACES_KEY: json.dumps(group).encode()})
                index.remove_files(group)
                index.add_file(name, rows=table.num_rows, size=size, visible=False)
                merged.append(name)
                result["files_merged"] += len(group)
                result["files_written"] += 1
                result["rows"] += table.num_rows
        for name in merged:
            finish_file(data_dir, name, own=True)
        if merged:
            with index.transaction():
                index.mark_visible(merged)
    finally:
        if own:
            index.close()
    return result
