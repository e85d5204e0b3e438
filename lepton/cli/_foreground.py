"""The foreground loop of the long-running cloud commands (``lepton worker``, ``lepton serve``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any


def run_until_signal(worker: Any, args: argparse.Namespace, progress: Callable[[dict[str, Any]], str]) -> bool:
    """Start ``worker``, report its status until SIGINT/SIGTERM, stop it; return whether stderr is a tty.

    Every ``--status-interval`` (at least 0.5 s) with ``--json``, one status per line on stdout; else once
    a second ``progress(status)`` on stderr (rewritten in place on a terminal); nothing with ``--quiet``.
    """
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ANN001, ARG001
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    worker.start()
    tty = sys.stderr.isatty()
    try:
        while not stop.wait(1.0 if not args.json else max(args.status_interval, 0.5)):
            if args.quiet:
                continue
            st = worker.status()
            if args.json:
                print(json.dumps(st, sort_keys=True), flush=True)
            else:
                line = "\r" + progress(st)
                print(line if tty else line.strip(), end="" if tty else "\n", file=sys.stderr, flush=True)
    finally:
        worker.stop()
    return tty
