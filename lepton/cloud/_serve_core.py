"""The serve worker's decisions without I/O: requests in, answers out (``lepton serve``'s core).

:class:`ServeCore` (clock passed in) decides what happens to each request: decode it, shed it when the
bounded queue (or the device's share of it) is full, refuse it when no model is loaded, its pipeline or
shape does not fit, or its deadline passed, and turn model scores into answers. Every request gets
exactly one answer, an error code being an answer too; nothing is silently dropped. It also keeps the
counters and latencies of the retained status, and :func:`serve_telemetry` flattens that status into
the telemetry report. :class:`ModelInfo` is what it knows of the model being served (the ONNX Runtime
session stays in the shell, lepton/cloud/_serve.py).

Threads: the core is not thread-safe by itself. All of its state (the queue, the per-device shares,
the counters and latencies) is owned by whoever holds ``ServeWorker._lock``: paho's network thread
calls ``submit``, the inference thread ``take``, ``answer`` and ``fail``, any thread ``status``, each
only under that lock. :class:`ModelInfo` and :class:`Pending` are immutable.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from lepton.errors import ConfigError, ProtocolError
from lepton.protocol import (
    ANSWER_ERRORS,
    DEFAULT_MAX_INFER_BYTES,
    InferAnswer,
    InferRequest,
    Topics,
    decode_infer,
    peek_seq,
    telemetry_fields,
)

__all__ = ["LATENCY_WINDOW", "RATE_S", "ModelInfo", "Pending", "ServeCore", "scores_to_answer",
           "serve_telemetry"]

#: fields of the serve status that are state, not numbers to chart: the telemetry leaves them out or,
#: for the objects, carries them flat (see :func:`serve_telemetry`)
_STATE_FIELDS = frozenset({"worker", "fleet", "role", "online", "group", "model", "model_sha256",
                           "model_error", "model_pending", "errors", "latency_ms", "teacher_labels"})
#: How many answer latencies the p50/p99 of the status are computed over.
LATENCY_WINDOW = 2048
#: The answer rate of the status is measured over this many seconds.
RATE_S = 10


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


def serve_telemetry(status: dict[str, Any]) -> dict[str, int | float]:
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
