"""The cloud inference worker (``lepton serve``): devices' infer requests in, the cloud model's answers out.

Two plain cores and this thin MQTT shell:

* :class:`~lepton.protocol.ModelAssembler` (no I/O, clock passed in), the very assembler a device
  runs, rebuilds the fleet's model from its retained, signed manifest and chunks (docs/protocol.md,
  "How a device assembles a model"): verify the manifest first, then each chunk as it arrives, hold
  orphan chunks in a bounded buffer, ask for a re-subscription when progress stalls, and join and
  verify the whole package. The worker feeds it from its own connection, never a second one: brokers
  that bind client ids to users would let a second connection of the same user kick the worker off.
* :class:`~lepton.cloud._serve_core.ServeCore` (no I/O, clock passed in; lepton/cloud/_serve_core.py)
  decides what happens to each request: admission, shedding, the checks against the model, answers
  and the counters of the status. Every request gets exactly one answer, an error code being an answer
  too; nothing is silently dropped.
* :class:`ServeWorker` (the shell) connects, subscribes, moves messages to the cores and carries out
  their decisions: it runs ONNX Runtime on batches, publishes answers and the retained status. Its
  settings are a :class:`~lepton.cloud._serve_config.ServeConfig`; with ``--data`` its answers are
  recorded by a :class:`~lepton.cloud._serve_labels.TeacherLabelWriter`, which has a thread of its own.

Threads and the state they own: paho's network thread only calls ``ServeCore.submit`` (under
``ServeWorker._lock``) and queues model messages (``_inbox_bytes`` and ``model_state.inbox_dropped``
under ``_inbox_lock``, which the model thread takes to subtract); the **inference thread** takes
batches from the core (under the same lock), runs ONNX Runtime outside it and publishes answers; the
**model thread** owns the assembler (and replaces its immutable ``AssemblerStats`` snapshot,
``ServeWorker._assembly``, after every event, so ``status()`` reads a consistent copy from any
thread) and the rest of ``model_state``, loads verified models and swaps them in with one reference
assignment (``ServeWorker._served``), so a batch in flight finishes on the model it started with; the
**status thread** publishes the retained status. The core is not thread-safe by itself: only ``_lock``
holders call it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.cloud._serve_config import ServeConfig
from lepton.cloud._serve_core import ModelInfo, ServeCore, serve_telemetry
from lepton.cloud._serve_labels import TeacherLabelWriter
from lepton.errors import ConfigError, ModelRejected, ProtocolError
from lepton.protocol import (
    Announced,
    AssemblerStats,
    AssemblyEvent,
    BrokerURL,
    Cleared,
    InferAnswer,
    ModelAssembler,
    ModelPackage,
    ParsedTopic,
    Ready,
    Refetch,
    Rejected,
    Stale,
    Topics,
    connect,
    encode_answer,
    encode_json,
    load_public_key,
    new_client,
)

log = logging.getLogger(__name__)

__all__ = ["ServeWorker"]

#: Requests are taken and answered at QoS 0 (docs/protocol.md, "Cloud inference": a late answer is
#: worth nothing, so nothing is queued or retransmitted for an absent peer).
INFER_QOS = 0


# ------------------------------------------------------------------------------------------------
# the MQTT shell
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Served:
    info: ModelInfo
    session: Any  # onnxruntime.InferenceSession
    input_name: str
    output_name: str
    loaded_at: float


@dataclass
class _ModelState:
    error: dict[str, Any] | None = None
    swaps: int = 0
    rejections: int = 0
    refetches: int = 0
    inbox_dropped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ServeWorker:
    """Answer a fleet's infer requests with its cloud model, hot-swapped from signed retained messages.

    Example (needs a broker)::

        with ServeWorker(ServeConfig(broker=url, fleet="demo", model="digits-cloud",
                                     public_key="lepton.pub")) as w:
            w.wait_model(1, timeout=30)
    """

    MAX_INBOX_BYTES = 64 * 1024 * 1024

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.topics = Topics(fleet=config.fleet, prefix=config.prefix)
        self.url = BrokerURL.parse(config.broker)
        key = config.public_key if config.verify else None
        if isinstance(key, (str, Path)):
            key = load_public_key(key)
        self.core = ServeCore(worker=config.name, model=config.model, topics=self.topics,
                              max_queue=config.max_queue, max_device_queue=config.max_device_queue,
                              max_payload_bytes=config.max_payload_bytes)
        # No pipeline or input check here: each request is checked against the model (ServeCore).
        self.assembler = ModelAssembler(fleet=config.fleet, model=config.model, public_key=key,
                                        pipeline_hash=None)
        self._assembly: AssemblerStats = self.assembler.stats()  # the model thread's snapshot of it
        self.model_state = _ModelState()
        self._served: _Served | None = None
        self._lock = threading.Lock()  # around every call of self.core
        self._work = threading.Condition(self._lock)
        self._inbox: queue.Queue[tuple[ParsedTopic, bytes]] = queue.Queue()
        self._inbox_bytes = 0
        self._inbox_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client: Any = None  # paho.mqtt.client.Client once started
        self._model_cond = threading.Condition()
        self._probe_topic: str | None = None
        self._probe_event = threading.Event()
        self.started_at = time.time()
        self._teacher = TeacherLabelWriter(config) if config.data is not None else None

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> ServeWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Connect, subscribe and start answering. Raises BrokerConnectionError, or ConfigError for
        ``group`` on a broker without shared subscriptions (the embedded amqtt broker)."""
        cfg = self.config
        client = new_client(self.url, client_id=f"lepton-serve-{cfg.fleet}-{cfg.name}", clean_session=True,
                            max_inflight=100)
        client.will_set(self.topics.worker_status(cfg.name),
                        encode_json({"worker": cfg.name, "online": False, "fleet": cfg.fleet,
                                     "role": "serve", "reason": "connection lost"}), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self._client = client
        connect(client, self.url)
        if cfg.group and not self._probe_shared(client):
            client.disconnect()
            client.loop_stop()
            raise ConfigError(
                f"broker {self.url} does not support shared subscriptions ($share/{cfg.group}/...), so "
                "--group cannot split the requests (the embedded amqtt broker has none); run one serve "
                "worker without --group, or use Mosquitto, EMQX or VerneMQ")
        # Subscribing only now: with a group, a plain subscription before the probe would take requests
        # that another worker of the group also gets.
        self._subscribe(client)
        for target, name in ((self._infer_loop, "infer"), (self._model_loop, "model"),
                             (self._status_loop, "status")):
            thread = threading.Thread(target=target, name=f"lepton-serve-{cfg.name}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._publish_status()
        log.info("serve worker %s answering %s with model %s", cfg.name, self._infer_filter(), cfg.model)

    def stop(self, timeout: float = 10.0) -> None:
        """Answer nothing more, publish the offline status and disconnect."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._work:
            self._work.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        if self._teacher is not None:
            self._teacher.close()  # the last batch of teacher labels is written before we go
        client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                info = client.publish(self.topics.worker_status(self.config.name),
                                      self._status_payload(online=False), qos=1, retain=True)
                info.wait_for_publish(3)
            client.disconnect()
            client.loop_stop()

    def wait_model(self, version: int | None = None, timeout: float = 30.0) -> bool:
        """Wait until a model (``version`` or newer) is served; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._model_cond:
            while True:
                served = self._served
                if served is not None and (version is None or served.info.version >= version):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._model_cond.wait(left)

    @property
    def served_version(self) -> int | None:
        served = self._served
        return served.info.version if served else None

    def status(self) -> dict[str, Any]:
        cfg = self.config
        served = self._served
        with self._lock:
            counters = self.core.status(now=time.time())
        pending = self._assembly.pending_summary
        state = self.model_state
        return {
            "worker": cfg.name, "fleet": cfg.fleet, "role": "serve", "online": not self._stop.is_set(),
            "group": cfg.group, "model": cfg.model,
            "model_version": served.info.version if served else None,
            "model_sha256": served.info.sha256 if served else None,
            "model_error": state.error, "model_pending": pending, "model_verify": cfg.verify,
            "swaps": state.swaps, "model_rejections": state.rejections, "model_refetches": state.refetches,
            "started_at": round(self.started_at, 3), **counters,
            "teacher_labels": (
                {"written": self._teacher.written, "dropped": self._teacher.dropped, "files": self._teacher.files}
                if self._teacher is not None else None
            ),
        }

    # -- MQTT (paho's network thread) -----------------------------------------------------------------
    def _infer_filter(self) -> str:
        base = self.topics.all_devices("infer")
        group = self.config.group
        return self.topics.shared(group, base) if group else base

    def _subscribe(self, client) -> None:  # noqa: ANN001
        client.subscribe([(self._infer_filter(), INFER_QOS),
                          (self.topics.model_filter(self.config.model), 0)])

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            log.warning("serve %s: broker refused the connection: %s", self.config.name, reason_code)
            return
        if self._threads:  # a reconnect (clean session: subscriptions are gone); start() subscribes first
            self._subscribe(client)

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        topic = msg.topic
        if topic == self._probe_topic:
            self._probe_event.set()
            return
        if self._stop.is_set():
            return
        payload = bytes(msg.payload)
        if topic.endswith("/infer"):
            served = self._served
            with self._work:
                reply = self.core.submit(topic, payload, now=time.time(),
                                         model=served.info if served else None)
                if reply is None:
                    self._work.notify()
            if reply is not None:
                self._publish_answer(*reply)
            return
        try:
            parsed = self.topics.parse(topic)
        except ProtocolError:
            return
        if parsed.channel in ("model", "model_chunk"):
            with self._inbox_lock:
                if self._inbox_bytes + len(payload) > self.MAX_INBOX_BYTES:
                    self.model_state.inbox_dropped += 1  # fetched again by a re-subscription
                    return
                self._inbox_bytes += len(payload)
            self._inbox.put((parsed, payload))

    def _publish_answer(self, device: str, answer: InferAnswer) -> None:
        client = self._client
        if client is None:
            return
        try:
            client.publish(self.topics.answers(device), encode_answer(answer), qos=INFER_QOS)
        except (ValueError, RuntimeError, ProtocolError) as exc:  # paho: queue full / not connected
            log.warning("serve %s: cannot answer %s seq %s: %s", self.config.name, device, answer.seq, exc)

    def _probe_shared(self, client) -> bool:  # noqa: ANN001
        """Does the broker deliver through a ``$share/`` subscription? amqtt 0.12 silently never does."""
        if self.config.shared_subscriptions is not None:
            return self.config.shared_subscriptions
        topic = self.topics.worker_status(self.config.name)
        self._probe_topic = topic
        shared = self.topics.shared(self.config.group or "", topic)
        client.subscribe(shared, qos=1)
        ok = False
        for _ in range(6):
            client.publish(topic, encode_json({"worker": self.config.name, "online": True, "probe": True}),
                           qos=1)
            if self._probe_event.wait(0.5):
                ok = True
                break
        client.unsubscribe(shared)
        self._probe_topic = None
        return ok

    # -- the inference thread -------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        cfg = self.config
        while not self._stop.is_set():
            served = self._served  # read once: a swap during this batch does not affect it
            info = served.info if served else None
            with self._work:
                if not self.core.depth:
                    self._work.wait(0.2)
                    continue
                batch, refused = self.core.take(now=time.time(), model=info, max_batch=cfg.max_batch)
            for reply in refused:
                self._publish_answer(*reply)
            if not batch:
                continue
            assert served is not None and info is not None
            try:
                feed = np.stack([np.asarray(p.request.x, dtype=info.dtype) for p in batch])
                out = np.asarray(served.session.run([served.output_name], {served.input_name: feed})[0])
                rows = out.reshape(len(batch), -1)
                error = None
            except Exception as exc:  # noqa: BLE001 - ORT raises its own types; every request gets an answer
                error = f"v{info.version}: {type(exc).__name__}: {str(exc)[:300]}"
                log.warning("serve %s: inference failed on a batch of %d: %s", cfg.name, len(batch), error)
            with self._lock:
                now = time.time()
                if error is None:
                    replies = [self.core.answer(p, rows[i], now=now, model=info) for i, p in enumerate(batch)]
                else:
                    replies = [self.core.fail(p, "inference_failed", error, now=now, model=info)
                               for p in batch]
            for reply in replies:
                self._publish_answer(*reply)
            if self._teacher is not None and error is None:
                self._teacher.put([r for r in replies if r[1].error is None])

    # -- the model thread -----------------------------------------------------------------------------
    def _model_loop(self) -> None:
        while not self._stop.is_set():
            try:
                parsed, payload = self._inbox.get(timeout=0.25)
            except queue.Empty:
                parsed = None
            try:
                if parsed is not None:
                    with self._inbox_lock:
                        self._inbox_bytes -= len(payload)
                    self._apply(self.assembler.receive(parsed, payload, time.monotonic()))
                self._apply(self.assembler.tick(time.monotonic()))
            except Exception:  # nothing may kill the model thread: the model would never update again
                log.exception("serve %s: unexpected error while assembling a model", self.config.name)

    def _apply(self, events: list[AssemblyEvent]) -> None:
        """Publish the assembler's new state, then carry out each of its decisions."""
        self._assembly = self.assembler.stats()
        cfg = self.config
        for event in events:
            if isinstance(event, Ready):
                self._swap(event.package)
            elif isinstance(event, Rejected):
                self._reject(event.error, event.version)
            elif isinstance(event, Refetch):
                self.model_state.refetches += 1
                log.info("serve %s: model %s: %s; subscribing again", cfg.name, cfg.model, event.why)
                self._client.subscribe(self.topics.model_filter(cfg.model), qos=0)
            elif isinstance(event, Stale):
                log.debug("serve %s: model %s v%d ignored (stale_version): serving v%s", cfg.name, cfg.model,
                          event.version, event.serving)
            elif isinstance(event, Announced):
                log.info("serve %s: model %s v%d announced: %d/%d chunks here", cfg.name, cfg.model,
                         event.version, event.have, event.of)
            elif isinstance(event, Cleared):
                log.info("serve %s: model %s: retained manifest cleared; keeping v%s", cfg.name, cfg.model,
                         event.serving)

    def _swap(self, package: ModelPackage) -> None:
        version = package.manifest.version
        try:
            served = self._load(package)
        except ModelRejected as exc:
            self._apply(self.assembler.refuse(version, exc))
            return
        with self._model_cond:
            self._served = served  # the swap: one reference assignment
            self.model_state.swaps += 1
            self.model_state.error = None
            self._model_cond.notify_all()
        self.assembler.served(version)
        self._assembly = self.assembler.stats()
        log.info("serve %s: serving %s v%d", self.config.name, self.config.model, version)
        self._publish_status()

    def _reject(self, exc: ModelRejected, version: int | None) -> None:
        self.model_state.rejections += 1
        self.model_state.error = {"reason": exc.reason, "message": exc.detail, "version": version,
                                  "ts": round(time.time(), 3)}
        log.warning("serve %s: model %s v%s rejected: %s", self.config.name, self.config.model, version, exc)
        self._publish_status()

    def _load(self, package: ModelPackage) -> _Served:
        import onnxruntime as ort

        manifest = package.manifest  # verified whole, external data refused (ModelAssembler)
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.config.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            session = ort.InferenceSession(package.data, sess_options=options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ModelRejected("load_failed", f"ONNX Runtime cannot load v{manifest.version}: "
                                f"{str(exc)[:300]}") from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelRejected("incompatible_input", f"v{manifest.version} has {len(inputs)} inputs; "
                                "a Lepton model takes one tensor")
        node = inputs[0]
        dtype = _ORT_TYPES.get(node.type)
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in node.shape]
        if dtype is None or len(dims) < 2:
            raise ModelRejected("incompatible_input", f"v{manifest.version} takes {node.type} {node.shape}; "
                                "the serve worker needs a float input with a batch dimension")
        sample_shape = tuple(dims[1:])
        try:
            probe = np.zeros([2, *[d if d > 0 else 1 for d in sample_shape]], dtype=dtype)
            out = np.asarray(session.run([outputs[0].name], {node.name: probe})[0])
        except Exception as exc:  # noqa: BLE001
            raise ModelRejected("load_failed", f"v{manifest.version} does not run on a batch of 2: "
                                f"{str(exc)[:300]}") from None
        labels = tuple(str(label) for label in manifest.labels)
        classes = int(out.reshape(2, -1).shape[1])
        if labels and classes != len(labels):
            raise ModelRejected("load_failed", f"v{manifest.version} outputs {classes} scores but its "
                                f"manifest names {len(labels)} labels")
        info = ModelInfo(name=manifest.name, version=manifest.version, labels=labels,
                         sample_shape=sample_shape, dtype=np.dtype(dtype), pipeline=manifest.pipeline_hash,
                         sha256=manifest.sha256, temperature=manifest.temperature)
        return _Served(info, session, node.name, outputs[0].name, time.time())

    # -- the status thread ----------------------------------------------------------------------------
    def _status_loop(self) -> None:
        while not self._stop.wait(self.config.status_interval):
            self._publish_status()

    def _status_payload(self, *, online: bool = True) -> bytes:
        body = self.status()
        body["online"] = online
        return encode_json(body)

    def telemetry(self) -> dict[str, int | float]:
        """The current telemetry report (what the telemetry topic carries, without ``v``/``ts``)."""
        return serve_telemetry(self.status())

    def _publish_status(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            status = self.status()
            client.publish(self.topics.worker_status(self.config.name), encode_json(status), qos=1,
                           retain=True)
            client.publish(self.topics.worker_telemetry(self.config.name),
                           encode_json(serve_telemetry(status)), qos=0)
        except (ValueError, RuntimeError) as exc:
            log.debug("serve %s: status not published: %s", self.config.name, exc)


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
