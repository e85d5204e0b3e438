"""The ingest batch transaction without I/O: messages in; rows, dead letters, acks and the
exactly-once decision out.

The worker (:mod:`lepton.cloud._ingest`) is a thin shell around it: paho's network thread queues
messages, the writer thread hands a batch to :meth:`BatchDecoder.decode`, asks the index which seqs it
already holds, gets a :class:`WritePlan` from :func:`plan_write`, and carries it out (quarantine,
Parquet file, index commit, acks, PUBACKs). Nothing here touches a socket, a file, a clock or a lock,
so every rule is unit-tested in microseconds (``tests/cloud/test_ingest_core.py``).

Each message is decoded and turned into rows inside its own error boundary: a message that breaks a
rule, or that the dataset schema refuses, costs that message only (a :class:`DeadLetter`), never the
batch. A bad sample inside an otherwise good envelope is dead-lettered alone; its seq is acked (a
resend cannot repair it, and the device's spool must drain).

A :class:`BatchDecoder` is owned by the worker's writer thread (its topic cache is not locked).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from lepton.errors import ProtocolError
from lepton.protocol import MAX_SEQ, SampleColumns, Topics, decode_samples_columns, seqs_to_ranges

log = logging.getLogger(__name__)

__all__ = [
    "BatchDecoder", "BatchProgress", "DeadLetter", "DecodedBatch", "Inbound", "InboundLike", "Part",
    "WritePlan",
    "plan_write",
]


@dataclass(frozen=True)
class Inbound:
    """One received message, as the shell hands it over."""

    topic: str
    payload: bytes
    received_at: float
    retain: bool = False
    #: set by the shell when writing this message failed for a reason no retry can fix
    unstorable: str | None = None


class InboundLike(Protocol):
    """What decoding reads of a message: an :class:`Inbound`, or the shell's own record of one."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def received_at(self) -> float: ...
    @property
    def retain(self) -> bool: ...
    @property
    def unstorable(self) -> str | None: ...


@dataclass(frozen=True)
class DeadLetter:
    """A rejected message (``problems`` with ``sample`` None) or its bad samples."""

    index: int  # of the message in the batch
    device: str | None
    #: ``(sample index or None, reason, field)``
    problems: tuple[tuple[int | None, str, str | None], ...]


class Part(NamedTuple):
    """The good samples of one message, as columns (validated by the protocol's rules)."""

    message: int  # its index in the batch
    device: str
    pipeline: str | None
    received_at: float
    columns: SampleColumns


@dataclass
class DecodedBatch:
    #: every message with good samples, in batch order
    parts: list[Part] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    #: seqs of dead-lettered samples to ack anyway, per device
    rejected: dict[str, set[int]] = field(default_factory=dict)
    #: the Arrow table of every row of ``parts``, in order (built by :meth:`BatchDecoder.decode`)
    table: Any = None

    @property
    def rows(self) -> list[tuple]:
        """The rows of :attr:`table` as tuples in dataset schema order (for tests and tools)."""
        if self.table is None or not self.table.num_rows:
            return []
        return list(zip(*(c.to_pylist() for c in self.table.columns), strict=True))

    @property
    def n_rows(self) -> int:
        return sum(len(p.columns.seq) for p in self.parts)

    def keys(self) -> list[tuple[str, int]]:
        """``(device, seq)`` of every good sample, in table order."""
        return [(p.device, s) for p in self.parts for s in p.columns.seq]

    def seqs(self) -> dict[str, set[int]]:
        """The seqs of the good samples, per device."""
        out: dict[str, set[int]] = {}
        for p in self.parts:
            out.setdefault(p.device, set()).update(p.columns.seq)
        return out


@dataclass(frozen=True)
class WritePlan:
    """What the shell does once the index said which seqs it already holds."""

    #: row indices of ``DecodedBatch.table`` to write; None means all of them
    keep: list[int] | None
    n_new: int
    n_duplicates: int
    #: seqs to record in the index, per device
    new_seqs: dict[str, set[int]]
    #: ack ranges to publish per device: every seq seen (new, duplicate, rejected)
    acks: dict[str, list[list[int]]]


@dataclass
class BatchProgress:
    """The steps one batch transaction has carried out, kept across its attempts.

    A transient failure (disk full, index locked) makes the shell try the same batch again; each step
    that already happened is skipped then, so the batch is decoded and admitted to quarantine once,
    committed to the index once (a second lookup would call its own new samples duplicates), renamed,
    reported and counted once. Owned by the writer thread, for one batch.
    """

    decoded: DecodedBatch | None = None
    #: dead-letter reports to publish, ``(name, payload, report)`` to quarantine, problems counted
    reports: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[tuple[str, bytes, dict[str, Any]]] = field(default_factory=list)
    n_dead: int = 0
    quarantined: bool = False  # payloads written and their folder fsynced
    committed: bool = False  # index transaction committed (plan, name, size, labelled are final)
    plan: WritePlan | None = None
    name: str | None = None
    size: int = 0
    labelled: int = 0
    renamed: bool = False  # file renamed into place and its folder fsynced
    reported: bool = False  # dead-letter reports published
    counted: bool = False  # added to the worker's counters


class BatchDecoder:
    """Decode and validate a batch with the protocol's one rule set, then build its table.

    >>> d = BatchDecoder(Topics(fleet="f1"), max_tensor_bytes=1 << 20, max_payload_bytes=1 << 20)
    >>> batch = d.decode([Inbound("lepton/f1/devices/cam-1/samples", b"junk", 0.0)])
    >>> batch.dead[0].problems[0][2]
    'payload'
    """

    def __init__(
        self,
        topics: Topics,
        *,
        max_tensor_bytes: int,
        max_payload_bytes: int,
    ) -> None:
        self.topics = topics
        self.max_tensor_bytes = max_tensor_bytes
        self.max_payload_bytes = max_payload_bytes
        self._topic_cache: dict[str, Any] = {}

    def decode(self, messages: Sequence[InboundLike]) -> DecodedBatch:
        out = DecodedBatch()
        for i, msg in enumerate(messages):
            self._decode_one(i, msg, out)
        self._build_table(out)
        return out

    def _device_of(self, topic: str) -> str:
        parsed = self._topic_cache.get(topic)
        if parsed is None:
            parsed = self.topics.parse(topic)
            if parsed.channel != "samples":
                raise ProtocolError(f"not a samples topic: {topic!r}", field="topic")
            if len(self._topic_cache) < 100_000:
                self._topic_cache[topic] = parsed
        assert parsed.device is not None  # a samples topic names its device
        return parsed.device

    def _decode_one(self, i: int, msg: InboundLike, out: DecodedBatch) -> None:
        device: str | None = None
        try:
            device = self._device_of(msg.topic)
            if msg.retain:
                # Samples are never retained (protocol v1): the broker would hand this message to
                # every worker that ever subscribes. What the device sent live (the broker clears the
                # retain flag on live delivery) was stored then.
                raise ProtocolError(
                    "retained samples message: samples are published with retain=false; "
                    "clear it with an empty retained message on this topic",
                    field="retain",
                )
            if msg.unstorable is not None:
                raise ProtocolError(f"the dataset writer cannot store this message ({msg.unstorable})",
                                    field="payload")
            # The columnar form of the validating decoder: no numpy array per sample, the tensor bytes
            # go to Parquet as they arrived, and the columns are built per envelope.
            device, pipeline, cols, bad = decode_samples_columns(
                msg.payload,
                expected_device=device,
                max_tensor_bytes=self.max_tensor_bytes,
                max_payload_bytes=self.max_payload_bytes,
            )
        except ProtocolError as exc:
            out.dead.append(DeadLetter(i, device, ((None, str(exc), exc.field),)))
            return
        except Exception as exc:  # noqa: BLE001 - the decoder promises ProtocolError; never trust it blindly
            reason = f"internal error: {type(exc).__name__}: {exc}"
            out.dead.append(DeadLetter(i, device, ((None, reason, None),)))
            return
        if bad:
            out.dead.append(DeadLetter(i, device, tuple((j, str(e), e.field) for j, _raw, e in bad)))
            for _j, raw, _e in bad:
                seq = raw.get("seq") if isinstance(raw, dict) else None
                if type(seq) is int and 0 <= seq <= MAX_SEQ:
                    out.rejected.setdefault(device, set()).add(seq)
        if cols.seq:
            out.parts.append(Part(i, device, pipeline, msg.received_at, cols))

    @staticmethod
    def _build_table(out: DecodedBatch) -> None:
        """One Arrow table for the batch; a message whose rows the schema refuses is found, dead-lettered
        and left out (its seqs acked: resending cannot repair it)."""
        from lepton.cloud import _dataset

        def table(parts: list[Part]) -> Any:
            return _dataset.table_from_columns(
                [(p.device, p.pipeline, p.received_at, p.columns) for p in parts]
            )

        try:
            out.table = table(out.parts)
            return
        except Exception:  # noqa: BLE001 - which message it was is found below
            log.warning("a batch of %d rows does not fit the dataset schema; checking message by message",
                        out.n_rows)
        kept = []
        for part in out.parts:
            try:
                table([part])
            except Exception as exc:  # noqa: BLE001
                reason = f"cannot be stored: {type(exc).__name__}: {exc}"
                out.dead.append(DeadLetter(part.message, part.device, ((None, reason, "samples"),)))
                out.rejected.setdefault(part.device, set()).update(part.columns.seq)
                continue
            kept.append(part)
        out.parts = kept
        out.table = table(out.parts)


def plan_write(batch: DecodedBatch, known: Mapping[str, set[int]]) -> WritePlan:
    """Exactly-once: keep the rows whose ``(device, seq)`` the index does not hold (``known``, per
    device) and that are not repeated inside the batch; ack everything seen."""
    n_rows = batch.n_rows
    valid = batch.seqs()
    if not any(known.get(d) for d in valid) and sum(map(len, valid.values())) == n_rows:
        keep = None  # the common case: nothing stored yet, no repeat inside the batch
        n_new = n_rows
    else:
        keep, taken = [], set()
        for i, key in enumerate(batch.keys()):
            if key[1] not in known.get(key[0], ()) and key not in taken:
                taken.add(key)
                keep.append(i)
        n_new = len(keep)
    new_seqs = {d: seqs - known.get(d, set()) for d, seqs in valid.items()}
    seen = {d: set(s) for d, s in valid.items()}
    for d, s in batch.rejected.items():
        seen.setdefault(d, set()).update(s)
    return WritePlan(
        keep=keep,
        n_new=n_new,
        n_duplicates=n_rows - n_new,
        new_seqs={d: s for d, s in new_seqs.items() if s},
        acks={d: seqs_to_ranges(s) for d, s in seen.items() if s},
    )
