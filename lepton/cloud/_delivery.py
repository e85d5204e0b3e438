"""Model delivery over MQTT: retained chunks, then the retained manifest, then cleanup.

Order matters. Chunks go first (QoS 1, retained, each acknowledged by the broker), then the manifest,
so a device that sees the new manifest finds every chunk already retained. Only then are the chunks
of the superseded version cleared with empty retained payloads (MQTT's way to delete a retained
message). A device that connects at any later time rebuilds the current model from retained messages
alone: see :func:`fetch_model`, which does exactly that and is also how :func:`publish_package`
reads the result back to confirm that the broker really kept it (Mosquitto silently drops messages
over ``message_size_limit`` and writes the ACL denies, yet still acknowledges them).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.errors import LeptonError, ModelRejected, ProtocolError
from lepton.protocol import (
    BrokerURL,
    ModelPackage,
    Topics,
    connect,
    load_public_key,
    new_client,
    parse_manifest,
    verify_package,
)

log = logging.getLogger(__name__)

__all__ = ["DeliveryError", "PublishResult", "fetch_model", "publish_package", "retained_manifest"]


class DeliveryError(LeptonError):
    """A model could not be published or fetched through the broker."""


@dataclass(frozen=True)
class PublishResult:
    model: str
    version: int
    chunks: int
    chunk_bytes: int
    manifest_bytes: int
    cleared: dict[int, int]  # superseded version -> number of chunk topics cleared
    verified: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "chunks": self.chunks,
                "chunk_bytes": self.chunk_bytes, "manifest_bytes": self.manifest_bytes,
                "cleared": {str(k): v for k, v in self.cleared.items()}, "verified": self.verified,
                "seconds": round(self.seconds, 3)}


def _url(url: str | BrokerURL) -> BrokerURL:
    return url if isinstance(url, BrokerURL) else BrokerURL.parse(url)


def _client(url: BrokerURL, role: str):
    client = new_client(url, client_id=f"lepton-{role}-{uuid.uuid4().hex[:12]}", clean_session=True,
                        max_inflight=20)
    connect(client, url)
    return client


def _close(client) -> None:  # noqa: ANN001
    try:
        client.disconnect()
    finally:
        client.loop_stop()


def _wait_all(infos, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    for info in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not _wait_one(info, remaining):
            raise DeliveryError(f"the broker did not acknowledge {what} within {timeout:.0f}s; "
                                "is it overloaded or did the connection drop?")


def _wait_one(info, timeout: float) -> bool:  # noqa: ANN001
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:  # paho: queue full / not connected
        raise DeliveryError(f"publish failed: {exc}") from None
    return info.is_published()


def retained_manifest(url: str | BrokerURL, fleet: str, model: str, *, timeout: float = 1.0,
                      client=None) -> bytes | None:  # noqa: ANN001
    """The retained manifest payload of ``model``, or None when the broker holds none.

    Waits for the SUBACK, then at most ``timeout`` seconds for the retained message.
    """
    topics = Topics(fleet=fleet)
    own = client is None
    if own:
        client = _client(_url(url), "probe")
    got: dict[str, bytes] = {}
    arrived, subscribed = threading.Event(), threading.Event()
    topic = topics.model(model)

    def on_message(c, userdata, msg):  # noqa: ANN001
        if msg.topic == topic and msg.payload:
            got["payload"] = bytes(msg.payload)
            arrived.set()

    def on_subscribe(c, userdata, mid, reason_codes, properties):  # noqa: ANN001
        subscribed.set()

    client.on_message, client.on_subscribe = on_message, on_subscribe
    try:
        client.subscribe(topic, qos=1)
        if subscribed.wait(max(timeout, 5.0)):
            arrived.wait(timeout)
        client.unsubscribe(topic)
    finally:
        client.on_message = client.on_subscribe = None
        if own:
            _close(client)
    return got.get("payload")


def publish_package(
    url: str | BrokerURL,
    fleet: str,
    manifest_payload: bytes,
    chunks: list[bytes],
    *,
    supersedes: dict[int, int] | None = None,
    verify: bool = True,
    timeout: float = 30.0,
) -> PublishResult:
    """Publish one model version built by :func:`lepton.protocol.build_package`.

    ``supersedes`` maps versions whose chunks must be cleared to their chunk counts (the registry
    knows the last one it published; the version currently retained on the broker is added here).
    Refuses to publish a version that is not newer than the one the broker retains, so devices only
    ever move forward. With ``verify``, the model is read back from retained messages alone and
    compared byte for byte.
    """
    manifest, _, _ = parse_manifest(manifest_payload)
    topics = Topics(fleet=fleet)
    burl = _url(url)
    started = time.monotonic()
    client = _client(burl, "publisher")
    cleared: dict[int, int] = {}
    try:
        supersedes = dict(supersedes or {})
        current = retained_manifest(burl, fleet, manifest.name, client=client)
        if current is not None:
            try:
                old, _, _ = parse_manifest(current)
            except ModelRejected:
                log.warning("the retained manifest of %s on %s is unreadable; replacing it", manifest.name, fleet)
            else:
                if old.version >= manifest.version and old.sha256 != manifest.sha256:
                    raise DeliveryError(
                        f"the broker already serves {manifest.name} v{old.version} on fleet {fleet}, not older "
                        f"than v{manifest.version}; devices never move back. Publish from the registry that "
                        "made it, or roll back with `lepton models rollback`, which creates a higher version")
                supersedes[old.version] = max(supersedes.get(old.version, 0), len(old.chunks))
        infos = [client.publish(topics.model_chunk(manifest.name, manifest.version, i), chunk, qos=1, retain=True)
                 for i, chunk in enumerate(chunks)]
        _wait_all(infos, timeout, f"{len(chunks)} chunks of {manifest.name} v{manifest.version}")
        _wait_all([client.publish(topics.model(manifest.name), manifest_payload, qos=1, retain=True)], timeout,
                  "the manifest")
        log.info("published %s v%d to %s: %d chunks, %d bytes", manifest.name, manifest.version, fleet,
                 len(chunks), manifest.size)
        clear_infos = []
        for version, count in sorted(supersedes.items()):
            if version == manifest.version:
                continue
            for i in range(count):
                clear_infos.append(client.publish(topics.model_chunk(manifest.name, version, i), b"", qos=1,
                                                  retain=True))
            cleared[version] = count
        _wait_all(clear_infos, timeout, "the clearing of superseded chunks")
    finally:
        _close(client)
    if verify:
        package = fetch_model(burl, fleet, manifest.name, None, timeout=min(timeout, 15.0),
                              min_version=manifest.version)
        if package.manifest.version != manifest.version or package.manifest.sha256 != manifest.sha256:
            raise DeliveryError(f"read-back found {package.manifest.name} v{package.manifest.version}, not "
                                f"v{manifest.version}: another publisher raced this one")
    return PublishResult(model=manifest.name, version=manifest.version, chunks=len(chunks),
                         chunk_bytes=sum(len(c) for c in chunks), manifest_bytes=len(manifest_payload),
                         cleared=cleared, verified=verify, seconds=time.monotonic() - started)


def fetch_model(url: str | BrokerURL, fleet: str, model: str, public_key=None, timeout: float = 10.0, *,
                min_version: int | None = None) -> ModelPackage:  # noqa: ANN001
    """Rebuild and verify the current package of ``model`` from retained messages alone.

    ``public_key`` is an Ed25519 public key, a path to its PEM file, or None to check hashes only.
    With ``min_version``, older manifests are skipped and the call waits for that version (brokers
    such as amqtt acknowledge a publish before their retained store holds it).
    Raises :class:`~lepton.errors.ModelRejected` (with its reason) for a bad package and
    :class:`DeliveryError` when no complete model arrives within ``timeout`` seconds.
    """
    if isinstance(public_key, (str, Path)):
        public_key = load_public_key(public_key)
    topics = Topics(fleet=fleet)
    head = topics.model(model)
    lock = threading.Lock()
    state: dict[str, Any] = {"manifest": None, "error": None}
    chunks: dict[tuple[int, int], bytes] = {}
    ready = threading.Event()

    def check() -> None:
        payload = state["manifest"]
        if payload is None:
            return
        try:
            m, _, _ = parse_manifest(payload)
        except ModelRejected as exc:
            state["error"] = exc
            ready.set()
            return
        if min_version is not None and m.version < min_version:
            return
        if all((m.version, i) in chunks for i in range(len(m.chunks))):
            ready.set()

    def on_message(c, userdata, msg):  # noqa: ANN001
        try:
            parsed = topics.parse(msg.topic)
        except ProtocolError:
            return
        if parsed.model != model:
            return
        with lock:
            if parsed.channel == "model":
                state["manifest"] = bytes(msg.payload) or None
            elif parsed.channel == "model_chunk":
                key = (parsed.version, parsed.chunk)
                if msg.payload:
                    chunks[key] = bytes(msg.payload)
                else:
                    chunks.pop(key, None)
            check()

    client = _client(_url(url), "fetch")
    client.on_message = on_message
    try:
        client.subscribe(topics.model_filter(model), qos=1)
        if not ready.wait(timeout):
            with lock:
                have = state["manifest"]
                n = len(chunks)
            detail = ("no retained manifest" if have is None
                      else f"a manifest and {n} chunk(s), not a complete model"
                      + (f" of v{min_version} or newer" if min_version else ""))
            raise DeliveryError(f"no complete model {model!r} on fleet {fleet!r} within {timeout:.0f}s "
                                f"({detail}); was it published to this broker?")
    finally:
        _close(client)
    with lock:
        if state["error"] is not None:
            raise state["error"]
        payload = state["manifest"]
        m, _, _ = parse_manifest(payload)
        parts = {i: chunks[(m.version, i)] for i in range(len(m.chunks))}
    package = verify_package(payload, parts, public_key=public_key)
    log.debug("fetched %s v%d (%d bytes, sha256 %s)", model, m.version, len(package.data),
              hashlib.sha256(package.data).hexdigest()[:12])
    return package
