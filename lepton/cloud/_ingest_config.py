"""The ingest worker's settings: :class:`WorkerConfig`, a frozen value checked when it is made.

Immutable once built; read by every thread of the worker (nothing writes it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lepton.errors import ConfigError
from lepton.protocol import DEFAULT_MAX_TENSOR_BYTES, DEFAULT_PREFIX, BrokerURL, Topics, validate_id

__all__ = ["DEFAULT_WORKER_MAX_PAYLOAD_BYTES", "WorkerConfig"]

#: The worker's default ceiling for one message: well above the device's 1,000,000-byte envelopes,
#: and exactly what ``max_packet_size`` in the project's mosquitto.conf allows (4 MiB).
DEFAULT_WORKER_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Settings of one ingest worker. Only ``broker``, ``fleet`` and ``data`` are required.

    >>> WorkerConfig(broker="mqtt://w1:pw@127.0.0.1:1883", fleet="demo", data="/data").batch
    4096
    """

    broker: str
    fleet: str
    data: str | Path
    name: str = "worker"
    #: topics are ``{prefix}/{fleet}/...``; the training child gets the same ``--prefix``.
    prefix: str = DEFAULT_PREFIX
    #: shared-subscription group: several workers with the same group split the stream.
    group: str | None = None
    #: ``None`` probes the broker; ``False`` refuses ``group`` at once (e.g. known amqtt).
    shared_subscriptions: bool | None = None
    #: the exactly-once index: None for SQLite in the dataset folder (one machine), or
    #: ``postgresql://USER@HOST[:PORT]/DB`` (workers on several machines; docs/dataset.md).
    index: str | None = dataclasses.field(default=None, repr=False)  # may hold a password
    batch: int = 4096  # samples per file, at most
    batch_ms: float = 100.0  # wait at most this long for more messages before writing
    #: messages per write at most: the broker's in-flight window (mosquitto.conf max_inflight_messages).
    max_pending: int = 1000
    #: with a burst pending, write once no message came for this long (the broker's window is full).
    idle_ms: float = 5.0
    status_interval: float = 2.0
    #: run the store (validation, Parquet + fsync, the index) in a forked child process, out of paho's
    #: GIL (the default); False runs it in the worker's writer thread (one process).
    store_process: bool = True
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    #: larger messages are dead-lettered unread; keep it at the broker's max_packet_size.
    max_payload_bytes: int = DEFAULT_WORKER_MAX_PAYLOAD_BYTES
    #: payload bytes received and not yet written, at most: beyond it paho's network thread waits
    #: (QoS 1: the broker holds the rest) and QoS 0 messages are dropped and counted.
    max_queue_bytes: int = 256 * 1024 * 1024
    #: quarantine bounds, bytes per device and in total (payloads are de-duplicated by hash).
    quarantine_device_bytes: int = 64 * 1024 * 1024
    quarantine_bytes: int = 1024 * 1024 * 1024
    #: at most this many per-sample dead-letter reports per message (then one summary report).
    max_reports_per_message: int = 16
    # -- training trigger ---------------------------------------------------------------------------
    train_every: int | None = None  # new labelled samples
    train_interval: float | None = None  # seconds, if new labelled samples arrived
    model: str | None = None
    key: str | None = None
    train_publish: bool = False
    #: the training child's broker URL (with password) when it publishes; default ``broker``. Give it a
    #: user of its own (role trainer): brokers that bind client ids to users (mosquitto.conf
    #: use_username_as_clientid) would let a child with the worker's user kick the worker off.
    train_broker: str | None = None
    train_args: tuple[str, ...] = ()
    #: replaces ``python -m lepton train ...`` entirely (tests, custom trainers).
    train_command: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        validate_id(self.fleet, kind="fleet", flag="--fleet")
        Topics(fleet=self.fleet, prefix=self.prefix)  # validates the prefix too
        validate_id(self.name, kind="worker", flag="--name")
        if self.group is not None:
            validate_id(self.group, kind="group", flag="--group")
        if self.model is not None:
            validate_id(self.model, kind="model", flag="--model")
        BrokerURL.parse(self.broker)
        if self.index is not None:
            from lepton.cloud._index_pg import is_postgres_url

            if not is_postgres_url(self.index):
                raise ConfigError(
                    "--index must be postgresql://USER@HOST[:PORT]/DATABASE (password in $PGPASSWORD); "
                    "leave it out for the SQLite index in the dataset folder"
                )
        if self.train_broker is not None:
            BrokerURL.parse(self.train_broker)
        if self.batch < 1 or self.max_pending < 1 or self.batch_ms < 0:
            raise ConfigError("--batch and --max-pending must be >= 1 and --batch-ms >= 0")
        if self.max_payload_bytes < 1024 or self.max_queue_bytes < self.max_payload_bytes:
            raise ConfigError("--max-payload-kb must be >= 1 and --max-queue-mb at least one payload")
        if self.quarantine_device_bytes < 0 or self.quarantine_bytes < 0:
            raise ConfigError("--quarantine-mb and --quarantine-device-mb must be >= 0")
        if (self.train_every or self.train_interval) and not (self.model or self.train_command):
            raise ConfigError("--train-every/--train-interval need --model NAME")
