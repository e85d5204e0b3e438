"""The fleet dataset: Parquet files under ``{root}/{fleet}/data/``, readable without Lepton.

Contract (see ``docs/dataset.md``):

- files ``{root}/{fleet}/data/*.parquet``, each written atomically: a hidden ``.name…tmp`` is written,
  flushed and fsynced, renamed to ``name``, then the directory is fsynced. Readers ignore names starting
  with ``.``.
- columns: see :data:`SCHEMA`. ``x`` holds the raw little-endian C-order bytes of the tensor, ``dtype``
  and ``shape`` say how to view them (:func:`decode_x`).
- each ``(device, seq)`` appears once in the dataset (the ingest worker's index guarantees it).

In Python (a dataset the ingest worker wrote under ``/data``)::

    ds = Dataset("/data", "demo")
    table = ds.read_table(columns=["device", "seq", "label"])

Plain pyarrow, pandas or DuckDB read it too::

    duckdb.sql("SELECT label, count(*) FROM '/data/demo/data/*.parquet' GROUP BY label")
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lepton._fs import atomic_file, fsync_dir, write_atomic
from lepton.protocol import DTYPES, RawSample, Sample, SampleColumns, validate_id

log = logging.getLogger(__name__)

__all__ = [
    "COMPACT_PREFIX",
    "Dataset",
    "REPLACES_KEY",
    "SCHEMA",
    "decode_x",
    "fsync_dir",
    "samples_to_table",
    "table_from_columns",
    "table_from_rows",
    "write_atomic",
    "write_parquet_atomic",
    "write_parquet_synced",
]

#: The dataset schema. Field order is part of the contract.
SCHEMA = pa.schema(
    [
        pa.field("device", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("ts", pa.float64(), nullable=False),  # device capture time, unix seconds
        pa.field("label", pa.string(), nullable=True),  # int labels as decimal text ("7")
        pa.field("dtype", pa.string(), nullable=False),  # one of lepton.protocol.DTYPES
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("x", pa.binary(), nullable=False),  # raw little-endian C-order bytes
        pa.field("pipeline", pa.string(), nullable=True),  # pipeline_hash of the device's preprocessing
        pa.field("received_at", pa.float64(), nullable=False),  # worker receive time, unix seconds
        pa.field("meta", pa.string(), nullable=True),  # JSON text of the sample's meta map
    ],
    metadata={b"lepton.schema": b"1"},
)

#: Parquet key-value metadata of a compacted file: JSON list of the file names it replaces.
REPLACES_KEY = b"lepton.replaces"
#: Name prefix of compacted files (only these can carry REPLACES_KEY, so readers check few footers).
COMPACT_PREFIX = "compact-"
DATA_DIR = "data"


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _write_parquet(fh: BinaryIO, table: pa.Table, metadata: dict[bytes, bytes] | None) -> int:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    # Tensors compress poorly; snappy is nearly free and helps the id, label and pipeline columns.
    pq.write_table(table, fh, compression="snappy", row_group_size=64 * 1024)
    return fh.tell()


def write_parquet_synced(
    path: str | Path, table: pa.Table, *, metadata: dict[bytes, bytes] | None = None
) -> int:
    """Write ``table`` as Parquet at ``path``, flush and fsync it (no rename); return its size in bytes.

    The ingest worker's first step: it renames the file only once the index has committed it
    (``lepton.cloud._index``). ``metadata`` is added to the schema's key-value metadata (e.g.
    :data:`REPLACES_KEY`).
    """
    with open(path, "wb") as fh:
        size = _write_parquet(fh, table, metadata)
        fh.flush()
        os.fsync(fh.fileno())
        return size


def write_parquet_atomic(
    path: str | Path, table: pa.Table, *, metadata: dict[bytes, bytes] | None = None, sync_dir: bool = True
) -> int:
    """Write ``table`` as Parquet at ``path`` atomically (:func:`lepton._fs.atomic_file`: a hidden
    temporary file, fsync, rename, fsync dir); return the file's size in bytes."""
    with atomic_file(path, sync_dir=sync_dir) as fh:
        return _write_parquet(fh, table, metadata)


def _label_text(y: int | str | None) -> str | None:
    return None if y is None else str(y)


_WIRE_NAMES = {dt: name for name, dt in DTYPES.items()}


def _sample_row(device: str, pipeline: str | None, s: Sample, received_at: float) -> tuple:
    x = s.x
    name = _WIRE_NAMES.get(x.dtype)  # dict lookup: dtype.name is surprisingly slow in a hot loop
    if name is None or not x.flags.c_contiguous:
        name = x.dtype.name
        x = np.ascontiguousarray(x, dtype=DTYPES[name])
    meta = None if not s.meta else json.dumps(s.meta, separators=(",", ":"), sort_keys=True, default=str)
    return (
        device,
        s.seq,
        float(s.ts),
        _label_text(s.y),
        name,
        list(x.shape),
        x.tobytes(),
        pipeline,
        float(received_at),
        meta,
    )


def raw_sample_rows(device: str, pipeline: str | None, samples: Sequence[RawSample],
                    received_at: float) -> list[tuple]:
    """Dataset rows (schema order) of samples validated by ``lepton.protocol.decode_samples_raw``.

    The hot path of ingest: the tensor's wire bytes are already little-endian C order, exactly what
    the ``x`` column stores, so no array is built.
    """
    received_at = float(received_at)
    dumps = json.dumps
    return [
        (device, r.seq, r.ts, None if r.y is None else str(r.y), r.dtype, r.shape, bytes(r.data), pipeline,
         received_at, dumps(r.meta, separators=(",", ":"), sort_keys=True, allow_nan=False) if r.meta else None)
        for r in samples
    ]


def table_from_columns(parts: Sequence[tuple[str, str | None, float, SampleColumns]]) -> pa.Table:
    """Build a :data:`SCHEMA` table from envelopes validated by ``lepton.protocol.decode_samples_columns``:
    ``(device, pipeline, received_at, columns)`` each; the same table as :func:`table_from_rows` of
    :func:`raw_sample_rows`.

    The hot path of ingest, built per envelope, not per sample: the envelope's constant columns are
    repeated, the ``x`` column is one buffer of the tensors' wire bytes with numpy offsets, and the
    ``shape`` column of a uniform envelope is its first shape tiled.
    """
    if not parts:
        return SCHEMA.empty_table()
    seq: list[int] = []
    ts: list[float] = []
    label: list[int | str | None] = []
    dtype: list[str] = []
    meta: list[str | None] = []
    data: list[Any] = []
    dims: list[int] = []
    ranks: list[int] = []
    dumps = json.dumps
    for _dev, _pipe, _received_at, c in parts:
        n = len(c.seq)
        seq += c.seq
        ts += c.ts
        label += c.y
        dtype += c.dtype
        if c.meta.count(None) == n:
            meta += [None] * n
        else:
            meta += [dumps(m, separators=(",", ":"), sort_keys=True, allow_nan=False) if m else None
                     for m in c.meta]
        data += c.data
        if c.uniform:
            dims += c.shape[0] * n
            ranks += [len(c.shape[0])] * n
        else:
            dims += [d for s in c.shape for d in s]
            ranks += map(len, c.shape)
    # One value per envelope (device, pipeline, receive time): spread to its rows by index, in C.
    row_part = pa.array(np.repeat(np.arange(len(parts)), [len(p[3].seq) for p in parts]))
    device = pa.array([p[0] for p in parts], pa.string()).take(row_part)
    pipeline = pa.array([p[1] for p in parts], pa.string()).take(row_part)
    received = pa.array([float(p[2]) for p in parts], pa.float64()).take(row_part)
    # Labels are stored as text; int labels (the common kind) are turned into decimal text by Arrow.
    kinds = set(map(type, label))
    if kinds == {int}:
        labels = pa.array(label, pa.int64()).cast(pa.string())
    elif kinds <= {str, type(None)}:
        labels = pa.array(label, pa.string())
    else:
        labels = pa.array([None if y is None else str(y) for y in label], pa.string())
    total = len(seq)
    shape_offsets = np.zeros(total + 1, np.int32)
    np.cumsum(np.asarray(ranks, np.int32), out=shape_offsets[1:])
    shape = pa.ListArray.from_arrays(pa.array(shape_offsets), pa.array(np.asarray(dims, np.int32)))
    sizes = np.fromiter(map(len, data), np.int64, total)
    if int(sizes.sum()) < 2**31:  # binary's int32 offsets; beyond that pyarrow chunks the column
        offsets = np.zeros(total + 1, np.int32)
        np.cumsum(sizes, out=offsets[1:])
        buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
        x = pa.Array.from_buffers(pa.binary(), total, buffers)
    else:
        x = pa.array(data, pa.binary())
    columns = [device, seq, ts, labels, dtype, shape, x, pipeline, received, meta]
    return pa.Table.from_arrays(
        [c if isinstance(c, (pa.Array, pa.ChunkedArray)) else pa.array(c, f.type)
         for c, f in zip(columns, SCHEMA, strict=True)],
        schema=SCHEMA,
    )


def samples_to_table(
    rows: Iterable[tuple[str, str | None, Sample]], *, received_at: float | Sequence[float] | None = None
) -> pa.Table:
    """Build a :data:`SCHEMA` table from ``(device, pipeline, sample)`` tuples.

    ``received_at`` is one time for all rows or one per row (default: now).
    """
    rows = list(rows)
    if received_at is None:
        received_at = time.time()
    recv = [received_at] * len(rows) if isinstance(received_at, (int, float)) else list(received_at)
    return table_from_rows([_sample_row(d, p, s, r) for (d, p, s), r in zip(rows, recv, strict=True)])


def table_from_rows(rows: Sequence[tuple]) -> pa.Table:
    """Build a :data:`SCHEMA` table from tuples in schema order
    ``(device, seq, ts, label, dtype, shape, x, pipeline, received_at, meta)``."""
    if not rows:
        return SCHEMA.empty_table()
    cols = list(zip(*rows, strict=True))
    return pa.Table.from_arrays(
        [pa.array(c, f.type) for c, f in zip(cols, SCHEMA, strict=True)], schema=SCHEMA
    )


def new_file_name(worker: str = "w", *, prefix: str = "part-") -> str:
    """A unique, time-ordered data file name (workers of one DIR never collide)."""
    return f"{prefix}{time.time_ns() // 1_000_000:013d}-{worker}-{uuid.uuid4().hex[:8]}.parquet"


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def decode_x(dtype: str, shape: Sequence[int], x: bytes) -> np.ndarray:
    """View one row's ``x`` bytes as the numpy array it was (read-only, no copy).

    >>> decode_x("float32", [2], np.array([1, 2], "<f4").tobytes()).tolist()
    [1.0, 2.0]
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    arr = np.frombuffer(x, dtype=DTYPES[dtype])
    return arr.reshape([int(d) for d in shape])


def replaced_by(path: Path) -> list[str]:
    """File names a compacted file replaces (empty for an ordinary data file)."""
    if not path.name.startswith(COMPACT_PREFIX):
        return []
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(REPLACES_KEY)
    return list(json.loads(raw)) if raw else []


class Dataset:
    """Read access to one fleet's dataset under ``{root}/{fleet}/``.

    Example (a dataset the ingest worker wrote under ``/data``)::

        ds = Dataset("/data", "demo")
        ds.count(), ds.stats()["devices"]
    """

    def __init__(self, root: str | Path, fleet: str) -> None:
        self.root = Path(root)
        self.fleet = validate_id(fleet, kind="fleet")
        self.dir = self.root / fleet
        self.data_dir = self.dir / DATA_DIR

    def __repr__(self) -> str:
        return f"Dataset(root={str(self.root)!r}, fleet={self.fleet!r})"

    def files(self) -> list[Path]:
        """Visible data files, oldest first. Sources of a compaction that is still finishing are
        hidden once the compacted file exists, so a reader never counts a sample twice."""
        if not self.data_dir.is_dir():
            return []
        names = sorted(
            n for n in os.listdir(self.data_dir) if n.endswith(".parquet") and not n.startswith(".")
        )
        hidden: set[str] = set()
        for name in names:
            if name.startswith(COMPACT_PREFIX):
                try:
                    hidden.update(replaced_by(self.data_dir / name))
                except (OSError, pa.ArrowException, ValueError):
                    continue
        return [self.data_dir / n for n in names if n not in hidden]

    def _existing(self) -> list[Path]:
        return [p for p in self.files() if p.exists()]

    def count(self) -> int:
        """Number of samples (from the Parquet footers, no data read)."""
        total = 0
        for path in self.files():
            try:
                total += pq.read_metadata(path).num_rows
            except FileNotFoundError:  # removed by a concurrent compaction: its rows live on elsewhere
                continue
        return total

    def _filter(self, filter_pipeline: str | None):  # noqa: ANN202
        if filter_pipeline is None:
            return None
        import pyarrow.compute as pc

        return pc.field("pipeline") == filter_pipeline

    def read_table(
        self, columns: Sequence[str] | None = None, filter_pipeline: str | None = None
    ) -> pa.Table:
        """Read the whole dataset (or some columns, or one pipeline's rows) as one Arrow table."""
        tables = []
        for path in self.files():
            try:
                t = pq.read_table(
                    path, columns=list(columns) if columns else None, filters=self._filter(filter_pipeline)
                )
            except FileNotFoundError:
                continue
            tables.append(t)
        if not tables:
            schema = SCHEMA if not columns else pa.schema([SCHEMA.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def iter_batches(
        self, batch_size: int = 4096, columns: Sequence[str] | None = None, filter_pipeline: str | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Stream the dataset as record batches, file by file (memory stays bounded)."""
        import pyarrow.compute as pc

        for path in self.files():
            try:
                pf = pq.ParquetFile(path)
            except FileNotFoundError:
                continue
            want = list(columns) if columns else None
            read_cols = want
            if filter_pipeline is not None and want is not None and "pipeline" not in want:
                read_cols = [*want, "pipeline"]
            for batch in pf.iter_batches(batch_size=batch_size, columns=read_cols):
                if filter_pipeline is not None:
                    batch = batch.filter(pc.equal(batch.column("pipeline"), filter_pipeline))
                    if read_cols is not want:
                        batch = batch.select(want)
                    if batch.num_rows == 0:
                        continue
                yield batch

    def stats(self) -> dict[str, Any]:
        """Counts per device, label and pipeline, plus files, bytes and seq ranges per device."""
        per_device: Counter[str] = Counter()
        per_label: Counter[str] = Counter()
        per_pipeline: Counter[str] = Counter()
        total_bytes = 0
        x_bytes = 0
        n_files = 0
        rows = 0
        first_ts, last_ts = math.inf, -math.inf
        for path in self.files():
            try:
                total_bytes += path.stat().st_size
                t = pq.read_table(path, columns=["device", "label", "pipeline", "ts", "x"])
            except FileNotFoundError:
                continue
            n_files += 1
            rows += t.num_rows
            for name, counter in (("device", per_device), ("label", per_label), ("pipeline", per_pipeline)):
                vc = t.column(name).value_counts()
                for item in vc.to_pylist():
                    key = item["values"]
                    counter["(none)" if key is None else key] += item["counts"]
            if t.num_rows:
                import pyarrow.compute as pc

                mm = pc.min_max(t.column("ts")).as_py()
                first_ts, last_ts = min(first_ts, mm["min"]), max(last_ts, mm["max"])
                x_bytes += int(pc.sum(pc.binary_length(t.column("x"))).as_py() or 0)
        return {
            "fleet": self.fleet,
            "root": str(self.root),
            "samples": rows,
            "files": n_files,
            "bytes": total_bytes,
            "tensor_bytes": x_bytes,
            "devices": dict(sorted(per_device.items())),
            "labels": dict(sorted(per_label.items())),
            "pipelines": dict(sorted(per_pipeline.items())),
            "first_ts": None if rows == 0 else first_ts,
            "last_ts": None if rows == 0 else last_ts,
        }

