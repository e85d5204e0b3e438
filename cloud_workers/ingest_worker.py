#!/usr/bin/env python3
"""Deployable ingest worker: one process per container/VM, configured by environment or flags.

    LEPTON_BROKER=mqtt://w1:secret@broker:1883 LEPTON_FLEET=f1 LEPTON_DATA=/data \
        python cloud_workers/ingest_worker.py --name w1 [--group ingest]

It is the Python API (lepton.cloud.IngestWorker) with the deployment concerns around it: settings from
the environment (12-factor), logs on stderr, SIGTERM stops cleanly (what container runtimes send), and
exit codes a supervisor can act on (2: fix the configuration, 3: broker unreachable; retry later).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from lepton.cloud import IngestWorker, WorkerConfig
from lepton.errors import BrokerConnectionError, ConfigError

log = logging.getLogger("lepton.cloud_workers.ingest")


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=env.get("LEPTON_BROKER"), help="broker URL (env LEPTON_BROKER)")
    p.add_argument("--fleet", default=env.get("LEPTON_FLEET"), help="fleet (env LEPTON_FLEET)")
    p.add_argument("--data", default=env.get("LEPTON_DATA"), help="dataset root (env LEPTON_DATA)")
    p.add_argument(
        "--name", default=env.get("LEPTON_WORKER_NAME", "worker"), help="worker name (env LEPTON_WORKER_NAME)"
    )
    p.add_argument(
        "--group", default=env.get("LEPTON_GROUP"), help="shared-subscription group (env LEPTON_GROUP)"
    )
    p.add_argument("--batch-ms", type=float, default=float(env.get("LEPTON_BATCH_MS", "100")))
    p.add_argument("--log-level", default=env.get("LEPTON_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    missing = [f for f in ("broker", "fleet", "data") if not getattr(args, f)]
    if missing:
        print(f"ingest_worker: error: set --{missing[0]} or LEPTON_{missing[0].upper()}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        worker = IngestWorker(
            WorkerConfig(
                broker=args.broker,
                fleet=args.fleet,
                data=args.data,
                name=args.name,
                group=args.group,
                batch_ms=args.batch_ms,
            )
        )
        worker.start()
    except ConfigError as exc:
        print(f"ingest_worker: error: {exc}", file=sys.stderr)
        return 2
    except BrokerConnectionError as exc:
        print(f"ingest_worker: error: {exc}", file=sys.stderr)
        return 3
    try:
        while not stop.wait(10):
            log.info("status %s", worker.status())
    finally:
        worker.stop()
    log.info("stopped: %s", worker.status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
