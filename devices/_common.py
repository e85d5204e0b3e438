"""What every firmware-style node shares: the connection flags and running an agent to an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from lepton.cli._prefix import add_prefix_argument, resolve_prefix
from lepton.device import DeviceAgent, DeviceConfig
from lepton.errors import BrokerConnectionError, ConfigError
from lepton.exitcodes import BROKER, OK, UNACKED, USAGE  # as `lepton device`: one table, lepton.exitcodes
from lepton.protocol import resolve_broker


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", help="mqtt://DEVICE_ID@HOST:PORT (env LEPTON_BROKER: a whole URL)")
    p.add_argument(
        "--password-file",
        help="file (mode 0600) holding the broker password; or set LEPTON_PASSWORD. A password written "
        "in --broker works but every local user can read it in /proc/PID/cmdline",
    )
    p.add_argument("--fleet", required=True)
    add_prefix_argument(p)
    p.add_argument("--id", required=True, dest="device_id")
    p.add_argument("--spool", help="spool directory (default ~/.lepton/spool/FLEET/ID)")
    p.add_argument("--rate", type=float, help="samples per second")
    p.add_argument("--limit", type=int, help="stop after N samples are captured and acknowledged")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    return p


def run(args: argparse.Namespace, *, name: str, **settings) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        resolved = resolve_broker(args.broker, password_file=args.password_file, environ=os.environ)
        if resolved is None:
            raise ConfigError("set --broker mqtt://DEVICE_ID@HOST:PORT (or LEPTON_BROKER)")
        if resolved.warning:
            print(f"{name}: warning: {resolved.warning}", file=sys.stderr)
        agent = DeviceAgent(
            DeviceConfig(
                broker=resolved.url,
                fleet=args.fleet,
                prefix=resolve_prefix(args),
                device_id=args.device_id,
                spool_dir=args.spool,
                rate_hz=args.rate,
                limit=args.limit,
                **settings,
            )
        )
        summary = agent.run()
    except ConfigError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return USAGE
    except BrokerConnectionError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return BROKER
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True))
    else:
        print(
            f"{name}: captured {summary.captured}, acked {summary.acked}, spool {summary.spool_depth}",
            file=sys.stderr,
        )
    return OK if summary.ok else UNACKED
