"""The device agent: capture -> preprocess -> spool -> publish in batches -> delete on end-to-end ack.

Three threads, each with one job:

* **capture** (the thread that calls :meth:`DeviceAgent.run`): reads the source at ``rate_hz``, runs the
  pipeline (and the model, when one is configured), appends each sample to the spool. It never touches
  the network, so a broker outage only makes the spool grow.
* **publisher**: the shell around :class:`~lepton.device._window.PublishWindow`, the I/O-free go-back-N
  window that decides what to send: it reads the spool in seq order after a cursor (up to
  ``READ_AHEAD_SAMPLES`` per query, whole batches), packs ``batch_size`` samples or what arrived within
  ``batch_ms`` into each envelope of at most ``max_message_bytes``
  (:func:`lepton.protocol.encode_samples_packed`, with the pipeline hash, splicing the spooled sample
  bodies without re-encoding them), and this thread publishes them with QoS 1. A
  sample leaves the spool only when a range on ``devices/{id}/acks`` covers it: a broker PUBACK proves
  nothing (Mosquitto drops silently when a queue is full, amqtt does not queue anonymous sessions). After a
  reconnect, or when no ack made progress for ``ack_timeout`` seconds, the cursor goes back to the start
  (go-back-N) and everything unacknowledged is sent again; the cloud stores by ``(device, seq)`` exactly
  once, so a duplicate costs bandwidth only. The number of unacknowledged samples in flight is capped by
  ``window``. It also publishes the status (on connect, when the model changes, every telemetry
  interval) and the telemetry.
* **network**: runs paho's loop and its callbacks and reconnects with exponential backoff and jitter, so
  a fleet that lost its broker does not reconnect in lock-step when it comes back. Its callbacks do no SQL
  and no disk I/O: acks are queued for the publisher, a connect only raises a flag the publisher acts on.
  The publisher deletes what queued acks cover in one transaction: at once when it has nothing to send,
  else when the oldest has waited ``ACK_DELAY_S`` (or ``ACK_BATCH`` ranges queued).

The session is persistent (``clean_session=False``, client id = device id) so acks sent while the
device was away are queued by the broker. On connect the device re-subscribes and publishes its
retained status (``online: true``); a Last Will (retained) says ``online: false`` if it vanishes.

**Who owns what.** Every mutable field of a :class:`DeviceAgent` has one owning thread, or a lock:

* ``counters`` (:class:`_Counters`): each counter has one writing thread, and every write, like the
  telemetry's read-and-reset of ``window_s``/``window_n``, holds ``_lock``. Capture writes ``captured``,
  ``frame_errors`` and the preprocessing times; the publisher ``published``, ``resent``, ``acked`` and
  ``ack_timeouts`` (after the publisher stopped, the main thread applies the last acks); the network
  thread ``reconnects``.
* the :class:`PublishWindow` and ``_warned_oversize``: the publisher (the window is local to its loop).
* ``_ack_inbox`` and ``_ack_since`` (when its oldest range arrived): filled by the network thread,
  drained by the publisher, under ``_ack_lock``.
* ``_first_capture_at`` (capture) and ``_last_ack_at`` (whoever applies acks), ``time.perf_counter``
  readings: under ``_lock``.
* ``_ever_connected``, ``_backoff``: the network thread (paho's callbacks and :meth:`_network_loop`).
* ``_stopped_by``: the capture thread, and the first :meth:`stop` (from any thread or a signal handler).
* events: ``_connected`` is set and cleared by the network thread (cleared by the main thread at close);
  ``_just_connected`` is set by the network thread and consumed by the publisher; ``_status_due`` is set
  by anyone who wants a status published (the model runtime's thread) and consumed by the publisher;
  ``_stop``, ``_pub_stop``, ``_net_stop`` are set by the main thread (``_stop`` by :meth:`stop`).
* everything else (config, topics, pipeline, source, spool, runtime, ``_client``, ``_threads``): set by
  the main thread before the other threads start, read-only after. The spool and the runtime guard
  their own state (see their modules).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from lepton.device._escalation import Answer, EscalationPolicy, Outcome, PendingAnswers, parse_upload_policy
from lepton.device._pipeline import FrameError, Pipeline
from lepton.device._sources import Source, open_source
from lepton.device._spool import ON_FULL_POLICIES, Spool, SpoolFull
from lepton.device._window import GoBack, PublishWindow, Read, Send, merge_ranges
from lepton.errors import BrokerConnectionError, ConfigError, ProtocolError
from lepton.protocol import (
    DEFAULT_PREFIX,
    BrokerURL,
    InferRequest,
    Topics,
    connect,
    decode_acks,
    decode_answer,
    encode_infer,
    encode_json,
    new_client,
    telemetry_fields,
    validate_id,
)

log = logging.getLogger(__name__)

__all__ = ["DeviceAgent", "DeviceConfig", "RunSummary", "default_spool_dir"]

#: One spool read feeds up to this many samples (whole batches, within the window's byte budget) into
#: one Send of several envelopes: at batch 1 one query serves 256 messages instead of one.
READ_AHEAD_SAMPLES = 256
#: While the publisher has samples to send, acks wait in the inbox this long (or until ACK_BATCH ranges
#: queued) and are then deleted in one transaction; when it has nothing to send it applies them at once.
ACK_DELAY_S = 0.002
ACK_BATCH = 512


def default_spool_dir(fleet: str, device_id: str) -> Path:
    """``$LEPTON_HOME/spool/{fleet}/{device}``, with LEPTON_HOME defaulting to ``~/.lepton``."""
    home = Path(os.environ.get("LEPTON_HOME") or Path.home() / ".lepton")
    return home / "spool" / fleet / device_id


@dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    """Everything a device agent needs; every field but the first three has a default that works.

    ``source`` is a spec string (``camera:0``, ``video:PATH``, ``folder:PATH``, ``digits``), a Source or
    any iterable of ``(frame, label)``. ``pipeline`` is a preset name, a ``.json``/``.toml`` path, a spec
    dict or a Pipeline. ``limit`` stops capture after that many samples, then the agent waits until all
    are acknowledged (at most ``drain_timeout`` seconds when set).
    """

    broker: str | BrokerURL
    fleet: str
    device_id: str
    source: Any = "digits"
    pipeline: Any = "digits"
    rate_hz: float | None = None
    limit: int | None = None
    once: bool = False
    batch_size: int = 32
    batch_ms: float = 50.0
    #: Upper bound of one samples message. Mosquitto 2.1 refuses packets over 2,000,000 bytes by default
    #: and AWS IoT Core over 128 KB: a batch that would exceed this is split into several envelopes.
    max_message_bytes: int = 1_000_000
    spool_dir: str | Path | None = None
    spool_max_bytes: int = 256 * 1024 * 1024
    on_full: str = "drop-oldest"
    #: power-loss safe spool (one fsync per group commit); False survives crashes, not power cuts.
    fsync: bool = True
    ack_timeout: float = 10.0
    window: int = 4096
    telemetry_interval: float = 5.0
    drain_timeout: float | None = None
    shutdown_grace: float = 3.0
    require_broker: bool = True
    model: str | None = None
    public_key: Any = None
    verify: bool = True
    predictions: bool = False
    prefix: str = DEFAULT_PREFIX
    ca_certs: str | None = None
    keepalive: int = 30
    #: Escalation (lepton/device/_escalation.py): ask the cloud (``lepton serve``) about predictions
    #: whose calibrated confidence is below ``escalate_below``, or the least confident ``escalate_rate``
    #: of them; ``cloud_only`` asks about every sample (a device without a local model).
    escalate_below: float | None = None
    escalate_rate: float | None = None
    cloud_only: bool = False
    #: How long an escalated sample waits for the cloud's answer before the device's own one stands.
    answer_timeout_ms: float = 250.0
    #: Which samples enter the spool (and so the dataset): all, escalated, sample:P, escalated+sample:P.
    upload: str = "all"

    def check(self) -> None:
        """Raise ConfigError naming the first bad setting."""
        for name, value in (("fleet", self.fleet), ("device", self.device_id)):
            try:
                validate_id(value, kind=name)
            except ProtocolError as exc:
                raise ConfigError(str(exc.detail)) from None
        if self.model is not None:
            try:
                validate_id(self.model, kind="model")
            except ProtocolError as exc:
                raise ConfigError(str(exc.detail)) from None
        if self.rate_hz is not None and not self.rate_hz > 0:
            raise ConfigError(f"rate must be > 0 Hz, got {self.rate_hz}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if not 1 <= self.batch_size <= 65_536:
            raise ConfigError(f"batch size must be in [1, 65536], got {self.batch_size}")
        if self.batch_ms < 0:
            raise ConfigError(f"batch-ms must be >= 0, got {self.batch_ms}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max message size must be >= 1 KiB, got {self.max_message_bytes} bytes")
        if self.on_full not in ON_FULL_POLICIES:
            raise ConfigError(f"on-full must be one of {', '.join(ON_FULL_POLICIES)}, got {self.on_full!r}")
        if self.window < self.batch_size:
            raise ConfigError(f"window ({self.window}) must be >= batch size ({self.batch_size})")
        if self.ack_timeout <= 0 or self.telemetry_interval <= 0:
            raise ConfigError("ack_timeout and telemetry_interval must be > 0 seconds")
        if self.cloud_only and self.model is not None:
            raise ConfigError("--cloud-only serves a device without a local model: drop --model, or "
                              "use --escalate-rate R to ask the cloud about the hard samples only")
        policy = EscalationPolicy(below=self.escalate_below, rate=self.escalate_rate, cloud_only=self.cloud_only)
        if policy.enabled and not (self.cloud_only or self.model is not None):
            raise ConfigError("--escalate-below/--escalate-rate need a local model (--model NAME) whose "
                              "confidence decides; without one use --cloud-only")
        if not 1 <= self.answer_timeout_ms <= 60_000:
            raise ConfigError(f"--answer-timeout-ms must be in [1, 60000], got {self.answer_timeout_ms}")
        upload = parse_upload_policy(self.upload)
        if upload.needs_escalation and not policy.enabled:
            raise ConfigError(f"--upload {self.upload}: uploading escalated samples needs escalation "
                              "(--escalate-below C, --escalate-rate R or --cloud-only)")
        if self.model is not None and self.verify and self.public_key is None:
            raise ConfigError(
                "--model needs --public-key FILE to verify model signatures "
                "(or --no-verify to accept unsigned models)"
            )


@dataclass
class _Counters:
    """What telemetry and the run summary report; written under the agent's ``_lock`` (module docstring)."""

    captured: int = 0
    published: int = 0
    resent: int = 0
    acked: int = 0
    frame_errors: int = 0
    reconnects: int = 0
    ack_timeouts: int = 0
    preprocess_s: float = 0.0
    preprocess_n: int = 0
    window_s: float = 0.0  # preprocessing time and count since the last telemetry report
    window_n: int = 0
    # collaboration (capture thread): the bytes a device sends per sample captured
    uploaded: int = 0  # samples that entered the spool (the upload policy kept them)
    infer_bytes: int = 0
    sample_bytes: int = 0  # publisher: bytes of samples envelopes published (resends included)
    escalated: int = 0
    answered_by_cloud: int = 0
    answered_by_edge: int = 0
    answered_by_none: int = 0
    # with ground truth (labelled sources): accuracy of the edge alone and of the answer used
    truth_n: int = 0
    edge_correct: int = 0
    joint_correct: int = 0


@dataclass(frozen=True)
class RunSummary:
    """What a run did; ``ok`` is True when everything captured was acknowledged: the spool is empty and
    the drop-oldest policy dropped nothing during this run (``dropped`` counts over the spool's life)."""

    device: str
    fleet: str
    captured: int
    published: int
    resent: int
    acked: int
    spool_depth: int
    dropped: int
    skipped: int
    frame_errors: int
    next_seq: int
    pipeline: str
    duration_s: float
    preprocess_ms: float | None
    stopped_by: str
    dropped_this_run: int = 0
    reconnects: int = 0
    #: seconds from the first sample captured to the last acknowledgement applied (None: none acked);
    #: ``duration_s`` also counts connecting, the start-up and the shutdown
    capture_to_ack_s: float | None = None
    #: spool transactions of samples this run (each one WAL fsync unless ``fsync=False``)
    spool_commits: int = 0
    model_version: int | None = None
    skipped_items: list[str] = field(default_factory=list)
    #: escalation, answers, upload and bytes (the telemetry's collaboration fields)
    collaboration: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.spool_depth == 0 and self.dropped_this_run == 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["ok"] = self.ok
        return out


class _Backoff:
    """Exponential backoff with "equal jitter": half the delay fixed, half random."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0


class DeviceAgent:
    """An edge device: ``DeviceAgent(DeviceConfig(...)).run()`` or keyword arguments directly.

    Building the agent checks everything (ids, URL, source, pipeline, spool, model key) and raises
    ConfigError before any connection; :meth:`run` connects (BrokerConnectionError on a refused password,
    or an unreachable broker when ``require_broker``), captures until the source ends, ``limit`` is
    reached or :meth:`stop` is called, waits for acks, and returns a :class:`RunSummary`.

        agent = DeviceAgent(broker="mqtt://cam-1:pw@localhost:1883", fleet="demo", device_id="cam-1",
                            source="digits", pipeline="digits", limit=100)
        summary = agent.run()
    """

    def __init__(self, config: DeviceConfig | None = None, /, **kwargs: Any) -> None:
        config = replace(config, **kwargs) if config is not None else DeviceConfig(**kwargs)
        config.check()
        self.config = config
        self.url = config.broker if isinstance(config.broker, BrokerURL) else BrokerURL.parse(config.broker)
        self.device_id = config.device_id
        try:
            self.topics = Topics(fleet=config.fleet, prefix=config.prefix)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        self.pipeline = Pipeline.resolve(config.pipeline)
        self.source: Source = open_source(config.source, once=config.once)
        spool_dir = (
            Path(config.spool_dir) if config.spool_dir else default_spool_dir(config.fleet, config.device_id)
        )
        try:
            self.spool = Spool(
                spool_dir, max_bytes=config.spool_max_bytes, on_full=config.on_full, fsync=config.fsync
            )
        except BaseException:
            self.source.close()  # a camera must not stay open behind a start-up error
            raise
        self._dropped_at_start = self.spool.dropped
        self.counters = _Counters()
        self._lock = threading.Lock()
        self._ack_lock = threading.Lock()
        self._ack_inbox: list[tuple[int, int]] = []
        self._ack_since = 0.0
        self._first_capture_at: float | None = None
        self._last_ack_at: float | None = None
        self._stop = threading.Event()
        self._stopped_by = "running"
        self._warned_oversize = False
        self._connected = threading.Event()
        self._just_connected = threading.Event()  # the publisher publishes the status and goes back
        self._status_due = threading.Event()
        self._net_stop = threading.Event()
        self._pub_stop = threading.Event()
        self._backoff = _Backoff()
        self._ever_connected = False
        self._started = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._client: mqtt.Client | None = None
        self.runtime: Any = None
        # Collaboration: the capture thread owns the policy, the pending answers and the upload rule;
        # the network thread only appends decoded answers to _answers (a deque: append/popleft are atomic).
        self._escalation = EscalationPolicy(
            below=config.escalate_below, rate=config.escalate_rate, cloud_only=config.cloud_only
        )
        self._upload = parse_upload_policy(config.upload)
        self._pending = PendingAnswers()
        self._answers: collections.deque[tuple[float, Answer]] = collections.deque(maxlen=65_536)
        self._answer_ms: collections.deque[float] = collections.deque(maxlen=2048)  # capture, under _lock
        self._pending_stats: dict[str, int] = {}  # a snapshot of _pending's counters, under _lock
        try:
            if config.model is not None:
                self.runtime = self._make_runtime(spool_dir / "models")
        except BaseException:
            self.spool.close()
            self.source.close()
            raise

    # -- model runtime (issue 6), imported only when a model is configured ----------------------------
    def _make_runtime(self, store_dir: Path) -> Any:
        try:
            from lepton.device._runtime import ModelRuntime
        except ModuleNotFoundError as exc:
            if exc.name != "lepton.device._runtime":
                raise
            raise ConfigError(
                "--model needs the model runtime (lepton.device._runtime), which this build "
                "lacks; run without --model"
            ) from None
        key = self.config.public_key
        if not self.config.verify:
            key = None
        elif isinstance(key, (str, Path)):
            from lepton.protocol import load_public_key

            key = load_public_key(key)
        last = self.pipeline.ops[-1] if self.pipeline.ops else None
        shape = tuple(last["shape"]) if last and last["op"] == "reshape" and -1 not in last["shape"] else None
        assert self.config.model is not None  # called only with --model
        return ModelRuntime(
            topics=self.topics,
            model=self.config.model,
            store_dir=store_dir,
            public_key=key,
            pipeline_hash=self.pipeline.hash,
            input_shape=shape,
            on_change=self._on_model_change,
            on_resubscribe=self._resubscribe_models,
        )

    def _on_model_change(self, _status: dict) -> None:
        # The runtime's thread: the publisher publishes it (one thread publishes status while running).
        self._status_due.set()
        self.spool.wake()

    def _resubscribe_models(self) -> None:
        """The runtime lost chunks (unverifiable orphans it dropped): the broker resends what is retained."""
        client = self._client
        if client is None or not self._connected.is_set() or self.runtime is None:
            return
        for topic_filter, qos in self.runtime.subscriptions():
            client.subscribe(topic_filter, qos)

    # -- reports ------------------------------------------------------------------------------------
    def status(self, *, online: bool = True) -> dict[str, Any]:
        """The retained status body (see docs/protocol.md, "Status")."""
        body: dict[str, Any] = {
            "device": self.device_id,
            "online": online,
            "pipeline": self.pipeline.hash,
            "pipeline_name": self.pipeline.name,
            "source": self.source.describe(),
            "spool_depth": self.spool.depth,
            "dropped": self.spool.dropped,
            "skipped": self.source.skipped,
            "next_seq": self.spool.next_seq,
            "model": self.config.model,
            "model_version": None,
            "escalation": self._escalation.mode,
            "upload": self._upload.spec,
        }
        if self.runtime is not None:
            try:
                body.update(self.runtime.status())
            except Exception:  # noqa: BLE001 - a report must never take the device down
                log.exception("device %s: model runtime status failed", self.device_id)
        return body

    def telemetry(self) -> dict[str, Any]:
        """The periodic telemetry body (see docs/protocol.md, "Telemetry"), exactly as published: flat
        ``name -> number`` (bools as 0/1, values not known yet left out). The topic names the device;
        strings and objects belong in :meth:`status`."""
        with self._lock:
            c = replace(self.counters)  # a consistent snapshot
            self.counters.window_s, self.counters.window_n = 0.0, 0
        window_ms = round(1000 * c.window_s / c.window_n, 4) if c.window_n else None
        body: dict[str, Any] = {
            "captured": c.captured,
            "published": c.published,
            "resent": c.resent,
            "acked": c.acked,
            "spool_depth": self.spool.depth,
            "spool_bytes": self.spool.bytes,
            "dropped": self.spool.dropped,
            "skipped": self.source.skipped,
            "frame_errors": c.frame_errors,
            "preprocess_ms": window_ms,
            "preprocess_ms_mean": round(1000 * c.preprocess_s / c.preprocess_n, 4)
            if c.preprocess_n
            else None,
            "reconnects": c.reconnects,
            "ack_timeouts": c.ack_timeouts,
            "connected": self._connected.is_set(),
            "uptime_s": round(time.monotonic() - self._started, 1),
            **self._collaboration(c),
        }
        if self.runtime is not None:
            try:
                body.update(self.runtime.telemetry())
            except Exception:  # noqa: BLE001
                log.exception("device %s: model runtime telemetry failed", self.device_id)
        return telemetry_fields(body)

    def _collaboration(self, c: _Counters) -> dict[str, Any]:
        """Flat numbers (Grafana's MQTT data source plots them as they are): escalation, answers, bytes."""
        with self._lock:
            lat = sorted(self._answer_ms)
            pending = dict(self._pending_stats)
        n = c.captured

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q / 100 * len(lat)))], 3) if lat else None

        return {
            "escalated": c.escalated,
            "escalated_fraction": round(c.escalated / n, 4) if n else 0.0,
            "answered_by_cloud": c.answered_by_cloud,
            "answered_by_edge": c.answered_by_edge,
            "answered_by_none": c.answered_by_none,
            "answers_timed_out": pending.get("timed_out", 0),
            "answers_late": pending.get("late", 0) + pending.get("unknown", 0),
            "answers_failed": pending.get("errors", 0),
            "answer_ms_p50": pct(50),
            "answer_ms_p99": pct(99),
            "uploaded": c.uploaded,
            "upload_fraction": round(c.uploaded / n, 4) if n else 0.0,
            "infer_bytes": c.infer_bytes,
            "sample_bytes": c.sample_bytes,
            "bytes_per_sample": round((c.infer_bytes + c.sample_bytes) / n, 1) if n else 0.0,
            "truth_samples": c.truth_n,
            "edge_accuracy": round(c.edge_correct / c.truth_n, 4) if c.truth_n else None,
            "joint_accuracy": round(c.joint_correct / c.truth_n, 4) if c.truth_n else None,
        }

    def _publish_status(self, *, online: bool = True) -> mqtt.MQTTMessageInfo | None:
        client = self._client
        if client is None or not self._connected.is_set():
            return None
        return client.publish(
            self.topics.status(self.device_id), encode_json(self.status(online=online)), qos=1, retain=True
        )

    def _publish_telemetry(self) -> None:
        client = self._client
        if client is not None and self._connected.is_set():
            # telemetry() is flat already (telemetry_fields): encode it as it is
            client.publish(self.topics.telemetry(self.device_id), encode_json(self.telemetry()), qos=0)

    # -- MQTT callbacks (paho's network thread) -------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            # At start-up connect() raises BrokerConnectionError with the fix; later it is only logged.
            (log.error if self._ever_connected else log.debug)(
                "device %s: broker %s refused the connection: %s", self.device_id, self.url, reason_code
            )
            return
        if self._ever_connected:
            with self._lock:
                self.counters.reconnects += 1
            log.info("device %s: reconnected to %s", self.device_id, self.url)
        self._ever_connected = True
        self._backoff.reset()
        client.subscribe(self.topics.acks(self.device_id), qos=1)
        if self._escalation.enabled:  # QoS 0: a late answer is worth nothing (docs/protocol.md)
            client.subscribe(self.topics.answers(self.device_id), qos=0)
        if self.runtime is not None:
            for topic_filter, qos in self.runtime.on_connected(session_present=bool(flags.session_present)):
                client.subscribe(topic_filter, qos)
        # The publisher publishes the status (it reads the spool) and goes back to the oldest unacked
        # sample (whatever was in flight may be lost): no SQL or spool lock on this thread.
        self._just_connected.set()
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if self._connected.is_set():
            log.warning(
                "device %s: disconnected from %s (%s); spooling until it is back",
                self.device_id,
                self.url,
                reason_code,
            )
        self._connected.clear()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        try:
            if message.topic == self.topics.acks(self.device_id):
                self._handle_acks(message.payload)
            elif message.topic == self.topics.answers(self.device_id):
                self._handle_answer(message.payload)
            elif self.runtime is not None:
                if not self.runtime.handle_message(message.topic, message.payload, message.retain):
                    log.debug("device %s: ignoring message on %s", self.device_id, message.topic)
        except Exception:  # noqa: BLE001 - the network thread must survive anything a message does
            log.exception("device %s: error handling a message on %s", self.device_id, message.topic)

    def _handle_answer(self, payload: bytes) -> None:
        """Queue the cloud's answer for the capture thread, stamped with its arrival time."""
        now = time.monotonic()
        try:
            a = decode_answer(payload)
        except ProtocolError as exc:
            log.warning("device %s: ignoring a bad answers payload: %s", self.device_id, exc)
            return
        if a.seq is None:
            return  # an answer to a request the worker could not read: nothing to match it with
        error = None if a.error is None else (a.error if isinstance(a.error, str) else str(a.error))
        self._answers.append((now, Answer(seq=a.seq, label=a.label, confidence=a.confidence,
                                          model_version=a.version, cloud_ms=a.latency_ms, error=error)))

    def _handle_acks(self, payload: bytes) -> None:
        """Queue the ranges; the publisher thread applies them. Keeps SQLite off paho's network thread,
        and turns a burst of small acks (batch 1) into one DELETE transaction."""
        try:
            ranges = decode_acks(payload)
        except ProtocolError as exc:
            log.warning("device %s: ignoring a bad acks payload: %s", self.device_id, exc)
            return
        with self._ack_lock:
            if not self._ack_inbox:
                self._ack_since = time.monotonic()
            self._ack_inbox.extend(ranges)
        self.spool.wake()

    def _acks_due(self, now: float) -> bool:
        """Acks queued long enough (or many enough) to be applied while there is sending to do."""
        with self._ack_lock:
            return bool(self._ack_inbox) and (
                now - self._ack_since >= ACK_DELAY_S or len(self._ack_inbox) >= ACK_BATCH
            )

    def _apply_acks(self, window: PublishWindow | None) -> None:
        """Delete what the queued acks cover (the publisher's, or the main thread's once it stopped)."""
        with self._ack_lock:
            if not self._ack_inbox:
                return
            pending, self._ack_inbox = self._ack_inbox, []
        ranges = window.receive_acks(pending) if window is not None else merge_ranges(pending)
        removed = self.spool.ack(ranges)
        if removed:
            with self._lock:
                self.counters.acked += removed
                self._last_ack_at = time.perf_counter()
        if window is not None:
            window.spool_deleted(removed, time.monotonic())

    # -- network thread -------------------------------------------------------------------------------
    def _network_loop(self) -> None:
        client = self._client
        assert client is not None
        while not self._net_stop.is_set():
            try:
                rc = client.loop(timeout=0.2)
            except Exception:  # noqa: BLE001 - e.g. a TLS error: treat it as a lost connection
                log.exception("device %s: network loop error", self.device_id)
                rc = mqtt.MQTT_ERR_CONN_LOST
            if rc == mqtt.MQTT_ERR_SUCCESS or self._net_stop.is_set():
                continue
            self._connected.clear()
            if self._net_stop.wait(self._backoff.next()):
                break
            try:
                client.reconnect()
            except (OSError, ValueError) as exc:
                log.info("device %s: broker %s unreachable (%s); retrying", self.device_id, self.url, exc)

    # -- publisher thread -----------------------------------------------------------------------------
    def _publisher_loop(self) -> None:
        # Whatever goes wrong in one pass (a full disk, a broken payload), the publisher keeps going:
        # a dead publisher thread would silently turn the device into a spool filler.
        while not self._pub_stop.is_set():
            try:
                self._publish_pass()
            except Exception:  # noqa: BLE001
                log.exception("device %s: publisher error; retrying in 1 s", self.device_id)
                self._pub_stop.wait(1.0)

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
        while not self._pub_stop.is_set():
            now = time.monotonic()
            if self._acks_due(now):
                self._apply_acks(window)
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
            step = window.poll(now, wall=time.time(), flush=self._stop.is_set())
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
                self._apply_acks(window)
            elif step.reason == "offline":
                self._connected.wait(0.1)
            elif step.reason == "batch":
                assert step.until_seq is not None and step.timeout is not None
                spool.wait_for_seq(step.until_seq, step.timeout)
            else:  # the window is full, or the spool empty
                spool.wait_for_change(0.05)

    def _send(self, topic: str, send: Send) -> bool:
        """Publish the envelopes of ``send`` in order; False when the client refused one."""
        client = self._client
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

    # -- life cycle -----------------------------------------------------------------------------------
    def _connect(self) -> None:
        client = new_client(
            self.url,
            # The client-id binding (broker/README.md): a device's username is its id, or ids go under it.
            client_id=self.device_id if self.url.username in (None, self.device_id)
            else f"{self.url.username}/{self.device_id}",
            clean_session=False,
            max_inflight=100,
            ca_certs=self.config.ca_certs,
        )
        offline = encode_json(
            {
                "device": self.device_id,
                "online": False,
                "pipeline": self.pipeline.hash,
                "reason": "connection lost",
            }
        )
        client.will_set(self.topics.status(self.device_id), offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        try:
            connect(client, self.url, keepalive=self.config.keepalive)
        except BrokerConnectionError as exc:
            if exc.reason_code is not None or self.config.require_broker:
                raise
            log.warning(
                "device %s: %s; capturing into the spool and retrying in the background", self.device_id, exc
            )
        else:
            client.loop_stop()  # hand the socket over to our own loop with jittered reconnects

    def start(self) -> None:
        """Connect and start the network and publisher threads (run() calls this; a second call does
        nothing, so a caller may start first, e.g. to wait for the model, then run)."""
        if self._threads:
            return
        self._connect()
        for name, target in (("net", self._network_loop), ("pub", self._publisher_loop)):
            t = threading.Thread(target=target, name=f"lepton-{name}-{self.device_id}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, reason: str = "stopped") -> None:
        """Ask :meth:`run` to stop capturing and shut down (thread- and signal-safe)."""
        if not self._stop.is_set():
            self._stopped_by = reason
            self._stop.set()
            self.spool.interrupt()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop.is_set():  # a second Ctrl-C: stop waiting for acks now (the spool stays consistent)
            raise KeyboardInterrupt
        log.info(
            "device %s: %s received; stopping (Ctrl-C again to skip waiting for acks)",
            self.device_id,
            signal.Signals(signum).name,
        )
        self.stop(signal.Signals(signum).name)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(
        self, *, handle_signals: bool = True, on_progress: Callable[[DeviceAgent], None] | None = None
    ) -> RunSummary:
        """Run until the source ends, ``limit`` samples are captured, or stop()/SIGINT/SIGTERM; then drain."""
        previous: dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self.start()
            progress = _Ticker(on_progress)
            self._capture(progress)
            self._drain(progress)
            return self._shutdown()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._close_quietly()

    def _capture(self, progress: _Ticker) -> None:
        self._capture_loop(progress)
        # The last escalated samples: their answers may still come, within their deadline.
        pred_topic = self._pred_topic()
        until = time.monotonic() + self.config.answer_timeout_ms / 1000.0
        while len(self._pending) and time.monotonic() < until and not self._stop.is_set():
            self._collect_answers(pred_topic)
            time.sleep(0.005)
        self._collect_answers(pred_topic, final=True)

    def _capture_loop(self, progress: _Ticker) -> None:
        cfg, c = self.config, self.counters
        period = 1.0 / cfg.rate_hz if cfg.rate_hz else 0.0
        next_at = time.monotonic()
        runtime = self.runtime
        esc = self._escalation
        escalating = esc.enabled  # fixed by the config: not a property lookup per sample
        pending, answers = self._pending, self._answers
        pipeline_hash = self.pipeline.hash
        pred_topic = self.topics.predictions(self.device_id) if cfg.predictions else None
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
                self._stopped_by = f"source error: {type(exc).__name__}: {exc}"[:200]
                return
            if self._stop.is_set():
                return
            if period:
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
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
            escalated = esc.decide(prediction.confidence if prediction is not None else None) \
                if escalating else False
            truth = None if label is None else str(label)
            try:
                if self._upload.keep(self.device_id, self.spool.next_seq, escalated=escalated):
                    # Group commit: durable within the spool's commit_ms, and never published before.
                    seq = self.spool.append_nowait(x, label, pipeline=pipeline_hash)
                    uploaded = 1
                else:  # not uploaded (--upload): the seq is used up all the same, a gap in the dataset
                    seq, uploaded = self.spool.skip_seq(), 0
            except SpoolFull:
                return  # block policy interrupted by stop()
            except ProtocolError as exc:  # e.g. a label that is neither int nor str: skip, never crash
                with self._lock:
                    c.frame_errors += 1
                log.warning("device %s: sample skipped: %s", self.device_id, exc)
                continue
            with self._lock:
                if self._first_capture_at is None:
                    self._first_capture_at = t0  # perf_counter, like _last_ack_at
                c.captured += 1
                c.uploaded += uploaded
                c.preprocess_s += spent
                c.preprocess_n += 1
                c.window_s += spent
                c.window_n += 1
            edge = (prediction.label, prediction.confidence) if prediction is not None else (None, None)
            if escalated and self._connected.is_set():
                self._escalate(seq, x, prediction, truth)
            elif escalated:  # offline: the device's own answer stands at once, nothing waits
                self._settle(PendingAnswers.local(seq, edge[0], edge[1], truth), prediction, pred_topic)
            elif prediction is not None:
                self._settle(PendingAnswers.local(seq, edge[0], edge[1], truth), prediction, pred_topic,
                             escalated=False)
            if answers or len(pending):  # nothing to match or expire otherwise
                self._collect_answers(pred_topic)
            progress.tick(self)
            if cfg.limit is not None and c.captured >= cfg.limit:
                self._stopped_by = "limit"
                return
        if not self._stop.is_set():
            self._stopped_by = "source ended"

    # -- collaboration (the capture thread) -------------------------------------------------------------
    def _escalate(self, seq: int, x: np.ndarray, prediction: Any, truth: str | None) -> None:
        cfg = self.config
        request = InferRequest(
            device=self.device_id, seq=seq, x=np.ascontiguousarray(x), pipeline=self.pipeline.hash,
            edge_label=prediction.label if prediction is not None else None,
            edge_confidence=prediction.confidence if prediction is not None else None,
            edge_version=prediction.version if prediction is not None else None,
            deadline=time.time() + cfg.answer_timeout_ms / 1000.0,
        )
        payload = encode_infer(request)
        now = time.monotonic()
        for pushed in self._pending.add(
            seq, now=now, deadline=now + cfg.answer_timeout_ms / 1000.0,
            edge_label=request.edge_label, edge_confidence=request.edge_confidence,
            payload=(truth, prediction),
        ):
            self._settle(pushed, pushed.payload[1], self._pred_topic())
        client = self._client
        if client is not None:
            client.publish(self.topics.infer(self.device_id), payload, qos=0)
        with self._lock:
            self.counters.escalated += 1
            self.counters.infer_bytes += len(payload)

    def _pred_topic(self) -> str | None:
        return self.topics.predictions(self.device_id) if self.config.predictions else None

    def _collect_answers(self, pred_topic: str | None, *, final: bool = False) -> None:
        """Match the answers that arrived, settle what is due; never waits."""
        answers = self._answers
        while answers:
            arrived, answer = answers.popleft()
            outcome = self._pending.answer(answer, now=arrived)
            if outcome is not None:
                if outcome.latency_ms is not None:
                    with self._lock:
                        self._answer_ms.append(outcome.latency_ms)
                self._settle(outcome, outcome.payload[1], pred_topic)
        due = self._pending.expire(float("inf") if final else time.monotonic())
        for outcome in due:
            self._settle(outcome, outcome.payload[1], pred_topic)
        if self._escalation.enabled:
            with self._lock:
                self._pending_stats = self._pending.stats()

    def _settle(self, outcome: Outcome, prediction: Any, pred_topic: str | None, *, escalated: bool = True) -> None:
        """Count the answer the device settled on, and publish it as its prediction."""
        truth = outcome.payload[0] if isinstance(outcome.payload, tuple) else outcome.payload
        with self._lock:
            c = self.counters
            if outcome.answered_by == "cloud":
                c.answered_by_cloud += 1
            elif outcome.answered_by == "edge":
                c.answered_by_edge += 1
            else:
                c.answered_by_none += 1
            # Accuracy over the samples the edge answered itself (or every sample with --cloud-only), so
            # edge and joint accuracy compare the same samples; before the first model there is neither.
            if truth is not None and (outcome.edge_label is not None or self.config.cloud_only):
                c.truth_n += 1
                c.edge_correct += outcome.edge_label is not None and str(outcome.edge_label) == truth
                c.joint_correct += outcome.label is not None and str(outcome.label) == truth
        if pred_topic is None or not self._connected.is_set() or self._client is None:
            return
        if prediction is not None and outcome.answered_by != "cloud":
            body = prediction.as_dict()
        else:
            body = {"label": outcome.label, "index": None, "confidence": outcome.confidence,
                    "latency_ms": outcome.latency_ms,
                    "version": outcome.cloud.model_version if outcome.cloud else None}
        body.update(device=self.device_id, seq=outcome.seq, truth=truth, answered_by=outcome.answered_by,
                    escalated=escalated, edge_label=outcome.edge_label, edge_confidence=outcome.edge_confidence)
        self._client.publish(pred_topic, encode_json(body), qos=0)

    def _drain(self, progress: _Ticker) -> None:
        """Wait for every spooled sample to be acknowledged (or the grace/drain timeout after a stop)."""
        cfg = self.config
        interrupted = self._stop.is_set()
        wait = cfg.drain_timeout if cfg.drain_timeout is not None else float("inf")
        deadline = time.monotonic() + (cfg.shutdown_grace if interrupted else wait)
        while self.spool.depth and time.monotonic() < deadline:
            if not interrupted and self._stop.is_set():
                interrupted = True
                deadline = min(deadline, time.monotonic() + cfg.shutdown_grace)
            self.spool.wait_for_change(0.1)
            progress.tick(self)
        if self.spool.depth and not interrupted and cfg.drain_timeout is not None:
            self._stopped_by = "drain timeout"
        progress.tick(self, force=True)

    def _shutdown(self) -> RunSummary:
        self._pub_stop.set()
        publishers = [t for t in self._threads if t.name.startswith("lepton-pub")]
        for t in publishers:
            t.join(5)
        if not any(t.is_alive() for t in publishers):  # the publisher's state is now the main thread's
            self._apply_acks(None)  # acks that arrived after the publisher's last pass
        if self._connected.is_set():
            self._publish_telemetry()
            info = self._publish_status(online=False)
            if info is not None:
                try:
                    info.wait_for_publish(2.0)
                except (RuntimeError, ValueError):
                    pass
        with self._lock:
            c = replace(self.counters)
            first, last_ack = self._first_capture_at, self._last_ack_at
        summary = RunSummary(
            device=self.device_id,
            fleet=self.config.fleet,
            captured=c.captured,
            published=c.published,
            resent=c.resent,
            acked=c.acked,
            spool_depth=self.spool.depth,
            dropped=self.spool.dropped,
            skipped=self.source.skipped,
            frame_errors=c.frame_errors,
            next_seq=self.spool.next_seq,
            pipeline=self.pipeline.hash,
            duration_s=round(time.monotonic() - self._started, 3),
            preprocess_ms=round(1000 * c.preprocess_s / c.preprocess_n, 4) if c.preprocess_n else None,
            stopped_by=self._stopped_by,
            dropped_this_run=self.spool.dropped - self._dropped_at_start,
            reconnects=c.reconnects,
            capture_to_ack_s=round(last_ack - first, 4)
            if first is not None and last_ack is not None else None,
            spool_commits=self.spool.commits,
            model_version=getattr(self.runtime, "version", None),
            skipped_items=list(self.source.skipped_items),
            collaboration={"escalation": self._escalation.mode, "upload": self._upload.spec,
                           **self._collaboration(c)},
        )
        return summary

    def _close_quietly(self) -> None:
        self._pub_stop.set()
        self._net_stop.set()
        client = self._client
        self._connected.clear()
        if client is not None:
            try:
                client.disconnect()  # a clean DISCONNECT: the broker does not send the Will
            except Exception:  # noqa: BLE001
                pass
        for t in self._threads:
            t.join(5)
        if client is not None:
            try:
                client.loop_stop()
            except Exception:  # noqa: BLE001
                pass
        if self.runtime is not None:
            try:
                self.runtime.close()
            except Exception:  # noqa: BLE001
                log.exception("device %s: model runtime close failed", self.device_id)
        self.source.close()
        self.spool.close()

    def close(self) -> None:
        """Release the spool, source and runtime without running (for an agent built but never run)."""
        self._close_quietly()


class _Ticker:
    """Calls ``on_progress`` at most every 0.25 s from the capture thread."""

    def __init__(self, callback: Callable[[DeviceAgent], None] | None) -> None:
        self.callback, self.last = callback, 0.0

    def tick(self, agent: DeviceAgent, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self.last >= 0.25:
            self.last = now
            try:
                self.callback(agent)
            except Exception:  # noqa: BLE001
                log.exception("progress callback failed")
