#!/usr/bin/env python3
"""Deployable ingest worker: one process per container/VM, configured by environment or flags.

    LEPTON_BROKER=mqtt://w1:secret@broker:1883 LEPTON_FLEET=f1 LEPTON_DATA=/data \
        python cloud_workers/ingest_worker.py --name w1 [--group ingest] [--prefix acme/site-3/lepton]

Credentials: the whole URL in $LEPTON_BROKER (a process's environment is readable by its own user only),
or --broker mqtt://w1@broker:1883 with the password in $LEPTON_PASSWORD or a 0600 --password-file
(e.g. a mounted container secret). A password written in --broker works but every local user can read it.

Workers on several machines: the exactly-once index in PostgreSQL, LEPTON_INDEX=postgresql://lepton@db/lepton
(or --index) with the password in $PGPASSWORD, and LEPTON_DATA a folder every worker mounts (docs/dataset.md).

It is the Python API (lepton.cloud.IngestWorker) with the deployment concerns around it: settings from
the environment (12-factor), logs on stderr, SIGTERM stops cleanly (what container runtimes send), and
exit codes a supervisor can act on (lepton.exitcodes: 2 fix the configuration, e.g. a bad --fleet or
--data; 3 broker unreachable, retry later).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from lepton import exitcodes
from lepton.cli._prefix import add_prefix_argument, resolve_prefix
from lepton.cloud import IngestWorker, WorkerConfig
from lepton.errors import BrokerConnectionError, ConfigError
from lepton.protocol import resolve_broker

log = logging.getLogger("lepton.cloud_workers.ingest")


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=None, help="broker URL (env LEPTON_BROKER)")
    p.add_argument(
        "--password-file",
        default=None,
        help="file (mode 0600) holding the broker password (env LEPTON_PASSWORD_FILE, or LEPTON_PASSWORD)",
    )
    p.add_argument("--fleet", default=env.get("LEPTON_FLEET"), help="fleet (env LEPTON_FLEET)")
    add_prefix_argument(p)
    p.add_argument("--data", default=env.get("LEPTON_DATA"), help="dataset root (env LEPTON_DATA)")
    p.add_argument(
        "--name", default=env.get("LEPTON_WORKER_NAME", "worker"), help="worker name (env LEPTON_WORKER_NAME)"
    )
    p.add_argument(
        "--group", default=env.get("LEPTON_GROUP"), help="shared-subscription group (env LEPTON_GROUP)"
    )
    p.add_argument(
        "--index", default=env.get("LEPTON_INDEX"),
        help="exactly-once index postgresql://USER@HOST[:PORT]/DB (env LEPTON_INDEX, password in "
        "$PGPASSWORD); default DATA/FLEET/index.sqlite",
    )
    p.add_argument("--batch-ms", type=float, default=float(env.get("LEPTON_BATCH_MS", "100")))
    p.add_argument("--log-level", default=env.get("LEPTON_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        prefix = resolve_prefix(args)
        resolved = resolve_broker(args.broker, password_file=args.password_file, environ=env)
    except ConfigError as exc:
        print(f"ingest_worker: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    missing = [f for f in ("fleet", "data") if not getattr(args, f)]
    if resolved is None or missing:
        flag = "broker" if resolved is None else missing[0]
        print(f"ingest_worker: error: set --{flag} or LEPTON_{flag.upper()}", file=sys.stderr)
        return exitcodes.USAGE
    if resolved.warning:
        print(f"ingest_worker: warning: {resolved.warning}", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        worker = IngestWorker(
            WorkerConfig(
                broker=resolved.url.secret_url(),
                fleet=args.fleet,
                prefix=prefix,
                data=args.data,
                name=args.name,
                group=args.group,
                index=args.index,
                batch_ms=args.batch_ms,
            )
        )
        worker.start()
    except ConfigError as exc:
        print(f"ingest_worker: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except BrokerConnectionError as exc:
        print(f"ingest_worker: error: {exc}", file=sys.stderr)
        return exitcodes.BROKER
    try:
        while not stop.wait(10):
            log.info("status %s", worker.status())
    finally:
        worker.stop()
    log.info("stopped: %s", worker.status())
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
