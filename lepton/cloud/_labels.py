"""Label provenance: labels that arrive after their sample, and which label a sample trains with.

A sample's label has a **source**:

* ``device``: sent with the sample (the ``label`` column of the data files);
* ``teacher``: the cloud model's answer to an escalated sample, with its confidence and model version
  (written by ``lepton serve --data DIR``);
* ``human``: imported by a person (``lepton dataset label --csv FILE``).

Data files are never rewritten for a label. Late labels live in ``{root}/{fleet}/labels/*.parquet``,
one atomically written file per import or per batch of teacher answers, in :data:`LABEL_SCHEMA`
(``device, seq, label, source, confidence, model_version, ts``). Within one source the newest label
of a ``(device, seq)`` wins (a re-import corrects an earlier one). Across sources,
:class:`LabelResolver` applies the precedence the trainer is given (default
``human > device > teacher``) and drops teacher labels below a confidence floor. docs/dataset.md
shows the same join in DuckDB and pandas.

:class:`LabelResolver` is I/O-free: rows in, ``(label, source)`` out. :class:`LabelStore` reads and
writes the files.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton.errors import ConfigError
from lepton.protocol import validate_id

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LABEL_SOURCES",
    "LABEL_SOURCES",
    "LabelResolver",
    "LabelRow",
    "LabelStore",
    "parse_label_sources",
    "read_label_csv",
]

LABEL_SOURCES = ("human", "device", "teacher")
DEFAULT_LABEL_SOURCES = ("human", "device", "teacher")
LABELS_DIR = "labels"
MAX_LABEL_CHARS = 256


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("device", pa.string()),
            ("seq", pa.int64()),
            ("label", pa.string()),
            ("source", pa.string()),
            ("confidence", pa.float64()),
            ("model_version", pa.int64()),
            ("ts", pa.float64()),
        ]
    )


@dataclass(frozen=True)
class LabelRow:
    device: str
    seq: int
    label: str
    source: str
    confidence: float | None = None
    model_version: int | None = None
    ts: float = 0.0


def parse_label_sources(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"human,device"`` -> ``("human", "device")``: the sources to use, in precedence order."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s) for s in text]
    items = [s for s in items if s]
    bad = [s for s in items if s not in LABEL_SOURCES]
    if bad or not items or len(set(items)) != len(items):
        raise ConfigError(
            f"--labels {','.join(items) or text!r}: give one or more of {', '.join(LABEL_SOURCES)}, "
            "each once, in precedence order (e.g. human,device,teacher)"
        )
    return tuple(items)


@dataclass
class LabelResolver:
    """Which label each sample trains with, by source precedence. No I/O.

    >>> r = LabelResolver(("human", "device", "teacher"), min_teacher_confidence=0.9)
    >>> r.add(LabelRow("cam-1", 7, "cat", "teacher", confidence=0.95))
    >>> r.resolve("cam-1", 7, None), r.resolve("cam-1", 7, "dog")
    (('cat', 'teacher'), ('dog', 'device'))
    >>> r.add(LabelRow("cam-1", 7, "fox", "human"))
    >>> r.resolve("cam-1", 7, "dog")
    ('fox', 'human')
    """

    sources: tuple[str, ...] = DEFAULT_LABEL_SOURCES
    min_teacher_confidence: float = 0.9
    #: (device, seq) -> source -> (ts, order, label); the newest per source wins.
    _late: dict[tuple[str, int], dict[str, tuple[float, int, str]]] = field(default_factory=dict)
    ignored: Counter = field(default_factory=Counter)
    _order: int = 0

    def __post_init__(self) -> None:
        self.sources = parse_label_sources(self.sources)
        if not 0.0 <= self.min_teacher_confidence <= 1.0:
            raise ConfigError(
                f"--min-teacher-confidence must be in [0, 1], got {self.min_teacher_confidence}"
            )

    def add(self, row: LabelRow) -> None:
        if row.source not in self.sources or row.source == "device":
            self.ignored[f"{row.source}_not_used"] += 1
            return
        if row.source == "teacher":
            c = row.confidence
            if c is None or not c >= self.min_teacher_confidence:
                self.ignored["teacher_below_confidence"] += 1
                return
        self._order += 1
        slot = self._late.setdefault((row.device, int(row.seq)), {})
        key = (float(row.ts), self._order, row.label)
        if row.source not in slot or key >= slot[row.source]:
            slot[row.source] = key

    def __len__(self) -> int:
        return len(self._late)

    def resolve(self, device: str, seq: int, device_label: str | None) -> tuple[str | None, str | None]:
        """``(label, source)`` of one sample; ``(None, None)`` when no allowed source labels it."""
        late = self._late.get((device, int(seq)))
        for source in self.sources:
            if source == "device":
                if device_label is not None:
                    return str(device_label), "device"
            elif late is not None and source in late:
                return late[source][2], source
        return None, None


def _check_row(device: Any, seq: Any, label: Any, *, where: str) -> tuple[str, int, str]:
    try:
        device = validate_id(str(device), kind="device")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    try:
        seq_i = int(str(seq).strip())
    except ValueError:
        raise ValueError(f"{where}: seq {seq!r} is not an integer") from None
    if not 0 <= seq_i < 2**63:
        raise ValueError(f"{where}: seq {seq_i} is out of range (0 .. 2^63-1)")
    text = "" if label is None else str(label).strip()
    if not text or len(text) > MAX_LABEL_CHARS or any(ord(ch) < 32 for ch in text):
        raise ValueError(f"{where}: label {label!r} must be 1..{MAX_LABEL_CHARS} printable characters")
    return device, seq_i, text


def read_label_csv(path: str | Path) -> tuple[list[tuple[str, int, str]], list[str]]:
    """``(rows, problems)`` of a CSV with a ``device,seq,label`` header; a bad row is a problem, not a crash."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--csv {path}: no such file; give a CSV with the header device,seq,label")
    rows: list[tuple[str, int, str]] = []
    problems: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        need = {"device", "seq", "label"}
        if reader.fieldnames is None or not need <= {f.strip() for f in reader.fieldnames}:
            raise ConfigError(
                f"--csv {path}: the first line must be the header device,seq,label (got {reader.fieldnames})"
            )
        for n, rec in enumerate(reader, start=2):
            rec = {k.strip(): v for k, v in rec.items() if k is not None}
            try:
                rows.append(_check_row(rec.get("device"), rec.get("seq"), rec.get("label"), where=f"line {n}"))
            except ValueError as exc:
                problems.append(str(exc))
    return rows, problems


class LabelStore:
    """``{root}/{fleet}/labels/*.parquet``: append-only files of late labels."""

    def __init__(self, root: str | Path, fleet: str) -> None:
        self.root = Path(root)
        self.fleet = validate_id(fleet, kind="fleet")
        self.directory = self.root / self.fleet / LABELS_DIR

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.parquet") if not p.name.startswith("."))

    def append(self, rows: Iterable[LabelRow], *, writer: str = "w") -> Path | None:
        """Write ``rows`` as one new file, atomically (tmp, fsync, rename, fsync dir); None if empty."""
        import pyarrow as pa

        from lepton.cloud._dataset import new_file_name, write_parquet_atomic

        rows = list(rows)
        if not rows:
            return None
        for r in rows:
            if r.source not in ("human", "teacher"):
                raise ValueError(f"label source {r.source!r}: late labels are human or teacher")
            _check_row(r.device, r.seq, r.label, where=f"label of {r.device}/{r.seq}")
            if r.confidence is not None and not (math.isfinite(r.confidence) and 0 <= r.confidence <= 1):
                raise ValueError(f"label of {r.device}/{r.seq}: confidence {r.confidence} not in [0, 1]")
        schema = _schema()
        cols = list(zip(*[(r.device, int(r.seq), r.label, r.source, r.confidence, r.model_version,
                           float(r.ts or time.time())) for r in rows], strict=True))
        table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, schema, strict=True)],
                                     schema=schema)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / new_file_name(writer, prefix="labels-")
        write_parquet_atomic(path, table)
        return path

    def rows(self) -> Iterable[LabelRow]:
        import pyarrow.parquet as pq

        for path in self.files():
            try:
                table = pq.read_table(path)
            except FileNotFoundError:
                continue
            names = set(table.column_names)
            if not {"device", "seq", "label", "source"} <= names:
                log.warning("label file %s lacks the label columns; skipped", path)
                continue
            data = table.to_pydict()
            n = table.num_rows
            for i in range(n):
                yield LabelRow(
                    device=data["device"][i],
                    seq=int(data["seq"][i]),
                    label=data["label"][i],
                    source=data["source"][i],
                    confidence=data.get("confidence", [None] * n)[i],
                    model_version=data.get("model_version", [None] * n)[i],
                    ts=data.get("ts", [0.0] * n)[i] or 0.0,
                )

    def resolver(
        self, sources: Sequence[str] = DEFAULT_LABEL_SOURCES, *, min_teacher_confidence: float = 0.9
    ) -> LabelResolver:
        r = LabelResolver(tuple(sources), min_teacher_confidence=min_teacher_confidence)
        for row in self.rows():
            r.add(row)
        return r

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.source for r in self.rows()))
