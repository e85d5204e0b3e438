"""lepton status: the fleet at a glance, from retained status and telemetry topics alone."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lepton.cli import _exit
from lepton.errors import ConfigError

DESCRIPTION = """\
Show every device and worker of a fleet from what the broker retains: each device's status
(online, model version, model error, accuracy per model version) and its latest telemetry
(inference latency, spool depth), and each worker's status. Nothing but MQTT is needed: a viewer
account (broker/add-user.sh viewer FLEET NAME) is enough.

The command subscribes, collects the retained messages until the broker goes quiet (at most
--timeout seconds), prints one table (or --json) and exits. --watch keeps the subscription open
and redraws every --interval seconds until Ctrl-C.

columns: online (yes/no from the retained status; the Last Will turns it to no), model (served
version), acc (running accuracy of the served version on labelled samples, with the sample count),
p50/p99 ms (inference latency), spool (samples waiting for the cloud's ack), seen (age of the newest
status or telemetry message), error (the reason code of the last rejected model).

examples:
  lepton status --broker mqtt://viewer:secret@localhost:1883 --fleet f1
  lepton status --broker mqtt://localhost:1883 --fleet f1 --json
  lepton status --broker mqtt://localhost:1883 --fleet f1 --watch --interval 2
"""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", metavar="URL", required=True, help="broker URL, e.g. mqtt://user:password@host:1883")
    parser.add_argument("--fleet", metavar="F", required=True, help="fleet name (the F in lepton/F/...)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table "
                        "(with --watch: one JSON document per line)")
    parser.add_argument("--watch", action="store_true", help="keep watching and redraw until Ctrl-C")
    parser.add_argument("--timeout", metavar="S", type=float, default=3.0,
                        help="longest wait for retained messages before printing (default 3 s)")
    parser.add_argument("--interval", metavar="S", type=float, default=2.0,
                        help="redraw period with --watch (default 2 s)")
    parser.add_argument("--prefix", default="lepton", help="topic prefix (default lepton)")
    parser.set_defaults(handler=run)


# ------------------------------------------------------------------------------------------------
# collecting
# ------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    status: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    received: float = 0.0  # wall clock of the newest message


@dataclass
class FleetView:
    """What the retained (and, while watching, live) messages say about one fleet."""

    fleet: str
    devices: dict[str, _Entry] = field(default_factory=dict)
    workers: dict[str, _Entry] = field(default_factory=dict)
    ignored: int = 0  # payloads that are not protocol v1 JSON
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_message: float = 0.0

    def apply(self, topics, topic: str, payload: bytes) -> None:
        from lepton.errors import ProtocolError
        from lepton.protocol import decode_json

        try:
            parsed = topics.parse(topic)
        except ProtocolError:
            self.ignored += 1
            return
        if parsed.channel == "worker_status":
            book, name, kind = self.workers, parsed.worker, "status"
        elif parsed.channel in ("status", "telemetry"):
            book, name, kind = self.devices, parsed.device, parsed.channel
        else:
            return
        with self.lock:
            self.last_message = time.monotonic()
            if not payload:  # a cleared retained message: the device or worker was removed
                entry = book.get(name)
                if entry is not None:
                    setattr(entry, kind, None)
                    if entry.status is None and entry.telemetry is None:
                        del book[name]
                return
            try:
                body = decode_json(payload, field=kind)
            except ProtocolError:
                self.ignored += 1
                return
            entry = book.setdefault(name, _Entry())
            setattr(entry, kind, body)
            entry.received = max(entry.received, time.time())

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        with self.lock:
            devices = [device_row(name, e.status, e.telemetry, now)
                       for name, e in sorted(self.devices.items())]
            workers = [worker_row(name, e.status, now) for name, e in sorted(self.workers.items())]
        return {"fleet": self.fleet, "ts": round(now, 3), "devices": devices, "workers": workers,
                "ignored_messages": self.ignored}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def device_row(name: str, status: dict | None, telemetry: dict | None, now: float) -> dict[str, Any]:
    """One device's row; field names per docs/protocol.md ("Status", "Telemetry", "Predictions")."""
    status, telemetry = status or {}, telemetry or {}
    version = status.get("model_version")
    if not isinstance(version, int):
        version = telemetry.get("model_version") if isinstance(telemetry.get("model_version"), int) else None
    accuracy = samples = None
    acc = status.get("accuracy")
    if isinstance(acc, dict) and version is not None and isinstance(acc.get(str(version)), dict):
        accuracy, samples = _num(acc[str(version)].get("accuracy")), acc[str(version)].get("samples")
    elif _num(acc) is not None:
        accuracy = _num(acc)
    latency = telemetry.get("inference_ms") if isinstance(telemetry.get("inference_ms"), dict) else {}
    error = status.get("model_error")
    if isinstance(error, dict):
        error_reason, error_message = error.get("reason"), error.get("message")
    else:
        error_reason, error_message = (str(error) if error else None), None
    stamps = [t for t in (_num(status.get("ts")), _num(telemetry.get("ts"))) if t is not None]
    last_seen = max(stamps) if stamps else None
    # the fresher of the two reports tells the spool depth
    t_ts, s_ts = _num(telemetry.get("ts")), _num(status.get("ts"))
    spool_src = telemetry if "spool_depth" in telemetry and (s_ts is None or (t_ts or 0) >= s_ts) else status
    online = status.get("online")
    return {
        "device": name,
        "online": online if isinstance(online, bool) else None,
        "model": status.get("model") if isinstance(status.get("model"), str) else None,
        "model_version": version,
        "accuracy": accuracy,
        "accuracy_samples": samples if isinstance(samples, int) else None,
        "inference_ms_p50": _num(latency.get("p50")),
        "inference_ms_p99": _num(latency.get("p99")),
        "inferences": _int(telemetry.get("inferences")),
        "swaps": _int(telemetry.get("swaps")),
        "spool_depth": _int(spool_src.get("spool_depth")),
        "last_seen": last_seen,
        "last_seen_s": round(now - last_seen, 1) if last_seen is not None else None,
        "model_error": error_reason,
        "model_error_message": error_message,
        "status": status or None,
        "telemetry": telemetry or None,
    }


# what an ingest worker reports first (lepton/cloud/_ingest.py); timestamps and ids are not shown
_WORKER_FIRST = ("samples_per_s", "stored", "duplicates", "dead_letters", "queue", "errors", "train_runs",
                 "train_running", "train_last_exit")
_WORKER_SKIP = ("v", "ts", "online", "worker", "fleet", "group", "started_at", "last_write",
                "train_last_started")


def worker_row(name: str, status: dict | None, now: float) -> dict[str, Any]:
    status = status or {}
    ts = _num(status.get("ts"))
    online = status.get("online")
    scalars = {k: v for k, v in status.items()
               if k not in _WORKER_SKIP and isinstance(v, (int, float, str, bool))}
    summary = {k: scalars.pop(k) for k in _WORKER_FIRST if k in scalars}
    summary.update(sorted(scalars.items()))
    return {"worker": name, "online": online if isinstance(online, bool) else None, "last_seen": ts,
            "last_seen_s": round(now - ts, 1) if ts is not None else None, "summary": summary,
            "status": status or None}


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------
def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render(snapshot: dict[str, Any]) -> str:
    devices, workers = snapshot["devices"], snapshot["workers"]
    online = sum(1 for d in devices if d["online"])
    out = [f"fleet {snapshot['fleet']}: {len(devices)} device(s), {online} online, {len(workers)} worker(s)"]
    if devices:
        rows = []
        for d in devices:
            acc = "-" if d["accuracy"] is None else f"{d['accuracy']:.3f}" + (
                f" ({d['accuracy_samples']})" if d["accuracy_samples"] is not None else "")
            version = f"v{d['model_version']}" if d["model_version"] else "-"
            rows.append([d["device"], _yes(d["online"]), version,
                         acc, _ms(d["inference_ms_p50"]), _ms(d["inference_ms_p99"]),
                         "-" if d["spool_depth"] is None else str(d["spool_depth"]), _age(d["last_seen_s"]),
                         d["model_error"] or ""])
        out.append("")
        out += _table(["device", "online", "model", "acc", "p50 ms", "p99 ms", "spool", "seen", "error"],
                      rows, right={2, 3, 4, 5, 6, 7})
        errors = [d for d in devices if d["model_error"] and d["model_error_message"]]
        for d in errors:
            out.append(f"  {d['device']}: {d['model_error']}: {d['model_error_message']}")
    else:
        out.append("no device has published a retained status on this fleet yet")
    if workers:
        rows = [[w["worker"], _yes(w["online"]), _age(w["last_seen_s"]),
                 " ".join(f"{k}={v}" for k, v in list(w["summary"].items())[:8])] for w in workers]
        out.append("")
        out += _table(["worker", "online", "seen", "status"], rows, right={2})
    if snapshot.get("ignored_messages"):
        out.append(f"({snapshot['ignored_messages']} message(s) ignored: not protocol v1 JSON)")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def collect(url: str, fleet: str, *, timeout: float = 3.0, quiet: float = 0.3, prefix: str = "lepton",
            keep_open: bool = False):
    """Subscribe and gather retained messages until the broker is quiet; return ``(view, client)``.

    The client is disconnected unless ``keep_open`` (then live messages keep updating the view).
    """
    import uuid

    from lepton.errors import BrokerConnectionError
    from lepton.protocol import BrokerURL, Topics, connect, new_client

    broker = BrokerURL.parse(url)
    topics = Topics(fleet=fleet, prefix=prefix)
    view = FleetView(fleet=fleet)
    subscribed = threading.Event()
    filters = [(topics.all_status(), 1), (topics.all_devices("telemetry"), 0)]
    client = new_client(broker, client_id=f"lepton-status-{uuid.uuid4().hex[:10]}")

    def on_connect(c, userdata, flags, reason_code, properties):  # noqa: ANN001
        if not reason_code.is_failure:
            c.subscribe(filters)

    def on_subscribe(c, userdata, mid, reason_codes, properties):  # noqa: ANN001
        subscribed.set()

    def on_message(c, userdata, message):  # noqa: ANN001
        view.apply(topics, message.topic, message.payload)

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    connect(client, broker)
    start = time.monotonic()
    if not subscribed.wait(max(timeout, 1.0)):
        client.disconnect()
        client.loop_stop()
        raise BrokerConnectionError(f"{broker} did not acknowledge the subscription within {timeout:.0f}s",
                                    url=str(broker))
    view.last_message = max(view.last_message, time.monotonic())
    while time.monotonic() - start < timeout:
        if time.monotonic() - view.last_message >= quiet:
            break
        time.sleep(0.02)
    if not keep_open:
        client.disconnect()
        client.loop_stop()
    return view, client


def run(args: argparse.Namespace) -> int:
    from lepton.protocol import validate_id

    try:
        validate_id(args.fleet, kind="fleet")
    except ValueError as exc:
        raise ConfigError(f"bad --fleet: {exc}") from None
    if args.timeout <= 0 or args.interval <= 0:
        raise ConfigError("--timeout and --interval must be > 0 seconds")
    view, client = collect(args.broker, args.fleet, timeout=args.timeout, prefix=args.prefix,
                           keep_open=args.watch)
    if not args.watch:
        _emit(view.snapshot(), args.json, clear=False)
        return _exit.OK
    try:
        while True:
            tty = sys.stdout.isatty()
            _emit(view.snapshot(), args.json, clear=not args.json and tty)
            if not args.json and not tty:
                print(flush=True)  # a blank line between frames in a log
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return _exit.OK
    finally:
        client.disconnect()
        client.loop_stop()


def _emit(snapshot: dict[str, Any], as_json: bool, *, clear: bool) -> None:
    if as_json:
        print(json.dumps(snapshot, sort_keys=True, default=str), flush=True)
        return
    text = render(snapshot)
    if clear:
        sys.stdout.write("\x1b[2J\x1b[H")
    print(text, flush=True)
