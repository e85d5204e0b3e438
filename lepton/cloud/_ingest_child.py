"""The ingest worker's store child: the store side in a process of its own, out of paho's GIL.

The MQTT process (paho's network thread, the batching and the acks) and the store (validation,
msgpack, Arrow, Parquet + fsync, the index) used to share one GIL, so every store second was a
second paho could not receive. :class:`StoreChild` forks one child (``fork``: it inherits the loaded
modules and the worker's settings, and starts in milliseconds) that runs a
:class:`~lepton.cloud._ingest_runner.StoreRunner` on its own index connection. The parent sends
whole batches of raw messages through a pipe; the child answers each with its outcomes, and with
``("state", ...)`` whenever its retry state changes.

Lifetimes: the child holds no copy of the parent's end of the pipe, so when the parent dies (even
kill -9) its ``recv`` ends and it exits; it also checks ``getppid`` while retrying. When the child
dies, the parent's ``recv`` ends: the worker stops without acking what the child had not finished
(the broker redelivers it), logs it as critical and ``run_forever`` exits with the child's code.

Wire of the pipe (both ends are this module): parent -> child ``("batch", [(topic, payload,
received_at, retain), ...])`` or ``("stop",)``; child -> parent ``("state", StoreState)``,
``("done", [Outcome, ...], quarantine usage)`` and, after ``stop``, ``("bye",)``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from lepton.cloud._ingest_runner import Msg, StoreRunner

log = logging.getLogger(__name__)

__all__ = ["StoreChild"]


class StoreChild:
    """Parent-side handle of the store child. ``make_runner(on_state)`` is called in the child (after
    the fork) to build its :class:`StoreRunner`; ``close()`` is called there on the way out."""

    def __init__(self, make_runner: Callable[[Callable[[], None], Callable[[float], bool]], StoreRunner],
                 close: Callable[[], None], *, name: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._stop = ctx.Event()
        self._proc = ctx.Process(
            target=_child_main, args=(child_conn, self._conn, self._stop, make_runner, close),
            name=f"lepton-ingest-store-{name}", daemon=True,
        )
        self._proc.start()
        child_conn.close()  # only the child holds its end: its death ends our recv()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def exitcode(self) -> int | None:
        return self._proc.exitcode

    def send(self, batch: list[tuple[str, bytes, float, bool]]) -> None:
        self._conn.send(("batch", batch))

    def recv(self) -> tuple[Any, ...]:
        """The child's next answer; EOFError or OSError when it died."""
        return self._conn.recv()

    def poll(self, timeout: float) -> bool:
        return self._conn.poll(timeout)

    def abandon_retries(self) -> None:
        """Make a batch in its retry backoff give up (unacked: the broker redelivers it), and every
        later batch that fails transiently."""
        self._stop.set()

    def request_stop(self) -> None:
        """Ask the child to exit after the batches already sent."""
        with contextlib.suppress(OSError):  # the child is gone already: nothing to stop
            self._conn.send(("stop",))

    def join(self, timeout: float) -> int | None:
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.error("store child %s did not exit; killing it", self._proc.pid)
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
        return self._proc.exitcode


def _child_main(conn, parent_conn, stop, make_runner, close) -> None:  # noqa: ANN001
    parent_conn.close()  # else the parent's death would never end our recv()
    # What the fork inherited stays out of the garbage collector's scans (they would walk the whole
    # parent heap at every full collection, and touch, hence copy, its pages).
    gc.freeze()
    parent = os.getppid()

    def wait(seconds: float) -> bool:  # the retry backoff: give up when stopping or orphaned
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if stop.wait(min(0.2, max(0.0, end - time.monotonic()))) or os.getppid() != parent:
                return True
        return False

    runner: StoreRunner | None = None

    def on_state() -> None:
        assert runner is not None
        conn.send(("state", runner.state))

    runner = make_runner(on_state, wait)
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the parent is gone
            if msg[0] == "stop":
                conn.send(("bye",))
                return
            batch = [Msg(i, t, p, r, bool(ret)) for i, (t, p, r, ret) in enumerate(msg[1])]
            try:
                outcomes = runner.run(batch)
            except Exception:  # the runner isolates every message; this is a bug: nothing is acked
                log.exception("store child: a batch failed unexpectedly")
                runner.state.errors += 1
                outcomes = []
            conn.send(("done", outcomes, runner.store.quarantine.usage()))
    finally:
        close()
