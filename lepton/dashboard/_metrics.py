"""``/metrics``: the board as Prometheus text, built at scrape time by a ``prometheus_client`` collector.

Generated from the board's rows on every scrape, so a device that disappears (its retained status
cleared) disappears from ``/metrics`` too, and label cardinality is what the board bounds: at most
``max_devices`` values of ``device``, :data:`~lepton.dashboard._board.MAX_VERSIONS` of ``version`` per
model, and only ids that passed :func:`lepton.protocol.validate_id` (topic levels) or were cleaned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: device row field -> (metric name, help)
DEVICE_GAUGES = {
    "online": ("lepton_device_online", "1 while the device's retained status says online (its Last Will sets 0)"),
    "spool_depth": ("lepton_device_spool_depth", "samples stored on the device and not yet acknowledged"),
    "model_version": ("lepton_device_model_version", "model version the device serves"),
    "accuracy": ("lepton_device_accuracy", "running accuracy of the served version on labelled samples"),
    "inference_ms_p99": ("lepton_device_inference_p99_ms", "p99 inference latency over the last 2048, ms"),
    "capture_rate": ("lepton_device_capture_rate", "samples captured per second (between telemetry reports)"),
    "ack_rate": ("lepton_device_ack_rate", "samples acknowledged per second (between telemetry reports)"),
    "escalation_rate": ("lepton_device_escalation_rate", "samples escalated to the cloud per second"),
    "last_seen": ("lepton_device_last_seen_timestamp_seconds", "the newest report's ts (sender clock)"),
}
#: device row field -> (counter name without _total, help): counters as the device reports them
DEVICE_COUNTERS = {
    "captured": ("lepton_device_captured", "samples captured since the device started"),
    "acked": ("lepton_device_acked", "samples acknowledged since the device started"),
    "inferences": ("lepton_device_inferences", "inferences since the device started"),
    "swaps": ("lepton_device_swaps", "model hot-swaps since the device started"),
}
#: worker status field -> (metric, help, counter?)
WORKER_FIELDS = {
    "online": ("lepton_worker_online", "1 while the worker's retained status says online", False),
    "samples_per_s": ("lepton_worker_ingest_rate", "samples stored per second", False),
    "queue": ("lepton_worker_queue", "messages waiting in the worker's queue", False),
    "files": ("lepton_worker_dataset_files", "Parquet files the worker wrote", False),
    "bytes": ("lepton_worker_dataset_bytes", "bytes of Parquet the worker wrote", False),
    "stored": ("lepton_worker_stored", "samples stored since the worker started", True),
    "duplicates": ("lepton_worker_duplicates", "duplicate samples acknowledged, not stored again", True),
    "dead_letters": ("lepton_worker_dead_letters", "dead-lettered problems since the worker started", True),
    "errors": ("lepton_worker_errors", "write errors since the worker started", True),
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


class BoardCollector(Collector):
    """Collects from ``read()``, which returns a board snapshot (``FleetBoard.snapshot``), taking the
    board's lock only while it builds it."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # concurrent scrapes build one snapshot each, never interleaved
            doc = self._read()
        fleet = doc["fleet"]
        summary = doc["summary"]
        yield _gauge("lepton_fleet_devices", "devices tracked", fleet, summary["devices"])
        yield _gauge("lepton_fleet_devices_online", "devices online", fleet, summary["online"])
        yield _gauge("lepton_fleet_ingest_rate", "samples stored per second, all workers", fleet,
                     summary["ingest_rate"])
        yield _counter("lepton_fleet_dead_letters_seen", "dead-letter reports the dashboard received",
                       fleet, summary["dead_letters_seen"])
        yield _counter("lepton_dashboard_ignored_messages", "messages ignored: not protocol v1, too big, "
                       "or beyond the device bound", fleet, summary["ignored_messages"])

        for key, (name, help_text) in DEVICE_GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=["fleet", "device"])
            for row in doc["devices"]:
                value = _number(row.get(key))
                if value is not None:
                    family.add_metric([fleet, row["device"]], value)
            yield family
        for key, (name, help_text) in DEVICE_COUNTERS.items():
            counter = CounterMetricFamily(name, help_text, labels=["fleet", "device"])
            for row in doc["devices"]:
                value = _number(row.get(key))
                if value is not None:
                    counter.add_metric([fleet, row["device"]], value)
            yield counter

        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for key, (name, help_text, is_counter) in WORKER_FIELDS.items():
            cls = CounterMetricFamily if is_counter else GaugeMetricFamily
            families[key] = cls(name, help_text, labels=["fleet", "worker"])
        for row in doc["workers"]:
            fields = {"online": row.get("online"), **row["summary"]}
            for key, worker_family in families.items():
                value = _number(fields.get(key))
                if value is not None:
                    worker_family.add_metric([fleet, row["worker"]], value)
        yield from families.values()

        devices = GaugeMetricFamily("lepton_model_devices", "devices serving each version of a model "
                                    "(rollout progress)", labels=["fleet", "model", "version"])
        latest = GaugeMetricFamily("lepton_model_latest_version", "version in the retained manifest",
                                   labels=["fleet", "model"])
        size = GaugeMetricFamily("lepton_model_size_bytes", "model size in the retained manifest",
                                 labels=["fleet", "model"])
        for model in doc["models"]:
            for version, count in model["devices"].items():
                devices.add_metric([fleet, model["model"], version], count)
            if model["version"] is not None:
                latest.add_metric([fleet, model["model"]], model["version"])
            if model["size"] is not None:
                size.add_metric([fleet, model["model"]], model["size"])
        yield devices
        yield latest
        yield size


def _gauge(name: str, help_text: str, fleet: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["fleet"])
    family.add_metric([fleet], value)
    return family


def _counter(name: str, help_text: str, fleet: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=["fleet"])
    family.add_metric([fleet], value)
    return family
