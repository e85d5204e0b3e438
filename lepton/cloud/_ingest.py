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
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton.cloud._ingest_core import BatchDecoder, BatchProgress, DeadLetter, plan_write
from lepton.errors import ConfigError
from lepton.protocol import (
    DEFAULT_MAX_TENSOR_BYTES,
    DEFAULT_PREFIX,
    BrokerURL,
    Topics,
    connect,
    encode_acks,
    encode_json,
    new_client,
    telemetry_fields,
    validate_id,
)

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_WORKER_MAX_PAYLOAD_BYTES", "IngestWorker", "WorkerConfig"]

#: The worker's default ceiling for one message: well above the device's 1,000,000-byte envelopes,
#: and exactly what ``max_packet_size`` in the project's mosquitto.conf allows (4 MiB).
DEFAULT_WORKER_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024

#: Failures that say nothing about the messages being written: the disk is full or failing, the index
#: is locked or unreadable for a while. They are retried, with backoff, and the batch stays unacked.
_TRANSIENT = (OSError, sqlite3.OperationalError)

#: fields of the worker status that are state, not numbers to chart: the telemetry leaves them out
#: (``quarantine`` it carries flat, as ``quarantine_{entries,bytes,refused}``)
_STATE_FIELDS = frozenset({"worker", "fleet", "group", "online", "last_error", "quarantine"})


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Settings of one ingest worker. Only ``broker``, ``fleet`` and ``data`` are required.

    >>> WorkerConfig(broker="mqtt://w1:pw@127.0.0.1:1883", fleet="demo", data="/data").batch
    4096
    """

    broker: str
    fleet: str
    data: str | Path
    name: str = "worker"
    #: topics are ``{prefix}/{fleet}/...``; the training child gets the same ``--prefix``.
    prefix: str = DEFAULT_PREFIX
    #: shared-subscription group: several workers with the same group split the stream.
    group: str | None = None
    #: ``None`` probes the broker; ``False`` refuses ``group`` at once (e.g. known amqtt).
    shared_subscriptions: bool | None = None
    #: the exactly-once index: None for SQLite in the dataset folder (one machine), or
    #: ``postgresql://USER@HOST[:PORT]/DB`` (workers on several machines; docs/dataset.md).
    index: str | None = dataclasses.field(default=None, repr=False)  # may hold a password
    batch: int = 4096  # samples per file, at most
    batch_ms: float = 100.0  # wait at most this long for more messages before writing
    #: messages per write at most: the broker's in-flight window (mosquitto.conf max_inflight_messages).
    max_pending: int = 1000
    #: with a burst pending, write once no message came for this long (the broker's window is full).
    idle_ms: float = 5.0
    status_interval: float = 2.0
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    #: larger messages are dead-lettered unread; keep it at the broker's max_packet_size.
    max_payload_bytes: int = DEFAULT_WORKER_MAX_PAYLOAD_BYTES
    #: payload bytes received and not yet written, at most: beyond it paho's network thread waits
    #: (QoS 1: the broker holds the rest) and QoS 0 messages are dropped and counted.
    max_queue_bytes: int = 256 * 1024 * 1024
    #: quarantine bounds, bytes per device and in total (payloads are de-duplicated by hash).
    quarantine_device_bytes: int = 64 * 1024 * 1024
    quarantine_bytes: int = 1024 * 1024 * 1024
    #: at most this many per-sample dead-letter reports per message (then one summary report).
    max_reports_per_message: int = 16
    # -- training trigger ---------------------------------------------------------------------------
    train_every: int | None = None  # new labelled samples
    train_interval: float | None = None  # seconds, if new labelled samples arrived
    model: str | None = None
    key: str | None = None
    train_publish: bool = False
    #: the training child's broker URL (with password) when it publishes; default ``broker``. Give it a
    #: user of its own (role trainer): brokers that bind client ids to users (mosquitto.conf
    #: use_username_as_clientid) would let a child with the worker's user kick the worker off.
    train_broker: str | None = None
    train_args: tuple[str, ...] = ()
    #: replaces ``python -m lepton train ...`` entirely (tests, custom trainers).
    train_command: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        validate_id(self.fleet, kind="fleet", flag="--fleet")
        Topics(fleet=self.fleet, prefix=self.prefix)  # validates the prefix too
        validate_id(self.name, kind="worker", flag="--name")
        if self.group is not None:
            validate_id(self.group, kind="group", flag="--group")
        if self.model is not None:
            validate_id(self.model, kind="model", flag="--model")
        BrokerURL.parse(self.broker)
        if self.index is not None:
            from lepton.cloud._index_pg import is_postgres_url

            if not is_postgres_url(self.index):
                raise ConfigError(
                    "--index must be postgresql://USER@HOST[:PORT]/DATABASE (password in $PGPASSWORD); "
                    "leave it out for the SQLite index in the dataset folder"
                )
        if self.train_broker is not None:
            BrokerURL.parse(self.train_broker)
        if self.batch < 1 or self.max_pending < 1 or self.batch_ms < 0:
            raise ConfigError("--batch and --max-pending must be >= 1 and --batch-ms >= 0")
        if self.max_payload_bytes < 1024 or self.max_queue_bytes < self.max_payload_bytes:
            raise ConfigError("--max-payload-kb must be >= 1 and --max-queue-mb at least one payload")
        if self.quarantine_device_bytes < 0 or self.quarantine_bytes < 0:
            raise ConfigError("--quarantine-mb and --quarantine-device-mb must be >= 0")
        if (self.train_every or self.train_interval) and not (self.model or self.train_command):
            raise ConfigError("--train-every/--train-interval need --model NAME")


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


@dataclass
class WorkerStats:
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
    labelled_since_train: int = 0
    train_runs: int = 0
    train_running: bool = False
    train_last_exit: int | None = None
    train_last_started: float | None = None


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
        self._q: queue.Queue[_Message] = queue.Queue()
        # Payload bytes in ``_q``: added by paho's network thread, taken by the writer, under _q_cond.
        self._q_bytes = 0
        self._q_cond = threading.Condition()
        self._gen = 0
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._writer: threading.Thread | None = None
        self._status_thread: threading.Thread | None = None
        self._my_unmarked: list[str] = []
        self._cond = threading.Condition()
        self._train_proc: subprocess.Popen | None = None
        self._last_train = time.monotonic()
        self._rate = (time.monotonic(), 0)
        self._last_rate = 0.0
        self._client: mqtt.Client | None = None
        self._decoder = BatchDecoder(
            self.topics, max_tensor_bytes=config.max_tensor_bytes, max_payload_bytes=config.max_payload_bytes
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
        _warm_up()
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
        self._stop_training()
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
            self._poll_training()
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
        self._poll_training()
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
        (:mod:`lepton.cloud._ingest_core`), this does the disk, the index and the MQTT side.

        ``done`` records the steps already carried out by an earlier attempt at the same batch
        (after a transient error), which are not done again."""
        from lepton.cloud._dataset import fsync_dir, new_file_name, write_parquet_synced
        from lepton.cloud._index import finish_file

        cfg = self.config
        done = done if done is not None else BatchProgress()
        if done.decoded is None:  # decoded, and its dead letters admitted to quarantine, once
            done.decoded = self._decoder.decode(batch)
            done.reports, done.quarantine, done.n_dead = self._dead_letters(batch, done.decoded.dead)
        decoded = done.decoded
        valid = decoded.seqs()

        # Quarantine first: a bad payload is on disk before its message can be acked.
        if done.quarantine and not done.quarantined:
            for qname, payload, report in done.quarantine:
                if self.quarantine.unwritten(qname):
                    self.quarantine.write(qname, payload, encode_json(report))
            self.quarantine.sync()
        done.quarantined = True

        if not done.committed and (decoded.parts or self._my_unmarked):
            plan = None
            name = None
            size = 0
            labelled = 0
            with self.index.transaction(devices=valid):  # locks these devices only (PostgreSQL)
                marked = list(self._my_unmarked)
                if marked:
                    self.index.mark_visible(marked)
                others = self.index.invisible_files()
                if others:  # another writer died between commit and rename: finish its file
                    for other in others:
                        finish_file(self.data_dir, other)
                    self.index.mark_visible(others)
                plan = plan_write(decoded, {dev: self.index.known(dev, seqs) for dev, seqs in valid.items()})
                if plan.n_new:
                    table = decoded.table if plan.keep is None else decoded.table.take(plan.keep)
                    labelled = plan.n_new - table.column("label").null_count
                    name = new_file_name(cfg.name)
                    size = write_parquet_synced(self.data_dir / f".{name}.tmp", table)
                    for dev, seqs in plan.new_seqs.items():
                        self.index.add(dev, seqs)
                    self.index.add_file(name, rows=plan.n_new, size=size, visible=False)
            # Committed: from here on a retry must not look the seqs up again (they would count as
            # duplicates) nor write another file.
            self._my_unmarked = [n for n in self._my_unmarked if n not in marked]
            done.committed = True
            done.plan, done.name, done.size, done.labelled = plan, name, size, labelled
        plan, name = done.plan, done.name
        if name is not None and not done.renamed:
            try:
                os.replace(self.data_dir / f".{name}.tmp", self.data_dir / name)
            except FileNotFoundError:
                # Another writer finished it for us meanwhile (and a compaction may already have
                # merged it), or an earlier attempt renamed it: the index is what made it durable.
                log.debug("worker %s: %s was finished by another writer", cfg.name, name)
            fsync_dir(self.data_dir)
            self._my_unmarked.append(name)
            done.renamed = True

        if plan is None:  # no good samples: nothing known to look up, only rejected seqs to ack
            plan = done.plan = plan_write(decoded, {})
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
            self.stats.labelled_since_train += done.labelled
            self._cond.notify_all()

    def _dead_letters(self, batch: list[_Message], dead: list[DeadLetter]):
        """Reports to publish and payloads to quarantine for the batch's dead letters:
        ``(reports, [(name, payload, report)], problems counted)``."""
        cfg = self.config
        reports: list[dict[str, Any]] = []
        quarantine: list[tuple[str, bytes, dict[str, Any]]] = []
        n = 0
        for d in dead:
            msg = batch[d.index]
            problems = d.problems
            n += len(problems)
            full = {"problems": [{"sample": i, "reason": r, "field": f} for i, r, f in problems]}
            qname, verdict = self.quarantine.admit(d.device, msg.payload,
                                                   report_size=len(encode_json(full)) + 400)
            base = {
                "topic": msg.topic,
                "device": d.device,
                "size": len(msg.payload),
                "time": msg.received_at,
                "worker": cfg.name,
                "quarantine": qname if verdict in ("new", "duplicate") else None,
            }
            if base["quarantine"] is None:
                base["quarantine_refused"] = verdict  # over its bounds: reported, acked, not kept
            shown = problems[: cfg.max_reports_per_message]
            for index, reason, fld in shown:
                reports.append({**base, "reason": reason, "field": fld, "sample": index})
            if len(problems) > len(shown):
                reports.append(
                    {
                        **base,
                        "reason": f"{len(problems) - len(shown)} more bad samples in this message",
                        "field": None,
                        "sample": None,
                    }
                )
            if verdict == "new":
                quarantine.append((qname, bytes(msg.payload), {**base, **full}))
            log.warning(
                "worker %s: dead-lettered %d problem(s) from %s (%d bytes): %s",
                cfg.name, len(problems), msg.topic, len(msg.payload), problems[0][1],
            )
        return reports, quarantine, n

    # -- status ---------------------------------------------------------------------------------------
    def _status_payload(self, *, online: bool = True, update_rate: bool = False) -> bytes:
        return encode_json(self._status_body(online=online, update_rate=update_rate))

    def _status_body(self, *, online: bool = True, update_rate: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        t0, n0 = self._rate
        if update_rate and now - t0 > 0.2:
            self._last_rate = (self.stats.stored - n0) / (now - t0)
            self._rate = (now, self.stats.stored)
        rate = self._last_rate
        st = self.stats
        return {
            "worker": self.config.name,
            "online": online,
            "fleet": self.config.fleet,
            "group": self.config.group,
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
            "quarantine": self.quarantine.usage(),
            "last_write": None if st.last_write is None else round(st.last_write, 3),
            "queue": self._q.qsize(),
            "queue_bytes": self._q_bytes,
            "started_at": round(self.started_at, 3),
            "train_runs": st.train_runs,
            "train_running": st.train_running,
            "train_last_exit": st.train_last_exit,
            "train_last_started": st.train_last_started,
        }

    @staticmethod
    def _telemetry_of(status: dict[str, Any]) -> dict[str, int | float]:
        """The telemetry report that goes with a status: its numbers, flat (docs/protocol.md, "Worker
        telemetry"); names, the error text and ``online`` stay in the status."""
        body = {k: v for k, v in status.items() if k not in _STATE_FIELDS}
        body.update({f"quarantine_{k}": v for k, v in status["quarantine"].items()})
        return telemetry_fields(body)

    def telemetry(self) -> dict[str, int | float]:
        """The current telemetry report (what the telemetry topic carries, without ``v``/``ts``)."""
        return self._telemetry_of(self._status_body())

    def _publish_status(self) -> None:
        if self._client is not None:
            status = self._status_body(update_rate=True)
            self._client.publish(self.topics.worker_status(self.config.name), encode_json(status), qos=1,
                                 retain=True)
            self._client.publish(self.topics.worker_telemetry(self.config.name),
                                 encode_json(self._telemetry_of(status)), qos=0)

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

    # -- training trigger -----------------------------------------------------------------------------
    def train_command(self) -> list[str]:
        cfg = self.config
        if cfg.train_command:
            return list(cfg.train_command)
        cmd = [
            sys.executable,
            "-m",
            "lepton",
            "train",
            "--data",
            str(cfg.data),
            "--fleet",
            cfg.fleet,
            "--prefix",
            cfg.prefix,
            "--model",
            str(cfg.model),
        ]
        if cfg.train_publish:
            cmd.append("--publish")  # the broker URL goes in the environment: argv is world-readable
        if cfg.key:
            cmd += ["--key", str(cfg.key)]
        return cmd + list(cfg.train_args)

    def train_environment(self) -> dict[str, str]:
        """The training child's environment: the broker URL (with its password) in $LEPTON_BROKER
        when it publishes, no broker credentials otherwise; never any of it in argv (/proc/PID/cmdline)."""
        from lepton.protocol._mqtt import ENV_BROKER, child_environment

        cfg = self.config
        url = BrokerURL.parse(cfg.train_broker) if cfg.train_broker else self.url
        if cfg.train_publish:
            return child_environment(url, os.environ)
        return {k: v for k, v in child_environment(url, os.environ).items() if k != ENV_BROKER}

    def _stop_training(self, grace: float = 10.0) -> None:
        """SIGTERM the training child, SIGKILL it after ``grace`` seconds, and reap it: no trainer
        outlives its worker (the writer thread, which starts it, has stopped)."""
        proc, self._train_proc = self._train_proc, None
        if proc is None:
            return
        if proc.poll() is None:
            log.info("worker %s: stopping training run %d (pid %d)", self.config.name, self.stats.train_runs,
                     proc.pid)
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("worker %s: training pid %d ignored SIGTERM for %.0fs; killing it",
                            self.config.name, proc.pid, grace)
                proc.kill()
                proc.wait()
        self.stats.train_running = False
        self.stats.train_last_exit = proc.returncode

    def _poll_training(self) -> None:
        cfg = self.config
        st = self.stats
        proc = self._train_proc
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return
            self._train_proc = None
            st.train_running = False
            st.train_last_exit = rc
            (log.info if rc == 0 else log.warning)(
                "worker %s: training run %d exited with %d (log: %s)",
                cfg.name,
                st.train_runs,
                rc,
                self.dir / "train.log",
            )
            self._publish_status()
        if not (cfg.train_every or cfg.train_interval) or st.labelled_since_train == 0:
            return
        due = bool(cfg.train_every and st.labelled_since_train >= cfg.train_every)
        due = due or bool(cfg.train_interval and time.monotonic() - self._last_train >= cfg.train_interval)
        if not due:
            return
        cmd = self.train_command()
        shown = [("***" if i > 0 and cmd[i - 1] == "--broker" else a) for i, a in enumerate(cmd)]
        log.info(
            "worker %s: %d new labelled samples, starting training: %s",
            cfg.name,
            st.labelled_since_train,
            " ".join(shown),
        )
        try:
            with open(self.dir / "train.log", "ab") as out:
                self._train_proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self.train_environment(),
                )
        except OSError as exc:
            log.error("worker %s: cannot start training %s: %s", cfg.name, cmd[0], exc)
            st.train_last_exit = -1
            self._last_train = time.monotonic()
            st.labelled_since_train = 0
            return
        st.train_runs += 1
        st.train_running = True
        st.train_last_started = round(time.time(), 3)
        st.labelled_since_train = 0
        self._last_train = time.monotonic()
        self._publish_status()


_MIN_WINDOW = 20


def _warm_up() -> None:
    """Import what the first Parquet write pulls in lazily (pandas shims: ~0.2 s) before any message
    waits on it."""
    import io

    import pyarrow.parquet as pq

    from lepton.cloud._dataset import SCHEMA

    pq.write_table(SCHEMA.empty_table(), io.BytesIO())


def _samples_hint(msg: _Message) -> int:
    """Rough sample count of a message before decoding: payload size over 1 KiB, at least 1."""
    return max(1, len(msg.payload) // 1024)
