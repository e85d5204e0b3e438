"""A test-only acknowledging subscriber: what the cloud's ingest worker does, minus the storage.

It subscribes to every device's samples with a persistent session (so Mosquitto queues samples while it
is away), decodes each envelope with the protocol, records every (seq -> ts) it saw, and publishes the
acks ranges back on ``devices/{id}/acks``. Built only on paho + lepton.protocol.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict

from lepton.protocol import BrokerURL, Topics, decode_samples, encode_acks, new_client, seqs_to_ranges


class Acker:
    def __init__(self, url: str, fleet: str, *, client_id: str | None = None, ack: bool = True) -> None:
        self.url = BrokerURL.parse(url)
        self.topics = Topics(fleet=fleet)
        self.ack = ack
        self.lock = threading.Lock()
        self.seen: dict[str, dict[int, set[float]]] = defaultdict(lambda: defaultdict(set))
        self.deliveries: Counter[str] = Counter()
        self.pipelines: set[str | None] = set()
        self.labels: dict[str, dict[int, object]] = defaultdict(dict)
        self.shapes: set[tuple] = set()
        self.envelopes = 0
        self.max_payload = 0
        self.client = new_client(
            self.url,
            client_id=client_id or f"acker-{uuid.uuid4().hex[:8]}",
            clean_session=False,
            max_inflight=100,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)  # come back quickly after a broker restart in a test

    def _on_connect(self, client, userdata, flags, rc, props):  # noqa: ANN001
        if not rc.is_failure:
            client.subscribe(self.topics.all_devices("samples"), qos=1)

    def _on_message(self, client, userdata, msg):  # noqa: ANN001
        device = self.topics.parse(msg.topic).device
        env = decode_samples(msg.payload, expected_device=device)
        with self.lock:
            self.envelopes += 1
            self.max_payload = max(self.max_payload, len(msg.payload))
            self.pipelines.add(env.pipeline)
            for s in env.samples:
                self.seen[device][s.seq].add(s.ts)
                self.deliveries[device] += 1
                self.labels[device][s.seq] = s.y
                self.shapes.add((s.x.dtype.name, s.x.shape))
        if self.ack:
            client.publish(
                self.topics.acks(device), encode_acks(seqs_to_ranges(s.seq for s in env.samples)), qos=1
            )

    def start(self) -> Acker:
        self.client.connect(self.url.host, self.url.port)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Acker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def seqs(self, device: str) -> set[int]:
        with self.lock:
            return set(self.seen[device])

    def wait_for(self, device: str, count: int, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.seqs(device)) >= count:
                return True
            time.sleep(0.05)
        return False

    def reused(self, device: str) -> list[int]:
        """Seqs that arrived with two different capture timestamps: a seq used for two samples."""
        with self.lock:
            return sorted(seq for seq, ts in self.seen[device].items() if len(ts) > 1)


class Watcher:
    """A read-only client recording every JSON report (status, telemetry, predictions) of a fleet."""

    def __init__(self, url: str, fleet: str) -> None:
        from lepton.protocol import decode_json

        self._decode = decode_json
        self.url = BrokerURL.parse(url)
        self.topics = Topics(fleet=fleet)
        self.lock = threading.Lock()
        self.messages: list[tuple[str, str, dict, bool]] = []  # (device, channel, body, retained)
        self.client = new_client(self.url, client_id=f"watch-{uuid.uuid4().hex[:8]}", clean_session=True)
        self.client.on_connect = lambda c, u, f, rc, p: [
            c.subscribe(self.topics.all_devices(ch), qos=1) for ch in ("status", "telemetry", "predictions")
        ]
        self.client.on_message = self._on_message

    def _on_message(self, client, userdata, msg):  # noqa: ANN001
        parsed = self.topics.parse(msg.topic)
        with self.lock:
            self.messages.append((parsed.device, parsed.channel, self._decode(msg.payload), bool(msg.retain)))

    def bodies(self, device: str, channel: str) -> list[dict]:
        with self.lock:
            return [b for d, c, b, _ in self.messages if d == device and c == channel]

    def wait(self, predicate, timeout: float = 20.0) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> Watcher:
        self.client.connect(self.url.host, self.url.port)
        self.client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()
