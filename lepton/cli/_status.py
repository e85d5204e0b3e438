"""lepton status: the fleet at a glance, from retained status and telemetry topics alone."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

from lepton._fleetview import MAX_ENTRIES, MAX_PAYLOAD, FleetView
from lepton.cli import _credentials, _exit, _prefix
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

Statuses are written by devices, so they are untrusted: every field is type-checked (a wrong type
shows as "-"), strings are cut to a bounded length, control and bidi characters are shown escaped
(\x1b, \u202e) instead of reaching the terminal, and a message over 64 KiB is ignored and counted.

examples:
  lepton status --broker mqtt://viewer@localhost:1883 --password-file viewer.pw --fleet f1
  lepton status --broker mqtt://localhost:1883 --fleet f1 --json
  lepton status --broker mqtt://localhost:1883 --fleet f1 --watch --interval 2
"""


def register(parser: argparse.ArgumentParser) -> None:
    _credentials.add_broker_arguments(parser, help="broker URL, e.g. mqtt://viewer@host:1883")
    parser.add_argument("--fleet", metavar="F", required=True, help="fleet name (the F in PREFIX/F/...)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table "
                        "(with --watch: one JSON document per line)")
    parser.add_argument("--watch", action="store_true", help="keep watching and redraw until Ctrl-C")
    parser.add_argument("--timeout", metavar="S", type=float, default=3.0,
                        help="longest wait for retained messages before printing (default 3 s)")
    parser.add_argument("--interval", metavar="S", type=float, default=2.0,
                        help="redraw period with --watch (default 2 s)")
    _prefix.add_prefix_argument(parser)
    parser.set_defaults(handler=run)


# ------------------------------------------------------------------------------------------------
# collecting
# ------------------------------------------------------------------------------------------------
def snapshot(view: FleetView, now: float | None = None) -> dict[str, Any]:
    """The JSON document of ``lepton status --json``: typed, bounded rows per device and worker."""
    now = time.time() if now is None else now
    devices = [device_row(name, e.status, e.telemetry, now) for name, e in sorted(view.devices.items())]
    workers = [worker_row(name, e.status, now) for name, e in sorted(view.workers.items())]
    return {"fleet": view.fleet, "ts": round(now, 3), "devices": devices, "workers": workers,
            "ignored_messages": view.ignored}


MAX_TEXT = 64  # ids, model names, reason codes, worker fields
MAX_MESSAGE = 300  # a model error's message
#: raw status/telemetry kept in --json: nesting depth and items per object/list
MAX_DEPTH, MAX_ITEMS = 4, 32
#: control (Cc: ESC, CR, BEL, ...), format (Cf: bidi overrides, zero-width), line/paragraph separators,
#: surrogates, private-use and unassigned code points: shown escaped, never written to a terminal
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_INT_MAX = 2**63 - 1


def clean_text(value: Any, limit: int = MAX_TEXT) -> str | None:
    r"""A device-supplied string made safe to print: escaped control characters, at most ``limit`` chars.

    >>> clean_text("\x1b[2Jok\u202e")
    '\\x1b[2Jok\\u202e'
    >>> clean_text(["not", "a", "string"]) is None
    True
    """
    if not isinstance(value, str):
        return None
    out: list[str] = []
    size = 0
    for ch in value[: limit + 1]:  # never look at more than we may show
        piece = ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _UNSAFE else ch
        out.append(piece)
        size += len(piece)
        if size > limit:
            break
    text = "".join(out)
    if len(text) > limit or len(value) > limit:
        return text[: limit - 1] + "\u2026"
    return text


def _num(value: Any, lo: float | None = None, hi: float | None = None) -> float | None:
    """A finite number within [lo, hi], else None (bools, strings, NaN, Infinity and 10**400 are not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    if not math.isfinite(number) or (lo is not None and number < lo) or (hi is not None and number > hi):
        return None
    return number


def _int(value: Any, lo: int = 0, hi: int = _INT_MAX) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def plain(value: Any, depth: int = 0) -> Any:
    """A bounded, typed copy of a device's report for --json: clean strings, finite numbers, cut lists."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return _int(value, -_INT_MAX, _INT_MAX)
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, str):
        return clean_text(value, MAX_MESSAGE)
    if depth >= MAX_DEPTH:
        return None
    if isinstance(value, dict):
        items = list(value.items())[:MAX_ITEMS]
        return {clean_text(str(k)) or "?": plain(v, depth + 1) for k, v in items}
    if isinstance(value, list):
        return [plain(v, depth + 1) for v in value[:MAX_ITEMS]]
    return None


def device_row(name: str, status: dict | None, telemetry: dict | None, now: float, *,
               raw: bool = True) -> dict[str, Any]:
    """One device's row; field names per docs/protocol.md ("Status", "Telemetry", "Predictions").

    Every field is checked for its type and range: a field of the wrong type is shown as missing.
    ``raw=False`` leaves out the bounded copies of both reports (``status``, ``telemetry``).
    """
    status, telemetry = _dict(status), _dict(telemetry)
    version = _int(status.get("model_version"))
    if version is None:
        version = _int(telemetry.get("model_version"))
    accuracy = samples = None
    acc = status.get("accuracy")
    if isinstance(acc, dict):
        entry = _dict(acc.get(str(version))) if version is not None else {}
        accuracy, samples = _num(entry.get("accuracy"), 0.0, 1.0), _int(entry.get("samples"))
    else:
        accuracy = _num(acc, 0.0, 1.0)
    error = status.get("model_error")
    if isinstance(error, dict):
        error_reason = clean_text(error.get("reason"))
        error_message = clean_text(error.get("message"), MAX_MESSAGE)
    else:
        error_reason, error_message = (clean_text(error) or None), None
    s_ts, t_ts = _num(status.get("ts"), 0.0), _num(telemetry.get("ts"), 0.0)
    stamps = [t for t in (s_ts, t_ts) if t is not None]
    last_seen = max(stamps) if stamps else None
    # the fresher of the two reports tells the spool depth
    t_depth, s_depth = _int(telemetry.get("spool_depth")), _int(status.get("spool_depth"))
    spool_depth = t_depth if t_depth is not None and (s_ts is None or (t_ts or 0) >= s_ts) else s_depth
    return {
        "device": clean_text(name) or "?",
        "online": _bool(status.get("online")),
        "model": clean_text(status.get("model")),
        "model_version": version,
        "accuracy": accuracy,
        "accuracy_samples": samples,
        "inference_ms_p50": _num(telemetry.get("inference_ms_p50"), 0.0),
        "inference_ms_p99": _num(telemetry.get("inference_ms_p99"), 0.0),
        "inferences": _int(telemetry.get("inferences")),
        "swaps": _int(telemetry.get("swaps")),
        "spool_depth": spool_depth,
        "last_seen": last_seen,
        "last_seen_s": round(now - last_seen, 1) if last_seen is not None else None,
        "model_error": error_reason,
        "model_error_message": error_message,
        **({"status": plain(status) or None, "telemetry": plain(telemetry) or None} if raw else {}),
    }


# what an ingest worker reports first (lepton/cloud/_ingest.py); timestamps and ids are not shown
_WORKER_FIRST = ("samples_per_s", "stored", "duplicates", "dead_letters", "queue", "errors", "train_runs",
                 "train_running", "train_last_exit")
_WORKER_SKIP = ("v", "ts", "online", "worker", "fleet", "group", "started_at", "last_write",
                "train_last_started")


def _scalar(value: Any) -> int | float | str | bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _int(value, -_INT_MAX, _INT_MAX)
    if isinstance(value, float):
        return _num(value)
    return clean_text(value)


def worker_row(name: str, status: dict | None, now: float, *, raw: bool = True) -> dict[str, Any]:
    status = _dict(status)
    ts = _num(status.get("ts"), 0.0)
    scalars: dict[str, Any] = {}
    for k, v in list(status.items())[: 4 * MAX_ITEMS]:
        if k in _WORKER_SKIP or not isinstance(v, (int, float, str, bool)):
            continue
        value = _scalar(v)
        if value is not None:
            scalars[clean_text(k) or "?"] = value
    summary = {k: scalars.pop(k) for k in _WORKER_FIRST if k in scalars}
    summary.update(sorted(scalars.items())[:MAX_ITEMS])
    return {"worker": clean_text(name) or "?", "online": _bool(status.get("online")), "last_seen": ts,
            "last_seen_s": round(now - ts, 1) if ts is not None else None, "summary": summary,
            **({"status": plain(status) or None} if raw else {})}


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
        out.append(f"({snapshot['ignored_messages']} message(s) ignored: not protocol v1 JSON, over "
                   f"{MAX_PAYLOAD // 1024} KiB, or beyond {MAX_ENTRIES} devices)")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
class _Watch:
    """The status shell: paho's network thread feeds messages to the view; the main thread reads
    :meth:`snapshot`. ``_lock`` guards ``view`` and ``last_message``, the only state both threads touch."""

    def __init__(self, view: FleetView) -> None:
        self.view = view
        self.last_message = time.monotonic()
        self._lock = threading.Lock()

    def on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        with self._lock:
            self.last_message = time.monotonic()
            self.view.apply(message.topic, message.payload, now=time.time())

    def touch(self) -> None:
        with self._lock:
            self.last_message = time.monotonic()

    def quiet_for(self) -> float:
        with self._lock:
            return time.monotonic() - self.last_message

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return snapshot(self.view)


@contextlib.contextmanager
def watch(url: str, fleet: str, *, timeout: float = 3.0, quiet: float = 0.3,
          prefix: str = "lepton") -> Iterator[_Watch]:
    """Subscribe and gather retained messages until the broker is quiet (at most ``timeout`` s), then
    yield the watch; live messages keep updating it until the ``with`` block ends and the client
    disconnects."""
    from lepton.errors import BrokerConnectionError
    from lepton.protocol import BrokerURL, short_lived_client

    broker = BrokerURL.parse(url)
    state = _Watch(FleetView(fleet=fleet, prefix=prefix))
    subscribed = threading.Event()
    filters = state.view.filters()

    def on_connect(c, userdata, flags, reason_code, properties):  # noqa: ANN001
        if not reason_code.is_failure:
            c.subscribe(filters)

    def on_subscribe(c, userdata, mid, reason_codes, properties):  # noqa: ANN001
        subscribed.set()

    with short_lived_client(broker, "status", on_connect=on_connect, on_subscribe=on_subscribe,
                            on_message=state.on_message):
        start = time.monotonic()
        if not subscribed.wait(max(timeout, 1.0)):
            raise BrokerConnectionError(
                f"{broker} did not acknowledge the subscription within {timeout:.0f}s", url=str(broker))
        state.touch()  # the retained messages follow the SUBACK: wait for quiet from here
        while time.monotonic() - start < timeout and state.quiet_for() < quiet:
            time.sleep(0.02)
        yield state


def collect(url: str, fleet: str, *, timeout: float = 3.0, quiet: float = 0.3,
            prefix: str = "lepton") -> dict[str, Any]:
    """The fleet's snapshot (see :func:`snapshot`) from its retained messages; see :func:`watch`."""
    with watch(url, fleet, timeout=timeout, quiet=quiet, prefix=prefix) as state:
        return state.snapshot()


def run(args: argparse.Namespace) -> int:
    from lepton.protocol import validate_id

    try:
        validate_id(args.fleet, kind="fleet")
    except ValueError as exc:
        raise ConfigError(f"bad --fleet: {exc}") from None
    if args.timeout <= 0 or args.interval <= 0:
        raise ConfigError("--timeout and --interval must be > 0 seconds")
    prefix = _prefix.resolve_prefix(args)
    broker = _credentials.broker_url(args, "status")
    with watch(broker, args.fleet, timeout=args.timeout, prefix=prefix) as state:
        if not args.watch:
            _emit(state.snapshot(), args.json, clear=False)
            return _exit.OK
        try:
            while True:
                tty = sys.stdout.isatty()
                _emit(state.snapshot(), args.json, clear=not args.json and tty)
                if not args.json and not tty:
                    print(flush=True)  # a blank line between frames in a log
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return _exit.OK


def _emit(snapshot: dict[str, Any], as_json: bool, *, clear: bool) -> None:
    if as_json:
        print(json.dumps(snapshot, sort_keys=True, default=str), flush=True)
        return
    text = render(snapshot)
    if clear:
        sys.stdout.write("\x1b[2J\x1b[H")
    print(text, flush=True)
