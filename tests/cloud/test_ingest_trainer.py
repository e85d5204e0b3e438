"""The ingest worker's training child on its own: when a run is due, and starting, polling, stopping
and reaping real child processes (no broker, no worker, a clock passed in)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from lepton.cloud._ingest_config import WorkerConfig
from lepton.cloud._ingest_status import RateMeter, WorkerStats, status_body, telemetry_of
from lepton.cloud._ingest_trainer import TrainerProcess


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, **kw: object) -> WorkerConfig:
    base: dict = {"broker": "mqtt://w1:pw@127.0.0.1:1883", "fleet": "f1", "data": tmp_path, "name": "w1"}
    return WorkerConfig(**{**base, **kw})


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _trainer(tmp_path: Path, code: str = "pass", **kw: object) -> tuple[TrainerProcess, list[int]]:
    changes: list[int] = []
    trainer = TrainerProcess(
        _config(tmp_path, train_command=_python(code), **{"train_every": 10, **kw}),
        log_path=tmp_path / "train.log",
        on_change=lambda: changes.append(1),
    )
    return trainer, changes


def _until(condition, what: str, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout  # generous: a broken case never gets there at all
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def test_no_trigger_is_never_due(tmp_path):
    trainer = TrainerProcess(_config(tmp_path), log_path=tmp_path / "train.log")

    trainer.add_labelled(10**6)

    assert trainer.due() is False


def test_train_every_is_due_at_that_many_new_labelled_samples(tmp_path):
    trainer, _ = _trainer(tmp_path, train_every=100)

    trainer.add_labelled(60)
    before = trainer.due()
    trainer.add_labelled(40)

    assert before is False and trainer.due() is True


def test_train_interval_is_due_once_it_passed_and_only_with_new_labelled_samples(tmp_path):
    clock = Clock()
    trainer = TrainerProcess(_config(tmp_path, model="m", train_interval=60.0), log_path=tmp_path / "t.log",
                             clock=clock)

    clock.now += 61
    without_samples = trainer.due()
    trainer.add_labelled(1)
    clock.now -= 2  # 59 s after the start
    too_soon = trainer.due()
    clock.now += 1

    assert (without_samples, too_soon, trainer.due()) == (False, False, True)


def test_a_due_run_is_started_reaped_and_reported(tmp_path):
    trainer, changes = _trainer(tmp_path, "print('trainer ran'); raise SystemExit(3)")
    trainer.add_labelled(10)

    trainer.poll()
    st = trainer.stats
    started = (st.train_runs, st.train_running, st.labelled_since_train, len(changes))
    _until(lambda: (trainer.poll(), not trainer.stats.train_running)[1], "the run is reaped")

    assert started == (1, True, 0, 1)
    assert trainer.status() == {"train_runs": 1, "train_running": False, "train_last_exit": 3,
                                "train_last_started": trainer.stats.train_last_started}
    assert trainer.stats.train_last_started is not None and len(changes) == 2 and trainer.pid is None
    assert "trainer ran" in (tmp_path / "train.log").read_text()


def test_a_running_child_is_never_doubled_and_stop_terminates_and_reaps_it(tmp_path):
    trainer, _ = _trainer(tmp_path, "import time; time.sleep(120)")
    trainer.add_labelled(10)
    trainer.poll()
    trainer.add_labelled(10)  # due again while the first run is still going

    trainer.poll()
    runs_while_running = trainer.stats.train_runs
    trainer.stop(grace=30)

    assert runs_while_running == 1
    st = trainer.stats
    assert st.train_running is False and st.train_last_exit == -signal.SIGTERM and trainer.pid is None


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(120)")
    trainer, _ = _trainer(tmp_path, code)
    trainer.add_labelled(10)
    trainer.poll()
    _until(lambda: "ready" in (tmp_path / "train.log").read_text(), "the child ignores SIGTERM")

    trainer.stop(grace=0.5)

    assert trainer.stats.train_last_exit == -signal.SIGKILL and trainer.stats.train_running is False


def test_a_trainer_that_cannot_start_is_reported_and_not_retried_at_once(tmp_path):
    clock = Clock()
    changes: list[int] = []
    trainer = TrainerProcess(
        _config(tmp_path, train_command=(str(tmp_path / "no-such-trainer"),), train_interval=60.0),
        log_path=tmp_path / "train.log", on_change=lambda: changes.append(1), clock=clock,
    )
    trainer.add_labelled(5)
    clock.now += 61

    trainer.poll()
    trainer.add_labelled(5)

    st = trainer.stats
    assert (st.train_runs, st.train_running, st.train_last_exit, changes) == (0, False, -1, [])
    assert trainer.due() is False  # the interval starts again from the failed attempt


def test_stop_without_a_run_changes_nothing(tmp_path):
    trainer, _ = _trainer(tmp_path)

    trainer.stop()

    assert trainer.status() == {"train_runs": 0, "train_running": False, "train_last_exit": None,
                                "train_last_started": None}


@pytest.mark.parametrize("publish", [False, True], ids=["no-publish", "publish"])
def test_broker_credentials_reach_the_child_only_in_its_environment_and_only_to_publish(tmp_path, publish):
    trainer = TrainerProcess(
        _config(tmp_path, model="m1", train_every=1, train_publish=publish,
                train_broker="mqtt://t1:tp@127.0.0.1:1883"),
        log_path=tmp_path / "train.log",
    )

    env, cmd = trainer.environment(), trainer.command()

    assert env.get("LEPTON_BROKER") == ("mqtt://t1:tp@127.0.0.1:1883" if publish else None)
    assert "tp" not in " ".join(cmd) and ("--publish" in cmd) is publish


def test_status_body_carries_the_training_fields_and_its_telemetry_is_flat_numbers(tmp_path):
    stats = WorkerStats(stored=7, retrying=True, last_error="OSError: disk full", last_write=12.34567)
    rate = RateMeter(now=0.0)
    rate.update(now=2.0, total=7)
    trainer, _ = _trainer(tmp_path)

    status = status_body(_config(tmp_path), stats, online=True, rate=rate.rate,
                         quarantine={"entries": 1, "bytes": 10, "refused": 0}, queue=2, queue_bytes=2048,
                         started_at=5.55555, training=trainer.status())
    telemetry = telemetry_of(status)

    assert (status["samples_per_s"], status["last_write"], status["started_at"]) == (3.5, 12.346, 5.556)
    assert list(status)[-4:] == ["train_runs", "train_running", "train_last_exit", "train_last_started"]
    assert telemetry["retrying"] == 1 and telemetry["quarantine_bytes"] == 10
    assert "last_error" not in telemetry and "worker" not in telemetry and "train_last_exit" not in telemetry
    assert all(type(v) in (int, float) for v in telemetry.values())


def test_the_counters_go_to_the_stats_it_is_given(tmp_path):
    stats = WorkerStats(stored=3)
    trainer = TrainerProcess(_config(tmp_path, train_every=1, train_command=_python("pass")),
                             log_path=tmp_path / "train.log", stats=stats)
    trainer.add_labelled(1)

    trainer.poll()
    trainer.stop()

    assert (stats.train_runs, stats.train_last_exit is not None, stats.labelled_since_train) == (1, True, 0)
    assert stats.stored == 3 and trainer.stats is stats
