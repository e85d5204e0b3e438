"""Broker URLs and paho client construction shared by devices, workers and tools."""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from lepton.errors import BrokerConnectionError, ConfigError

log = logging.getLogger(__name__)

SCHEMES = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}


@dataclass(frozen=True)
class BrokerURL:
    """A parsed broker URL: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://…`` for TLS.

    >>> BrokerURL.parse("mqtt://dev-1:secret@127.0.0.1:1884").port
    1884
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        if "://" not in url:
            raise ConfigError(f"bad broker URL {url!r}: write it as mqtt://host:1883 or mqtts://host:8883")
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ConfigError(f"bad broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        try:
            port = parts.port if parts.port is not None else SCHEMES[parts.scheme]
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise ConfigError(f"bad broker URL {url!r}: the port must be a number from 1 to 65535")
        if not parts.hostname:
            raise ConfigError(f"bad broker URL {url!r}: no host; write it as mqtt://host:1883")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"bad broker URL {url!r}: no path, query or fragment allowed; "
                              "write it as mqtt://host:1883")
        return cls(
            host=parts.hostname,
            port=port,
            tls=parts.scheme in ("mqtts", "ssl"),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def with_credentials(self, username: str | None, password: str | None) -> BrokerURL:
        return BrokerURL(self.host, self.port, self.tls, username or self.username, password or self.password)

    def __str__(self) -> str:  # never print the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def new_client(
    url: BrokerURL,
    *,
    client_id: str,
    clean_session: bool = True,
    manual_ack: bool = False,
    max_inflight: int = 20,
    max_queued: int = 0,
    ca_certs: str | None = None,
) -> mqtt.Client:
    """A paho 2.x client (MQTT 3.1.1, callback API v2) configured for ``url``; not yet connected."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    if url.username is not None:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        client.tls_set(ca_certs=ca_certs, cert_reqs=ssl.CERT_REQUIRED)
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(max_queued)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def connect(client: mqtt.Client, url: BrokerURL, *, keepalive: int = 30, timeout: float = 10.0) -> None:
    """Connect and start paho's network thread; raise BrokerConnectionError with a clear reason.

    Waits for CONNACK so a wrong password or an unreachable host is reported here, once, instead of
    being retried forever in the background.
    """
    done = threading.Event()
    outcome: dict[str, object] = {}
    previous = client.on_connect

    def on_connect(c, userdata, flags, reason_code, properties):  # noqa: ANN001
        outcome["rc"] = reason_code
        done.set()
        if previous is not None:
            previous(c, userdata, flags, reason_code, properties)

    client.on_connect = on_connect
    try:
        client.connect(url.host, url.port, keepalive=keepalive)
    except (OSError, ValueError) as exc:
        client.on_connect = previous
        raise BrokerConnectionError(
            f"cannot reach broker {url}: {exc}; check --broker host and port and that the broker runs",
            url=str(url),
        ) from None
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        client.on_connect = previous
        raise BrokerConnectionError(f"no CONNACK from {url} within {timeout:.0f}s; is it an MQTT broker?",
                                    url=str(url))
    client.on_connect = previous
    rc = outcome["rc"]
    if rc.is_failure:  # type: ignore[union-attr]
        client.loop_stop()
        client.disconnect()
        hint = ("check the username and password in the broker URL (mqtt://user:password@host:port)"
                if int(rc.value) in (4, 5, 134, 135) else "see the broker's log")  # type: ignore[union-attr]
        raise BrokerConnectionError(f"broker {url} refused the connection: {rc}; {hint}",
                                    url=str(url), reason_code=int(rc.value))  # type: ignore[union-attr]
