"""Model delivery over MQTT: the retained manifest, then the retained chunks, then cleanup.

Order matters. The manifest goes first, so a device that is online verifies it before any chunk
arrives and then checks every chunk as it comes, holding only verified bytes (a device with little
RAM can write them straight to flash). Then the chunks, then the chunks of the superseded version
are cleared with empty retained payloads (MQTT's way to delete a retained message). Each step is
confirmed by the messages' echo on the publisher's own subscription before the next one starts (a
PUBACK alone proves little: see :class:`_Echoes`). Every model message is published at QoS 0: no
broker queues a QoS 0 message for an offline persistent session, so a device that was away gets only
what is retained when it re-subscribes (amqtt queues by the publisher's QoS, Mosquitto by the lower
of both); the echoes make up for the missing PUBACKs, and a missing echo is published again.

A device that connects at any later time rebuilds the current model from retained messages alone
(their order on a new subscription is up to the broker): :func:`fetch_model` does exactly that, and
:func:`publish_package` uses it to read the result back.

A retained manifest decides something here (the version to refuse going below, the chunks to clear)
only once it verified: with the publisher's public key when it signs, see
:func:`~lepton.protocol.open_manifest`. A forged manifest is logged and left alone.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.errors import DeliveryError, ModelRejected, ProtocolError
from lepton.protocol import (
    DEFAULT_PREFIX,
    BrokerURL,
    ModelPackage,
    Topics,
    load_public_key,
    open_manifest,
    short_lived_client,
    verify_package,
)

log = logging.getLogger(__name__)

__all__ = ["DeliveryError", "PublishResult", "fetch_model", "publish_package"]


#: While waiting for a complete model, fetch_model re-subscribes this often (seconds).
RESUBSCRIBE_S = 1.0
#: Model messages are published at QoS 0 (see the module docstring); a message whose echo does not
#: come back is sent again this many times.
MODEL_QOS = 0
RESENDS = 2


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
        return {
            "model": self.model,
            "version": self.version,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "manifest_bytes": self.manifest_bytes,
            "cleared": {str(k): v for k, v in self.cleared.items()},
            "verified": self.verified,
            "seconds": round(self.seconds, 3),
        }


def _url(url: str | BrokerURL) -> BrokerURL:
    return url if isinstance(url, BrokerURL) else BrokerURL.parse(url)


def _wait_all(infos, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    for info in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not _wait_one(info, remaining):
            raise DeliveryError(
                f"the broker did not acknowledge {what} within {timeout:.0f}s; "
                "is it overloaded or did the connection drop?"
            )


def _wait_one(info, timeout: float) -> bool:  # noqa: ANN001
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:  # paho: queue full / not connected
        raise DeliveryError(f"publish failed: {exc}") from None
    return info.is_published()


class _Echoes:
    """The publisher's own subscription to the model's topics.

    MQTT 3.1.1 delivers a client's publishes back to it when it subscribes to their topics. Seeing a
    message come back proves the broker processed it (stored it as retained, fanned it out) and did not
    drop it, which a PUBACK does not: amqtt acknowledges before processing and drops what is still
    queued when the client disconnects; Mosquitto acknowledges messages over ``message_size_limit`` or
    denied by its ACL and discards them. Retained copies (sent on subscribing) show the current state.
    """

    def __init__(self, manifest_topic: str) -> None:
        self.manifest_topic = manifest_topic
        self.cond = threading.Condition()
        self.seen: Counter = Counter()
        self.retained_manifest: bytes | None = None
        self.subscribed = threading.Event()
        self.got_retained = threading.Event()

    @staticmethod
    def key(topic: str, payload: bytes) -> tuple[str, bytes]:
        return topic, hashlib.sha256(payload).digest()

    def on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        if msg.retain:
            if msg.topic == self.manifest_topic and msg.payload:
                self.retained_manifest = bytes(msg.payload)
                self.got_retained.set()
            return
        with self.cond:
            self.seen[self.key(msg.topic, bytes(msg.payload))] += 1
            self.cond.notify_all()

    def on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        self.subscribed.set()

    def wait(self, expected: Counter, timeout: float) -> Counter:
        """Wait until every expected message came back; return what is still missing."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                missing = expected - self.seen
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                self.cond.wait(remaining)


def publish_package(
    url: str | BrokerURL,
    fleet: str,
    manifest_payload: bytes,
    chunks: list[bytes],
    *,
    supersedes: dict[int, int] | None = None,
    public_key=None,  # noqa: ANN001
    verify: bool = True,
    timeout: float = 30.0,
    probe_timeout: float = 1.0,
    prefix: str = DEFAULT_PREFIX,
) -> PublishResult:
    """Publish one model version built by :func:`lepton.protocol.build_package` for ``fleet``, on
    ``{prefix}/{fleet}/models/...``.

    ``supersedes`` maps versions whose chunks must be cleared to their chunk counts (the registry
    knows the last one it published; the version the broker currently retains is added here).
    ``public_key`` (an Ed25519 public key or the path of its PEM file; the signer's own) verifies
    the package and the manifest the broker retains: an unverified retained manifest decides nothing,
    neither the refusal below nor which chunks to clear. Without a key (an unsigned fleet, whose
    devices run ``--no-verify``) nothing can be verified and the retained manifest is taken as it is.
    Refuses to publish a version that is not newer than the one the broker retains, so devices only
    ever move forward. Every message is confirmed by its echo on the publisher's own subscription
    before the next step; with ``verify`` the model is also read back from retained messages alone,
    by a new connection, as a device joining later would, and compared byte for byte.
    """
    if isinstance(public_key, (str, Path)):
        public_key = load_public_key(public_key)
    manifest, _ = open_manifest(manifest_payload, public_key=public_key, fleet=fleet)
    topics = Topics(fleet=fleet, prefix=prefix)
    name, version = manifest.name, manifest.version
    burl = _url(url)
    started = time.monotonic()
    echoes = _Echoes(topics.model(name))
    cleared: dict[int, int] = {}
    with short_lived_client(burl, "publisher", on_message=echoes.on_message,
                            on_subscribe=echoes.on_subscribe) as client:
        client.subscribe(topics.model_filter(name), qos=1)
        if not echoes.subscribed.wait(timeout):
            raise DeliveryError(f"no SUBACK for {topics.model_filter(name)} within {timeout:.0f}s")
        echoes.got_retained.wait(probe_timeout)  # retained messages follow the SUBACK
        supersedes = dict(supersedes or {})
        if echoes.retained_manifest is not None:
            try:  # verify first: a forged manifest must not block publishing nor pick what to clear
                old, _ = open_manifest(
                    echoes.retained_manifest, public_key=public_key, fleet=fleet, model=name
                )
            except ModelRejected as exc:
                log.warning("ignoring the retained manifest of %s on %s (%s: %s); replacing it",
                            name, fleet, exc.reason, exc.detail)
            else:
                if old.version >= version and old.sha256 != manifest.sha256:
                    raise DeliveryError(
                        f"the broker already serves {name} v{old.version} on fleet {fleet}, not older "
                        f"than v{version}; devices never move back. Publish from the registry that "
                        "made it, or roll back with `lepton models rollback`, which creates a higher version"
                    )
                supersedes[old.version] = max(supersedes.get(old.version, 0), len(old.chunks))

        def send(items: list[tuple[str, bytes]], what: str) -> None:
            expected = Counter(_Echoes.key(t, p) for t, p in items)
            todo = items
            for attempt in range(RESENDS + 1):
                infos = [client.publish(t, p, qos=MODEL_QOS, retain=True) for t, p in todo]
                _wait_all(infos, timeout, what)
                missing = echoes.wait(expected, timeout if attempt == RESENDS else min(timeout, 5.0))
                if not missing:
                    return
                todo = [(t, p) for t, p in items if _Echoes.key(t, p) in missing]
                log.info("%d of %d messages (%s) did not come back; sending them again", len(todo),
                         len(items), what)
            if missing:
                raise DeliveryError(
                    f"the broker acknowledged but did not deliver {sum(missing.values())} of {len(items)} "
                    f"messages ({what}); it drops messages over its size limit (Mosquitto: "
                    "message_size_limit / max_packet_size: lower --chunk-size) or denied by its ACL "
                    f"(grant this user readwrite on {topics.model_filter(name)})"
                )

        send([(topics.model(name), manifest_payload)], "the manifest")
        send(
            # an empty chunk (an empty model's only one) cannot be retained: receivers take it as sent
            [(topics.model_chunk(name, version, i), c) for i, c in enumerate(chunks) if c],
            f"{len(chunks)} chunks of {name} v{version}",
        )
        log.info(
            "published %s v%d to %s: %d chunks, %d bytes", name, version, fleet, len(chunks), manifest.size
        )
        clears = []
        for old_version, count in sorted(supersedes.items()):
            if old_version != version:
                clears += [(topics.model_chunk(name, old_version, i), b"") for i in range(count)]
                cleared[old_version] = count
        if clears:
            send(clears, "the clearing of superseded chunks")
    if verify:
        package = fetch_model(burl, fleet, name, public_key, timeout=min(timeout, 15.0), min_version=version,
                              prefix=prefix)
        if package.manifest.version != version or package.manifest.sha256 != manifest.sha256:
            raise DeliveryError(
                f"read-back found {name} v{package.manifest.version}, not v{version}: another "
                "publisher raced this one"
            )
    return PublishResult(
        model=name,
        version=version,
        chunks=len(chunks),
        chunk_bytes=sum(len(c) for c in chunks),
        manifest_bytes=len(manifest_payload),
        cleared=cleared,
        verified=verify,
        seconds=time.monotonic() - started,
    )


def fetch_model(
    url: str | BrokerURL,
    fleet: str,
    model: str,
    public_key=None,
    timeout: float = 10.0,
    *,
    min_version: int | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> ModelPackage:  # noqa: ANN001
    """Rebuild and verify the current package of ``model`` from retained messages alone (topics
    ``{prefix}/{fleet}/models/{model}/#``).

    ``public_key`` is an Ed25519 public key, a path to its PEM file, or None to check hashes only.
    With ``min_version``, older manifests are skipped and the call waits for that version (brokers
    such as amqtt acknowledge a publish before their retained store holds it).
    A manifest is verified when it arrives (signature with ``public_key``, then its fleet and model
    against the topic), before it may replace the one being assembled: a forged manifest, retained or
    live, is remembered only as the error to raise if nothing genuine completes.
    Raises :class:`~lepton.errors.ModelRejected` (with its reason) for a bad package and
    :class:`DeliveryError` when no complete model arrives within ``timeout`` seconds.
    """
    if isinstance(public_key, (str, Path)):
        public_key = load_public_key(public_key)
    topics = Topics(fleet=fleet, prefix=prefix)
    lock = threading.Lock()
    state: dict[str, Any] = {"manifest": None, "parsed": None, "error": None, "complete": False}
    chunks: dict[tuple[int, int], bytes] = {}
    ready = threading.Event()

    def have(m, i: int) -> bool:  # noqa: ANN001
        return (m.version, i) in chunks or (m.size == 0 and i == 0)

    def check() -> None:
        m = state["parsed"]
        if m is None:
            return
        if min_version is not None and m.version < min_version:
            return
        if all(have(m, i) for i in range(len(m.chunks))):
            state["complete"] = True
            ready.set()

    def on_manifest(payload: bytes) -> None:
        if not payload or payload == state["manifest"]:
            return  # a cleared manifest is unverifiable: it decides nothing either
        try:
            m, _ = open_manifest(payload, public_key=public_key, fleet=fleet, model=model)
        except ModelRejected as exc:
            state["error"] = exc  # raised only if nothing genuine arrives
            ready.set()
            return
        current = state["parsed"]
        if current is not None and m.version < current.version:
            return
        state["manifest"], state["parsed"], state["complete"] = payload, m, False

    def on_message(c, userdata, msg):  # noqa: ANN001
        try:
            parsed = topics.parse(msg.topic)
        except ProtocolError:
            return
        if parsed.model != model:
            return
        with lock:
            if parsed.channel == "model":
                on_manifest(bytes(msg.payload))
            elif parsed.channel == "model_chunk":
                assert parsed.version is not None and parsed.chunk is not None  # set on this channel
                key = (parsed.version, parsed.chunk)
                if msg.payload:
                    chunks[key] = bytes(msg.payload)
                else:
                    chunks.pop(key, None)
            check()

    with short_lived_client(_url(url), "fetch", on_message=on_message) as client:
        client.subscribe(topics.model_filter(model), qos=1)
        deadline = time.monotonic() + timeout
        while True:
            ready.wait(min(RESUBSCRIBE_S, max(0.0, deadline - time.monotonic())))
            with lock:
                ready.clear()
                complete = state["complete"]
                # Only forged or foreign manifests so far: a plain fetch reports it; a read-back
                # (min_version) waits for its own, which a re-subscription brings.
                refused = state["parsed"] is None and state["error"] is not None and min_version is None
            if complete or refused or time.monotonic() >= deadline:
                break
            # Subscribing again makes the broker resend the retained messages. It closes a race of
            # amqtt's, which fans a publish out before storing it as retained: a subscription made in
            # between gets neither the live message nor the new retained one.
            client.subscribe(topics.model_filter(model), qos=1)
        with lock:
            if not state["complete"] and state["parsed"] is None and state["error"] is not None:
                raise state["error"]
        if not complete:
            with lock:
                got = state["parsed"]
                n = len(chunks)
            detail = (
                "no retained manifest"
                if got is None
                else f"a manifest and {n} chunk(s), not a complete model"
                + (f" of v{min_version} or newer" if min_version else "")
            )
            raise DeliveryError(
                f"no complete model {model!r} on fleet {fleet!r} within {timeout:.0f}s "
                f"({detail}); was it published to this broker?"
            )
    with lock:
        payload, m = state["manifest"], state["parsed"]
        parts = {i: chunks.get((m.version, i), b"") for i in range(len(m.chunks))}
    package = verify_package(payload, parts, public_key=public_key, fleet=fleet, model=model)
    log.debug(
        "fetched %s v%d (%d bytes, sha256 %s)",
        model,
        m.version,
        len(package.data),
        hashlib.sha256(package.data).hexdigest()[:12],
    )
    return package
