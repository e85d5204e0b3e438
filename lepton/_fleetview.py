"""The fleet as its retained messages tell it: one I/O-free parser for ``lepton status`` and the demo.

Topic and payload in, view updated, no socket, thread or clock (the caller passes ``now``). The MQTT
shells around it (``lepton.cli._status``, ``lepton._demo``) subscribe to :meth:`FleetView.filters`,
feed every message to :meth:`FleetView.apply` under their own lock, and render the view their way.

What it keeps, per fleet: each device's latest status and telemetry reports, each worker's latest
status, each model's latest retained manifest (parsed for display, not verified: it decides
nothing), and, when subscribed (``filters(deadletter=True)``, ``lepton dashboard``), the latest
``max_dead_letters`` dead-letter reports. Devices write these topics, so nothing is trusted: a payload that is not protocol v1 JSON,
over ``max_payload`` (:data:`MAX_PAYLOAD`), or for a device beyond ``max_entries`` (:data:`MAX_ENTRIES`)
is ignored and counted, and an
empty retained payload (a cleared topic) removes what it cleared. The values inside the reports are
left to the renderer to type-check.

>>> view = FleetView(fleet="demo")
>>> view.apply("lepton/demo/devices/cam-1/status", b'{"v": 1, "ts": 1, "online": true}', now=5.0)
'status'
>>> view.devices["cam-1"].status["online"], view.devices["cam-1"].received
(True, 5.0)
>>> view.apply("lepton/demo/devices/cam-1/status", b"not json", now=6.0), view.ignored
(None, 1)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lepton.errors import ModelRejected, ProtocolError
from lepton.protocol import MAX_MANIFEST_BYTES, Topics, decode_json, parse_manifest

__all__ = ["MAX_ENTRIES", "MAX_PAYLOAD", "FleetView", "ModelInfo", "Reports"]

#: a status or telemetry message bigger than this is ignored (a device's honest status is a few KiB)
MAX_PAYLOAD = 64 * 1024
#: devices (and workers, and models) kept at most: retained topics are cheap for whoever can write them
MAX_ENTRIES = 10_000


@dataclass
class Reports:
    """The latest reports of one device (status and telemetry) or one worker (status only)."""

    status: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    #: the caller's ``now`` at the newest message
    received: float = 0.0
    #: the kinds held, least recently updated first (to fold them in the order they came)
    order: list[str] = field(default_factory=list)

    def bodies(self) -> list[dict[str, Any]]:
        """The reports held, oldest first."""
        return [body for body in (getattr(self, kind) for kind in self.order) if body is not None]


@dataclass(frozen=True)
class ModelInfo:
    """What a model's retained manifest says (unverified: for display only)."""

    version: int
    size: int
    quantization: str | None
    metrics: dict[str, Any]


@dataclass
class FleetView:
    """Everything one fleet's status, telemetry and model topics said so far; see the module docstring."""

    fleet: str
    prefix: str = "lepton"
    devices: dict[str, Reports] = field(default_factory=dict)
    workers: dict[str, Reports] = field(default_factory=dict)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    #: payloads that are not protocol v1 JSON (or a manifest), too big, or beyond max_entries
    ignored: int = 0
    #: devices (and workers, and models) kept at most, and the largest status/telemetry kept
    max_entries: int = MAX_ENTRIES
    max_payload: int = MAX_PAYLOAD
    #: the latest dead-letter reports (decoded JSON objects, oldest first), and how many arrived
    max_dead_letters: int = 50
    dead_letters: deque[dict[str, Any]] = field(init=False, repr=False)
    dead_letters_seen: int = 0
    topics: Topics = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.topics = Topics(fleet=self.fleet, prefix=self.prefix)
        self.dead_letters = deque(maxlen=self.max_dead_letters)

    def filters(
        self, *, workers: Iterable[str] | None = None, models: Iterable[str] | None = (),
        deadletter: bool = False,
    ) -> list[tuple[str, int]]:
        """``(topic filter, QoS)`` to subscribe to: every device's status and telemetry, the status of
        every worker (or of the named ``workers`` only), the manifests of ``models`` (``None``: of every
        model), and with ``deadletter`` the fleet's dead letters."""
        t = self.topics
        status = [(t.all_status(), 1)] if workers is None else [
            (t.all_devices("status"), 1), *((t.worker_status(w), 1) for w in workers)]
        manifests = [(t.all_manifests(), 1)] if models is None else [(t.model(m), 1) for m in models]
        dead = [(t.deadletter(), 1)] if deadletter else []
        return [*status, (t.all_devices("telemetry"), 0), *manifests, *dead]

    def apply(self, topic: str, payload: bytes | bytearray | memoryview, *, now: float) -> str | None:
        """Fold one message in. Returns its channel (``"status"``, ``"telemetry"``, ``"worker_status"``,
        ``"model"``) when it changed the view, None when it was ignored or is not for this view."""
        try:
            parsed = self.topics.parse(topic)
        except ProtocolError:
            self.ignored += 1
            return None
        if parsed.channel == "model":
            assert parsed.model is not None  # Topics.parse names the model on this channel
            return self._apply_model(parsed.model, bytes(payload))
        if parsed.channel == "deadletter":
            return self._apply_dead_letter(payload)
        if parsed.channel == "worker_status":
            book, name, kind = self.workers, parsed.worker, "status"
        elif parsed.channel in ("status", "telemetry"):
            book, name, kind = self.devices, parsed.device, parsed.channel
        else:
            return None
        assert name is not None  # Topics.parse names the device or worker on these channels
        if len(payload) > self.max_payload or (name not in book and len(book) >= self.max_entries):
            self.ignored += 1
            return None
        if not payload:  # a cleared retained message: the device or worker was removed
            entry = book.get(name)
            if entry is None:
                return None
            setattr(entry, kind, None)
            if entry.status is None and entry.telemetry is None:
                del book[name]
            return parsed.channel
        try:
            body = decode_json(payload, field=kind)
        except ProtocolError:
            self.ignored += 1
            return None
        entry = book.setdefault(name, Reports())
        setattr(entry, kind, body)
        if kind in entry.order:
            entry.order.remove(kind)
        entry.order.append(kind)
        entry.received = max(entry.received, now)
        return parsed.channel

    def _apply_model(self, name: str, payload: bytes) -> str | None:
        if not payload:  # the manifest was cleared
            return "model" if self.models.pop(name, None) is not None else None
        if len(payload) > MAX_MANIFEST_BYTES or (name not in self.models and len(self.models) >= self.max_entries):
            self.ignored += 1
            return None
        try:
            manifest, _, _ = parse_manifest(payload)
        except ModelRejected:
            self.ignored += 1
            return None
        self.models[name] = ModelInfo(version=manifest.version, size=manifest.size,
                                      quantization=manifest.quantization, metrics=dict(manifest.metrics))
        return "model"

    def _apply_dead_letter(self, payload: bytes | bytearray | memoryview) -> str | None:
        if not payload or len(payload) > self.max_payload:
            self.ignored += 1
            return None
        try:
            body = decode_json(payload, field="deadletter")
        except ProtocolError:
            self.ignored += 1
            return None
        self.dead_letters.append(body)
        self.dead_letters_seen += 1
        return "deadletter"
