"""Settings of one serve worker (``lepton serve``): :class:`ServeConfig`, checked when it is made.

Frozen: built once at the CLI edge (lepton/cli/_serve.py) and only read afterwards, by every thread
of the worker, so it has no owning thread. Environment variables and files are read by the CLI, not
here; ``public_key`` may be a path, loaded when the worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.errors import ConfigError
from lepton.protocol import DEFAULT_MAX_INFER_BYTES, DEFAULT_PREFIX, BrokerURL, Topics, validate_id

__all__ = ["ServeConfig"]


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
