"""The cloud inference worker (``lepton serve``): devices' infer requests in, the cloud model's answers out.

Two plain cores and a thin MQTT shell:

* :class:`~lepton.protocol.ModelAssembler` (no I/O, clock passed in), the very assembler a device
  runs, rebuilds the fleet's model from its retained, signed manifest and chunks (docs/protocol.md,
  "How a device assembles a model"): verify the manifest first, then each chunk as it arrives, hold
  orphan chunks in a bounded buffer, ask for a re-subscription when progress stalls, and join and
  verify the whole package. The worker feeds it from its own connection, never a second one: brokers
  that bind client ids to users would let a second connection of the same user kick the worker off.
* :class:`ServeCore` (no I/O, clock passed in) decides what happens to each request: decode it, shed
  it when the bounded queue (or the device's share of it) is full, refuse it when no model is loaded,
  its pipeline or shape does not fit, or its deadline passed, and turn model scores into answers. Every
  request gets exactly one answer, an error code being an answer too; nothing is silently dropped.
  It also keeps the counters and latencies of the retained status.
* :class:`ServeWorker` (the shell) connects, subscribes, moves messages to the cores and carries out
  their decisions: it runs ONNX Runtime on batches, publishes answers and the retained status.

Threads and the state they own: paho's network thread only calls ``ServeCore.submit`` (under
``ServeWorker._lock``) and queues model messages; the **inference thread** takes batches from the core
(under the same lock), runs ONNX Runtime outside it and publishes answers; the **model thread** owns the
assembler (and replaces its immutable ``AssemblerStats`` snapshot, ``ServeWorker._assembly``, after
every event, so ``status()`` reads a consistent copy from any thread), loads verified models and swaps
them in with one reference assignment (``ServeWorker._served``), so a batch in flight finishes on the
model it started with; the **status thread** publishes the retained status. The core is not thread-safe by itself: only ``_lock`` holders
call it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError, ModelRejected, ProtocolError
from lepton.protocol import (
    ANSWER_ERRORS,
    DEFAULT_MAX_INFER_BYTES,
    DEFAULT_PREFIX,
    BrokerURL,
    Announced,
    AssemblerStats,
    AssemblyEvent,
    Cleared,
    InferAnswer,
    InferRequest,
    ModelAssembler,
    ModelPackage,
    ParsedTopic,
    Ready,
    Refetch,
    Rejected,
    Stale,
    Topics,
    connect,
    decode_infer,
    encode_answer,
    encode_json,
    load_public_key,
    new_client,
    peek_seq,
    telemetry_fields,
    validate_id,
)

log = logging.getLogger(__name__)

#: fields of the serve status that are state, not numbers to chart: the telemetry leaves them out or,
#: for the objects, carries them flat (see ``ServeWorker._telemetry_of``)
_STATE_FIELDS = frozenset({"worker", "fleet", "role", "online", "group", "model", "model_sha256",
                           "model_error", "model_pending", "errors", "latency_ms", "teacher_labels"})

__all__ = ["ModelInfo", "ServeConfig", "ServeCore", "ServeWorker"]

#: Requests are taken and answered at QoS 0 (docs/protocol.md, "Cloud inference": a late answer is
#: worth nothing, so nothing is queued or retransmitted for an absent peer).
INFER_QOS = 0
#: How many answer latencies the p50/p99 of the status are computed over.
LATENCY_WINDOW = 2048
#: The answer rate of the status is measured over this many seconds.
RATE_S = 10


# ------------------------------------------------------------------------------------------------
# request handling (I/O-free)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What the core needs to know of the model being served (the session stays in the shell)."""

    name: str
    version: int
    labels: tuple[str, ...]
    sample_shape: tuple[int, ...]  # the input shape without its batch dimension; -1 where dynamic
    dtype: np.dtype
    pipeline: str | None
    sha256: str = ""
    #: the manifest's calibration temperature: confidences are softmax(logits / T)
    temperature: float = 1.0


@dataclass(frozen=True)
class Pending:
    """A request in the queue, with the time the worker received it."""

    request: InferRequest
    received: float


def scores_to_answer(scores: np.ndarray, temperature: float = 1.0) -> tuple[int, float]:
    """``(argmax, its probability)``: softmax of the scores over the calibration ``temperature``, used as
    they are when they already sum to 1 (the same rule as a device's predictions)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError(f"the model output has no finite scores (shape {np.shape(scores)})")
    if not (np.all(s >= 0) and abs(float(s.sum()) - 1.0) < 1e-3):
        s = s / temperature
        s = np.exp(s - s.max())
        s /= s.sum()
    index = int(np.argmax(s))
    return index, min(1.0, max(0.0, float(s[index])))


class ServeCore:
    """The serve worker's decisions: admission (bounded queue, shedding), checks, answers, counters.

    Every method takes ``now`` (Unix seconds: request deadlines are Unix times) and returns the answers
    to publish as ``(device, InferAnswer)`` pairs. Not thread-safe; the shell serialises calls.

    >>> core = ServeCore(worker="w1", model="digits", topics=Topics(fleet="demo"), max_queue=1)
    >>> from lepton.protocol import encode_infer
    >>> req = encode_infer(InferRequest(device="cam-1", seq=1, x=np.zeros(3, np.float32)))
    >>> core.submit("lepton/demo/devices/cam-1/infer", req, now=0.0) is None          # queued
    True
    >>> core.submit("lepton/demo/devices/cam-1/infer", req, now=0.0)[1].error         # queue full
    'overloaded'
    """

    def __init__(
        self,
        *,
        worker: str,
        model: str,
        topics: Topics,
        max_queue: int = 256,
        max_device_queue: int | None = None,
        max_payload_bytes: int = DEFAULT_MAX_INFER_BYTES,
        latency_window: int = LATENCY_WINDOW,
    ) -> None:
        if max_queue < 1:
            raise ConfigError("the queue must hold at least one request (--max-queue >= 1)")
        self.worker, self.model, self.topics = worker, model, topics
        self.max_queue = max_queue
        share = max_queue if max_device_queue is None else max_device_queue
        self.max_device_queue = max(1, min(share, max_queue))
        self.max_payload_bytes = max_payload_bytes
        self._queue: deque[Pending] = deque()
        self._per_device: Counter[str] = Counter()
        self.received = 0
        self.answered = 0  # answers with a label
        self.errors: Counter[str] = Counter()  # answers with an error, per code
        self.unroutable = 0  # messages on a topic that names no valid device: nobody to answer
        self.batches = 0
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._per_second: deque[list[float]] = deque()  # [whole second, answers in it], the last RATE_S

    # -- admission (paho's network thread) ------------------------------------------------------------
    def submit(self, topic: str, payload: bytes, *, now: float,
               model: ModelInfo | None = None) -> tuple[str, InferAnswer] | None:
        """Take one request message: ``None`` when queued, else the answer to publish at once."""
        try:
            parsed = self.topics.parse(topic)
        except ProtocolError:
            parsed = None
        if parsed is None or parsed.channel != "infer" or parsed.device is None:
            self.unroutable += 1
            return None
        self.received += 1
        device = parsed.device
        version = model.version if model is not None else None
        try:
            request = decode_infer(payload, expected_device=device, max_payload_bytes=self.max_payload_bytes)
        except ProtocolError as exc:
            seq = peek_seq(payload, max_payload_bytes=self.max_payload_bytes)
            return device, self._error(seq, "bad_request", str(exc), now, now, version)
        if request.deadline is not None and request.deadline <= now:
            return device, self._error(request.seq, "expired", _expired(request, now), now, now, version)
        if len(self._queue) >= self.max_queue:
            return device, self._error(request.seq, "overloaded",
                                       f"the queue holds {self.max_queue} requests; retry later or run more "
                                       "serve workers (--group)", now, now, version)
        if self._per_device[device] >= self.max_device_queue:
            return device, self._error(request.seq, "overloaded", f"device {device} already has "
                                       f"{self.max_device_queue} requests queued", now, now, version)
        self._queue.append(Pending(request, now))
        self._per_device[device] += 1
        return None

    # -- the inference thread -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._queue)

    def take(self, *, now: float, model: ModelInfo | None, max_batch: int = 32
             ) -> tuple[list[Pending], list[tuple[str, InferAnswer]]]:
        """Take queued requests until ``max_batch`` can run: ``(runnable, answers)``, where ``answers``
        refuse those that cannot run on ``model`` (none loaded, wrong pipeline or shape, deadline
        passed). Refusing costs nothing, so refused requests do not count towards ``max_batch``."""
        runnable: list[Pending] = []
        answers: list[tuple[str, InferAnswer]] = []
        while self._queue and len(runnable) < max_batch:
            item = self._queue.popleft()
            request = item.request
            self._per_device[request.device] -= 1
            if not self._per_device[request.device]:
                del self._per_device[request.device]
            problem = self._check(request, model, now)
            if problem is None:
                runnable.append(item)
            else:
                code, message = problem
                answers.append((request.device, self._error(request.seq, code, message, item.received, now,
                                                            model.version if model else None)))
        if runnable:
            self.batches += 1
        return runnable, answers

    def answer(self, item: Pending, scores: np.ndarray, *, now: float, model: ModelInfo
               ) -> tuple[str, InferAnswer]:
        """The answer to a request the model ran on, from its row of the model's output."""
        try:
            index, confidence = scores_to_answer(scores, model.temperature)
            label = model.labels[index] if model.labels else str(index)
        except (ValueError, IndexError) as exc:
            return self.fail(item, "inference_failed", f"v{model.version}: {exc}", now=now, model=model)
        latency = max(0.0, (now - item.received) * 1000.0)
        self.answered += 1
        self._count(now, 1)
        self._latencies.append(latency)
        return item.request.device, InferAnswer(
            seq=item.request.seq, label=label, index=index, confidence=confidence, version=model.version,
            model=self.model, latency_ms=round(latency, 3), worker=self.worker)

    def fail(self, item: Pending, code: str, message: str, *, now: float, model: ModelInfo | None
             ) -> tuple[str, InferAnswer]:
        return item.request.device, self._error(item.request.seq, code, message, item.received, now,
                                                model.version if model else None)

    # -- status ---------------------------------------------------------------------------------------
    def status(self, *, now: float) -> dict[str, Any]:
        """Counters for the retained status. ``answers_per_s`` counts every answer (errors too) over the
        last :data:`RATE_S` seconds; the latencies are those of answers with a label."""
        self._count(now, 0)
        answers = sum(n for _, n in self._per_second)
        lat = sorted(self._latencies)
        return {
            "received": self.received,
            "answered": self.answered,
            "errors": dict(sorted(self.errors.items())),
            "shed": self.errors.get("overloaded", 0),
            "expired": self.errors.get("expired", 0),
            "unroutable": self.unroutable,
            "queue": len(self._queue),
            "queue_max": self.max_queue,
            "batches": self.batches,
            "answers_per_s": round(answers / RATE_S, 3),
            "latency_ms": {
                "p50": _percentile(lat, 50),
                "p99": _percentile(lat, 99),
                "mean": round(sum(lat) / len(lat), 3) if lat else None,
                "n": len(lat),
            },
        }

    def _count(self, now: float, n: int) -> None:
        second = math.floor(now)
        while self._per_second and self._per_second[0][0] <= second - RATE_S:
            self._per_second.popleft()
        if n:
            if self._per_second and self._per_second[-1][0] == second:
                self._per_second[-1][1] += n
            else:
                self._per_second.append([second, n])

    # -- rules ----------------------------------------------------------------------------------------
    def _check(self, request: InferRequest, model: ModelInfo | None, now: float) -> tuple[str, str] | None:
        if request.deadline is not None and request.deadline <= now:
            return "expired", _expired(request, now)
        if model is None:
            return "no_model", (f"no verified version of model {self.model!r} yet; publish one with "
                                "`lepton train --publish` or `lepton models publish`")
        if request.pipeline != model.pipeline:
            return "wrong_pipeline", (f"the request's pipeline is {request.pipeline!r}, {self.model} "
                                      f"v{model.version} was trained on {model.pipeline!r}")
        shape = request.x.shape
        expected = model.sample_shape
        if len(shape) != len(expected) or any(e > 0 and s != e for s, e in zip(shape, expected, strict=True)):
            return "wrong_shape", (f"x has shape {list(shape)}, {self.model} v{model.version} takes "
                                   f"{list(expected)} (one sample, no batch dimension; -1 is any size)")
        if request.x.dtype.kind not in "biuf":
            return "wrong_shape", f"x has dtype {request.x.dtype.name}; the model takes numbers"
        return None

    def _error(self, seq: int | None, code: str, message: str, received: float, now: float,
               version: int | None) -> InferAnswer:
        assert code in ANSWER_ERRORS, code
        self.errors[code] += 1
        self._count(now, 1)
        return InferAnswer(seq=seq, error=code, message=message, version=version, model=self.model,
                           latency_ms=round(max(0.0, (now - received) * 1000.0), 3), worker=self.worker)


def _expired(request: InferRequest, now: float) -> str:
    late = now - (request.deadline or 0.0)
    return f"the deadline {request.deadline:.3f} passed {late:.3f}s before the worker reached it"


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)  # nearest rank
    return round(sorted_values[rank], 3)


# ------------------------------------------------------------------------------------------------
# the MQTT shell
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Settings of one serve worker. Only ``broker``, ``fleet`` and ``model`` are required.

    >>> ServeConfig(broker="mqtt://w1:pw@127.0.0.1:1883", fleet="demo", model="digits",
    ...             public_key=None, verify=False).max_queue
    256
    """

    broker: str
    fleet: str
    model: str
    name: str = "serve"
    #: shared-subscription group: several serve workers with the same group split the requests.
    group: str | None = None
    #: ``None`` probes the broker; ``False`` refuses ``group`` at once (e.g. known amqtt).
    shared_subscriptions: bool | None = None
    #: the Ed25519 public key (or its PEM path) that signs the fleet's models; required with ``verify``.
    public_key: Any = None
    verify: bool = True
    prefix: str = DEFAULT_PREFIX
    max_queue: int = 256
    #: requests of one device queued at most (default: the whole queue).
    max_device_queue: int | None = None
    max_batch: int = 32
    max_payload_bytes: int = DEFAULT_MAX_INFER_BYTES
    status_interval: float = 2.0
    #: ONNX Runtime threads per inference (intra-op).
    threads: int = 1
    #: The dataset root (the ingest worker's --data): answers are recorded there as teacher labels
    #: (DIR/FLEET/labels/, lepton/cloud/_labels.py). None records nothing.
    data: Path | None = None
    #: Teacher labels are written in batches of at most this many, or every ``labels_flush_s``.
    labels_flush_s: float = 2.0

    def __post_init__(self) -> None:
        validate_id(self.fleet, kind="fleet")
        validate_id(self.model, kind="model")
        validate_id(self.name, kind="worker")
        if self.group is not None:
            validate_id(self.group, kind="group")
        BrokerURL.parse(self.broker)
        Topics(fleet=self.fleet, prefix=self.prefix)
        if self.verify and self.public_key is None:
            raise ConfigError("serving verified models needs --public-key FILE (the key that signs the "
                              "fleet's models), or --no-verify for an unsigned development fleet")
        if self.max_queue < 1 or self.max_batch < 1 or self.threads < 1:
            raise ConfigError("--max-queue, --max-batch and --threads must be >= 1")
        if self.max_device_queue is not None and self.max_device_queue < 1:
            raise ConfigError("--max-device-queue must be >= 1")
        if self.status_interval <= 0:
            raise ConfigError("--status-interval must be > 0")


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


class _TeacherLabels:
    """Answers recorded as teacher labels, off the inference thread: its own thread writes them in
    batches (one atomic Parquet file per flush) so inference never waits for the disk."""

    def __init__(self, config: ServeConfig) -> None:
        from lepton.cloud._labels import LabelStore

        assert config.data is not None  # made only with --data
        self.store = LabelStore(Path(config.data), config.fleet)
        self.flush_s = config.labels_flush_s
        self.writer = config.name
        self._queue: queue.Queue[list | None] = queue.Queue(maxsize=1024)
        self._thread = threading.Thread(target=self._loop, name="serve-labels", daemon=True)
        self.written = self.dropped = self.files = 0
        self._thread.start()

    def put(self, replies: list) -> None:
        if replies:
            try:
                self._queue.put_nowait(replies)
            except queue.Full:  # the disk is behind: a teacher label is an optional extra, inference is not
                self.dropped += len(replies)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from lepton.cloud._labels import LabelRow

        pending: list = []
        last = time.monotonic()
        done = False
        while not done:
            try:
                item = self._queue.get(timeout=self.flush_s)
            except queue.Empty:
                item = []
            if item is None:
                done = True
            else:
                pending.extend(item)
            if pending and (done or time.monotonic() - last >= self.flush_s or len(pending) >= 4096):
                now = time.time()
                rows = [LabelRow(device, int(a.seq), str(a.label), "teacher", confidence=a.confidence,
                                 model_version=a.version, ts=now) for device, a in pending]
                try:
                    self.store.append(rows, writer=self.writer)
                    self.written += len(rows)
                    self.files += 1
                except (OSError, ValueError) as exc:
                    self.dropped += len(rows)
                    log.warning("serve: %d teacher labels not recorded: %s", len(rows), exc)
                pending, last = [], time.monotonic()


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
        self._teacher = _TeacherLabels(config) if config.data is not None else None

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

    @staticmethod
    def _telemetry_of(status: dict[str, Any]) -> dict[str, int | float]:
        """The telemetry report that goes with a status: its numbers, flat (docs/protocol.md, "Worker
        telemetry"). ``errors`` becomes a total and one ``errors_{code}`` per ANSWER_ERRORS code,
        ``latency_ms`` ``latency_ms_{p50,p99,mean}`` and ``latency_n``; names, texts and the model
        error stay in the status."""
        body = {k: v for k, v in status.items() if k not in _STATE_FIELDS}
        errors = status["errors"]
        body["errors"] = sum(errors.values())
        body.update({f"errors_{code}": errors.get(code, 0) for code in ANSWER_ERRORS})
        latency = status["latency_ms"]
        body.update({f"latency_ms_{k}": latency[k] for k in ("p50", "p99", "mean")}, latency_n=latency["n"])
        pending = status["model_pending"] or {}
        body.update({f"model_pending_{k}": pending.get(k) for k in ("version", "chunks", "of")})
        teacher = status["teacher_labels"] or {}
        body.update({f"teacher_labels_{k}": teacher.get(k) for k in ("written", "dropped", "files")})
        return telemetry_fields(body)

    def telemetry(self) -> dict[str, int | float]:
        """The current telemetry report (what the telemetry topic carries, without ``v``/``ts``)."""
        return self._telemetry_of(self.status())

    def _publish_status(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            status = self.status()
            client.publish(self.topics.worker_status(self.config.name), encode_json(status), qos=1,
                           retain=True)
            client.publish(self.topics.worker_telemetry(self.config.name),
                           encode_json(self._telemetry_of(status)), qos=0)
        except (ValueError, RuntimeError) as exc:
            log.debug("serve %s: status not published: %s", self.config.name, exc)


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
