"""The ingest worker: device samples from MQTT -> exactly-once, durable Parquet dataset.

Design (why it is exactly-once and durable):

- paho client with a fixed client id, ``clean_session=False`` and ``manual_ack=True``: the broker keeps
  our subscription and queues samples while we are away, and redelivers every message we have not
  PUBACKed. We PUBACK a message only after each of its samples is in a renamed, fsynced Parquet file
  committed to the index, or dead-lettered (report published, raw payload fsynced in quarantine).
- paho calls ``on_message`` in its network thread; it only enqueues. The writer thread batches
  (``batch`` samples, ``batch_ms``, or ``max_pending`` messages: the broker's in-flight window, after
  which it sends nothing until we ack) and hands each batch to the store. By default
  (``store_process``) the store runs in a forked child (:mod:`lepton.cloud._ingest_child`), out of
  this process's GIL: the writer sends it the raw messages of a batch through a pipe (at most two
  batches unanswered) and the result thread does the MQTT side of each answer: device acks,
  dead-letter reports, then the PUBACKs of the batch in one buffer
  (:func:`lepton.protocol.ack_many`: it only appends to paho's outgoing deque and wakes the network
  thread once through its socket pair, so calling it from another thread is safe). With
  ``store_process=False`` the writer thread runs the store itself and does the MQTT side.
  If the store child dies the worker exits (code of the child, 128 + signal if killed) without
  acking anything the child had not finished; if the worker dies the child sees its pipe close and
  exits.
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
``_q_cond``), which the writer thread subtracts from. The store (:class:`~lepton.cloud._ingest_store.
BatchStore`: decoder, index, quarantine, and the :class:`~lepton.cloud._ingest_runner.StoreRunner`
that retries and isolates) is owned by the store child's only thread, or in-process by the writer
thread. The counters and the :class:`~lepton.cloud._ingest_trainer.TrainerProcess` are owned by the
thread that does the MQTT side of results (the result thread, or in-process the writer thread); the
batches sent and not yet answered (``_sent``, a deque) go from the writer to the result thread; the
status thread only publishes. :meth:`IngestWorker.stop` stops the child and the trainer and closes
the index after the writer ended.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton.cloud._ingest_config import DEFAULT_WORKER_MAX_PAYLOAD_BYTES, WorkerConfig
from lepton.cloud._ingest_child import StoreChild
from lepton.cloud._ingest_core import BatchDecoder
from lepton.cloud._ingest_runner import TRANSIENT, Msg, Outcome, StoreRunner, StoreState
from lepton.cloud._ingest_status import RateMeter, WorkerStats, status_body, telemetry_of
from lepton.cloud._ingest_store import BatchStore, warm_up
from lepton.cloud._ingest_trainer import TrainerProcess
from lepton.errors import ConfigError
from lepton.protocol import _mqtt
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


@dataclass
class _Message:
    gen: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float
    retain: bool = False



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
        self._transient = TRANSIENT + self.index.transient_errors
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
        self._store = self._make_store(self.index)
        # In-process mode: the writer thread runs the store. Store-child mode: the child does, the
        # writer thread sends it batches (at most ``_slots`` unanswered, in ``_sent``) and the result
        # thread does the MQTT side of its answers.
        self._runner: StoreRunner | None = None
        self._child: StoreChild | None = None
        self._results: threading.Thread | None = None
        self._slots = threading.Semaphore(2)
        self._sent: collections.deque[list[_Message]] = collections.deque()
        self._store_errors = 0  # the store's error count already added to stats.errors
        self._quarantine_usage: dict[str, int] | None = None  # the child's, from its last answer
        self._fatal: int | None = None
        self._stopping = False
        self.started_at = time.time()

    def _make_store(self, index: Any) -> BatchStore:
        cfg = self.config
        decoder = BatchDecoder(self.topics, max_tensor_bytes=cfg.max_tensor_bytes,
                               max_payload_bytes=cfg.max_payload_bytes)
        return BatchStore(cfg, data_dir=self.data_dir, index=index, quarantine=self.quarantine,
                          decoder=decoder)

    def _start_store(self) -> None:
        """Build the store's runner: in the writer thread, or in a forked child (the default)."""
        cfg = self.config
        if not cfg.store_process:
            self._runner = StoreRunner(self._store, transient=self._transient, wait=self._stop.wait,
                                       on_state=self._on_runner_state, name=cfg.name)
            return
        from lepton.cloud._index import open_index

        self.index.close()  # the child opens its own: a database connection must not cross a fork
        own: list[Any] = []

        def make_runner(on_state, wait):  # noqa: ANN001, ANN202 - runs in the child
            index = open_index(self.dir, cfg.index)
            own.append(index)
            return StoreRunner(self._make_store(index), transient=TRANSIENT + index.transient_errors,
                               wait=wait, on_state=on_state, name=cfg.name)

        def close() -> None:  # in the child, on its way out
            for index in own:
                index.close()

        self._child = StoreChild(make_runner, close, name=cfg.name)
        self._results = threading.Thread(target=self._result_loop, name=f"lepton-ingest-{cfg.name}-acks",
                                         daemon=True)
        self._results.start()

    @property
    def store_pid(self) -> int | None:
        """The store child's pid (None in-process mode or before start)."""
        return self._child.pid if self._child is not None else None

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
        self._start_store()  # before any MQTT thread runs: the child is forked from this one only
        try:
            self._connect()
        except BaseException:
            self._stop_store()
            raise

    def _stop_store(self) -> None:
        """start() failed after the child was forked: stop it again."""
        self._stop.set()
        if self._child is not None:
            self._child.abandon_retries()
        self._join_store(10)

    def _join_store(self, timeout: float) -> None:
        """Ask the store child to exit after the batches already sent; wait for it and its results."""
        if self._child is None:
            return
        self._child.request_stop()
        if self._results is not None:
            self._results.join(timeout)
        self._child.join(timeout)

    def _connect(self) -> None:
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
        if self._stopping:
            return
        self._stopping = True
        self._stop.set()
        if self._child is not None:
            self._child.abandon_retries()  # as in-process: a batch in its retry backoff gives up
        if self._writer is not None:
            self._writer.join(timeout)
        self._join_store(timeout)
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

    # -- writer thread (and, with the store child, the result thread) --------------------------------
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
        """Gather one batch and write it (or hand it to the store child); False once stopping and the
        queue is empty."""
        cfg = self.config
        child = self._child
        if child is not None and not self._slots.acquire(timeout=0.2):
            return not (self._stop.is_set() and (self._q.empty() or self._fatal is not None))
        try:
            first = self._take(self._q.get(timeout=0.2))
        except queue.Empty:
            if child is not None:
                self._slots.release()
            else:
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
        if child is not None:
            self._sent.append(batch)  # before the send: the result thread pops it
            child.send([(m.topic, m.payload, m.received_at, m.retain) for m in batch])
            return True
        assert self._runner is not None
        self._finish(batch, self._runner.run(
            [Msg(i, m.topic, m.payload, m.received_at, m.retain) for i, m in enumerate(batch)]))
        self._trainer.poll()
        return True

    def _result_loop(self) -> None:
        """The store child's answers: do the MQTT side of each finished batch (result thread)."""
        child = self._child
        assert child is not None
        while True:
            try:
                if not child.poll(0.2):
                    self._trainer.poll()
                    continue
                msg = child.recv()
            except (EOFError, OSError):
                self._child_died()
                return
            try:
                if msg[0] == "bye":
                    return
                if msg[0] == "state":
                    self._copy_state(msg[1])
                    self._publish_status()
                    continue
                _, outcomes, self._quarantine_usage = msg
                batch = self._sent.popleft()
                self._slots.release()
                self._finish(batch, outcomes)
                self._trainer.poll()
            except Exception:
                self.stats.errors += 1
                log.exception("worker %s: unexpected error handling the store's result", self.config.name)

    def _child_died(self) -> None:
        """The store child is gone: fail loudly and exit. Nothing it had not finished is acked, so the
        broker redelivers it to the next session (and the index drops what it had committed)."""
        child = self._child
        assert child is not None
        child.join(5)
        code = child.exitcode
        if self._stop.is_set():  # stopping anyway: what it had not finished stays unacked
            log.error("worker %s: the store child died while stopping (exit code %s)", self.config.name, code)
            return
        rc = 128 - code if code is not None and code < 0 else (code or 1)
        log.critical("worker %s: the store child (pid %s) died (exit code %s); exiting with %d so it is "
                     "restarted (the broker redelivers everything unacknowledged)",
                     self.config.name, child.pid, code, rc)
        logging.shutdown()
        os._exit(rc)

    def _copy_state(self, state: StoreState) -> None:
        st = self.stats
        st.errors += state.errors - self._store_errors
        self._store_errors = state.errors
        st.retrying, st.last_error = state.retrying, state.last_error

    def _on_runner_state(self) -> None:  # in-process mode (writer thread)
        assert self._runner is not None
        self._copy_state(self._runner.state)
        self._publish_status()

    def _finish(self, batch: list[_Message], outcomes: list[Outcome]) -> None:
        """The MQTT side of a written batch: tell the devices (duplicates and rejected seqs included),
        report dead letters, PUBACK (only what the store made durable), count."""
        client = self._client
        assert client is not None  # between start() and stop()
        for out in outcomes:
            if out.ack:
                for dev, ranges in out.acks.items():
                    client.publish(self.topics.acks(dev), encode_acks(ranges), qos=1)
                for report in out.reports:
                    client.publish(self.topics.deadletter(), encode_json(report), qos=1)
                gen = self._gen
                mids = [batch[i].mid for i in out.messages if batch[i].gen == gen and batch[i].qos == 1]
                # One wake-up of paho's loop for the lot; called through its module so that a test can
                # inject a crash just before the PUBACKs.
                _mqtt.ack_many(client, mids)
                for i in out.messages:
                    msg = batch[i]
                    if msg.gen == gen and msg.qos == 2:
                        client.ack(msg.mid, msg.qos)
            self._count(len(out.messages), out)

    def _count(self, received: int, out: Outcome) -> None:
        with self._cond:
            self.stats.received += received
            self.stats.dead_letters += out.n_dead
            self.stats.stored += out.stored
            self.stats.duplicates += out.duplicates
            if out.file:
                self.stats.files += 1
                self.stats.bytes += out.size
                self.stats.last_write = time.time()
            self._trainer.add_labelled(out.labelled)
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
            quarantine=self._quarantine_usage or self.quarantine.usage(),
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
