"""The device agent's configuration and reports: :class:`DeviceConfig` (checked before anything
connects), :class:`RunSummary` (what a run did), the :class:`Counters` behind telemetry and the summary,
and the reconnect :class:`Backoff`.

**Who owns what.** ``DeviceConfig`` and ``RunSummary`` are frozen. A :class:`Counters` belongs to one
agent: each counter has one writing thread, and every write, like the telemetry's read-and-reset of
``window_s``/``window_n``, holds the agent's ``_lock``. Capture writes ``captured``, ``frame_errors``,
the preprocessing times and the collaboration counters (``uploaded``, ``infer_bytes``, ``escalated``,
``answered_by_*``, the accuracy counts); the publisher ``published``, ``resent``, ``acked``,
``ack_timeouts`` and ``sample_bytes`` (after the publisher stopped, the main thread applies the last
acks); the network thread ``reconnects``. A :class:`Backoff` is the network thread's.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton.device._escalation import EscalationPolicy, parse_upload_policy
from lepton.device._spool import ON_FULL_POLICIES
from lepton.errors import ConfigError, ProtocolError
from lepton.protocol import DEFAULT_PREFIX, BrokerURL, validate_id

__all__ = ["Backoff", "Counters", "DeviceConfig", "RunSummary", "default_spool_dir"]


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
class Counters:
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


class Backoff:
    """Exponential backoff with "equal jitter": half the delay fixed, half random."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0
