"""Issue 10 items 2, 3 and 6 on both brokers: client identity, the ACL against a device credential,
retained messages only for a client's own filters, and the packet size bound."""

from __future__ import annotations

import time

import pytest

from lepton.errors import BrokerConnectionError
from lepton.protocol import BrokerURL, Topics, connect, new_client
from tests.broker._mqtt import Inbox

SETTLE = 1.0  # how long a kicked client would take to notice (the broker closes its socket at once)


def attempt(url: str, client_id: str, *, clean_session: bool) -> bool:
    """Connect with ``client_id``, hold it briefly, leave; True when the broker accepted the CONNECT."""
    parsed = BrokerURL.parse(url)
    client = new_client(parsed, client_id=client_id, clean_session=clean_session)
    try:
        connect(client, parsed)
    except BrokerConnectionError:
        return False
    time.sleep(0.3)
    client.disconnect()
    client.loop_stop()
    return True


@pytest.mark.parametrize("clean_session", [True, False])
def test_a_device_cannot_kick_another_device_by_using_its_client_id(broker, fleet, clean_session):
    topics = Topics(fleet=fleet)
    worker_url = broker.url("worker", "ingest-1", fleet=fleet)
    attacker_url = broker.url("device", "cam-b", fleet=fleet)
    with Inbox(broker.url("device", "cam-a", fleet=fleet), client_id="cam-a", clean_session=False) as victim:
        assert victim.subscribe(topics.acks("cam-a"))

        attempt(attacker_url, "cam-a", clean_session=clean_session)
        parsed = BrokerURL.parse(attacker_url)
        attempt(f"mqtt://cam-b:wrong@{parsed.host}:{parsed.port}", "cam-a", clean_session=clean_session)
        attempt(f"mqtt://cam-a:wrong@{parsed.host}:{parsed.port}", "cam-a", clean_session=clean_session)
        time.sleep(SETTLE)

        with Inbox(worker_url) as worker:
            worker.publish(topics.acks("cam-a"), b"still yours")
        assert victim.get().payload == b"still yours"  # its session and subscription survived
        assert victim.disconnects == 0                 # and it was never kicked off


@pytest.mark.parametrize("clean_session", [True, False])
def test_a_device_cannot_take_over_the_workers_persistent_session(broker, fleet, clean_session):
    topics = Topics(fleet=fleet)
    worker_url = broker.url("worker", "ingest-1", fleet=fleet)
    worker_id = f"ingest-1/lepton-worker-{fleet}-ingest-1"  # what lepton.cloud's worker uses
    with Inbox(worker_url, client_id=worker_id, clean_session=False) as worker:
        assert worker.subscribe(topics.all_devices("samples"))
    with Inbox(broker.url("device", "cam-a", fleet=fleet), client_id="cam-a") as device:
        for seq in range(5):
            device.publish(topics.samples("cam-a"), f"queued-{seq}".encode())

    attacker_url = broker.url("device", "cam-x", fleet=fleet)
    for client_id in (worker_id, "ingest-1", f"lepton-worker-{fleet}-ingest-1"):
        attempt(attacker_url, client_id, clean_session=clean_session)

    with Inbox(worker_url, client_id=worker_id, clean_session=False) as worker:
        with Inbox(broker.url("device", "cam-ctl", fleet=fleet), client_id="cam-ctl") as device:
            device.publish(topics.samples("cam-ctl"), b"control")
        received = [m.payload for m in worker.until(topics.samples("cam-ctl"))]

    assert received == [f"queued-{seq}".encode() for seq in range(5)] + [b"control"]


def test_a_device_credential_reads_nothing_beyond_its_acks_and_models_even_with_wildcards(broker, fleet):
    topics, other = Topics(fleet=fleet), Topics(fleet=f"{fleet}x")
    worker_url = broker.url("worker", "ingest-1", fleet=fleet)
    with Inbox(broker.url("device", "cam-spy", fleet=fleet), client_id="cam-spy") as spy:
        for wildcard in ("#", "$SYS/#", topics.all_devices("samples"), topics.all_devices("status"),
                         topics.all_devices("acks"), f"lepton/{other.fleet}/#", "lepton/+/devices/+/samples"):
            spy.subscribe(wildcard)  # accepted or refused: either way nothing may arrive
        assert spy.subscribe(topics.acks("cam-spy"))
        with Inbox(broker.url("device", "cam-a", fleet=fleet), client_id="cam-a") as device, \
                Inbox(broker.url("device", "cam-z", fleet=other.fleet), client_id="cam-z") as other_device, \
                Inbox(worker_url) as worker:
            device.publish(topics.samples("cam-a"), b"secret sample")
            device.publish(topics.status("cam-a"), b"secret status", retain=True)
            other_device.publish(other.samples("cam-z"), b"other fleet")
            worker.publish(topics.acks("cam-a"), b"not yours")
            worker.publish(topics.acks("cam-spy"), b"control")
        seen = spy.until(topics.acks("cam-spy"))

    assert [(m.topic, m.payload) for m in seen] == [(topics.acks("cam-spy"), b"control")]


def test_a_forged_ack_never_reaches_the_device_it_names(broker, fleet):
    """A forged ack made a device delete 228 unacknowledged samples from its spool."""
    topics = Topics(fleet=fleet)
    with Inbox(broker.url("device", "cam-a", fleet=fleet), client_id="cam-a") as victim, \
            Inbox(broker.url("device", "cam-b", fleet=fleet), client_id="cam-b") as forger:
        assert victim.subscribe(topics.acks("cam-a"))
        forger.publish(topics.acks("cam-a"), b"forged: 0-227")
        victim.publish(topics.acks("cam-a"), b"forged by itself")  # not even its own acks are writable
        with Inbox(broker.url("worker", "ingest-1", fleet=fleet)) as worker:
            worker.publish(topics.acks("cam-a"), b"genuine")
        seen = victim.until(topics.acks("cam-a"))

    assert [m.payload for m in seen] == [b"genuine"]


def test_a_viewer_reads_statuses_but_writes_nothing(broker, fleet):
    topics = Topics(fleet=fleet)
    with Inbox(broker.url("worker", "ingest-1", fleet=fleet)) as worker, \
            Inbox(broker.url("viewer", "grafana", fleet=fleet)) as viewer, \
            Inbox(broker.url("device", "cam-a", fleet=fleet), client_id="cam-a") as device:
        assert worker.subscribe(topics.all_models())
        assert worker.subscribe(topics.all_devices("acks").replace("acks", "+"))
        assert viewer.subscribe(topics.all_devices("status"))
        viewer.publish(topics.model("digits"), b"forged", retain=True)
        viewer.publish(topics.acks("cam-a"), b"forged")
        viewer.publish(topics.status("cam-b"), b"forged")
        device.publish(topics.status("cam-a"), b"online")
        assert [m.payload for m in viewer.until(topics.status("cam-a"))] == [b"online"]
        seen = worker.until(topics.status("cam-a"))

    assert [(m.topic, m.payload) for m in seen] == [(topics.status("cam-a"), b"online")]


def test_a_client_receives_only_retained_messages_matching_its_own_filters(broker, fleet):
    """amqtt sent every connecting client the retained messages of *other* sessions' filters (an offline
    worker's models/#): a subscriber of devices/c1/status received 96 KiB model chunks."""
    topics = Topics(fleet=fleet)
    worker_url = broker.url("worker", "ingest-1", fleet=fleet)
    with Inbox(worker_url, client_id="ingest-1/models", clean_session=False) as offline:
        assert offline.subscribe(topics.all_models())   # a persistent session, then offline
    with Inbox(worker_url) as publisher:
        publisher.publish(topics.model_chunk("digits", 1, 0), b"\0" * 96 * 1024, retain=True)
        publisher.publish(topics.model("digits"), b"manifest", retain=True)

    # A viewer may read models, so only the filter decides what it gets.
    with Inbox(broker.url("viewer", "grafana", fleet=fleet), client_id="grafana/status",
               clean_session=False) as viewer:
        assert viewer.subscribe(topics.status("c1"))
    with Inbox(broker.url("viewer", "grafana", fleet=fleet), client_id="grafana/status",
               clean_session=False) as viewer:   # reconnects: amqtt re-sent retained for every filter here
        with Inbox(broker.url("device", "c1", fleet=fleet), client_id="c1") as device:
            device.publish(topics.status("c1"), b"online")
        seen = viewer.until(topics.status("c1"))

    assert [(m.topic, m.payload) for m in seen] == [(topics.status("c1"), b"online")]


def test_an_oversized_publish_disconnects_its_sender_and_the_broker_serves_everyone_else(broker, fleet):
    topics = Topics(fleet=fleet)
    worker_url = broker.url("worker", "ingest-1", fleet=fleet)
    with Inbox(worker_url) as worker, \
            Inbox(broker.url("device", "cam-big", fleet=fleet), client_id="cam-big") as big:
        assert worker.subscribe(topics.all_devices("samples"))
        big.publish(topics.samples("cam-big"), b"x" * 1_000_000)  # a default-sized envelope passes
        assert len(worker.get().payload) == 1_000_000

        big.client.publish(topics.samples("cam-big"), b"x" * (5 * 1024 * 1024), qos=0)
        deadline = time.monotonic() + 10
        while big.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert big.disconnects >= 1                    # the sender is cut off

        with Inbox(broker.url("device", "cam-ok", fleet=fleet), client_id="cam-ok") as other:
            other.publish(topics.samples("cam-ok"), b"control")
        seen = worker.until(topics.samples("cam-ok"))

    assert [(m.topic, len(m.payload)) for m in seen] == [(topics.samples("cam-ok"), 7)]  # never the 5 MiB one
