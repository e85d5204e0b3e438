"""The device agent: capture -> preprocess -> spool -> publish in batches -> delete on end-to-end ack.

Three threads, each with one job, each in its own module:

* **capture** (the thread that calls :meth:`DeviceAgent.run`): :class:`~lepton.device._capture.CaptureLoop`
  reads the source at ``rate_hz``, runs the pipeline (and the model, when one is configured), appends
  each sample to the spool, and carries out the collaboration's decisions
  (:class:`~lepton.device._collaboration.Collaboration`). It never touches the network beyond QoS 0
  publishes, so a broker outage only makes the spool grow.
* **publisher**: :class:`~lepton.device._publisher.Publisher`, the shell around the I/O-free go-back-N
  :class:`~lepton.device._window.PublishWindow`: it publishes the spool in batches with QoS 1, deletes
  a sample only when a range on ``devices/{id}/acks`` covers it, and publishes the status and telemetry.
* **network**: this module. It runs paho's loop and its callbacks and reconnects with exponential
  backoff and jitter, so a fleet that lost its broker does not reconnect in lock-step when it comes
  back. Its callbacks do no SQL and no disk I/O: acks are queued for the publisher, answers for the
  capture loop, and a connect only raises a flag the publisher acts on.

The session is persistent (``clean_session=False``, client id = device id) so acks sent while the
device was away are queued by the broker. On connect the device re-subscribes and publishes its
retained status (``online: true``); a Last Will (retained) says ``online: false`` if it vanishes.

**Who owns what.** Every mutable field of a :class:`DeviceAgent` has one owning thread, or a lock
(the capture loop's and the publisher's own fields are named in their modules):

* ``counters`` (:class:`~lepton.device._config.Counters`): each counter has one writing thread, and
  every write holds ``_lock`` (lepton/device/_config.py names the writer of each).
* ``_ever_connected``, ``_backoff``: the network thread (paho's callbacks and :meth:`_network_loop`).
* ``_stopped_by``: the capture thread (the reason :class:`CaptureLoop` returned), and the first
  :meth:`stop` (from any thread or a signal handler).
* events: ``_connected`` is set and cleared by the network thread (cleared by the main thread at close);
  ``_just_connected`` is set by the network thread and consumed by the publisher; ``_status_due`` is set
  by anyone who wants a status published (the model runtime's thread) and consumed by the publisher;
  ``_stop`` (by :meth:`stop`) and ``_net_stop`` are set by the main thread, and so is the publisher's
  ``stop``.
* everything else (config, topics, pipeline, source, spool, runtime, collaboration, ``_capture``,
  ``_publisher``, ``_client``, ``_threads``): set by the main thread before the other threads start,
  read-only after. The spool and the runtime guard their own state (see their modules).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from lepton.device._capture import CaptureLoop, Ticker
from lepton.device._collaboration import Collaboration, collaboration_fields
from lepton.device._config import Backoff, Counters, DeviceConfig, RunSummary, default_spool_dir
from lepton.device._escalation import Answer
from lepton.device._pipeline import Pipeline
from lepton.device._publisher import Publisher
from lepton.device._sources import Source, open_source
from lepton.device._spool import Spool
from lepton.errors import BrokerConnectionError, ConfigError, ProtocolError
from lepton.protocol import (
    BrokerURL,
    Topics,
    connect,
    decode_acks,
    decode_answer,
    encode_json,
    new_client,
    telemetry_fields,
)

log = logging.getLogger(__name__)

__all__ = ["DeviceAgent", "DeviceConfig", "RunSummary", "default_spool_dir"]


class DeviceAgent:
    """An edge device: ``DeviceAgent(DeviceConfig(...)).run()`` or keyword arguments directly.

    Building the agent checks everything (ids, URL, source, pipeline, spool, model key) and raises
    ConfigError before any connection; :meth:`run` connects (BrokerConnectionError on a refused password,
    or an unreachable broker when ``require_broker``), captures until the source ends, ``limit`` is
    reached or :meth:`stop` is called, waits for acks, and returns a :class:`RunSummary`.

        agent = DeviceAgent(broker="mqtt://cam-1:pw@localhost:1883", fleet="demo", device_id="cam-1",
                            source="digits", pipeline="digits", limit=100)
        summary = agent.run()
    """

    def __init__(self, config: DeviceConfig | None = None, /, **kwargs: Any) -> None:
        config = replace(config, **kwargs) if config is not None else DeviceConfig(**kwargs)
        config.check()
        self.config = config
        self.url = config.broker if isinstance(config.broker, BrokerURL) else BrokerURL.parse(config.broker)
        self.device_id = config.device_id
        try:
            self.topics = Topics(fleet=config.fleet, prefix=config.prefix)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        self.pipeline = Pipeline.resolve(config.pipeline)
        self.source: Source = open_source(config.source, once=config.once)
        spool_dir = (
            Path(config.spool_dir) if config.spool_dir else default_spool_dir(config.fleet, config.device_id)
        )
        try:
            self.spool = Spool(
                spool_dir, max_bytes=config.spool_max_bytes, on_full=config.on_full, fsync=config.fsync
            )
        except BaseException:
            self.source.close()  # a camera must not stay open behind a start-up error
            raise
        self._dropped_at_start = self.spool.dropped
        self.counters = Counters()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stopped_by = "running"
        self._connected = threading.Event()
        self._just_connected = threading.Event()  # the publisher publishes the status and goes back
        self._status_due = threading.Event()
        self._net_stop = threading.Event()
        self._backoff = Backoff()
        self._ever_connected = False
        self._started = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._client: mqtt.Client | None = None
        self.runtime: Any = None
        self.collab = Collaboration(
            device_id=config.device_id, escalate_below=config.escalate_below,
            escalate_rate=config.escalate_rate, cloud_only=config.cloud_only, upload=config.upload,
            answer_timeout_ms=config.answer_timeout_ms,
        )
        self._publisher = Publisher(
            config=config, topics=self.topics, spool=self.spool, counters=self.counters, lock=self._lock,
            connected=self._connected, just_connected=self._just_connected, status_due=self._status_due,
            flush=self._stop, client=lambda: self._client, publish_status=self._publish_status,
            publish_telemetry=self._publish_telemetry,
        )
        try:
            if config.model is not None:
                self.runtime = self._make_runtime(spool_dir / "models")
        except BaseException:
            self.spool.close()
            self.source.close()
            raise
        self._capture_loop = CaptureLoop(
            config=config, topics=self.topics, pipeline=self.pipeline, source=self.source, spool=self.spool,
            runtime=self.runtime, collab=self.collab, counters=self.counters, lock=self._lock, stop=self._stop,
            connected=self._connected, publish=self._publish_qos0,
        )

    # -- model runtime (issue 6), imported only when a model is configured ----------------------------
    def _make_runtime(self, store_dir: Path) -> Any:
        try:
            from lepton.device._runtime import ModelRuntime
        except ModuleNotFoundError as exc:
            if exc.name != "lepton.device._runtime":
                raise
            raise ConfigError(
                "--model needs the model runtime (lepton.device._runtime), which this build "
                "lacks; run without --model"
            ) from None
        key = self.config.public_key
        if not self.config.verify:
            key = None
        elif isinstance(key, (str, Path)):
            from lepton.protocol import load_public_key

            key = load_public_key(key)
        last = self.pipeline.ops[-1] if self.pipeline.ops else None
        shape = tuple(last["shape"]) if last and last["op"] == "reshape" and -1 not in last["shape"] else None
        assert self.config.model is not None  # called only with --model
        return ModelRuntime(
            topics=self.topics,
            model=self.config.model,
            store_dir=store_dir,
            public_key=key,
            pipeline_hash=self.pipeline.hash,
            input_shape=shape,
            on_change=self._on_model_change,
            on_resubscribe=self._resubscribe_models,
        )

    def _on_model_change(self, _status: dict) -> None:
        # The runtime's thread: the publisher publishes it (one thread publishes status while running).
        self._status_due.set()
        self.spool.wake()

    def _resubscribe_models(self) -> None:
        """The runtime lost chunks (unverifiable orphans it dropped): the broker resends what is retained."""
        client = self._client
        if client is None or not self._connected.is_set() or self.runtime is None:
            return
        for topic_filter, qos in self.runtime.subscriptions():
            client.subscribe(topic_filter, qos)

    # -- reports ------------------------------------------------------------------------------------
    def status(self, *, online: bool = True) -> dict[str, Any]:
        """The retained status body (see docs/protocol.md, "Status")."""
        body: dict[str, Any] = {
            "device": self.device_id,
            "online": online,
            "pipeline": self.pipeline.hash,
            "pipeline_name": self.pipeline.name,
            "source": self.source.describe(),
            "spool_depth": self.spool.depth,
            "dropped": self.spool.dropped,
            "skipped": self.source.skipped,
            "next_seq": self.spool.next_seq,
            "model": self.config.model,
            "model_version": None,
            "escalation": self.collab.escalation.mode,
            "upload": self.collab.upload.spec,
        }
        if self.runtime is not None:
            try:
                body.update(self.runtime.status())
            except Exception:  # noqa: BLE001 - a report must never take the device down
                log.exception("device %s: model runtime status failed", self.device_id)
        return body

    def telemetry(self) -> dict[str, Any]:
        """The periodic telemetry body (see docs/protocol.md, "Telemetry"), exactly as published: flat
        ``name -> number`` (bools as 0/1, values not known yet left out). The topic names the device;
        strings and objects belong in :meth:`status`."""
        with self._lock:
            c = replace(self.counters)  # a consistent snapshot
            self.counters.window_s, self.counters.window_n = 0.0, 0
        window_ms = round(1000 * c.window_s / c.window_n, 4) if c.window_n else None
        body: dict[str, Any] = {
            "captured": c.captured,
            "published": c.published,
            "resent": c.resent,
            "acked": c.acked,
            "spool_depth": self.spool.depth,
            "spool_bytes": self.spool.bytes,
            "dropped": self.spool.dropped,
            "skipped": self.source.skipped,
            "frame_errors": c.frame_errors,
            "preprocess_ms": window_ms,
            "preprocess_ms_mean": round(1000 * c.preprocess_s / c.preprocess_n, 4)
            if c.preprocess_n
            else None,
            "reconnects": c.reconnects,
            "ack_timeouts": c.ack_timeouts,
            "connected": self._connected.is_set(),
            "uptime_s": round(time.monotonic() - self._started, 1),
            **self._collaboration(c),
        }
        if self.runtime is not None:
            try:
                body.update(self.runtime.telemetry())
            except Exception:  # noqa: BLE001
                log.exception("device %s: model runtime telemetry failed", self.device_id)
        return telemetry_fields(body)

    def _collaboration(self, c: Counters) -> dict[str, Any]:
        with self._lock:
            latencies, pending = self._capture_loop.snapshot()
        return collaboration_fields(c, latencies, pending)

    def _publish_status(self, *, online: bool = True) -> mqtt.MQTTMessageInfo | None:
        client = self._client
        if client is None or not self._connected.is_set():
            return None
        return client.publish(
            self.topics.status(self.device_id), encode_json(self.status(online=online)), qos=1, retain=True
        )

    def _publish_qos0(self, topic: str, payload: bytes) -> None:
        """Escalation requests and predictions (the capture thread): QoS 0, nothing waits for them."""
        client = self._client
        if client is not None:
            client.publish(topic, payload, qos=0)

    def _publish_telemetry(self) -> None:
        client = self._client
        if client is not None and self._connected.is_set():
            # telemetry() is flat already (telemetry_fields): encode it as it is
            client.publish(self.topics.telemetry(self.device_id), encode_json(self.telemetry()), qos=0)

    # -- MQTT callbacks (paho's network thread) -------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            # At start-up connect() raises BrokerConnectionError with the fix; later it is only logged.
            (log.error if self._ever_connected else log.debug)(
                "device %s: broker %s refused the connection: %s", self.device_id, self.url, reason_code
            )
            return
        if self._ever_connected:
            with self._lock:
                self.counters.reconnects += 1
            log.info("device %s: reconnected to %s", self.device_id, self.url)
        self._ever_connected = True
        self._backoff.reset()
        client.subscribe(self.topics.acks(self.device_id), qos=1)
        if self.collab.enabled:  # QoS 0: a late answer is worth nothing (docs/protocol.md)
            client.subscribe(self.topics.answers(self.device_id), qos=0)
        if self.runtime is not None:
            for topic_filter, qos in self.runtime.on_connected(session_present=bool(flags.session_present)):
                client.subscribe(topic_filter, qos)
        # The publisher publishes the status (it reads the spool) and goes back to the oldest unacked
        # sample (whatever was in flight may be lost): no SQL or spool lock on this thread.
        self._just_connected.set()
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if self._connected.is_set():
            log.warning(
                "device %s: disconnected from %s (%s); spooling until it is back",
                self.device_id,
                self.url,
                reason_code,
            )
        self._connected.clear()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        try:
            if message.topic == self.topics.acks(self.device_id):
                self._handle_acks(message.payload)
            elif message.topic == self.topics.answers(self.device_id):
                self._handle_answer(message.payload)
            elif self.runtime is not None:
                if not self.runtime.handle_message(message.topic, message.payload, message.retain):
                    log.debug("device %s: ignoring message on %s", self.device_id, message.topic)
        except Exception:  # noqa: BLE001 - the network thread must survive anything a message does
            log.exception("device %s: error handling a message on %s", self.device_id, message.topic)

    def _handle_answer(self, payload: bytes) -> None:
        """Queue the cloud's answer for the capture thread, stamped with its arrival time."""
        now = time.monotonic()
        try:
            a = decode_answer(payload)
        except ProtocolError as exc:
            log.warning("device %s: ignoring a bad answers payload: %s", self.device_id, exc)
            return
        if a.seq is None:
            return  # an answer to a request the worker could not read: nothing to match it with
        error = None if a.error is None else (a.error if isinstance(a.error, str) else str(a.error))
        self._capture_loop.answers.append((now, Answer(seq=a.seq, label=a.label, confidence=a.confidence,
                                          model_version=a.version, cloud_ms=a.latency_ms, error=error)))

    def _handle_acks(self, payload: bytes) -> None:
        """Queue the ranges; the publisher thread applies them. Keeps SQLite off paho's network thread,
        and turns a burst of small acks (batch 1) into one DELETE transaction."""
        try:
            ranges = decode_acks(payload)
        except ProtocolError as exc:
            log.warning("device %s: ignoring a bad acks payload: %s", self.device_id, exc)
            return
        self._publisher.queue_acks(ranges)

    # -- network thread -------------------------------------------------------------------------------
    def _network_loop(self) -> None:
        client = self._client
        assert client is not None
        while not self._net_stop.is_set():
            try:
                rc = client.loop(timeout=0.2)
            except Exception:  # noqa: BLE001 - e.g. a TLS error: treat it as a lost connection
                log.exception("device %s: network loop error", self.device_id)
                rc = mqtt.MQTT_ERR_CONN_LOST
            if rc == mqtt.MQTT_ERR_SUCCESS or self._net_stop.is_set():
                continue
            self._connected.clear()
            if self._net_stop.wait(self._backoff.next()):
                break
            try:
                client.reconnect()
            except (OSError, ValueError) as exc:
                log.info("device %s: broker %s unreachable (%s); retrying", self.device_id, self.url, exc)

    # -- life cycle -----------------------------------------------------------------------------------
    def _connect(self) -> None:
        client = new_client(
            self.url,
            # The client-id binding (broker/README.md): a device's username is its id, or ids go under it.
            client_id=self.device_id if self.url.username in (None, self.device_id)
            else f"{self.url.username}/{self.device_id}",
            clean_session=False,
            max_inflight=100,
            ca_certs=self.config.ca_certs,
        )
        offline = encode_json(
            {
                "device": self.device_id,
                "online": False,
                "pipeline": self.pipeline.hash,
                "reason": "connection lost",
            }
        )
        client.will_set(self.topics.status(self.device_id), offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        try:
            connect(client, self.url, keepalive=self.config.keepalive)
        except BrokerConnectionError as exc:
            if exc.reason_code is not None or self.config.require_broker:
                raise
            log.warning(
                "device %s: %s; capturing into the spool and retrying in the background", self.device_id, exc
            )
        else:
            client.loop_stop()  # hand the socket over to our own loop with jittered reconnects

    def start(self) -> None:
        """Connect and start the network and publisher threads (run() calls this; a second call does
        nothing, so a caller may start first, e.g. to wait for the model, then run)."""
        if self._threads:
            return
        self._connect()
        for name, target in (("net", self._network_loop), ("pub", self._publisher.run)):
            t = threading.Thread(target=target, name=f"lepton-{name}-{self.device_id}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, reason: str = "stopped") -> None:
        """Ask :meth:`run` to stop capturing and shut down (thread- and signal-safe)."""
        if not self._stop.is_set():
            self._stopped_by = reason
            self._stop.set()
            self.spool.interrupt()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop.is_set():  # a second Ctrl-C: stop waiting for acks now (the spool stays consistent)
            raise KeyboardInterrupt
        log.info(
            "device %s: %s received; stopping (Ctrl-C again to skip waiting for acks)",
            self.device_id,
            signal.Signals(signum).name,
        )
        self.stop(signal.Signals(signum).name)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(
        self, *, handle_signals: bool = True, on_progress: Callable[[DeviceAgent], None] | None = None
    ) -> RunSummary:
        """Run until the source ends, ``limit`` samples are captured, or stop()/SIGINT/SIGTERM; then drain."""
        previous: dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self.start()
            progress = Ticker(on_progress)
            reason = self._capture_loop.run(lambda: progress.tick(self))
            if reason is not None:
                self._stopped_by = reason
            self._drain(progress)
            return self._shutdown()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._close_quietly()

    def _drain(self, progress: Ticker) -> None:
        """Wait for every spooled sample to be acknowledged (or the grace/drain timeout after a stop)."""
        cfg = self.config
        interrupted = self._stop.is_set()
        wait = cfg.drain_timeout if cfg.drain_timeout is not None else float("inf")
        deadline = time.monotonic() + (cfg.shutdown_grace if interrupted else wait)
        while self.spool.depth and time.monotonic() < deadline:
            if not interrupted and self._stop.is_set():
                interrupted = True
                deadline = min(deadline, time.monotonic() + cfg.shutdown_grace)
            self.spool.wait_for_change(0.1)
            progress.tick(self)
        if self.spool.depth and not interrupted and cfg.drain_timeout is not None:
            self._stopped_by = "drain timeout"
        progress.tick(self, force=True)

    def _shutdown(self) -> RunSummary:
        self._publisher.stop.set()
        publishers = [t for t in self._threads if t.name.startswith("lepton-pub")]
        for t in publishers:
            t.join(5)
        if not any(t.is_alive() for t in publishers):  # the publisher's state is now the main thread's
            self._publisher.apply_acks(None)  # acks that arrived after the publisher's last pass
        if self._connected.is_set():
            self._publish_telemetry()
            info = self._publish_status(online=False)
            if info is not None:
                try:
                    info.wait_for_publish(2.0)
                except (RuntimeError, ValueError):
                    pass
        with self._lock:
            c = replace(self.counters)
            first, last_ack = self._capture_loop.first_at, self._publisher.last_ack_at
        summary = RunSummary(
            device=self.device_id,
            fleet=self.config.fleet,
            captured=c.captured,
            published=c.published,
            resent=c.resent,
            acked=c.acked,
            spool_depth=self.spool.depth,
            dropped=self.spool.dropped,
            skipped=self.source.skipped,
            frame_errors=c.frame_errors,
            next_seq=self.spool.next_seq,
            pipeline=self.pipeline.hash,
            duration_s=round(time.monotonic() - self._started, 3),
            preprocess_ms=round(1000 * c.preprocess_s / c.preprocess_n, 4) if c.preprocess_n else None,
            stopped_by=self._stopped_by,
            dropped_this_run=self.spool.dropped - self._dropped_at_start,
            reconnects=c.reconnects,
            capture_to_ack_s=round(last_ack - first, 4)
            if first is not None and last_ack is not None else None,
            spool_commits=self.spool.commits,
            model_version=getattr(self.runtime, "version", None),
            skipped_items=list(self.source.skipped_items),
            collaboration={"escalation": self.collab.escalation.mode, "upload": self.collab.upload.spec,
                           **self._collaboration(c)},
        )
        return summary

    def _close_quietly(self) -> None:
        self._publisher.stop.set()
        self._net_stop.set()
        client = self._client
        self._connected.clear()
        if client is not None:
            try:
                client.disconnect()  # a clean DISCONNECT: the broker does not send the Will
            except Exception:  # noqa: BLE001
                pass
        for t in self._threads:
            t.join(5)
        if client is not None:
            try:
                client.loop_stop()
            except Exception:  # noqa: BLE001
                pass
        if self.runtime is not None:
            try:
                self.runtime.close()
            except Exception:  # noqa: BLE001
                log.exception("device %s: model runtime close failed", self.device_id)
        self.source.close()
        self.spool.close()

    def close(self) -> None:
        """Release the spool, source and runtime without running (for an agent built but never run)."""
        self._close_quietly()
