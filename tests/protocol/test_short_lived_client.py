"""short_lived_client: the one helper for a tool's connect / do one thing / disconnect (issue 11, item 6),
against both real brokers."""

from __future__ import annotations

import queue
import threading

import pytest

from lepton.errors import BrokerConnectionError
from lepton.protocol import BrokerURL, Topics, encode_json, short_lived_client

WAIT = 10.0


def _paho_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-")]


def test_the_client_gets_retained_messages_inside_the_block_and_is_closed_after_it(broker, fleet):
    topics = Topics(fleet=fleet)
    topic = topics.worker_status("w1")
    with short_lived_client(broker.url("worker", "w1", fleet=fleet), "publisher") as pub:
        pub.publish(topic, encode_json({"online": True}), qos=1, retain=True).wait_for_publish(WAIT)
    got: queue.Queue = queue.Queue()
    before = len(_paho_threads())
    url = broker.url("viewer", "v1", fleet=fleet)

    with short_lived_client(url, "status", on_connect=lambda c, *a: c.subscribe(topic, qos=1),
                            on_message=lambda c, u, m: got.put(m)) as client:
        message = got.get(timeout=WAIT)
        client_id = client._client_id.decode()
        assert client.is_connected()

    assert (message.topic, message.retain) == (topic, True)
    assert client_id.startswith("v1/lepton-status-")  # under the username: the client-id binding
    assert not client.is_connected()
    assert len(_paho_threads()) == before  # its network thread is gone


def test_an_error_inside_the_block_still_disconnects(broker, fleet):
    url = broker.url("viewer", "v2", fleet=fleet)

    with pytest.raises(RuntimeError, match="the job failed"), short_lived_client(url, "fetch") as client:
        assert client.is_connected()
        raise RuntimeError("the job failed")

    assert not client.is_connected()


def test_refused_credentials_are_a_broker_connection_error_carrying_the_url(broker, fleet):
    good = BrokerURL.parse(broker.url("viewer", "v3", fleet=fleet))
    bad = good.with_credentials("v3", "wrong-password")
    before = len(_paho_threads())

    with pytest.raises(BrokerConnectionError, match="refused") as info, short_lived_client(bad, "status"):
        pytest.fail("the block must not run without a connection")

    assert info.value.url == str(bad) and "wrong-password" not in str(info.value)
    assert len(_paho_threads()) == before
