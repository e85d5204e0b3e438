"""The store side of the ingest worker, without MQTT: a batch of raw messages in, what to tell MQTT out.

:class:`StoreRunner` carries out one batch on a :class:`~lepton.cloud._ingest_store.BatchStore`
(validate with the protocol's rules, dedupe in the index, Parquet + fsync + rename, index commit),
retrying transient failures with backoff and isolating a message of an unknown failure by splitting
the batch. It never touches a socket: each finished part of the batch comes out as an
:class:`Outcome` (which messages to PUBACK, the end-to-end acks and dead-letter reports to publish,
what to count), and the shell (:mod:`lepton.cloud._ingest`) does the MQTT side. So the same runner
runs in the worker's writer thread (in-process mode) or in the store child
(:mod:`lepton.cloud._ingest_child`), whose results go back to the MQTT process through a pipe.

A :class:`StoreRunner` is owned by one thread (the writer thread, or the child's only thread).
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lepton.cloud._ingest_core import BatchProgress
from lepton.cloud._ingest_store import BatchStore

log = logging.getLogger(__name__)

__all__ = ["Msg", "Outcome", "StoreRunner", "StoreState", "TRANSIENT"]

#: Failures that say nothing about the messages being written: the disk is full or failing, the index
#: is locked or unreadable for a while. They are retried, with backoff, and the batch stays unacked.
TRANSIENT = (OSError, sqlite3.OperationalError)


@dataclass(frozen=True)
class Msg:
    """One received message as the store sees it (an :class:`~lepton.cloud._ingest_core.InboundLike`);
    ``i`` is its index in the batch the shell handed over."""

    i: int
    topic: str
    payload: bytes
    received_at: float
    retain: bool = False
    #: set when writing this message failed for a reason no retry can fix: dead-letter it.
    unstorable: str | None = None


@dataclass
class Outcome:
    """One finished part of a batch: what the shell tells MQTT and adds to its counters."""

    #: indices (``Msg.i``) of the messages of this part
    messages: list[int]
    #: PUBACK them (False: committed but finishing failed; the broker redelivers, the index drops them)
    ack: bool = True
    #: end-to-end acks per device: seq ranges
    acks: dict[str, list[list[int]]] = field(default_factory=dict)
    #: dead-letter reports to publish
    reports: list[dict[str, Any]] = field(default_factory=list)
    n_dead: int = 0
    stored: int = 0
    duplicates: int = 0
    file: bool = False
    size: int = 0
    labelled: int = 0


@dataclass
class StoreState:
    """The store's own status fields (the shell copies them into its WorkerStats)."""

    errors: int = 0
    retrying: bool = False
    last_error: str | None = None


class StoreRunner:
    """Run batches on ``store``; ``wait(seconds)`` sleeps between retries and returns True to give up
    (stopping); ``on_state()`` is called when :attr:`state` changed (to publish the status)."""

    def __init__(
        self,
        store: BatchStore,
        *,
        transient: tuple[type[BaseException], ...],
        wait: Callable[[float], bool],
        on_state: Callable[[], None],
        name: str,
    ) -> None:
        self.store = store
        self.transient = transient
        self.wait = wait
        self.on_state = on_state
        self.name = name
        self.state = StoreState()

    def run(self, batch: list[Msg]) -> list[Outcome]:
        out: list[Outcome] = []
        self._with_retry(batch, out)
        return out

    def _with_retry(self, batch: list[Msg], out: list[Outcome]) -> None:
        """Write ``batch``: retry transient failures with backoff; isolate anything else.

        A failure that is not transient is a message the writer cannot store that the protocol's rules
        let through (a bug, or a rule still missing): the batch is split in halves until that message
        is alone, and then it is dead-lettered and acknowledged, so it can never stall ingest.
        """
        delay = 0.5
        st = self.state
        # What this batch has already done (quarantine, index commit, rename): a retry carries on from
        # there, so no step is done twice and every message is counted once.
        done = BatchProgress()
        while True:
            try:
                self.store.write(batch, done)
                out.append(_outcome(batch, done, ack=True))
                if st.retrying:
                    log.warning("worker %s: writing works again", self.name)
                    st.retrying = False
                    self.on_state()
                return
            except self.transient as exc:  # disk full, I/O error, index locked or unreachable: retry
                st.errors += 1
                st.retrying = True
                st.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.error(
                    "worker %s: writing a batch of %d messages failed (%s); retrying in %.1fs",
                    self.name, len(batch), st.last_error, delay,
                )
                self.on_state()
                if self.wait(delay):
                    log.warning("worker %s: stopping with %d messages unwritten (the broker redelivers them)",
                                self.name, len(batch))
                    return
                delay = min(delay * 2, 10.0)
            except Exception as exc:  # deterministic: never retried as it is
                st.errors += 1
                st.last_error = f"{type(exc).__name__}: {exc}"[:300]
                if done.committed:
                    # The samples are durable in the index: splitting would count them again as
                    # duplicates. Count the batch once; its unacked messages come back after a
                    # reconnect and are dropped (and acked) as duplicates then.
                    log.exception("worker %s: finishing a committed batch of %d messages failed",
                                  self.name, len(batch))
                    out.append(_outcome(batch, done, ack=False))
                    return
                if len(batch) > 1:
                    log.exception("worker %s: a batch of %d messages cannot be written; isolating the message",
                                  self.name, len(batch))
                    half = len(batch) // 2
                    self._with_retry(batch[:half], out)
                    self._with_retry(batch[half:], out)
                    return
                log.exception("worker %s: message on %s cannot be written; dead-lettering it",
                              self.name, batch[0].topic)
                batch = [dataclasses.replace(batch[0], unstorable=f"{type(exc).__name__}: {exc}"[:300])]
                done = BatchProgress()  # a different batch now: decoded again, as a dead letter


def _outcome(batch: list[Msg], done: BatchProgress, *, ack: bool) -> Outcome:
    plan = done.plan
    return Outcome(
        messages=[m.i for m in batch],
        ack=ack,
        acks=dict(plan.acks) if (ack and plan is not None) else {},
        reports=list(done.reports) if ack else [],
        n_dead=done.n_dead,
        stored=plan.n_new if plan is not None else 0,
        duplicates=plan.n_duplicates if plan is not None else 0,
        file=done.name is not None,
        size=done.size,
        labelled=done.labelled,
    )
