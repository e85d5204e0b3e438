"""Shared fixtures: real brokers on free ports, unique names per test."""

from __future__ import annotations

import os
import uuid

import pytest

from lepton.testing import AmqttBroker, MosquittoBroker, mosquitto_available

REQUIRE_MOSQUITTO = os.environ.get("LEPTON_REQUIRE_MOSQUITTO") == "1"


def _mosquitto_or_skip() -> None:
    if mosquitto_available():
        return
    message = "mosquitto binary not found (apt-get install -y mosquitto mosquitto-clients)"
    if REQUIRE_MOSQUITTO:
        pytest.fail(message + " and LEPTON_REQUIRE_MOSQUITTO=1")
    pytest.skip(message)


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
