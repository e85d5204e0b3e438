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
from collections.abc import Callable, Iterator
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

__all__ = ["BLOCK", "CaptureLoop", "Ticker"]

#: At most this many frames are read, preprocessed and spooled together, when the source has them at
#: once (not a camera or a generator: :attr:`Source.waits`) and capture is not paced slower than it runs.
BLOCK = 64


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
        most = 1 if self.source.waits else BLOCK
        frames = iter(self.source)
        while True:
            n = most if cfg.limit is None else min(most, cfg.limit - c.captured)
            if period and n > 1:  # paced: read as many frames as are due now (behind: catching up)
                behind = time.monotonic() - next_at
                n = min(n, 1 + int(behind / period)) if behind > 0 else 1
            items, stamps, end = self._read(frames, n)
            if items:
                if self._stop.is_set():
                    return None
                if period:
                    delay = next_at - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return None
                    next_at = max(next_at + len(items) * period, time.monotonic() - 1.0)  # catch up <= 1 s
                if not self._capture_block(items, stamps):
                    return None  # block policy interrupted by stop()
                tick()
                if cfg.limit is not None and c.captured >= cfg.limit:
                    return "limit"
            if end is not None:
                return None if end == "source ended" and self._stop.is_set() else end

    def _read(self, frames: Iterator[tuple[Any, Any]], n: int) -> tuple[list[tuple[Any, Any]], list[float], str | None]:
        """Up to ``n`` frames with their capture times, and why the source ended (None: it did not)."""
        items: list[tuple[Any, Any]] = []
        stamps: list[float] = []
        try:
            for _ in range(n):
                items.append(next(frames))
                stamps.append(time.time())
        except StopIteration:
            return items, stamps, "source ended"
        except Exception as exc:  # noqa: BLE001 - a failing (custom) source ends capture, not the agent
            log.exception("device %s: source %s failed; stopping capture", self.device_id, self.source.describe())
            return items, stamps, f"source error: {type(exc).__name__}: {exc}"[:200]
        return items, stamps, None

    def _capture_block(self, items: list[tuple[Any, Any]], stamps: list[float]) -> bool:
        """Preprocess, infer, decide and spool a block of frames; False when the spool refused (stop).

        Per sample as if one at a time: its seq, capture time, prediction, escalation and upload
        decision, frame error; per block: one pipeline call, one spool hand-off, one counters update.
        """
        c, collab, runtime, spool = self.counters, self.collab, self.runtime, self.spool
        escalating = collab.enabled
        keep_all = collab.upload.mode == "all"
        settling = escalating or runtime is not None  # anything to do per sample after spooling
        encode = spool.encode_body
        t0 = time.perf_counter()
        xs = self.pipeline.run_block([frame for frame, _ in items])
        spent = time.perf_counter() - t0
        base = seq = spool.next_seq  # capture is the only thread that takes seqs: these are ours
        bodies: list[bytes | None] = []
        times: list[float] = []
        later: list[tuple[int, np.ndarray, Any, str | None, bool]] = []
        errors, ok = c.frame_errors, 0
        for x, (_, label), ts in zip(xs, items, stamps, strict=True):
            if isinstance(x, FrameError):
                errors += 1
                if errors <= 5 or errors % 1000 == 0:
                    log.warning("device %s: frame skipped (%d so far): %s", self.device_id, errors, x)
                continue
            ok += 1
            prediction = runtime.predict(x) if runtime is not None else None
            if prediction is not None and label is not None:
                runtime.record_truth(prediction, str(label))
            if isinstance(label, np.generic):  # labels from numpy arrays (custom sources) go as plain values
                label = label.item()
            escalated = collab.decide(prediction) if escalating else False
            body: bytes | None = None
            if keep_all or collab.keep(seq, escalated=escalated):
                try:
                    body = encode(x, label)
                except ProtocolError as exc:  # e.g. a label that is neither int nor str: skip, never crash
                    errors += 1
                    log.warning("device %s: sample skipped: %s", self.device_id, exc)
                    continue
            # else not uploaded (--upload): the seq is used up all the same, a gap in the dataset
            bodies.append(body)
            times.append(ts)
            if settling:
                later.append((seq, x, prediction, None if label is None else str(label), escalated))
            seq += 1
        if errors != c.frame_errors:  # capture is its only writer: reading it needs no lock
            with self._lock:
                c.frame_errors = errors
        share = spent / ok if ok else 0.0  # preprocessing time per sample
        done, full = 0, False
        while not full and done < len(bodies):
            try:
                # Group commit: durable within the spool's commit_ms, and never published before. With
                # the block policy, what went in is counted before capture waits for room for the rest.
                spool.append_block(bodies[done:], ts=times[done:], pipeline=self.pipeline.hash, partial=True)
            except SpoolFull:
                full = True  # block policy interrupted by stop()
            queued = spool.next_seq - base
            self._count(t0, bodies[done:queued], share)
            for seq, x, prediction, truth, escalated in later[done:queued]:
                if escalated and self._connected.is_set():
                    self._escalate(seq, x, prediction, truth)
                elif escalated:  # offline: the device's own answer stands at once, nothing waits
                    self._settle(collab.local(seq, prediction, truth), prediction)
                elif prediction is not None:
                    self._settle(collab.local(seq, prediction, truth), prediction, escalated=False)
            done = queued
        if self.answers or collab.waiting:  # nothing to match or expire otherwise
            self.collect_answers()
        return not full

    def _count(self, t0: float, bodies: list[bytes | None], share: float) -> None:
        """Count captured samples (``None`` bodies: seqs the upload policy left out)."""
        if not bodies:
            return
        c, n = self.counters, len(bodies)
        uploaded = n - bodies.count(None)
        with self._lock:
            if self.first_at is None:
                self.first_at = t0  # perf_counter, like the publisher's last_ack_at
            c.captured += n
            c.uploaded += uploaded
            c.preprocess_s += share * n
            c.preprocess_n += n
            c.window_s += share * n
            c.window_n += n

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
