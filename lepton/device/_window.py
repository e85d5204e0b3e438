"""The device's publish window without I/O: what to send next, when to go back, how to split a batch.

:class:`PublishWindow` is the go-back-N sender of the device agent, in the style of h11 and wsproto
("sans-I/O"): it never touches a socket, a thread, a clock, the spool or SQLite. The agent's publisher
thread feeds it events and carries out its decisions, and its rules are tested in microseconds
(``tests/device/test_window.py``).

Events in (each a method):

* ``connected(now)``: (re)connected; whatever was in flight may be lost, so go back.
* ``disconnected()``: nothing is sent until ``connected`` again.
* ``receive_acks(ranges)``: ack ranges arrived; returns them merged, every one for the spool to delete.
* ``spool_deleted(count, now)``: the spool deleted ``count`` samples for those ranges (ack progress).
* ``spool_dropped_through(seq)``: the drop-oldest policy deleted every seq up to ``seq``, unacknowledged.
* ``offer(rows)``: the spooled rows a :class:`Read` asked for.
* ``sent(send)``: every envelope of a :class:`Send` was handed to the broker.

Decisions out: ``poll(now, wall=..., flush=...)`` returns :class:`Read` (offer up to ``limit`` spooled
rows with a seq after ``after``), :class:`Send` (publish these envelopes, then call ``sent``; a failed
publish is simply not confirmed), :class:`Wait` (nothing to do until something changes, or ``timeout``)
or :class:`GoBack` (no ack progress for ``ack_timeout`` seconds: it went back to the oldest sample).

The rules:

1. Samples go out in seq order after a cursor, the highest seq sent since the last go-back. Seqs may
   have gaps (acked or dropped samples); nothing assumes they are contiguous.
2. In flight are the samples sent since the last go-back and neither acknowledged nor dropped: at most
   ``window``. A read asks for at most ``min(k * batch_size, window - in_flight)`` rows, where ``k``
   (batches per read) is 1 until rows were seen, then as many batches as fit in ``read_bytes`` by the
   last rows' mean body size, between 1 and ``batches_per_read``. One read then feeds one
   :class:`Send` of up to ``k`` envelopes: at batch 1 that is one spool query for many samples.
3. A batch goes out when it is full (``batch_size`` rows), when its oldest sample is ``batch_ms`` old (its
   capture time ``ts`` against ``wall``, the wall clock), or at once when ``flush`` (capture stopped).
   Of a read of several batches, the full ones go out at once; a partial last one goes with them only
   when it is due, else it is read again with the next read.
4. Go-back-N: on ``connected`` and when samples are in flight and no ack made progress for
   ``ack_timeout`` seconds of ``now`` (a monotonic clock), the cursor goes back to the start and the
   in-flight samples are forgotten: everything still spooled is sent again, oldest first. Ack progress
   means the spool deleted something for an ack; the ack clock also restarts when the first sample
   goes in flight and at every go-back. ``resent`` counts samples at or below the highest seq sent.
5. Acks: ranges are merged (sorted, overlapping and adjacent ones joined) and all of them go to the
   spool, unknown seqs included (a previous run's samples may still be spooled); the spool ignores
   what it does not hold. The in-flight samples and offered rows that a range covers leave the window.
   A duplicate or out-of-order ack is harmless.
6. Envelopes: a Send holds one envelope per batch of ``batch_size`` rows; a batch is split where the
   pipeline hash changes and before an envelope would outgrow
   ``max_message_bytes`` (estimated as :data:`ENVELOPE_OVERHEAD` plus, per sample, its body and
   :data:`SAMPLE_OVERHEAD`, upper bounds). Every envelope holds at least one sample, so a sample larger
   than the limit on its own is still sent, alone, flagged ``oversize`` (the agent warns once;
   docs/protocol.md, "Message size").
7. A sample that cannot be encoded (which cannot happen for what the spool stored) gets an envelope
   with ``payload=None`` and the ``error``; it counts as sent, so the publisher never loops on it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from lepton.errors import ProtocolError
from lepton.protocol import encode_samples_packed

__all__ = [
    "ENVELOPE_OVERHEAD",
    "SAMPLE_OVERHEAD",
    "Envelope",
    "GoBack",
    "PublishWindow",
    "Read",
    "Row",
    "Send",
    "Wait",
    "merge_ranges",
    "split_envelopes",
]

#: msgpack framing around the spooled sample bodies: the envelope's map, "v", "device", "pipeline" and
#: the samples array; per sample the "seq" and "ts" entries. Upper bounds, so envelopes stay under the limit.
ENVELOPE_OVERHEAD = 256
SAMPLE_OVERHEAD = 32


class Row(Protocol):
    """A spooled sample as the window sees it (:class:`lepton.device.SpooledSample` is one)."""

    @property
    def seq(self) -> int: ...
    @property
    def ts(self) -> float: ...
    @property
    def pipeline(self) -> str | None: ...
    @property
    def body(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Read:
    """Offer (:meth:`PublishWindow.offer`) up to ``limit`` spooled rows with a seq after ``after``."""

    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to send now.

    ``reason``: ``offline`` (until connected), ``window`` (until acks free room), ``empty`` (until a
    sample is spooled) or ``batch`` (a partial batch: until seq ``until_seq`` is spooled, at most
    ``timeout`` seconds, then it goes out as it is). ``timeout`` None: until something changes.
    """

    reason: Literal["offline", "window", "empty", "batch"]
    timeout: float | None = None
    until_seq: int | None = None


@dataclass(frozen=True, slots=True)
class GoBack:
    """No ack made progress for ``ack_timeout`` seconds with ``in_flight`` samples out: resend them all."""

    in_flight: int


@dataclass(frozen=True, slots=True)
class Envelope:
    """One samples message: seqs ``first``..``last`` (``count`` samples, maybe with gaps)."""

    first: int
    last: int
    count: int
    payload: bytes | None
    error: str | None = None
    #: one sample that is over the size limit on its own: sent anyway, alone
    oversize: bool = False


@dataclass(frozen=True, slots=True)
class Send:
    """Publish ``envelopes`` in order, then confirm with :meth:`PublishWindow.sent`."""

    envelopes: tuple[Envelope, ...]
    seqs: tuple[int, ...]
    #: how many of ``seqs`` were sent before (after a go-back)
    resent: int

    @property
    def count(self) -> int:
        return len(self.seqs)


def merge_ranges(ranges: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
    """Sort inclusive ``(first, last)`` ranges and join overlapping and adjacent ones.

    >>> merge_ranges([(5, 9), (0, 3), (4, 4), (20, 21), (8, 12)])
    [(0, 12), (20, 21)]
    """
    merged: list[list[int]] = []
    for first, last in sorted((int(a), int(b)) for a, b in ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(a, b) for a, b in merged]


def split_envelopes(
    device_id: str, rows: Sequence[Row], max_message_bytes: int, max_count: int | None = None
) -> tuple[Envelope, ...]:
    """Pack ``rows`` (in seq order) into envelopes of at most ``max_count`` rows each (rules 6 and 7 of
    the module docstring)."""
    out: list[Envelope] = []
    start, n = 0, len(rows)
    while start < n:
        end, size = start, ENVELOPE_OVERHEAD
        stop = n if max_count is None else min(n, start + max_count)
        while end < stop and rows[end].pipeline == rows[start].pipeline:
            size += len(rows[end].body) + SAMPLE_OVERHEAD
            if end > start and size > max_message_bytes:
                break
            end += 1
        part = rows[start:end]
        try:
            payload: bytes | None = encode_samples_packed(
                device_id, [(r.seq, r.ts, r.body) for r in part], pipeline=part[0].pipeline
            )
            error = None
        except ProtocolError as exc:
            payload, error = None, str(exc)
        out.append(
            Envelope(
                first=part[0].seq,
                last=part[-1].seq,
                count=len(part),
                payload=payload,
                error=error,
                oversize=payload is not None and len(payload) > max_message_bytes,
            )
        )
        start = end
    return tuple(out)


class PublishWindow:
    """The go-back-N publish window of one device (see the module docstring for events and rules).

    >>> from lepton.device import SpooledSample
    >>> w = PublishWindow("cam-1", batch_size=2, batch_ms=50)
    >>> w.connected(now=0.0)
    >>> w.poll(0.0, wall=100.0)
    Read(after=-1, limit=2)
    >>> body = b"\\x82\\xa1x\\xc0\\xa1y\\xc0"
    >>> w.offer([SpooledSample(0, 100.0, None, body), SpooledSample(1, 100.0, None, body)])
    >>> send = w.poll(0.0, wall=100.0)
    >>> send.seqs, len(send.envelopes), w.sent(send), w.in_flight
    ((0, 1), 1, True, 2)
    >>> w.receive_acks([(0, 1)]), w.in_flight
    ([(0, 1)], 0)
    """

    def __init__(
        self,
        device_id: str,
        *,
        batch_size: int = 32,
        batch_ms: float = 50.0,
        window: int = 4096,
        ack_timeout: float = 10.0,
        max_message_bytes: int = 1_000_000,
        batches_per_read: int = 1,
        read_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if not 1 <= batch_size <= window:
            raise ValueError(f"need 1 <= batch_size ({batch_size}) <= window ({window})")
        if batches_per_read < 1 or read_bytes < 1:
            raise ValueError("batches_per_read and read_bytes must be >= 1")
        if batch_ms < 0 or ack_timeout <= 0:
            raise ValueError("batch_ms must be >= 0 and ack_timeout > 0")
        self.device_id = device_id
        self.batch_size = batch_size
        self.batch_ms = batch_ms
        self.window = window
        self.ack_timeout = ack_timeout
        self.max_message_bytes = max_message_bytes
        self.batches_per_read = batches_per_read
        self.read_bytes = read_bytes
        self._batches = 1  # batches per read, from the mean body size of the last rows offered (rule 2)
        self._online = False
        self._cursor = -1  # highest seq sent since the last go-back
        self._max_sent = -1  # highest seq ever sent: at or below it, a send is a resend
        self._in_flight: list[int] = []  # sorted: sent since the last go-back, not acked nor dropped
        self._last_progress = 0.0
        self._dropped_through = -1
        self._read: Read | None = None  # the read waiting for offer()
        self._rows: list[Row] | None = None  # what offer() brought, used by the next poll()
        self._unconfirmed: Send | None = None  # the send waiting for sent()

    # -- state ----------------------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self._online

    @property
    def cursor(self) -> int:
        """The highest seq sent since the last go-back (-1: none)."""
        return self._cursor

    @property
    def in_flight(self) -> int:
        """Samples sent since the last go-back, neither acknowledged nor dropped."""
        return len(self._in_flight)

    # -- events in ------------------------------------------------------------------------------------
    def connected(self, now: float) -> None:
        self._online = True
        self._go_back(now)

    def disconnected(self) -> None:
        self._online = False

    def receive_acks(self, ranges: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
        """Merge the ranges and take what they cover out of the window; return them for the spool."""
        merged = merge_ranges(ranges)
        flight = self._in_flight
        for first, last in merged:
            if not flight or last < flight[0] or first > flight[-1]:
                continue
            del flight[bisect_left(flight, first) : bisect_right(flight, last)]
        if self._rows and merged:
            starts = [a for a, _ in merged]

            def covered(seq: int) -> bool:
                i = bisect_right(starts, seq) - 1
                return i >= 0 and seq <= merged[i][1]

            self._keep_rows(lambda r: not covered(r.seq))
        return merged

    def spool_deleted(self, count: int, now: float) -> None:
        """The spool deleted ``count`` samples for acks: when any, that is ack progress."""
        if count > 0:
            self._last_progress = now

    def spool_dropped_through(self, seq: int) -> None:
        """The spool dropped (drop-oldest) every sample up to ``seq``: they no longer count as in flight."""
        if seq <= self._dropped_through:
            return
        self._dropped_through = seq
        del self._in_flight[: bisect_right(self._in_flight, seq)]
        if self._rows:
            self._keep_rows(lambda r: r.seq > seq)

    def offer(self, rows: Sequence[Row]) -> None:
        """The rows for the last :class:`Read`, oldest first (ignored when no read is waiting)."""
        if self._read is None:
            return
        after, self._read = self._read.after, None
        self._rows = [r for r in rows if r.seq > after and r.seq > self._dropped_through]
        if self.batches_per_read > 1 and rows:
            mean = max(1, sum(len(r.body) for r in rows) // len(rows))
            self._batches = max(1, min(self.batches_per_read, self.read_bytes // (mean * self.batch_size)))

    def sent(self, send: Send) -> bool:
        """Confirm that ``send``, the last poll's decision, was published; False (ignored) otherwise."""
        if send is not self._unconfirmed:
            return False
        self._unconfirmed = None
        self._in_flight.extend(s for s in send.seqs if s > self._dropped_through)
        self._cursor = send.seqs[-1]
        self._max_sent = max(self._max_sent, self._cursor)
        return True

    # -- decisions out --------------------------------------------------------------------------------
    def poll(self, now: float, *, wall: float, flush: bool = False) -> Read | Send | Wait | GoBack:
        """The next thing to do; ``now`` is monotonic seconds, ``wall`` the clock of the samples' ``ts``."""
        self._unconfirmed = None  # a send not confirmed before the next poll failed: read it again
        if not self._online:
            return Wait("offline")
        in_flight = len(self._in_flight)
        if in_flight and now - self._last_progress > self.ack_timeout:
            self._go_back(now)
            return GoBack(in_flight)
        if in_flight >= self.window:
            return Wait("window")
        rows, self._rows = self._rows, None
        if rows is None:
            self._read = Read(self._cursor, min(self._batches * self.batch_size, self.window - in_flight))
            return self._read
        if not rows:
            return Wait("empty")
        full = len(rows) - len(rows) % self.batch_size  # rows in full batches
        if full < len(rows) and not flush:
            wait = self.batch_ms / 1000 - (wall - rows[full].ts)
            if wait > 0:  # a partial batch waits until it is full or its oldest sample batch_ms old
                if not full:
                    return Wait("batch", wait, rows[0].seq + self.batch_size - 1)
                rows = rows[:full]  # the full batches go now; the partial one is read again later
        if not in_flight:
            self._last_progress = now  # the ack clock starts with the first sample in flight
        self._unconfirmed = Send(
            envelopes=split_envelopes(self.device_id, rows, self.max_message_bytes, self.batch_size),
            seqs=tuple(r.seq for r in rows),
            resent=sum(1 for r in rows if r.seq <= self._max_sent),
        )
        return self._unconfirmed

    # -- internals ------------------------------------------------------------------------------------
    def _go_back(self, now: float) -> None:
        self._cursor = -1
        self._in_flight.clear()
        self._read = self._rows = self._unconfirmed = None
        self._last_progress = now

    def _keep_rows(self, keep: Callable[[Row], bool]) -> None:
        assert self._rows is not None
        rows = [r for r in self._rows if keep(r)]
        # offered rows all left the spool: read again at once rather than wait for a new sample
        self._rows = rows if rows or not self._rows else None
