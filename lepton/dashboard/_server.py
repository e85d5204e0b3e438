"""The dashboard's shell: one MQTT client in, one aiohttp server out (``lepton dashboard``).

Threads and what they own:

* paho's network thread: receives every status, telemetry, manifest and dead letter and folds it into
  the :class:`~lepton.dashboard._board.FleetBoard` under ``_lock``;
* the server thread (an asyncio loop): serves the page, ``/api/fleet``, ``/metrics`` and ``/events``
  (SSE). Every ``push_s`` it takes what changed from the board (under ``_lock``), encodes it once and
  queues it to every connected page. A page whose queue is full (a stalled browser) is dropped; its
  EventSource reconnects and starts again from a snapshot.

``_lock`` guards the board, the only state both threads touch. The broker password stays here: the
browser gets JSON documents, never the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from importlib import resources
from typing import Any

from lepton.dashboard._board import FleetBoard
from lepton.errors import ConfigError
from lepton.protocol import BrokerURL, connect, new_client

log = logging.getLogger(__name__)

__all__ = ["DashboardServer"]

#: the page's security headers: nothing but this server, no inline script, no framing
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {"/": ("index.html", "text/html"), "/dashboard.js": ("dashboard.js", "text/javascript"),
          "/dashboard.css": ("dashboard.css", "text/css")}
#: the parts of a delta that are there only when they changed
_TABLES = {"workers", "models", "dead_letters", "point"}
#: queued documents per page before it counts as stalled
QUEUE = 64


class DashboardServer:
    """The fleet dashboard: subscribe with ``url`` (a viewer is enough), serve the page on host:port.

    ``start()`` connects to the broker (raises BrokerConnectionError, exit 3) and binds the port
    (raises ConfigError, exit 2, when it is taken), then returns; ``stop()`` undoes both. ``port=0``
    picks a free port; :attr:`url` is the page's address either way.

    Example (needs a broker)::

        server = DashboardServer("mqtt://viewer:PW@localhost:1883", "demo", port=0).start()
        print(server.url)   # http://127.0.0.1:41234/
        ...
        server.stop()
    """

    def __init__(self, url: str | BrokerURL, fleet: str, *, prefix: str = "lepton", host: str = "127.0.0.1",
                 port: int = 8050, max_devices: int = 2000, push_s: float = 0.25, history_s: float = 900.0,
                 sample_s: float = 2.0, ca_certs: str | None = None) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {port}")
        if max_devices < 1 or push_s <= 0 or history_s <= 0 or sample_s <= 0:
            raise ConfigError("--max-devices must be >= 1 and the intervals > 0 seconds")
        self.broker = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
        self.board = FleetBoard(fleet=fleet, prefix=prefix, max_devices=max_devices, history_s=history_s,
                                sample_s=sample_s)
        self.host, self.port, self.push_s, self.ca_certs = host, port, push_s, ca_certs
        self._lock = threading.Lock()
        self._pages: set[asyncio.Queue[bytes | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._runner: Any = None
        self._static = {path: (resources.files("lepton.dashboard").joinpath("static", name).read_bytes(), ctype)
                        for path, (name, ctype) in STATIC.items()}

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8050/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> DashboardServer:
        self._connect()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="lepton-dashboard", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._disconnect()
            exc = failure[0]
            if isinstance(exc, OSError):
                raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; "
                                  "choose another --port or --host") from None
            raise exc
        log.info("dashboard for fleet %s on %s", self.board.fleet, self.url)
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        self._disconnect()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Block until Ctrl-C (KeyboardInterrupt propagates after stopping)."""
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            self.stop()

    # -- MQTT (paho's thread) --------------------------------------------------------------------------
    def _connect(self) -> None:
        name = f"lepton-dashboard-{uuid.uuid4().hex[:12]}"
        user = self.broker.username
        client = new_client(self.broker, client_id=f"{user}/{name}" if user else name, clean_session=True,
                            ca_certs=self.ca_certs)
        filters = self.board.filters()

        def on_connect(c, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
            if reason_code.is_failure:
                log.error("dashboard: broker %s refused the connection: %s", self.broker, reason_code)
                return
            c.subscribe(filters)  # again on every reconnect: the session is clean

        def on_message(c, userdata, message) -> None:  # noqa: ANN001
            with self._lock:
                self.board.apply(message.topic, message.payload, now=time.time())

        client.on_connect, client.on_message = on_connect, on_message
        connect(client, self.broker)
        self._client = client

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()

    # -- HTTP (the server thread) ----------------------------------------------------------------------
    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/dashboard.js", self._page)
        app.router.add_get("/dashboard.css", self._page)
        app.router.add_get("/api/fleet", self._api)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/events", self._events)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        self._pusher = asyncio.get_running_loop().create_task(self._push())
        self._registry = _registry(self._snapshot)

    async def _shutdown(self) -> None:
        self._pusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pusher
        for queue in list(self._pages):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        await self._runner.cleanup()

    def _snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self.board.snapshot(time.time())

    async def _page(self, request) -> Any:  # noqa: ANN001
        from aiohttp import web

        body, ctype = self._static[request.path]
        return web.Response(body=body, content_type=ctype, charset="utf-8", headers=HEADERS)

    async def _api(self, request) -> Any:  # noqa: ANN001
        from aiohttp import web

        body = await asyncio.get_running_loop().run_in_executor(None, lambda: _encode(self._snapshot()))
        return web.Response(body=body, content_type="application/json", headers=HEADERS)

    async def _metrics(self, request) -> Any:  # noqa: ANN001
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, self._registry)
        return web.Response(body=body, headers={**HEADERS, "Content-Type": CONTENT_TYPE_LATEST})

    async def _events(self, request) -> Any:  # noqa: ANN001
        from aiohttp import web

        response = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
        self._pages.add(queue)  # before the snapshot: no delta between the two is lost
        try:
            await response.write(_event(self._snapshot()))
            while True:
                try:
                    data = await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    data = b": keep-alive\n\n"
                if data is None:
                    break
                await response.write(data)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._pages.discard(queue)
        return response

    async def _push(self) -> None:
        while True:
            await asyncio.sleep(self.push_s)
            if not self._pages:
                with self._lock:
                    self.board.tick(time.time())
                continue
            now = time.time()
            with self._lock:
                point = self.board.tick(now)
                delta = self.board.delta(now, point)
            if not (delta["devices"] or delta["removed"] or set(delta) & _TABLES):
                continue  # nothing changed but the summary's clock
            data = _event(delta)
            for queue in list(self._pages):
                try:
                    queue.put_nowait(data)
                except asyncio.QueueFull:  # a stalled page: it reconnects and starts from a snapshot
                    self._pages.discard(queue)
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                    queue.put_nowait(None)


def _encode(doc: dict[str, Any]) -> bytes:
    # allow_nan=False: the rows hold only finite numbers; a NaN here is a bug, not device input
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _event(doc: dict[str, Any]) -> bytes:
    return b"data: " + _encode(doc) + b"\n\n"


def _registry(read):  # noqa: ANN001, ANN202
    from prometheus_client import CollectorRegistry

    from lepton.dashboard._metrics import BoardCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoardCollector(read))
    return registry

