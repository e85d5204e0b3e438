"""Broker URLs and paho client construction shared by devices, workers and tools."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import stat
import struct
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast
from urllib.parse import quote, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from lepton.errors import BrokerConnectionError, ConfigError

log = logging.getLogger(__name__)

SCHEMES = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}

#: Environment variables that carry broker credentials. A process's environment is readable only by
#: its own user (``/proc/PID/environ`` is mode 0400), unlike its argv (``/proc/PID/cmdline``: everyone).
ENV_BROKER = "LEPTON_BROKER"  #: the whole URL, e.g. mqtt://cam-1:secret@host:1883
ENV_PASSWORD = "LEPTON_PASSWORD"  #: only the password, for the user named in the URL
ENV_PASSWORD_FILE = "LEPTON_PASSWORD_FILE"  #: a 0600 file holding the password
#: a password file is one short line; anything bigger is the wrong file
_MAX_PASSWORD_FILE = 4096


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

    def secret_url(self) -> str:
        """The URL *with* its password, for a child's environment or a config object; never log it.

        >>> BrokerURL.parse("mqtt://u:p%40ss@h:1").secret_url()
        'mqtt://u:p%40ss@h:1'
        """
        user = ""
        if self.username is not None:
            user = quote(self.username, safe="")
            if self.password is not None:
                user += ":" + quote(self.password, safe="")
            user += "@"
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def __str__(self) -> str:  # never print the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def read_password_file(path: str | os.PathLike[str]) -> str:
    """The password in ``path`` (its first line), refusing a file that group or others may read.

    The file must be a regular file without any group/other permission bits (``chmod 600``): a password
    readable by every local user is no better than one on the command line.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot read password file {str(p)!r}: {exc.strerror}; "
                          "pass --password-file PATH of a file holding the password") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"password file {str(p)!r} is not a regular file; put the password in a file")
        if st.st_mode & 0o077:
            raise ConfigError(f"password file {str(p)!r} is accessible by group/others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}")
        raw = os.read(fd, _MAX_PASSWORD_FILE + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_PASSWORD_FILE:
        raise ConfigError(f"password file {str(p)!r} is over {_MAX_PASSWORD_FILE} bytes; "
                          "it must hold only the password")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"password file {str(p)!r} is not UTF-8 text") from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise ConfigError(f"password file {str(p)!r} is empty; write the password on its first line")
    return password


@dataclass(frozen=True)
class ResolvedBroker:
    """A broker URL with its password looked up, and a warning for the operator if there is one."""

    url: BrokerURL
    #: set when the password came from the command line (readable by every local user)
    warning: str | None = None


def resolve_broker(
    url: str | None,
    *,
    password_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    url_from_argv: bool = True,
) -> ResolvedBroker | None:
    """Combine a broker URL with a password from a file or the environment; ``None`` if no URL at all.

    ``url`` is the ``--broker`` flag (or ``None``: then ``$LEPTON_BROKER``). The password is, in order:
    ``password_file`` (or ``$LEPTON_PASSWORD_FILE``), ``$LEPTON_PASSWORD``, the URL's own. A password
    written in a URL that came from the command line still works but yields a warning. The caller
    (a CLI edge) passes ``os.environ``; nothing here reads the process environment by itself.

    >>> r = resolve_broker("mqtt://cam-1@h:1883", environ={"LEPTON_PASSWORD": "pw"})
    >>> r.url.password, r.warning
    ('pw', None)
    """
    env = environ if environ is not None else {}
    if url is None:
        url, url_from_argv = env.get(ENV_BROKER) or None, False
    if url is None:
        return None
    parsed = BrokerURL.parse(url)
    warning = None
    if url_from_argv and parsed.password is not None:
        warning = (f"the password in --broker {parsed} is visible to every local user (/proc/PID/cmdline); "
                   f"pass it with --password-file FILE (mode 0600) or ${ENV_PASSWORD} instead")
    password_file = password_file or env.get(ENV_PASSWORD_FILE) or None
    password = read_password_file(password_file) if password_file else (env.get(ENV_PASSWORD) or None)
    if password is not None:
        if parsed.username is None:
            raise ConfigError(f"a password was given but broker URL {parsed} names no user; "
                              "write it as mqtt://USER@host:port")
        parsed = replace(parsed, password=password)
    return ResolvedBroker(parsed, warning)


def child_environment(url: BrokerURL, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a child process that should connect as ``url``: the whole URL in $LEPTON_BROKER.

    Other credential variables are dropped, so the child uses exactly these credentials (and the
    password never appears in the child's argv).
    """
    env = {k: v for k, v in environ.items() if k not in (ENV_PASSWORD, ENV_PASSWORD_FILE)}
    env[ENV_BROKER] = url.secret_url()
    return env


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
    """A paho 2.x client (MQTT 3.1.1, callback API v2) configured for ``url``; not yet connected.

    Brokers bind client ids to users (broker/README.md): an id other than the username goes under it,
    ``username/client_id``.
    """
    if url.username and client_id and client_id != url.username and not client_id.startswith(url.username + "/"):
        client_id = f"{url.username}/{client_id}"
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


_PUBACK = struct.Struct("!BBH")


def ack_many(client: mqtt.Client, mids: list[int]) -> None:
    """PUBACK QoS 1 messages of a ``manual_ack`` client, many at once.

    ``client.ack`` queues one packet per message and writes a byte to paho's socket pair for each, so
    the network thread wakes up and calls ``send`` once per message. This queues the same PUBACK
    packets (``0x40 0x02 MID``, MQTT 3.1.1 section 3.4: the bytes on the wire are those ``ack``
    sends) as one buffer: one wake-up and one ``send`` for the lot. Falls back to ``client.ack``
    per message on a paho without the internal queue this relies on (paho-mqtt 2.x has it).
    """
    if not mids:
        return
    queue_packet = getattr(client, "_packet_queue", None)
    if queue_packet is None or not getattr(client, "_manual_ack", False) or len(mids) == 1:
        for mid in mids:
            client.ack(mid, 1)
        return
    packet = b"".join([_PUBACK.pack(0x40, 2, mid) for mid in mids])
    queue_packet(0x40, packet, 0, 1)


def connect(client: mqtt.Client, url: BrokerURL, *, keepalive: int = 30, timeout: float = 10.0) -> None:
    """Connect and start paho's network thread; raise BrokerConnectionError with a clear reason.

    Waits for CONNACK so a wrong password or an unreachable host is reported here, once, instead of
    being retried forever in the background.
    """
    done = threading.Event()
    outcome: dict[str, ReasonCode] = {}
    # every client here is made with CallbackAPIVersion.VERSION2 (new_client), so a callback already
    # set on it takes the five arguments of the v2 signature
    previous = cast("mqtt.CallbackOnConnect_v2 | None", client.on_connect)

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
    if rc.is_failure:
        client.loop_stop()
        client.disconnect()
        hint = ("check the username and password in the broker URL (mqtt://user:password@host:port)"
                if int(rc.value) in (4, 5, 134, 135) else "see the broker's log")
        raise BrokerConnectionError(f"broker {url} refused the connection: {rc}; {hint}",
                                    url=str(url), reason_code=int(rc.value))


@contextlib.contextmanager
def short_lived_client(
    url: BrokerURL | str,
    role: str,
    *,
    on_connect=None,  # noqa: ANN001
    on_message=None,  # noqa: ANN001
    on_subscribe=None,  # noqa: ANN001
    timeout: float = 10.0,
    max_inflight: int = 20,
) -> Iterator[mqtt.Client]:
    """A tool's connection for one job: connected on entry, disconnected on exit, even on an error.

    The client id is ``{user}/lepton-{role}-{random}`` (unique, under the user: the client-id binding
    of broker/README.md), the session clean. Callbacks are set before CONNECT, so ``on_connect`` can
    subscribe and ``on_message`` sees the retained messages that follow. Raises BrokerConnectionError
    like :func:`connect`.

    Example (needs a broker)::

        with short_lived_client("mqtt://viewer@localhost:1883", "fetch") as client:
            client.subscribe("lepton/demo/models/digits", qos=1)
    """
    broker = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
    suffix = f"lepton-{role}-{uuid.uuid4().hex[:12]}"
    client = new_client(broker, client_id=f"{broker.username}/{suffix}" if broker.username else suffix,
                        clean_session=True, max_inflight=max_inflight)
    client.on_connect, client.on_message, client.on_subscribe = on_connect, on_message, on_subscribe
    connect(client, broker, timeout=timeout)
    try:
        yield client
    finally:
        try:
            client.disconnect()
        finally:
            client.loop_stop()
