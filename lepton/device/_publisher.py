"""The publisher thread: the shell around :class:`~lepton.device._window.PublishWindow`, and the ack inbox.

The window is the I/O-free go-back-N core that decides what to send: it reads the spool in seq order
after a cursor (up to ``READ_AHEAD_SAMPLES`` per query, whole batches), packs ``batch_size`` samples or
what arrived within ``batch_ms`` into each envelope of at most ``max_message_bytes``
(:func:`lepton.protocol.encode_samples_packed`, with the pipeline hash, splicing the spooled sample
bodies without re-encoding them), and this thread publishes them with QoS 1. A sample leaves the spool
only when a range on ``devices/{id}/acks`` covers it: a broker PUBACK proves nothing (Mosquitto drops
silently when a queue is full, amqtt does not queue anonymous sessions). After a reconnect, or when no
ack made progress for ``ack_timeout`` seconds, the cursor goes back to the start (go-back-N) and
everything unacknowledged is sent again; the cloud stores by ``(device, seq)`` exactly once, so a
duplicate costs bandwidth only. The number of unacknowledged samples in flight is capped by ``window``.
It also publishes the status (on connect, when the model changes, every telemetry interval) and the
telemetry.

Acks arrive on paho's network thread, which does no SQL and no disk I/O: it only queues the ranges
(:meth:`Publisher.queue_acks`). The publisher hands the queued ranges to the spool
(:meth:`Spool.ack_nowait`) at once when it has nothing to send, else when the oldest has waited
``ACK_DELAY_S`` (or ``ACK_BATCH`` ranges queued); the spool's committer deletes them in its next
transaction, so the publisher never waits for a commit's fsync, and the publisher counts what was deleted
(``acked``, ack progress) from :attr:`Spool.acked_total`.

**Who owns what.**

* the :class:`PublishWindow`, ``_warned_oversize`` and ``_acks_counted`` (the spool's ``acked_total``
  already counted): the publisher (the window is local to its loop); ``_acks_counted`` passes to the
  main thread once the publisher stopped.
* ``ack_inbox`` and ``_ack_since`` (when its oldest range arrived): filled by the network thread,
  drained by the publisher (or, once the publisher stopped, by the main thread), under ``_ack_lock``.
* ``last_ack_at`` (``time.perf_counter`` when acks last removed samples) and the counters it writes
  (``published``, ``resent``, ``acked``, ``ack_timeouts``, ``sample_bytes``): under the agent's ``_lock``.
* the events: ``just_connected`` is set by the network thread and consumed here; ``status_due`` is set
  by anyone who wants a status published and consumed here; ``stop`` (end the thread) is set by the
  main thread; ``flush`` is the agent's ``_stop`` (set by :meth:`DeviceAgent.stop`: send partial batches).
* everything else (config, topics, spool, ``client``, the callbacks): set before the thread starts,
  read-only after.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from lepton.device._config import Counters, DeviceConfig
from lepton.device._spool import Spool
from lepton.device._window import GoBack, PublishWindow, Read, Send, merge_ranges
from lepton.protocol import Topics

log = logging.getLogger(__name__)

__all__ = ["ACK_BATCH", "ACK_DELAY_S", "READ_AHEAD_SAMPLES", "Publisher"]

#: One spool read feeds up to this many samples (whole batches, within the window's byte budget) into
#: one Send of several envelopes: at batch 1 one query serves 256 messages instead of one.
READ_AHEAD_SAMPLES = 256
#: While the publisher has samples to send, acks wait in the inbox this long (or until ACK_BATCH ranges
#: queued) and are then deleted in one transaction; when it has nothing to send it applies them at once.
ACK_DELAY_S = 0.002
ACK_BATCH = 512


class Publisher:
    """Publishes the spool through a PublishWindow and applies the acks; :meth:`run` is the thread."""

    def __init__(
        self,
        *,
        config: DeviceConfig,
        topics: Topics,
        spool: Spool,
        counters: Counters,
        lock: threading.Lock,
        connected: threading.Event,
        just_connected: threading.Event,
        status_due: threading.Event,
        flush: threading.Event,
        client: Callable[[], mqtt.Client | None],
        publish_status: Callable[[], object],
        publish_telemetry: Callable[[], None],
    ) -> None:
        self.config, self.topics, self.spool, self.device_id = config, topics, spool, config.device_id
        self.counters, self._lock = counters, lock
        self._connected, self._just_connected, self._status_due = connected, just_connected, status_due
        self._flush = flush
        self._client = client
        self._publish_status, self._publish_telemetry = publish_status, publish_telemetry
        self.stop = threading.Event()
        self._ack_lock = threading.Lock()
        self.ack_inbox: list[tuple[int, int]] = []
        self._ack_since = 0.0
        self.last_ack_at: float | None = None
        self._acks_counted = spool.acked_total  # what _count_acks counted so far (the publisher's)
        self._warned_oversize = False

    # -- acks (queued by the network thread) ----------------------------------------------------------
    def queue_acks(self, ranges: list[tuple[int, int]]) -> None:
        """Queue ranges for the publisher (the network thread: no SQL here)."""
        with self._ack_lock:
            if not self.ack_inbox:
                self._ack_since = time.monotonic()
            self.ack_inbox.extend(ranges)
        self.spool.wake()

    def _acks_due(self, now: float) -> bool:
        """Acks queued long enough (or many enough) to be applied while there is sending to do."""
        with self._ack_lock:
            return bool(self.ack_inbox) and (
                now - self._ack_since >= ACK_DELAY_S or len(self.ack_inbox) >= ACK_BATCH
            )

    def apply_acks(self, window: PublishWindow | None) -> None:
        """Hand what the queued acks cover to the spool (the publisher's, or the main thread's once it stopped)."""
        with self._ack_lock:
            pending, self.ack_inbox = self.ack_inbox, []
        if window is not None:  # the spool's committer deletes them: never wait for a commit's fsync here
            if pending:
                self.spool.ack_nowait(window.receive_acks(pending))
            return
        self.spool.flush_acks(5.0)  # the main thread at shutdown: what the committer holds first, then these
        if pending:
            self.spool.ack(merge_ranges(pending))
        self._count_acks(None)

    def _count_acks(self, window: PublishWindow | None) -> None:
        """Count the samples the spool deleted for acks since the last call (ack progress)."""
        total = self.spool.acked_total
        removed, self._acks_counted = total - self._acks_counted, total
        if removed:
            with self._lock:
                self.counters.acked += removed
                self.last_ack_at = self.spool.last_ack_at
            if window is not None:
                window.spool_deleted(removed, time.monotonic())

    # -- the publisher thread -------------------------------------------------------------------------
    def run(self) -> None:
        # Whatever goes wrong in one pass (a full disk, a broken payload), the publisher keeps going:
        # a dead publisher thread would silently turn the device into a spool filler.
        while not self.stop.is_set():
            try:
                self._publish_pass()
            except Exception:  # noqa: BLE001
                log.exception("device %s: publisher error; retrying in 1 s", self.device_id)
                self.stop.wait(1.0)

    def _publish_pass(self) -> None:
        cfg, spool = self.config, self.spool
        topic = self.topics.samples(self.device_id)
        window = PublishWindow(
            self.device_id,
            batch_size=cfg.batch_size,
            batch_ms=cfg.batch_ms,
            window=cfg.window,
            ack_timeout=cfg.ack_timeout,
            max_message_bytes=cfg.max_message_bytes,
            batches_per_read=max(1, READ_AHEAD_SAMPLES // cfg.batch_size),
            read_bytes=max(4 * cfg.max_message_bytes, READ_AHEAD_SAMPLES * 1024),
        )
        next_report = time.monotonic() + cfg.telemetry_interval
        while not self.stop.is_set():
            now = time.monotonic()
            if self._acks_due(now):
                self.apply_acks(window)
            self._count_acks(window)
            window.spool_dropped_through(spool.dropped_through)
            if self._connected.is_set():
                if self._just_connected.is_set() or not window.online:
                    self._just_connected.clear()
                    self._status_due.set()
                    window.connected(now)  # go back to the oldest unacknowledged sample
            else:
                window.disconnected()
            if now >= next_report:
                next_report = now + cfg.telemetry_interval
                self._publish_telemetry()
                self._status_due.set()
            if self._status_due.is_set():
                self._status_due.clear()
                self._publish_status()
            step = window.poll(now, wall=time.time(), flush=self._flush.is_set())
            if isinstance(step, Read):
                window.offer(spool.read_after(step.after, step.limit))
            elif isinstance(step, Send):
                if self._send(topic, step):
                    window.sent(step)
                    with self._lock:
                        self.counters.published += step.count
                        self.counters.resent += step.resent
            elif isinstance(step, GoBack):
                log.warning(
                    "device %s: no ack for %.0fs with %d samples in flight; resending from the oldest",
                    self.device_id,
                    cfg.ack_timeout,
                    step.in_flight,
                )
                with self._lock:
                    self.counters.ack_timeouts += 1
            elif self._acks_due(float("inf")):  # nothing to send: apply the queued acks now, decide again
                self.apply_acks(window)
            elif step.reason == "offline":
                self._connected.wait(0.1)
            elif step.reason == "batch":
                assert step.until_seq is not None and step.timeout is not None
                spool.wait_for_seq(step.until_seq, step.timeout)
            else:  # the window is full, or the spool empty
                spool.wait_for_change(0.05)

    def _send(self, topic: str, send: Send) -> bool:
        """Publish the envelopes of ``send`` in order; False when the client refused one."""
        client = self._client()
        assert client is not None
        limit = self.config.max_message_bytes
        for env in send.envelopes:
            if env.payload is None:  # cannot happen for what append() stored; never loop on it
                log.error("device %s: cannot encode seqs %d-%d: %s", self.device_id, env.first, env.last,
                          env.error)
                continue
            if env.oversize and not self._warned_oversize:
                self._warned_oversize = True
                log.warning("device %s: one sample (seq %d) is over %d bytes on its own; brokers with a "
                            "smaller packet limit will refuse it", self.device_id, env.first, limit)
            info = client.publish(topic, env.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return False
            with self._lock:
                self.counters.sample_bytes += len(env.payload)
        return True
