"""The embedded amqtt broker: a zero-setup MQTT 3.1.1 broker for development, tests and the demo."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lepton.errors import ConfigError

if TYPE_CHECKING:  # amqtt is the broker extra; imported when the broker starts
    from lepton.broker._server import LeptonBroker

log = logging.getLogger(__name__)

# Above the device's 1,000,000-byte envelopes and 96 KiB model chunks; the same bound as mosquitto.conf.
MAX_PACKET_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """Settings of the embedded broker.

    ``password_file`` holds ``user:argon2-hash`` lines (see :func:`write_password_file`); named clients
    authenticate against it and get durable persistent sessions. A client's id must be its username or
    start with ``username/``. ``acl_file`` holds the access rules (``lepton.broker._acl``, the format of
    ``broker/lepton.acl``); ``None`` lets every client use every topic (tests of amqtt itself only).
    ``allow_anonymous`` admits clients that send no username (e.g. ``mosquitto_sub`` on a dashboard) with
    the ACL's anonymous rules; amqtt does not queue for those. ``max_packet_size`` bytes: a client sending
    a bigger packet is disconnected (0: no limit).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    password_file: str | Path | None = None
    acl_file: str | Path | None = None
    allow_anonymous: bool = False
    max_connections: int = 0
    max_packet_size: int = MAX_PACKET_SIZE


def amqtt_config(settings: BrokerSettings) -> dict:
    """The amqtt configuration dictionary for ``settings`` (also what ``broker/amqtt.yaml`` documents)."""
    if settings.password_file is not None and not Path(settings.password_file).is_file():
        raise ConfigError(f"password file {settings.password_file} not found; create it with "
                          "`lepton broker --add-user NAME` or pass --allow-anonymous")
    if settings.acl_file is not None and not Path(settings.acl_file).is_file():
        raise ConfigError(f"ACL file {settings.acl_file} not found; create it with "
                          "`lepton broker --add-user NAME --role ROLE --fleet FLEET`")
    plugins: dict = {
        "lepton.broker._auth.LeptonAuthPlugin": {
            "password_file": str(settings.password_file) if settings.password_file else None,
            "allow_anonymous": settings.allow_anonymous,
            "max_packet_size": settings.max_packet_size,
        },
    }
    if settings.acl_file is not None:
        plugins["lepton.broker._auth.LeptonAclPlugin"] = {"acl_file": str(settings.acl_file)}
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{settings.host}:{settings.port}",
                        "max_connections": settings.max_connections},
        },
        # Sessions of named clients stay until they come back: the worker's queued samples must survive.
        "session_expiry_interval": None,
        "plugins": plugins,
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def generate_password() -> str:
    return secrets.token_urlsafe(18)


class EmbeddedBroker:
    """amqtt (``lepton.broker._server.LeptonBroker``) in a background thread with its own event loop.

    >>> broker = EmbeddedBroker(BrokerSettings(port=free_port(), allow_anonymous=True))
    >>> broker.start(); broker.stop()
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: LeptonBroker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.settings.host}:{self.settings.port}"

    def start(self, timeout: float = 15.0) -> None:
        from lepton.broker._server import LeptonBroker as Broker

        config = amqtt_config(self.settings)
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # reported to the caller of start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="lepton-amqtt", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise ConfigError(f"embedded broker did not start within {timeout:.0f}s on {self.url}")
        if failure:
            raise ConfigError(f"embedded broker cannot listen on {self.settings.host}:{self.settings.port}: "
                              f"{failure[0]}; choose another --port") from failure[0]
        log.info("embedded broker listening on %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._broker is None:
            return
        loop, broker = self._loop, self._broker
        try:
            asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout)
        except Exception:  # shutting down anyway; amqtt sometimes raises on half-closed clients
            log.debug("amqtt shutdown raised", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._loop = self._broker = self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
