"""Shared fixtures: real brokers on free ports, unique names per test."""

from __future__ import annotations

import os
import uuid

import pytest

from lepton.testing import AmqttBroker, MosquittoBroker, PostgresServer, mosquitto_available, postgres_bin_dir

REQUIRE_MOSQUITTO = os.environ.get("LEPTON_REQUIRE_MOSQUITTO") == "1"

# One torch/OpenMP thread per process, here and in every process a test starts (they inherit the
# environment). The suite runs on two pytest workers on a 2-core machine, and each test may start
# trainers and devices of its own: with torch's default of one thread per core, one small training step
# of the digits CNN took 6-447 ms instead of 5-8 ms whenever another process held a core.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def missing_component(message: str) -> None:
    """A real component a test needs is not here: fail in CI (LEPTON_REQUIRE_MOSQUITTO=1, where
    .ci/run installs every one), skip elsewhere. Never returns."""
    if REQUIRE_MOSQUITTO:
        pytest.fail(message + " and LEPTON_REQUIRE_MOSQUITTO=1")
    pytest.skip(message)


def _mosquitto_or_skip() -> None:
    if not mosquitto_available():
        missing_component("mosquitto binary not found (apt-get install -y mosquitto mosquitto-clients)")


@pytest.fixture
def require_mosquitto() -> None:
    """For tests that run Mosquitto with a config of their own: skip without it, fail in CI."""
    _mosquitto_or_skip()


@pytest.fixture
def amqtt_broker():
    with AmqttBroker() as broker:
        yield broker


@pytest.fixture
def mosquitto_broker():
    _mosquitto_or_skip()
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture(params=["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker(request):
    """The same test against the embedded amqtt broker and against Mosquitto."""
    if request.param == "amqtt":
        with AmqttBroker() as b:
            yield b
    else:
        _mosquitto_or_skip()
        with MosquittoBroker() as b:
            yield b


@pytest.fixture
def fleet() -> str:
    """A fleet name no other test uses, so runs never see each other's retained messages."""
    return f"t{uuid.uuid4().hex[:10]}"


def _postgres_or_skip() -> None:
    """PostgreSQL (initdb/pg_ctl) and psycopg, like Mosquitto: skip without them, fail in CI."""
    missing = []
    if postgres_bin_dir() is None:
        missing.append("initdb/pg_ctl not found (apt-get install -y postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing.append("psycopg not installed (pip install -e '.[postgres]')")
    if not missing:
        return
    missing_component("; ".join(missing))


@pytest.fixture(scope="session")
def postgres_server():
    """One throw-away PostgreSQL cluster for the session; tests keep apart by their fleet name (the
    index's dataset key)."""
    _postgres_or_skip()
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def index_url(request) -> str | None:
    """The same test against both exactly-once index backends: None (SQLite in the dataset folder)
    or the URL of a real PostgreSQL server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").url()
