"""Every topic string of protocol v1 is built and parsed here, and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

from lepton.errors import ProtocolError
from lepton.protocol._ids import validate_id

DEFAULT_PREFIX = "lepton"

#: Per-device channels under ``{prefix}/{fleet}/devices/{device}/``.
#: ``infer`` (device -> cloud) and ``answers`` (cloud -> device) carry collaborative inference.
DEVICE_CHANNELS = ("samples", "acks", "status", "telemetry", "predictions", "infer", "answers")


def prefix_problem(value: object) -> str | None:
    """Why ``value`` cannot be a topic prefix, or ``None`` when it can (see :func:`validate_prefix`)."""
    if not isinstance(value, str) or not value:
        return "it must be a non-empty string"
    if any(c in value for c in "+#\0") or value.startswith("$"):
        return "no wildcards, no leading '$'"
    if value.startswith("/") or value.endswith("/"):
        return "no leading or trailing '/'"
    if any(c.isspace() or not c.isprintable() for c in value):
        return "no whitespace or control characters"
    return None


def validate_prefix(value: object) -> str:
    """Return ``value`` if it can be a topic prefix, else raise ProtocolError (``field="prefix"``).

    A prefix is one or more topic levels (``lepton``, ``acme/site-3/lepton``): not empty, no ``+``,
    ``#``, NUL or whitespace (ACL files separate their fields with spaces), no leading ``$`` or ``/``,
    no trailing ``/``.

    >>> validate_prefix("acme/site-3/lepton")
    'acme/site-3/lepton'
    """
    problem = prefix_problem(value)
    if problem is not None:
        raise ProtocolError(f"bad topic prefix {value!r}: {problem}", field="prefix")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class ParsedTopic:
    """What a topic names. ``channel`` is one of DEVICE_CHANNELS, ``"model"``, ``"model_chunk"``,
    ``"worker_status"``, ``"worker_telemetry"`` or ``"deadletter"``."""

    fleet: str
    channel: str
    device: str | None = None
    model: str | None = None
    version: int | None = None
    chunk: int | None = None
    worker: str | None = None


@dataclass(frozen=True)
class Topics:
    """Topic builder and parser for one fleet.

    >>> t = Topics(fleet="demo")
    >>> t.samples("cam-1")
    'lepton/demo/devices/cam-1/samples'
    >>> t.parse("lepton/demo/devices/cam-1/samples").device
    'cam-1'
    """

    fleet: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_id(self.fleet, kind="fleet")
        validate_prefix(self.prefix)

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    # -- device channels --------------------------------------------------------------------------
    def device(self, device: str, channel: str) -> str:
        if channel not in DEVICE_CHANNELS:
            raise ProtocolError(f"unknown device channel {channel!r}", field="channel")
        return f"{self.root}/devices/{validate_id(device, kind='device')}/{channel}"

    def samples(self, device: str) -> str:
        return self.device(device, "samples")

    def acks(self, device: str) -> str:
        return self.device(device, "acks")

    def status(self, device: str) -> str:
        return self.device(device, "status")

    def telemetry(self, device: str) -> str:
        return self.device(device, "telemetry")

    def predictions(self, device: str) -> str:
        return self.device(device, "predictions")

    def infer(self, device: str) -> str:
        """Where ``device`` asks the cloud to classify a sample (msgpack infer request)."""
        return self.device(device, "infer")

    def answers(self, device: str) -> str:
        """Where the cloud answers ``device``'s infer requests (msgpack answer)."""
        return self.device(device, "answers")

    def all_devices(self, channel: str) -> str:
        """Subscription filter for one channel of every device of the fleet."""
        if channel not in DEVICE_CHANNELS:
            raise ProtocolError(f"unknown device channel {channel!r}", field="channel")
        return f"{self.root}/devices/+/{channel}"

    # -- models -----------------------------------------------------------------------------------
    def model(self, model: str) -> str:
        """Retained manifest of the current version of ``model``."""
        return f"{self.root}/models/{validate_id(model, kind='model')}"

    def model_chunk(self, model: str, version: int, index: int) -> str:
        """Retained chunk ``index`` of ``version`` of ``model``."""
        if not isinstance(version, int) or version < 1:
            raise ProtocolError(f"model version must be an int >= 1, got {version!r}", field="version")
        if not isinstance(index, int) or index < 0:
            raise ProtocolError(f"chunk index must be an int >= 0, got {index!r}", field="chunk")
        return f"{self.model(model)}/v/{version}/chunks/{index}"

    def model_filter(self, model: str) -> str:
        """Subscription filter for a model's manifest and all its chunks (``#`` also matches the parent)."""
        return f"{self.model(model)}/#"

    def all_models(self) -> str:
        return f"{self.root}/models/#"

    def all_manifests(self) -> str:
        """Subscription filter for the retained manifest of every model, without their chunks."""
        return f"{self.root}/models/+"

    # -- fleet-wide -------------------------------------------------------------------------------
    def deadletter(self) -> str:
        return f"{self.root}/deadletter"

    def worker_status(self, worker: str) -> str:
        return f"{self.root}/workers/{validate_id(worker, kind='worker')}/status"

    def worker_telemetry(self, worker: str) -> str:
        return f"{self.root}/workers/{validate_id(worker, kind='worker')}/telemetry"

    def all_status(self) -> str:
        return f"{self.root}/+/+/status"

    def shared(self, group: str, topic_filter: str) -> str:
        """MQTT 5 / Mosquitto / EMQX shared subscription of ``topic_filter`` for ``group``."""
        return f"$share/{validate_id(group, kind='group')}/{topic_filter}"

    # -- parsing ----------------------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Parse a topic of this fleet; raise ProtocolError naming what does not match."""
        head = self.root + "/"
        if not isinstance(topic, str) or not topic.startswith(head):
            raise ProtocolError(f"topic {topic!r} is not under {head!r}", field="topic")
        parts = topic[len(head):].split("/")
        kind = parts[0]
        if kind == "devices" and len(parts) == 3:
            device = validate_id(parts[1], kind="device")
            if parts[2] not in DEVICE_CHANNELS:
                raise ProtocolError(f"unknown device channel {parts[2]!r} in {topic!r}", field="topic")
            return ParsedTopic(self.fleet, parts[2], device=device)
        if kind == "models" and len(parts) == 2:
            return ParsedTopic(self.fleet, "model", model=validate_id(parts[1], kind="model"))
        if kind == "models" and len(parts) == 6 and parts[2] == "v" and parts[4] == "chunks":
            model = validate_id(parts[1], kind="model")
            version, index = _nonneg_int(parts[3], "version"), _nonneg_int(parts[5], "chunk")
            if version < 1:
                raise ProtocolError(f"model version must be >= 1 in {topic!r}", field="version")
            return ParsedTopic(self.fleet, "model_chunk", model=model, version=version, chunk=index)
        if kind == "workers" and len(parts) == 3 and parts[2] in ("status", "telemetry"):
            return ParsedTopic(self.fleet, f"worker_{parts[2]}", worker=validate_id(parts[1], kind="worker"))
        if kind == "deadletter" and len(parts) == 1:
            return ParsedTopic(self.fleet, "deadletter")
        raise ProtocolError(f"topic {topic!r} is not a protocol v1 topic", field="topic")


def _nonneg_int(text: str, field: str) -> int:
    # isascii: str.isdigit() also accepts "١" and "²", which int() reads differently or not at all.
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0"):
        raise ProtocolError(f"{text!r} is not a non-negative integer", field=field)
    return int(text)
