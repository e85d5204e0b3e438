"""amqtt's Broker with the fixes Lepton needs (amqtt 0.12). Everything runs on the broker's event loop.

1. **Authenticate before touching a session.** amqtt looks up, deletes (clean session) or takes over
   (already connected) the session named by a CONNECT's client id *before* it asks the auth plugins,
   and then copies the newcomer's credentials onto the old session. A client with any id, even with a
   wrong password, could so drop another client's session. Here the plugins (password, client-id
   binding, throttle) run first and a refused CONNECT never reaches the session table.
2. **Retained messages only for the client's own subscriptions.** On every (re)connect amqtt sends the
   new client the retained messages matching *every* filter in the broker, including other clients'
   (an offline worker's ``models/#`` sent 96 KiB model chunks to a subscriber of ``devices/c1/status``).
   Here a client gets retained messages only for filters it holds itself, and only those it may read.
3. **Packet size bound.** amqtt reads a packet of any announced length into memory. Here a read larger
   than ``max_packet_size`` (the auth plugin's option) closes that client's connection first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import format_client_message, gen_client_id

from lepton.broker._acl import READ
from lepton.broker._auth import LeptonAclPlugin, LeptonAuthPlugin

log = logging.getLogger(__name__)


class PacketTooLarge(Exception):
    """A client announced a packet above ``max_packet_size``; its connection is closed."""


class _BoundedReader(ReaderAdapter):
    def __init__(self, inner: StreamReaderAdapter, writer: StreamWriterAdapter, limit: int) -> None:
        self._inner, self._writer, self._limit = inner, writer, limit

    async def read(self, n: int = -1) -> bytes:
        if self._limit and n > self._limit:
            # Close before reading: the payload is never buffered.
            self._writer._writer.transport.abort()  # noqa: SLF001 - no public abort on the adapter
            raise PacketTooLarge(f"packet field of {n} bytes above max_packet_size {self._limit}")
        return await self._inner.read(n)

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class LeptonBroker(Broker):
    """``amqtt.broker.Broker`` with the three fixes of this module's docstring."""

    def _plugin(self, cls: type) -> Any:
        return next((p for p in self.plugins_manager._plugins if isinstance(p, cls)), None)  # noqa: SLF001

    async def stream_connected(self, reader, writer, listener_name: str) -> None:  # noqa: ANN001
        auth = self._plugin(LeptonAuthPlugin)
        limit = auth.max_packet_size if auth is not None else 0
        out = StreamWriterAdapter(writer)
        try:
            await self._client_connected(listener_name, _BoundedReader(StreamReaderAdapter(reader), out, limit),
                                         out)
        except PacketTooLarge as exc:  # raised while reading the CONNECT; later ones end the reader loop
            log.warning("closed a connection from %s: %s", writer.get_extra_info("peername"), exc)
            server = self._servers.get(listener_name)
            if server is not None:
                server.release_connection()

    async def _initialize_client_session(self, reader, writer, remote_address: str,  # noqa: ANN001
                                         remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        # amqtt's method with the authentication moved in front of every session lookup.
        try:
            handler, client_session = await BrokerProtocolHandler.init_from_connect(reader, writer,
                                                                                    self.plugins_manager)
        except AMQTTError as exc:
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            raise AMQTTError(exc) from exc

        if not await super()._authenticate(client_session, None):
            log.info("refused CONNECT of %r (user %r) from %s", client_session.client_id,
                     client_session.username, format_client_message(address=remote_address, port=remote_port))
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError("not authorised")

        if client_session.clean_session:
            if client_session.client_id:
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            existing, _ = self._sessions[client_session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "is_anonymous", "remote_address", "remote_port"):
                setattr(existing, name, getattr(client_session, name))
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0
        client_session.lepton_authenticated = True
        acl = self._plugin(LeptonAclPlugin)
        if acl is not None:
            acl._reload(force=True)  # noqa: SLF001 - grants of a user added a moment ago

        delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(delay, int):
            client_session.keep_alive += delay
        return handler, client_session

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # Already decided in _initialize_client_session; the flag is used once.
        if getattr(session, "lepton_authenticated", False):
            session.lepton_authenticated = False
            return True
        return await super()._authenticate(session, listener)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        topic_filter, qos = subscription
        if not any(s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, ())):
            return  # another client's filter (amqtt's reconnect loop offers every filter in the broker)
        acl = self._plugin(LeptonAclPlugin)
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = [asyncio.ensure_future(handler.mqtt_publish(m.topic, m.data, min(qos, m.qos or qos), retain=True))
                 for topic, m in list(self._retained_messages.items())
                 if self._matches(topic, topic_filter) and (acl is None or acl.allowed(session, topic, READ))]
        if tasks:
            await asyncio.wait(tasks)
