"""lepton dashboard: the fleet in the browser, live; /api/fleet JSON and /metrics for Prometheus."""

from __future__ import annotations

import argparse
import sys

from lepton.cli import _credentials, _exit, _prefix
from lepton.errors import ConfigError

DESCRIPTION = """\
Serve one page that shows a fleet live: which devices are online, the model version each serves
(how far a rollout has got), edge accuracy, spool depth, capture/ack/escalation rates, model errors,
the ingest workers (rate, stored, duplicates, dead letters, dataset size), the models (versions,
devices per version, size, int8 or fp32, metrics), the latest dead letters, and charts of ingest
rate, spool depth and accuracy per model version over a rolling window kept in memory (--history).

One MQTT connection, with viewer credentials (broker/add-user.sh viewer FLEET NAME, or lepton broker
--add-user NAME --role viewer), subscribes to the fleet's status, telemetry, manifests and dead
letters. The browser gets JSON over Server-Sent Events, never the broker password. The page loads
nothing from elsewhere (no CDN) and shows device-supplied strings as text only.

Besides the page: GET /api/fleet (one JSON snapshot) and GET /metrics (Prometheus text: per-device
gauges such as lepton_device_online, lepton_device_spool_depth, lepton_device_model_version, worker
counters). At most --max-devices devices are tracked (more are ignored and counted), which bounds
the label cardinality of /metrics too. See docs/dashboards.md for Prometheus, Grafana and Node-RED.

The server has no login: it listens on 127.0.0.1 unless --host says otherwise; put it behind a
reverse proxy with authentication before exposing it.

examples:
  lepton dashboard --broker mqtt://viewer@localhost:1883 --password-file viewer.pw --fleet f1
  lepton dashboard --broker mqtt://viewer@gw:1883 --fleet f1 --host 0.0.0.0 --port 8050
"""


def register(parser: argparse.ArgumentParser) -> None:
    _credentials.add_broker_arguments(parser, help="broker URL, e.g. mqtt://viewer@host:1883")
    parser.add_argument("--fleet", metavar="F", required=True, help="fleet name (the F in PREFIX/F/...)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050; 0 = any)")
    parser.add_argument("--max-devices", metavar="N", type=int, default=2000,
                        help="devices tracked at most (default 2000); more are ignored and counted")
    parser.add_argument("--history", metavar="S", type=float, default=900.0,
                        help="seconds of chart history kept in memory (default 900)")
    _prefix.add_prefix_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        from lepton.dashboard import DashboardServer
    except ModuleNotFoundError as exc:
        raise ConfigError(f"lepton dashboard needs {exc.name}: pip install 'lepton[dashboard]'") from None
    from lepton.protocol import validate_id

    try:
        validate_id(args.fleet, kind="fleet")
    except ValueError as exc:
        raise ConfigError(f"bad --fleet: {exc}") from None
    prefix = _prefix.resolve_prefix(args)
    broker = _credentials.broker_url(args, "dashboard")
    server = DashboardServer(broker, args.fleet, prefix=prefix, host=args.host, port=args.port,
                             max_devices=args.max_devices, history_s=args.history)
    server.start()
    print(f"lepton dashboard: fleet {args.fleet} on {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return _exit.OK
    return _exit.OK
