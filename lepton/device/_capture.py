"""The capture loop: read the source at ``rate_hz``, run the pipeline (and the model, when one is
configured), append each sample to the spool, and carry out the collaboration's decisions.

It runs on the **capture** thread (the thread that calls :meth:`DeviceAgent.run`) and never waits for
the network, so a broker outage only makes the spool grow: escalation requests and predictions are QoS 0
publishes that paho queues, and they are skipped while offline.

**Who owns what.** A :class:`CaptureLoop` is the capture thread's:

* the :class:`~lepton.device._collaboration.Collaboration` (policies, pending answers): capture only.
* ``answers``: filled by the network thread (decoded cloud answers, stamped with their arrival), drained
  by capture; a deque, whose append and popleft are atomic.
* ``answer_ms`` (answer latencies), ``pending_stats`` (a snapshot of the pending answers' counters) and
  ``first_at`` (the ``time.perf_counter`` reading of the first capture): written by capture under the
  agent's ``_lock``, read by whoever reports (telemetry on the publisher, the summary on the main thread).
* the agent's counters it writes (``captured``, ``frame_errors``, preprocessing times, collaboration
  counts): under the agent's ``_lock`` (see lepton/device/_config.py).
* everything else (config, pipeline, source, spool, runtime, topics, the events and ``publish``): set by
  the agent before capture starts, read-only after.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lepton.device._collaboration import Collaboration
from lepton.device._config import Counters, DeviceConfig
from lepton.device._escalation import Answer, Outcome
from lepton.device._pipeline import FrameError, Pipeline
from lepton.device._sources import Source
from lepton.device._spool import Spool, SpoolFull
from lepton.errors import ProtocolError
from lepton.protocol import Topics, encode_json

log = logging.getLogger(__name__)

__all__ = ["CaptureLoop", "Ticker"]


class CaptureLoop:
    """Capture until the source ends, ``limit`` is reached or ``stop`` is set; see :meth:`run`."""

    def __init__(
        self,
        *,
        config: DeviceConfig,
        topics: Topics,
        pipeline: Pipeline,
        source: Source,
        spool: Spool,
        runtime: Any,
        collab: Collaboration,
        counters: Counters,
        lock: threading.Lock,
        stop: threading.Event,
        connected: threading.Event,
        publish: Callable[[str, bytes], None],
    ) -> None:
        self.config, self.topics, self.device_id = config, topics, config.device_id
        self.pipeline, self.source, self.spool, self.runtime = pipeline, source, spool, runtime
        self.collab, self.counters, self._lock = collab, counters, lock
        self._stop, self._connected, self._publish = stop, connected, publish
        self.pred_topic = topics.predictions(self.device_id) if config.predictions else None
        self.infer_topic = topics.infer(self.device_id)
        self.answers: collections.deque[tuple[float, Answer]] = collections.deque(maxlen=65_536)
        self.answer_ms: collections.deque[float] = collections.deque(maxlen=2048)
        self.pending_stats: dict[str, int] = {}
        self.first_at: float | None = None

    def run(self, tick: Callable[[], None]) -> str | None:
        """Capture, then wait (within their deadline) for the answers to the last escalated samples.

        Returns why capture ended ("limit", "source ended", "source error: ..."), None when stopped.
        """
        reason = self._loop(tick)
        until = time.monotonic() + self.config.answer_timeout_ms / 1000.0
        while self.collab.waiting and time.monotonic() < until and not self._stop.is_set():
            self.collect_answers()
            time.sleep(0.005)
        self.collect_answers(final=True)
        return reason

    def _loop(self, tick: Callable[[], None]) -> str | None:
        cfg, c = self.config, self.counters
        period = 1.0 / cfg.rate_hz if cfg.rate_hz else 0.0
        next_at = time.monotonic()
        runtime = self.runtime
        collab = self.collab
        escalating = collab.enabled
        answers = self.answers
        pipeline_hash = self.pipeline.hash
        frames = iter(self.source)
        while True:
            try:
                frame, label = next(frames)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - a failing (custom) source ends capture, not the agent
                log.exception(
                    "device %s: source %s failed; stopping capture", self.device_id, self.source.describe()
                )
                return f"source error: {type(exc).__name__}: {exc}"[:200]
            if self._stop.is_set():
                return None
            if period:
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return None
                next_at = max(next_at + period, time.monotonic() - 1.0)  # catch up at most 1 s
            t0 = time.perf_counter()
            try:
                x = self.pipeline(frame)
            except FrameError as exc:
                with self._lock:
                    c.frame_errors += 1
                    errors = c.frame_errors
                if errors <= 5 or errors % 1000 == 0:
                    log.warning("device %s: frame skipped (%d so far): %s", self.device_id, errors, exc)
                continue
            spent = time.perf_counter() - t0
            prediction = runtime.predict(x) if runtime is not None else None
            if prediction is not None and label is not None:
                runtime.record_truth(prediction, str(label))
            if isinstance(label, np.generic):  # labels from numpy arrays (custom sources) go as plain values
                label = label.item()
            escalated = collab.decide(prediction) if escalating else False
            truth = None if label is None else str(label)
            try:
                if collab.keep(self.spool.next_seq, escalated=escalated):
                    # Group commit: durable within the spool's commit_ms, and never published before.
                    seq = self.spool.append_nowait(x, label, pipeline=pipeline_hash)
                    uploaded = 1
                else:  # not uploaded (--upload): the seq is used up all the same, a gap in the dataset
                    seq, uploaded = self.spool.skip_seq(), 0
            except SpoolFull:
                return None  # block policy interrupted by stop()
            except ProtocolError as exc:  # e.g. a label that is neither int nor str: skip, never crash
                with self._lock:
                    c.frame_errors += 1
                log.warning("device %s: sample skipped: %s", self.device_id, exc)
                continue
            with self._lock:
                if self.first_at is None:
                    self.first_at = t0  # perf_counter, like the publisher's last_ack_at
                c.captured += 1
                c.uploaded += uploaded
                c.preprocess_s += spent
                c.preprocess_n += 1
                c.window_s += spent
                c.window_n += 1
            if escalated and self._connected.is_set():
                self._escalate(seq, x, prediction, truth)
            elif escalated:  # offline: the device's own answer stands at once, nothing waits
                self._settle(collab.local(seq, prediction, truth), prediction)
            elif prediction is not None:
                self._settle(collab.local(seq, prediction, truth), prediction, escalated=False)
            if answers or collab.waiting:  # nothing to match or expire otherwise
                self.collect_answers()
            tick()
            if cfg.limit is not None and c.captured >= cfg.limit:
                return "limit"
        return None if self._stop.is_set() else "source ended"

    # -- collaboration: carry out the decisions of self.collab ------------------------------------------
    def _escalate(self, seq: int, x: np.ndarray, prediction: Any, truth: str | None) -> None:
        payload, pushed = self.collab.escalate(
            seq, x, prediction, truth, pipeline=self.pipeline.hash, now=time.monotonic(), wall=time.time()
        )
        for outcome in pushed:
            self._settle(outcome, outcome.payload[1])
        self._publish(self.infer_topic, payload)
        with self._lock:
            self.counters.escalated += 1
            self.counters.infer_bytes += len(payload)

    def collect_answers(self, *, final: bool = False) -> None:
        """Match the answers that arrived, settle what is due; never waits."""
        answers, collab = self.answers, self.collab
        while answers:
            arrived, answer = answers.popleft()
            outcome = collab.answered(answer, arrived=arrived)
            if outcome is not None:
                if outcome.latency_ms is not None:
                    with self._lock:
                        self.answer_ms.append(outcome.latency_ms)
                self._settle(outcome, outcome.payload[1])
        for outcome in collab.expire(float("inf") if final else time.monotonic()):
            self._settle(outcome, outcome.payload[1])
        if collab.enabled:
            with self._lock:
                self.pending_stats = collab.pending.stats()

    def _settle(self, outcome: Outcome, prediction: Any, *, escalated: bool = True) -> None:
        """Count the answer the device settled on, and publish it as its prediction."""
        with self._lock:
            self.collab.tally(self.counters, outcome)
        if self.pred_topic is None or not self._connected.is_set():
            return
        self._publish(self.pred_topic, encode_json(self.collab.prediction_body(outcome, prediction,
                                                                                escalated=escalated)))

    def snapshot(self) -> tuple[list[float], dict[str, int]]:
        """The answer latencies and the pending answers' counters (the caller holds the agent's lock)."""
        return list(self.answer_ms), dict(self.pending_stats)


class Ticker:
    """Calls ``on_progress`` at most every 0.25 s from the capture thread."""

    def __init__(self, callback: Callable[[Any], None] | None) -> None:
        self.callback, self.last = callback, 0.0

    def tick(self, agent: Any, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self.last >= 0.25:
            self.last = now
            try:
                self.callback(agent)
            except Exception:  # noqa: BLE001
                log.exception("progress callback failed")
