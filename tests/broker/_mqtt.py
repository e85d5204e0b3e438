"""A small synchronous MQTT client for broker tests: connect, subscribe (waiting for SUBACK), collect."""

from __future__ import annotations

import queue
import threading
import uuid

import paho.mqtt.client as mqtt

from lepton.protocol import BrokerURL, connect, new_client

WAIT = 10.0  # generous: the machine is shared; tests wait for events, never sleep for a verdict


class Inbox:
    """A connected paho client whose received messages land in a queue."""

    def __init__(self, url: str, *, client_id: str | None = None, clean_session: bool = True) -> None:
        self.url = BrokerURL.parse(url)
        # Brokers bind client ids to users: the username itself or "username/..." (broker/README.md).
        random_id = f"t-{uuid.uuid4().hex[:12]}"
        self.client_id = client_id or (f"{self.url.username}/{random_id}" if self.url.username else random_id)
        self.client = new_client(self.url, client_id=self.client_id, clean_session=clean_session)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subacks: dict[int, list] = {}
        self._suback = threading.Condition()
        self.client.on_message = lambda client, userdata, message: self.messages.put(message)
        self.disconnects = 0  # a kicked client sees one (paho then reconnects on its own)
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        connect(self.client, self.url)

    def _on_disconnect(self, *args: object) -> None:
        self.disconnects += 1

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        with self._suback:
            self._subacks[mid] = list(reason_codes)
            self._suback.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> bool:
        """Subscribe and wait for SUBACK; return False when the broker refused the subscription."""
        rc, mid = self.client.subscribe(topic, qos=qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self._suback:
            assert self._suback.wait_for(lambda: mid in self._subacks, WAIT), f"no SUBACK for {topic}"
            codes = self._subacks.pop(mid)
        return not any(code.is_failure for code in codes)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def get(self, timeout: float = WAIT) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing arrived within {timeout:.0f}s") from None

    def until(self, topic: str, timeout: float = WAIT) -> list[mqtt.MQTTMessage]:
        """Every message received up to and including the first one on ``topic`` (the positive control)."""
        seen = []
        while True:
            message = self.get(timeout)
            seen.append(message)
            if message.topic == topic:
                return seen

    def drain(self) -> list[mqtt.MQTTMessage]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
