"""The ingest worker: device samples from MQTT -> exactly-once, durable Parquet dataset.

Design (why it is exactly-once and durable):

- paho client with a fixed client id, ``clean_session=False`` and ``manual_ack=True``: the broker keeps
  our subscription and queues samples while we are away, and redelivers every message we have not
  PUBACKed. We PUBACK a message only after each of its samples is in a renamed, fsynced Parquet file
  committed to the index, or dead-lettered (report published, raw payload fsynced in quarantine).
- paho calls ``on_message`` in its network thread; it only enqueues. One writer thread decodes, batches
  (``batch`` samples, ``batch_ms``, or ``max_pending`` messages: the broker's in-flight window, after
  which it sends nothing until we ack), writes and acks. ``Client.ack`` only appends to paho's outgoing
  deque and wakes the network thread through its socket pair, so calling it from the writer is safe.
- A PUBACK carries a packet id that is only meaningful on the connection the message arrived on: after
  a reconnect we skip acks of older messages (the broker redelivers them, the index drops them).
- Every message is decoded, validated and turned into rows inside its own error boundary: a message
  that cannot be stored is dead-lettered (report + quarantine) and acknowledged, never retried, so one
  device's poison never stalls the fleet. Only transient failures (disk full, I/O errors, a locked
  index) are retried, with backoff, and the status says so (``retrying``, ``last_error``). A failure
  of an unknown kind splits the batch until the message that causes it is alone, then dead-letters it.
- Duplicates (redelivery, device resends, a resend reaching another worker of the group) are dropped
  by the shared :class:`~lepton.cloud._index.SampleIndex` inside the same exclusive transaction that
  records the new rows, so two workers on one folder never store a sample twice.
- After each durable write the worker publishes on ``devices/{id}/acks`` the ranges of every seq it
  saw in the batch for that device, duplicates included, so a device that resends is released.
- The settings are in :mod:`lepton.cloud._ingest_config`; the disk side of a batch (quarantine,
  Parquet, index, rename) in :mod:`lepton.cloud._ingest_store`; the training child
  (``--train-every``) in :mod:`lepton.cloud._ingest_trainer`; the counters and telemetry in
  :mod:`lepton.cloud._ingest_status`.

Owning threads: paho's network thread runs the MQTT callbacks; it alone bumps the connection
generation (``_gen``), and it adds to the receive queue's byte count (``_q_bytes``, under
``_q_cond``), which the writer thread subtracts from. The writer thread owns the
:class:`~lepton.cloud._ingest_store.BatchStore` (decoder, index, quarantine), the
:class:`~lepton.cloud._ingest_trainer.TrainerProcess` and the counters; the status thread only
publishes. :meth:`IngestWorker.stop` stops the trainer and closes the index after the writer ended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton.cloud._ingest_config import DEFAULT_WORKER_MAX_PAYLOAD_BYTES, WorkerConfig
from lepton.cloud._ingest_core import BatchDecoder, BatchProgress
from lepton.cloud._ingest_status import RateMeter, WorkerStats, status_body, telemetry_of
from lepton.cloud._ingest_store import BatchStore, warm_up
from lepton.cloud._ingest_trainer import TrainerProcess
from lepton.errors import ConfigError
from lepton.protocol import (
    BrokerURL,
    Topics,
    connect,
    encode_acks,
    encode_json,
    new_client,
)

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_WORKER_MAX_PAYLOAD_BYTES", "IngestWorker", "WorkerConfig"]

#: Failures that say nothing about the messages being written: the disk is full or failing, the index
#: is locked or unreadable for a while. They are retried, with backoff, and the batch stays unacked.
_TRANSIENT = (OSError, sqlite3.OperationalError)


@dataclass
class _Message:
    gen: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float
    retain: bool = False
    #: set when writing this message failed for a reason no retry can fix: dead-letter it.
    unstorable: str | None = None



class IngestWorker:
    """Subscribe to a fleet's samples and store them exactly once under ``{data}/{fleet}/``.

    Example (``url`` a broker URL with a worker's credentials)::

        with IngestWorker(WorkerConfig(broker=url, fleet="demo", data="/data")) as w:
            w.wait_stored(1000)
    """

    def __init__(self, config: WorkerConfig) -> None:
        from lepton.cloud._dataset import DATA_DIR
        from lepton.cloud._index import open_index
        from lepton.cloud._quarantine import Quarantine, QuarantineLimits

        self.config = config
        self.topics = Topics(fleet=config.fleet, prefix=config.prefix)
        self.url = BrokerURL.parse(config.broker)
        self.dir = Path(config.data) / config.fleet
        self.data_dir = self.dir / DATA_DIR
        self.quarantine_dir = self.dir / "quarantine"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot use --data {config.data}: {exc.strerror} ({exc.filename}); "
                "pass a writable dataset directory"
            ) from None
        self.index = open_index(self.dir, config.index)
        self._transient = _TRANSIENT + self.index.transient_errors
        self.quarantine = Quarantine(
            self.quarantine_dir,
            QuarantineLimits(
                device_bytes=config.quarantine_device_bytes, total_bytes=config.quarantine_bytes
            ),
        )
        self.stats = WorkerStats()
        self._trainer = TrainerProcess(
            config, log_path=self.dir / "train.log", on_change=self._publish_status, stats=self.stats
        )
        self._q: queue.Queue[_Message] = queue.Queue()
        # Payload bytes in ``_q``: added by paho's network thread, taken by the writer, under _q_cond.
        self._q_bytes = 0
        self._q_cond = threading.Condition()
        self._gen = 0
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._writer: threading.Thread | None = None
        self._status_thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._rate = RateMeter(now=time.monotonic())
        self._client: mqtt.Client | None = None
        self._store = BatchStore(
            config,
            data_dir=self.data_dir,
            index=self.index,
            quarantine=self.quarantine,
            decoder=BatchDecoder(
                self.topics,
                max_tensor_bytes=config.max_tensor_bytes,
                max_payload_bytes=config.max_payload_bytes,
            ),
        )
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> IngestWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Recover the dataset folder, connect, subscribe and start writing. Raises BrokerConnectionError
        or ConfigError (e.g. ``group`` on a broker without shared subscriptions)."""
        from lepton.cloud._index import recover

        recover(self.index, self.dir)
        warm_up()
        cfg = self.config
        client = new_client(
            self.url,
            # "username/...": the client-id binding (broker/README.md); Mosquitto uses the username itself.
            client_id=(f"{self.url.username}/" if self.url.username else "")
            + f"lepton-worker-{cfg.fleet}-{cfg.name}",
            clean_session=False,
            manual_ack=True,
            max_inflight=max(20, cfg.max_pending),
        )
        status_topic = self.topics.worker_status(cfg.name)
        client.will_set(
            status_topic,
            encode_json({"worker": cfg.name, "online": False, "fleet": cfg.fleet}),
            qos=1,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self._client = client
        connect(client, self.url)
        if cfg.group and not self._probe_shared(client):
            client.disconnect()
            client.loop_stop()
            raise ConfigError(
                f"broker {self.url} does not support shared subscriptions ($share/{cfg.group}/...), "
                "so --group cannot split the stream (the embedded amqtt broker has none); "
                "run a single worker without --group, or use Mosquitto, EMQX or VerneMQ"
            )
        self._writer = threading.Thread(
            target=self._write_loop, name=f"lepton-ingest-{cfg.name}", daemon=True
        )
        self._writer.start()
        self._status_thread = threading.Thread(
            target=self._status_loop, name="lepton-ingest-status", daemon=True
        )
        self._status_thread.start()
        self._publish_status()
        log.info("worker %s ingesting %s into %s", cfg.name, self._filter(), self.dir)

    def stop(self, timeout: float = 30.0) -> None:
        """Write what was received, stop the training child, publish the offline status and disconnect."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout)
        if self._status_thread is not None:
            self._status_thread.join(timeout)
        self._trainer.stop()
        client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                info = client.publish(
                    self.topics.worker_status(self.config.name),
                    self._status_payload(online=False),
                    qos=1,
                    retain=True,
                )
                info.wait_for_publish(3)
            client.disconnect()
            client.loop_stop()
        self.index.close()
        self._stopped.set()

    def run_forever(self) -> None:
        """Block until :meth:`stop` is called (from a signal handler, for example)."""
        self._stop.wait()
        self._stopped.wait()

    def wait_stored(self, n: int, timeout: float | None = None) -> bool:
        """Wait until ``n`` new samples were stored by this worker (tests and tools)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.stats.stored < n:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
        return True

    # -- MQTT callbacks (paho's network thread) ------------------------------------------------------
    def _filter(self) -> str:
        base = self.topics.all_devices("samples")
        return self.topics.shared(self.config.group, base) if self.config.group else base

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            log.warning("worker %s: broker refused connection: %s", self.config.name, reason_code)
            return
        self._gen += 1
        client.subscribe(self._filter(), qos=1)
        log.info(
            "worker %s connected (session present: %s)",
            self.config.name,
            getattr(flags, "session_present", "?"),
        )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if not self._stop.is_set():
            log.warning("worker %s disconnected (%s); paho reconnects", self.config.name, reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        if msg.topic == self._probe_topic:
            self._probe_event.set()
            return
        if self._stop.is_set():
            return  # stopping: not acked, so the broker delivers it again to the next session
        size = len(msg.payload)
        limit = self.config.max_queue_bytes
        with self._q_cond:
            if self._q_bytes + size > limit:
                if msg.qos == 0:  # nothing would resend it, and nothing may grow without bound
                    self.stats.dropped_qos0 += 1
                    if self.stats.dropped_qos0 in (1, 10, 100, 1000) or self.stats.dropped_qos0 % 10_000 == 0:
                        log.warning("worker %s: receive queue full (%d bytes): dropped %d QoS 0 messages",
                                    self.config.name, self._q_bytes, self.stats.dropped_qos0)
                    return
                # QoS 1: hold paho's network thread (TCP back-pressure; the broker keeps the rest
                # unacked) until the writer frees room.
                while self._q_bytes + size > limit and self._q_bytes and not self._stop.is_set():
                    self._q_cond.wait(0.5)
            self._q_bytes += size
        self._q.put(
            _Message(self._gen, msg.mid, msg.qos, msg.topic, msg.payload, time.time(), bool(msg.retain))
        )

    def _take(self, msg: _Message) -> _Message:
        with self._q_cond:
            self._q_bytes -= len(msg.payload)
            self._q_cond.notify_all()
        return msg

    _probe_topic: str | None = None

    def _probe_shared(self, client) -> bool:  # noqa: ANN001
        """Does the broker deliver through a ``$share/`` subscription? amqtt 0.12 silently never does."""
        if self.config.shared_subscriptions is not None:
            return self.config.shared_subscriptions
        self._probe_event = threading.Event()
        topic = self.topics.worker_status(self.config.name)
        self._probe_topic = topic
        group = self.config.group
        assert group is not None  # probed for --group only
        client.subscribe(self.topics.shared(group, topic), qos=1)
        ok = False
        for _ in range(6):
            client.publish(
                topic, encode_json({"worker": self.config.name, "online": True, "probe": True}), qos=1
            )
            if self._probe_event.wait(0.5):
                ok = True
                break
        client.unsubscribe(self.topics.shared(group, topic))
        self._probe_topic = None
        return ok

    # -- writer thread --------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            try:
                if not self._write_once():
                    return
            except Exception:  # nothing may kill the writer: ingest would stall silently
                self.stats.errors += 1
                log.exception("worker %s: unexpected error in the writer loop", self.config.name)
                time.sleep(0.5)

    def _write_once(self) -> bool:
        """Gather one batch and write it; False once stopping and the queue is empty."""
        cfg = self.config
        try:
            first = self._take(self._q.get(timeout=0.2))
        except queue.Empty:
            self._trainer.poll()
            return not self._stop.is_set()
        batch = [first]
        n_samples = _samples_hint(first)
        deadline = time.monotonic() + cfg.batch_ms / 1000
        while len(batch) < cfg.max_pending and n_samples < cfg.batch:
            left = deadline - time.monotonic()
            # A burst that pauses has most likely filled the broker's in-flight window: it sends
            # nothing more until we ack, so waiting out batch_ms would only add latency. A trickle
            # (fewer than the smallest common window, Mosquitto's default 20) waits, to make
            # fewer, larger files.
            if len(batch) >= _MIN_WINDOW:
                left = min(left, cfg.idle_ms / 1000)
            try:
                batch.append(self._take(self._q.get(timeout=left) if left > 0 else self._q.get_nowait()))
            except queue.Empty:
                break
            n_samples += _samples_hint(batch[-1])
        self._process_with_retry(batch)
        self._trainer.poll()
        return True

    def _process_with_retry(self, batch: list[_Message]) -> None:
        """Write ``batch``: retry transient failures with backoff; isolate anything else.

        A failure that is not transient is a message the writer cannot store that the protocol's rules
        let through (a bug, or a rule still missing): the batch is split in halves until that message
        is alone, and then it is dead-lettered and acknowledged, so it can never stall ingest.
        """
        delay = 0.5
        st = self.stats
        # What this batch has already done (quarantine, index commit, rename, acks): a retry carries on
        # from there, so no step is done twice and every message is counted once.
        done = BatchProgress()
        while True:
            try:
                self._process(batch, done)
                if st.retrying:
                    log.warning("worker %s: writing works again", self.config.name)
                    st.retrying = False
                    self._publish_status()
                return
            except self._transient as exc:  # disk full, I/O error, index locked or unreachable: retry
                st.errors += 1
                st.retrying = True
                st.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.error(
                    "worker %s: writing a batch of %d messages failed (%s); retrying in %.1fs",
                    self.config.name, len(batch), st.last_error, delay,
                )
                self._publish_status()
                if self._stop.wait(delay):
                    log.warning(
                        "worker %s: stopping with %d messages unwritten (the broker redelivers them)",
                        self.config.name,
                        len(batch),
                    )
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
                                  self.config.name, len(batch))
                    self._count(batch, done)
                    return
                if len(batch) > 1:
                    log.exception(
                        "worker %s: a batch of %d messages cannot be written; isolating the message",
                        self.config.name, len(batch),
                    )
                    half = len(batch) // 2
                    self._process_with_retry(batch[:half])
                    self._process_with_retry(batch[half:])
                    return
                log.exception("worker %s: message on %s cannot be written; dead-lettering it",
                              self.config.name, batch[0].topic)
                batch = [dataclasses.replace(batch[0], unstorable=f"{type(exc).__name__}: {exc}"[:300])]
                done = BatchProgress()  # a different batch now: decoded again, as a dead letter

    def _process(self, batch: list[_Message], done: BatchProgress | None = None) -> None:
        """Carry out one batch transaction: the decisions come from the I/O-free core
        (:mod:`lepton.cloud._ingest_core`), the disk and the index side from
        :class:`~lepton.cloud._ingest_store.BatchStore`; this does the MQTT side.

        ``done`` records the steps already carried out by an earlier attempt at the same batch
        (after a transient error), which are not done again."""
        done = done if done is not None else BatchProgress()
        self._store.write(batch, done)
        plan = done.plan
        assert plan is not None  # write() always leaves the plan of what to ack
        # Durable: tell the devices (duplicates and rejected seqs included), report, then PUBACK.
        client = self._client
        assert client is not None  # the writer thread runs between start() and stop()
        for dev, ranges in plan.acks.items():
            client.publish(self.topics.acks(dev), encode_acks(ranges), qos=1)
        if not done.reported:
            for report in done.reports:
                client.publish(self.topics.deadletter(), encode_json(report), qos=1)
            done.reported = True
        gen = self._gen
        for msg in batch:
            if msg.gen == gen and msg.qos > 0:
                client.ack(msg.mid, msg.qos)
        self._count(batch, done)

    def _count(self, batch: list[_Message], done: BatchProgress) -> None:
        """Add a batch to the counters: once per batch, whatever its attempts."""
        if done.counted:
            return
        done.counted = True
        plan = done.plan
        with self._cond:
            self.stats.received += len(batch)
            self.stats.dead_letters += done.n_dead
            self.stats.stored += plan.n_new if plan is not None else 0
            self.stats.duplicates += plan.n_duplicates if plan is not None else 0
            if done.name is not None:
                self.stats.files += 1
                self.stats.bytes += done.size
                self.stats.last_write = time.time()
            self._trainer.add_labelled(done.labelled)
            self._cond.notify_all()

    # -- status ---------------------------------------------------------------------------------------
    def train_command(self) -> list[str]:
        """The training child's argv (see :meth:`TrainerProcess.command`)."""
        return self._trainer.command()

    def train_environment(self) -> dict[str, str]:
        """The training child's environment (see :meth:`TrainerProcess.environment`)."""
        return self._trainer.environment()

    def _status_payload(self, *, online: bool = True, update_rate: bool = False) -> bytes:
        return encode_json(self._status_body(online=online, update_rate=update_rate))

    def _status_body(self, *, online: bool = True, update_rate: bool = False) -> dict[str, Any]:
        if update_rate:
            self._rate.update(now=time.monotonic(), total=self.stats.stored)
        return status_body(
            self.config,
            self.stats,
            online=online,
            rate=self._rate.rate,
            quarantine=self.quarantine.usage(),
            queue=self._q.qsize(),
            queue_bytes=self._q_bytes,
            started_at=self.started_at,
            training=self._trainer.status(),
        )

    def telemetry(self) -> dict[str, int | float]:
        """The current telemetry report (what the telemetry topic carries, without ``v``/``ts``)."""
        return telemetry_of(self._status_body())

    def _publish_status(self) -> None:
        if self._client is not None:
            status = self._status_body(update_rate=True)
            self._client.publish(self.topics.worker_status(self.config.name), encode_json(status), qos=1,
                                 retain=True)
            self._client.publish(self.topics.worker_telemetry(self.config.name),
                                 encode_json(telemetry_of(status)), qos=0)

    def _status_loop(self) -> None:
        while not self._stop.wait(self.config.status_interval):
            try:
                self._publish_status()
            except Exception:
                log.exception("worker %s: publishing status failed", self.config.name)

    def status(self) -> dict[str, Any]:
        """The current status as a dict (what the retained status topic carries, without ``v``/``ts``)."""
        import json

        body = json.loads(self._status_payload())
        body.pop("v", None)
        return body


_MIN_WINDOW = 20


def _samples_hint(msg: _Message) -> int:
    """Rough sample count of a message before decoding: payload size over 1 KiB, at least 1."""
    return max(1, len(msg.payload) // 1024)
