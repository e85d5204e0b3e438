"""The dashboard's core: the fleet view, rates, a bounded rolling history and the page's documents.

I/O-free like :class:`lepton._fleetview.FleetView`, which it wraps: messages in (``apply``), JSON-ready
documents out (``snapshot``, ``delta``), the clock passed in (``now``). The server (``_server.py``) owns
one board and calls it under its lock from two threads: paho's network thread calls :meth:`apply`; the
event loop calls :meth:`tick`, :meth:`delta` and :meth:`snapshot`. Nothing else touches it.

Everything a device or worker sends is untrusted. Rows come from :func:`lepton.cli._status.device_row`
and ``worker_row`` (type-checked fields, strings cut to a bounded length and control characters
escaped); the page inserts them as text, never as HTML. What is kept is bounded: ``max_devices``
devices (more are ignored and counted), ``max_payload`` bytes per report, ``max_dead_letters``
reports, ``MAX_VERSIONS`` model versions per chart, and ``history_s / sample_s`` history points.

>>> board = FleetBoard(fleet="f1")
>>> board.apply("lepton/f1/devices/cam-1/status", b'{"v": 1, "ts": 10, "online": true}', now=10.0)
'status'
>>> [d["device"] for d in board.delta(now=10.5)["devices"]], board.delta(now=11.0)["devices"]
(['cam-1'], [])
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lepton._fleetview import FleetView
from lepton.cli._status import MAX_MESSAGE, _dict, _int, _num, clean_text, device_row, worker_row

__all__ = ["MAX_VERSIONS", "FleetBoard"]

#: model versions charted at once (the newest): a device may report any number, the chart shows these
MAX_VERSIONS = 8
#: models listed in the rollout table (the retained manifests seen, then names devices report)
MAX_MODELS = 32


@dataclass
class _Rates:
    """The previous telemetry counters of one device, to turn counters into per-second rates."""

    ts: float
    counters: dict[str, int]
    rates: dict[str, float | None] = field(default_factory=dict)


#: telemetry counter -> the rate field of the row
_RATE_FIELDS = {"captured": "capture_rate", "acked": "ack_rate", "escalated": "escalation_rate"}


def _escalated(telemetry: dict[str, Any]) -> int | None:
    """Escalations so far (the telemetry's ``escalated`` counter)."""
    return _int(telemetry.get("escalated"))


@dataclass
class FleetBoard:
    """One fleet on one page; see the module docstring."""

    fleet: str
    prefix: str = "lepton"
    max_devices: int = 2000
    max_payload: int = 16 * 1024
    max_dead_letters: int = 50
    #: rolling history kept, and one point every ``sample_s`` seconds
    history_s: float = 900.0
    sample_s: float = 2.0
    view: FleetView = field(init=False)
    history: deque[dict[str, Any]] = field(init=False)
    _rates: dict[str, _Rates] = field(init=False, default_factory=dict)
    _dirty: set[str] = field(init=False, default_factory=set)
    _removed: set[str] = field(init=False, default_factory=set)
    _changed: set[str] = field(init=False, default_factory=set)
    _next_sample: float = field(init=False, default=0.0)
    _dead_sent: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.view = FleetView(fleet=self.fleet, prefix=self.prefix, max_entries=self.max_devices,
                              max_payload=self.max_payload, max_dead_letters=self.max_dead_letters)
        self.history = deque(maxlen=max(2, math.ceil(self.history_s / self.sample_s)))

    def filters(self) -> list[tuple[str, int]]:
        """Every device's status and telemetry, every worker's status, every manifest, the dead letters:
        what the viewer role may read (lepton/broker/_acl.py)."""
        return self.view.filters(models=None, deadletter=True)

    # -- messages in (paho's thread, under the server's lock) ----------------------------------------
    def apply(self, topic: str, payload: bytes | bytearray | memoryview, *, now: float) -> str | None:
        channel = self.view.apply(topic, payload, now=now)
        if channel is None:
            return None
        if channel in ("status", "telemetry"):
            name = self.view.topics.parse(topic).device
            assert name is not None
            if name in self.view.devices:
                self._dirty.add(name)
                self._removed.discard(name)
                if channel == "telemetry":
                    self._count(name, self.view.devices[name].telemetry or {})
            else:
                self._dirty.discard(name)
                self._removed.add(name)
                self._rates.pop(name, None)
        self._changed.add(channel)
        return channel

    def _count(self, name: str, telemetry: dict[str, Any]) -> None:
        ts = _num(telemetry.get("ts"), 0.0)
        if ts is None:
            return
        counters = {k: v for k, v in (("captured", _int(telemetry.get("captured"))),
                                      ("acked", _int(telemetry.get("acked"))),
                                      ("escalated", _escalated(telemetry))) if v is not None}
        previous = self._rates.get(name)
        rates: dict[str, float | None] = {}
        if previous is not None and ts > previous.ts:
            for key, value in counters.items():
                before = previous.counters.get(key)
                # a restarted device counts from 0 again: no rate for that interval
                if before is not None and value >= before:
                    rates[_RATE_FIELDS[key]] = round((value - before) / (ts - previous.ts), 2)
        elif previous is not None:
            rates = previous.rates
        self._rates[name] = _Rates(ts=ts, counters=counters, rates=rates)

    # -- documents out (the event loop, under the server's lock) --------------------------------------
    def device(self, name: str, now: float) -> dict[str, Any]:
        """One device's row: ``lepton status``'s fields plus counters and rates."""
        reports = self.view.devices[name]
        row = device_row(name, reports.status, reports.telemetry, now, raw=False)
        telemetry = _dict(reports.telemetry)
        rates = self._rates.get(name)
        row.update({"captured": _int(telemetry.get("captured")), "acked": _int(telemetry.get("acked")),
                    "escalated": _escalated(telemetry)})
        for key in _RATE_FIELDS.values():
            row[key] = rates.rates.get(key) if rates is not None else None
        return row

    def workers(self, now: float) -> list[dict[str, Any]]:
        return [worker_row(name, r.status, now, raw=False) for name, r in sorted(self.view.workers.items())]

    def models(self) -> list[dict[str, Any]]:
        """Per model: its retained manifest (unverified, for display) and how many devices serve each
        version: the rollout's progress."""
        serving: dict[str, dict[str, int]] = {}
        for reports in self.view.devices.values():
            status = _dict(reports.status)
            name = clean_text(status.get("model"))
            if name is None:
                continue
            version = _int(status.get("model_version"))
            key = "none" if version is None else str(version)
            per = serving.setdefault(name, {})
            if key in per or len(per) < MAX_VERSIONS:
                per[key] = per.get(key, 0) + 1
        names = sorted(set(self.view.models) | set(serving))[:MAX_MODELS]
        out = []
        for name in names:
            info = self.view.models.get(name)
            metrics = {}
            if info is not None:
                for k, v in list(info.metrics.items())[:8]:
                    number = _num(v)
                    if number is not None:
                        metrics[clean_text(str(k)) or "?"] = number
            per = serving.get(name, {})
            out.append({
                "model": clean_text(name) or "?",
                "version": info.version if info else None,
                "size": info.size if info else None,
                "quantization": clean_text(info.quantization) if info else None,
                "metrics": metrics,
                "devices": dict(sorted(per.items(), key=lambda kv: (kv[0] == "none", -_key(kv[0])))),
            })
        return out

    def dead_letters(self) -> list[dict[str, Any]]:
        """The latest dead letters, newest first, each field checked and cut."""
        out = []
        for body in reversed(self.view.dead_letters):
            out.append({
                "ts": _num(body.get("time"), 0.0) or _num(body.get("ts"), 0.0),
                "device": clean_text(body.get("device")),
                "worker": clean_text(body.get("worker")),
                "reason": clean_text(body.get("reason"), MAX_MESSAGE),
                "field": clean_text(body.get("field")),
                "topic": clean_text(body.get("topic"), 160),
                "size": _int(body.get("size")),
            })
        return out

    def summary(self, now: float) -> dict[str, Any]:
        devices = self.view.devices.values()
        workers = self.view.workers.values()
        online = sum(1 for r in devices if _dict(r.status).get("online") is True)
        return {
            "devices": len(self.view.devices),
            "online": online,
            "workers": len(self.view.workers),
            "ingest_rate": round(sum(_num(_dict(r.status).get("samples_per_s"), 0.0) or 0.0 for r in workers), 1),
            "dead_letters_seen": self.view.dead_letters_seen,
            "ignored_messages": self.view.ignored,
            "max_devices": self.max_devices,
        }

    def _point(self, now: float) -> dict[str, Any]:
        """One history point: ingest rate, total spool depth, online devices, dead letters seen, and
        the pooled accuracy of each model version (correct / samples over the devices reporting it)."""
        spool = 0
        pooled: dict[int, list[int]] = {}
        for name, reports in self.view.devices.items():
            status, telemetry = _dict(reports.status), _dict(reports.telemetry)
            depth = _int(telemetry.get("spool_depth"))
            spool += depth if depth is not None else (_int(status.get("spool_depth")) or 0)
            accuracy = status.get("accuracy")
            if isinstance(accuracy, dict):
                for version, entry in list(accuracy.items())[:MAX_VERSIONS]:
                    v = _key(version)
                    correct, samples = _int(_dict(entry).get("correct")), _int(_dict(entry).get("samples"))
                    if v > 0 and correct is not None and samples and correct <= samples:
                        acc = pooled.setdefault(v, [0, 0])
                        acc[0] += correct
                        acc[1] += samples
        newest = sorted(pooled)[-MAX_VERSIONS:]
        summary = self.summary(now)
        return {"t": round(now, 3), "ingest_rate": summary["ingest_rate"], "spool_depth": spool,
                "online": summary["online"], "dead_letters": summary["dead_letters_seen"],
                "accuracy": {str(v): round(pooled[v][0] / pooled[v][1], 4) for v in newest}}

    def tick(self, now: float) -> dict[str, Any] | None:
        """Add a history point when one is due; returns it (None when not due)."""
        if now < self._next_sample:
            return None
        self._next_sample = now + self.sample_s
        point = self._point(now)
        self.history.append(point)
        return point

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything: what ``/api/fleet`` returns and what a page gets when it connects. Changes
        nothing: the pages already connected keep getting their deltas."""
        return {"type": "snapshot", "fleet": self.fleet, "prefix": self.prefix, "ts": round(now, 3),
                "summary": self.summary(now),
                "devices": [self.device(n, now) for n in sorted(self.view.devices)],
                "workers": self.workers(now), "models": self.models(), "dead_letters": self.dead_letters(),
                "history": list(self.history)}

    def delta(self, now: float, point: dict[str, Any] | None = None) -> dict[str, Any]:
        """What changed since the last ``delta`` or ``snapshot``: the rows of devices that reported,
        the devices removed (their retained status cleared), and the small tables whole."""
        devices = [self.device(n, now) for n in sorted(self._dirty) if n in self.view.devices]
        removed = sorted(self._removed)
        changed = self._changed
        out: dict[str, Any] = {"type": "delta", "ts": round(now, 3), "summary": self.summary(now),
                               "devices": devices, "removed": removed}
        if changed & {"worker_status"}:
            out["workers"] = self.workers(now)
        if changed & {"status", "model"}:
            out["models"] = self.models()
        if self.view.dead_letters_seen != self._dead_sent:
            out["dead_letters"] = self.dead_letters()
            self._dead_sent = self.view.dead_letters_seen
        if point is not None:
            out["point"] = point
        self._dirty, self._removed, self._changed = set(), set(), set()
        return out


def _key(version: str) -> int:
    """A reported version key as a number for sorting (``"12"`` -> 12; anything else -> 0)."""
    return int(version) if isinstance(version, str) and version.isascii() and version.isdigit() and \
        len(version) < 19 else 0
