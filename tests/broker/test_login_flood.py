"""The embedded broker under a flood of bad passwords: argon2 runs off the event loop and failed logins
are throttled, so other clients' round trips stay short (it went from 1 ms to 2 s)."""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time
import uuid

from lepton.protocol import Topics
from tests.broker._mqtt import Inbox


def _field(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    body = _field("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)  # 3.1.1, user+password+clean
    body += _field(client_id) + _field(username) + _field(password)
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([0x10]) + bytes(encoded) + body


def flood(host: str, port: int, username: str, stop: threading.Event, results: list[int]) -> None:
    """CONNECT with a new wrong password each time, as fast as the broker answers."""
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(connect_packet(username, username, uuid.uuid4().hex))
                reply = s.recv(4)
                results.append(reply[3] if len(reply) == 4 else -1)
        except OSError:
            results.append(-2)


def round_trips(inbox: Inbox, topic: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.monotonic()
        inbox.client.publish(topic, str(i).encode(), qos=1)
        assert inbox.get().payload == str(i).encode()
        out.append(time.monotonic() - started)
    return out


def test_a_bad_password_flood_does_not_slow_down_other_clients(amqtt_broker, fleet):
    topics = Topics(fleet=fleet)
    topic = topics.worker_status("ingest-1")
    amqtt_broker.url("device", "cam-a", fleet=fleet)  # the flood guesses this device's password
    with Inbox(amqtt_broker.url("worker", "ingest-1", fleet=fleet)) as worker:
        assert worker.subscribe(topic)
        round_trips(worker, topic, 5)  # warm up
        baseline = round_trips(worker, topic, 30)

        stop, results = threading.Event(), []
        threads = [threading.Thread(target=flood, args=(amqtt_broker.host, amqtt_broker.port, "cam-a", stop,
                                                        results), daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the flood is in full swing
        try:
            during = round_trips(worker, topic, 30)
        finally:
            stop.set()
            for t in threads:
                t.join(10)

    # The flood really ran: every thread was answered (slowly: checks per address queue up, then
    # the throttle refuses without hashing).
    assert len(results) >= len(threads), results
    assert 0 not in results                                # and no guess got in
    # Before the fix every round trip took about 2 s (argon2 on the event loop). On a loaded 2-core
    # machine one round trip now and then still waits behind a hash running on the other core, so the
    # assertion is about the bulk, not the single worst: the median and the 90th percentile.
    during.sort()
    assert statistics.median(during) < statistics.median(baseline) + 0.1, (statistics.median(baseline), during[-5:])
    assert during[int(0.9 * len(during))] < 0.5, (statistics.median(baseline), during[-5:])


def test_many_clients_logging_in_at_once_from_one_address_are_all_admitted(amqtt_broker, fleet):
    """The per-address cap on concurrent password checks queues them: the demo starts its worker, its
    devices and its monitor together from 127.0.0.1 (an early version refused the third)."""
    urls = [amqtt_broker.url("device", f"cam-{i}", fleet=fleet) for i in range(8)]
    outcomes: list[object] = []

    def login(url: str, name: str) -> None:
        try:
            with Inbox(url, client_id=name):
                outcomes.append("ok")
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            outcomes.append(exc)

    threads = [threading.Thread(target=login, args=(url, f"cam-{i}")) for i, url in enumerate(urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert outcomes == ["ok"] * 8
