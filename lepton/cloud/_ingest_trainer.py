"""The ingest worker's training child: when to start ``lepton train``, and starting, polling, stopping
and reaping that process.

A :class:`TrainerProcess` is owned by the worker's writer thread: it counts the new labelled samples
of each durable write (:meth:`~TrainerProcess.add_labelled`), and between batches
:meth:`~TrainerProcess.poll` collects a finished child's exit code and starts the next run once a
trigger (``train_every`` samples, ``train_interval`` seconds) is due. :meth:`~TrainerProcess.stop`
runs in the thread that stops the worker, after the writer thread has ended, so no trainer outlives
its worker. Other threads (the status thread) only read :meth:`~TrainerProcess.status`.

The child never sees broker credentials in argv (``/proc/PID/cmdline`` is world-readable): the URL
goes in ``$LEPTON_BROKER`` when it publishes, and is left out of its environment otherwise.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.cloud._ingest_config import WorkerConfig
from lepton.protocol import BrokerURL

log = logging.getLogger(__name__)

__all__ = ["TrainerProcess", "TrainingStats"]


@dataclass
class TrainingStats:
    """The training counters (:class:`~lepton.cloud._ingest_status.WorkerStats` carries them too)."""

    labelled_since_train: int = 0  # new labelled samples stored since the last run started
    train_runs: int = 0
    train_running: bool = False
    train_last_exit: int | None = None
    train_last_started: float | None = None


class TrainerProcess:
    """The training child of one ingest worker, started when ``config``'s trigger is due.

    ``on_change`` is called after a run starts and after one ends (the worker publishes its status);
    ``clock`` is the monotonic clock the ``train_interval`` trigger is measured on; ``stats`` receives
    the counters (the worker passes its own :class:`~lepton.cloud._ingest_status.WorkerStats`).

    >>> t = TrainerProcess(WorkerConfig(broker="mqtt://127.0.0.1", fleet="f", data="/d", model="m",
    ...                                 train_every=100), log_path=Path("/d/f/train.log"))
    >>> t.add_labelled(99); t.due()
    False
    >>> t.add_labelled(1); t.due()
    True
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        log_path: Path,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stats: TrainingStats | None = None,
    ) -> None:
        self.config = config
        self.log_path = log_path
        self._on_change = on_change
        self._clock = clock
        self._proc: subprocess.Popen | None = None
        self._last_train = clock()
        self.stats = stats if stats is not None else TrainingStats()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def status(self) -> dict[str, Any]:
        """The training fields of the worker's status (docs/protocol.md)."""
        st = self.stats
        return {
            "train_runs": st.train_runs,
            "train_running": st.train_running,
            "train_last_exit": st.train_last_exit,
            "train_last_started": st.train_last_started,
        }

    def command(self) -> list[str]:
        """``python -m lepton train ...`` from the worker's flags, or ``train_command`` as given."""
        cfg = self.config
        if cfg.train_command:
            return list(cfg.train_command)
        cmd = [
            sys.executable,
            "-m",
            "lepton",
            "train",
            "--data",
            str(cfg.data),
            "--fleet",
            cfg.fleet,
            "--prefix",
            cfg.prefix,
            "--model",
            str(cfg.model),
        ]
        if cfg.train_publish:
            cmd.append("--publish")  # the broker URL goes in the environment: argv is world-readable
        if cfg.key:
            cmd += ["--key", str(cfg.key)]
        return cmd + list(cfg.train_args)

    def environment(self) -> dict[str, str]:
        """The training child's environment: the broker URL (with its password) in $LEPTON_BROKER
        when it publishes, no broker credentials otherwise; never any of it in argv (/proc/PID/cmdline)."""
        from lepton.protocol._mqtt import ENV_BROKER, child_environment

        cfg = self.config
        url = BrokerURL.parse(cfg.train_broker or cfg.broker)
        if cfg.train_publish:
            return child_environment(url, os.environ)
        return {k: v for k, v in child_environment(url, os.environ).items() if k != ENV_BROKER}

    def add_labelled(self, n: int) -> None:
        """Count ``n`` new labelled samples made durable (the ``train_every`` trigger)."""
        self.stats.labelled_since_train += n

    def due(self) -> bool:
        """Is a run due: a trigger is set, labelled samples arrived, and enough of them or time passed?"""
        cfg = self.config
        if not (cfg.train_every or cfg.train_interval) or self.stats.labelled_since_train == 0:
            return False
        if cfg.train_every and self.stats.labelled_since_train >= cfg.train_every:
            return True
        return bool(cfg.train_interval and self._clock() - self._last_train >= cfg.train_interval)

    def poll(self) -> None:
        """Reap a finished run; start the next one when it is due (a running child is never doubled)."""
        proc = self._proc
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return
            self._proc = None
            self.stats.train_running = False
            self.stats.train_last_exit = rc
            (log.info if rc == 0 else log.warning)(
                "worker %s: training run %d exited with %d (log: %s)",
                self.config.name,
                self.stats.train_runs,
                rc,
                self.log_path,
            )
            self._changed()
        if self.due():
            self._start()

    def _start(self) -> None:
        cfg = self.config
        cmd = self.command()
        shown = [("***" if i > 0 and cmd[i - 1] == "--broker" else a) for i, a in enumerate(cmd)]
        log.info(
            "worker %s: %d new labelled samples, starting training: %s",
            cfg.name,
            self.stats.labelled_since_train,
            " ".join(shown),
        )
        try:
            with open(self.log_path, "ab") as out:
                self._proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self.environment(),
                )
        except OSError as exc:
            log.error("worker %s: cannot start training %s: %s", cfg.name, cmd[0], exc)
            self.stats.train_last_exit = -1
            self._last_train = self._clock()
            self.stats.labelled_since_train = 0
            return
        self.stats.train_runs += 1
        self.stats.train_running = True
        self.stats.train_last_started = round(time.time(), 3)
        self.stats.labelled_since_train = 0
        self._last_train = self._clock()
        self._changed()

    @property
    def pid(self) -> int | None:
        """The running child's process id, None when no run is in progress."""
        return self._proc.pid if self._proc is not None else None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the training child, SIGKILL it after ``grace`` seconds, and reap it: no trainer
        outlives its worker (the writer thread, which starts it, has stopped)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            log.info("worker %s: stopping training run %d (pid %d)", self.config.name, self.stats.train_runs,
                     proc.pid)
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("worker %s: training pid %d ignored SIGTERM for %.0fs; killing it",
                            self.config.name, proc.pid, grace)
                proc.kill()
                proc.wait()
        self.stats.train_running = False
        self.stats.train_last_exit = proc.returncode
