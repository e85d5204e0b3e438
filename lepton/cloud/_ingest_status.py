"""What an ingest worker reports: its counters, the retained status body and the flat telemetry
report made from it (docs/protocol.md, "Worker status" and "Worker telemetry").

Owning threads: the writer thread writes every :class:`WorkerStats` counter (``stored`` and the
others :meth:`~lepton.cloud.IngestWorker.wait_stored` reads under the worker's condition; the
training ones through its :class:`~lepton.cloud._ingest_trainer.TrainerProcess`), except
``dropped_qos0``, which paho's network thread writes under the receive queue's condition; other
threads only read them. A :class:`RateMeter` is advanced by whichever thread publishes the status (the status
thread; the writer thread when a retry or a training run changes the status): each update is one
tuple assignment, so a race costs one rate sample, never a wrong counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lepton.cloud._ingest_trainer import TrainingStats
from lepton.protocol import telemetry_fields

if TYPE_CHECKING:
    from lepton.cloud._ingest_config import WorkerConfig

__all__ = ["RateMeter", "WorkerStats", "status_body", "telemetry_of"]

#: fields of the worker status that are state, not numbers to chart: the telemetry leaves them out
#: (``quarantine`` it carries flat, as ``quarantine_{entries,bytes,refused}``)
_STATE_FIELDS = frozenset({"worker", "fleet", "group", "online", "last_error", "quarantine"})


@dataclass
class WorkerStats(TrainingStats):
    """The worker's counters; the training ones (:class:`TrainingStats`) are written by its trainer."""

    received: int = 0  # messages
    stored: int = 0  # new samples written
    duplicates: int = 0
    dead_letters: int = 0  # bad messages + bad samples
    files: int = 0
    bytes: int = 0
    errors: int = 0  # failed write attempts (transient: retried) and internal errors (isolated)
    retrying: bool = False
    last_error: str | None = None
    dropped_qos0: int = 0  # QoS 0 messages dropped because the receive queue was full
    last_write: float | None = None


class RateMeter:
    """Samples stored per second, measured over at least 0.2 s between updates (clock passed in).

    >>> m = RateMeter(now=10.0)
    >>> m.update(now=10.1, total=50)  # too soon: the last rate stands
    0.0
    >>> m.update(now=12.0, total=400)
    200.0
    """

    def __init__(self, *, now: float) -> None:
        self._mark = (now, 0)
        self.rate = 0.0

    def update(self, *, now: float, total: int) -> float:
        t0, n0 = self._mark
        if now - t0 > 0.2:
            self.rate = (total - n0) / (now - t0)
            self._mark = (now, total)
        return self.rate


def status_body(
    config: WorkerConfig,
    stats: WorkerStats,
    *,
    online: bool,
    rate: float,
    quarantine: dict[str, int],
    queue: int,
    queue_bytes: int,
    started_at: float,
    training: dict[str, Any],
) -> dict[str, Any]:
    """The worker's status, in the order the retained status topic carries it (docs/protocol.md)."""
    st = stats
    return {
        "worker": config.name,
        "online": online,
        "fleet": config.fleet,
        "group": config.group,
        "samples_per_s": round(rate, 1),
        "stored": st.stored,
        "duplicates": st.duplicates,
        "dead_letters": st.dead_letters,
        "files": st.files,
        "bytes": st.bytes,
        "received": st.received,
        "errors": st.errors,
        "retrying": st.retrying,
        "last_error": st.last_error,
        "dropped_qos0": st.dropped_qos0,
        "quarantine": quarantine,
        "last_write": None if st.last_write is None else round(st.last_write, 3),
        "queue": queue,
        "queue_bytes": queue_bytes,
        "started_at": round(started_at, 3),
        **training,
    }


def telemetry_of(status: dict[str, Any]) -> dict[str, int | float]:
    """The telemetry report that goes with a status: its numbers, flat (docs/protocol.md, "Worker
    telemetry"); names, the error text and ``online`` stay in the status.

    >>> telemetry_of({"worker": "w1", "online": True, "stored": 5, "last_error": None,
    ...               "quarantine": {"entries": 1, "bytes": 10, "refused": 0}})
    {'stored': 5, 'quarantine_entries': 1, 'quarantine_bytes': 10, 'quarantine_refused': 0}
    """
    body = {k: v for k, v in status.items() if k not in _STATE_FIELDS}
    body.update({f"quarantine_{k}": v for k, v in status["quarantine"].items()})
    return telemetry_fields(body)
