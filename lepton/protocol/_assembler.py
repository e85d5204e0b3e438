"""Model chunk assembly and verification without I/O: messages and the time in, decisions out.

:class:`ModelAssembler` holds every rule of the model channel (docs/protocol.md, "How a device
assembles a model") and nothing else: it never touches MQTT, a thread, a clock or a file. It is the one
copy both receivers use: a device's runtime (lepton/device/_runtime.py) and the cloud serve worker
(lepton/cloud/_serve.py), which verifies and swaps models exactly as a device does. Its caller feeds it
what arrived, with the monotonic time it arrived, and carries out what it returns::

    core = ModelAssembler(fleet="f1", model="digits", public_key=key, pipeline_hash=spec_hash,
                          input_shape=(64,))
    for event in core.receive_manifest(payload, now=1.0) + core.receive_chunk(3, 0, chunk, now=1.1):
        if isinstance(event, Ready):      # a verified package: load it, then core.served(version)
            ...                           # or core.refuse(version, error) if it does not load
        elif isinstance(event, Rejected): # report event.error.reason (a REJECT_REASONS code)
            ...
        elif isinstance(event, Refetch):  # subscribe again: the broker resends what is retained
            ...

An empty list means "waiting": nothing to do until more messages come or :meth:`ModelAssembler.tick`
is called. Not thread-safe: the thread that calls it owns all of its state (the device runtime's worker
thread, the serve worker's model thread); other threads read the immutable :class:`AssemblerStats`
snapshot its owner publishes.

The rules, each unit-tested in tests/protocol/test_assembler.py:

* Verify first: a manifest goes through :func:`~lepton.protocol.open_manifest` (size, signature, fields,
  the signed fleet and model against the receiver's) before it decides anything; a forged or replayed
  one supersedes nothing, clears nothing, pins nothing, and is reported with the version it claims.
* A verified manifest not newer than the one served or the one being assembled is :class:`Stale`,
  not an error. A version refused once, and any older one, is never assembled again and not reported
  again (the retained manifest comes back on every reconnect).
* A newer verified manifest drops the older assembly and older orphan chunks; one that is too large
  (``max_model_bytes``) or does not fit the receiver (pipeline hash, input dtype and shape) is refused.
* Chunks of the version being assembled are checked against their sha256 on arrival; chunks of any
  other newer version are *orphans*: unverifiable, held within ``max_orphan_bytes``,
  ``max_orphan_chunks`` and ``max_orphan_versions`` (O(1) per chunk), dropped after ``orphan_ttl``,
  and checked when their manifest verifies. An empty chunk payload (the cloud clearing a topic)
  removes an orphan and is otherwise ignored.
* A complete version is checked whole (size, sha256, hashed chunk by chunk in order: the chunks are
  not copied into one buffer; ``package.parts`` holds them), then refused if the ONNX model names
  external data files; otherwise it is :class:`Ready`.
* Without progress, :meth:`ModelAssembler.tick` asks for a re-subscription (:class:`Refetch`) with
  exponential backoff up to ``REFETCH_MAX_S``; after ``assemble_timeout`` it reports the missing chunks
  once (``missing_chunk``) and keeps waiting. Orphans without a manifest trigger a refetch too, and so
  does a resumed session that brought no model message within ``reconnect_quiet``.

Where the device's and the serve worker's former copies differed, the stricter rule was kept (issue 11):

* a second verified manifest of the version being assembled is stale (serve's rule; the device's
  copy restarted the assembly with it, which docs/protocol.md never allowed);
* a refused version is a floor: it and every older version are ignored from then on (serve's
  ``settle``), where the device remembered the last 16 refused versions and would take an older one;
* the serve worker now gets the device's caps (orphans bounded in count, versions and time as well as
  bytes; 32 MiB of orphans and 256 MiB per model instead of 64 MiB and 1 GiB), the device's refusal
  of manifests that do not fit (remembered, so not reported on every reconnect), the ``missing_chunk``
  report, the external-data check before a package is Ready, and reports a forged manifest with the
  version it claims;
* the refetch backoff keeps growing while one version stays incomplete (the device's rule: each
  re-subscription makes the broker resend every chunk), where serve's reset it on every new chunk.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lepton.errors import ModelRejected
from lepton.protocol._ids import validate_id
from lepton.protocol._models import (
    ModelManifest,
    ModelPackage,
    assemble_package,
    check_onnx_self_contained,
    open_manifest,
    parse_manifest,
    verify_chunk,
    verify_package,
)
from lepton.protocol._topics import ParsedTopic

__all__ = [
    "INPUT_DTYPE_NAMES",
    "Announced",
    "AssemblerStats",
    "AssemblyEvent",
    "Cleared",
    "ModelAssembler",
    "Ready",
    "Refetch",
    "Rejected",
    "Stale",
    "check_input_shape",
    "shape_fits",
]

#: dtypes a manifest may name for the model input (numpy names).
INPUT_DTYPE_NAMES = ("float32", "float16", "float64", "uint8", "int8", "int32", "int64")
#: sha256 of no bytes: the one chunk of an empty model, which is never sent (an empty retained
#: message clears the topic), so a receiver takes it as present.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
REFETCH_MAX_S = 60.0


# ------------------------------------------------------------------------------------------------
# what comes out
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """Every chunk arrived and the package verified: load it, then call ``served`` or ``refuse``."""

    package: ModelPackage
    manifest_payload: bytes  # exactly as received, to store as the last good model
    manifest_seen: float  # the ``now`` the manifest came with
    manifest_wall: float | None  # the ``wall`` the caller passed with the manifest, carried unread

    @property
    def version(self) -> int:
        return self.package.manifest.version


@dataclass(frozen=True)
class Rejected:
    """A manifest or chunk was refused; ``error.reason`` is a REJECT_REASONS code.

    ``version`` is the verified version, or for a manifest that did not verify the version it claims
    (for the report only), or None. A refused chunk or a timeout leaves that version being assembled.
    """

    version: int | None
    error: ModelRejected


@dataclass(frozen=True)
class Stale:
    """A verified manifest not newer than the version served or being assembled: ignored."""

    version: int
    serving: int | None


@dataclass(frozen=True)
class Refetch:
    """Subscribe to the model topics again, so the broker resends the retained manifest and chunks."""

    why: str


@dataclass(frozen=True)
class Announced:
    """A newer verified manifest is now being assembled; ``have`` of its ``of`` chunks are here."""

    version: int
    have: int
    of: int


@dataclass(frozen=True)
class Cleared:
    """The retained manifest was cleared (empty payload): unverifiable, so it changes nothing."""

    serving: int | None


AssemblyEvent = Ready | Rejected | Stale | Refetch | Announced | Cleared


@dataclass(frozen=True)
class AssemblerStats:
    """A snapshot of what the assembler holds, for status and telemetry (immutable: safe to share)."""

    pending: tuple[int, int, int] | None  # (version, chunks here, chunks in all)
    pending_bytes: int
    orphan_bytes: int
    orphan_chunks: int
    orphan_versions: int
    orphans_dropped: int
    refetches: int

    @property
    def pending_summary(self) -> dict[str, int] | None:
        """``pending`` as the ``model_pending`` object of a status: ``{"version", "chunks", "of"}``."""
        if self.pending is None:
            return None
        return dict(zip(("version", "chunks", "of"), self.pending, strict=True))


# ------------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------------
class _Prefix:
    """The sha256 of chunks ``0 .. count-1`` in order, fed as they arrive, so that the whole model's
    digest is ready when its last chunk comes instead of costing one more pass over every byte then.

    Only hashing: it decides nothing. The caller feeds it the exact objects it holds, and starts a new
    one if a chunk it already hashed is replaced.
    """

    __slots__ = ("count", "hasher", "size")

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.count = 0
        self.size = 0

    def advance(self, chunks: Mapping[int, bytes]) -> None:
        while self.count in chunks:
            data = chunks[self.count]
            self.hasher.update(data)
            self.size += len(data)
            self.count += 1

    def result(self, n_chunks: int) -> tuple[str, int] | None:
        """``(sha256 hex, size)`` of chunks ``0 .. n_chunks-1``, if exactly those were hashed."""
        return (self.hasher.hexdigest(), self.size) if self.count == n_chunks else None


@dataclass
class _Assembly:
    """The chunks of the one version whose manifest verified and that is not served yet.

    Every chunk in ``chunks`` has been checked against the manifest (on arrival, or when the manifest
    came), so finishing does not hash them again.
    """

    version: int
    manifest: ModelManifest
    manifest_payload: bytes
    signed_by: str | None
    manifest_seen: float
    manifest_wall: float | None
    chunks: dict[int, bytes] = field(default_factory=dict)
    whole: _Prefix = field(default_factory=_Prefix)  # over verified chunks only
    nbytes: int = 0
    last_progress: float = 0.0
    refetch_wait: float = 0.0  # seconds without progress before the next re-subscribe
    refetches: int = 0
    stuck_reported: bool = False

    def add(self, index: int, data: bytes, now: float) -> None:
        old = self.chunks.get(index)
        self.nbytes += len(data) - (len(old) if old is not None else 0)
        self.chunks[index] = data
        self.last_progress = now
        self.whole.advance(self.chunks)

    def complete(self) -> bool:
        return len(self.chunks) == len(self.manifest.chunks)


@dataclass
class _Orphans:
    """Chunks of a version without a verified manifest: unverifiable, so bounded and short-lived.

    Each is hashed as it arrives (``digests``; ``whole`` hashes them in order), work the manifest's
    check then need not wait for: it only compares digests. Nothing is decided before it verifies.
    """

    first_seen: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    digests: dict[int, str] = field(default_factory=dict)
    whole: _Prefix = field(default_factory=_Prefix)
    nbytes: int = 0


class ModelAssembler:
    """The model channel of one model name on one receiver, as a state machine without I/O.

    ``public_key=None`` is ``--no-verify``: hashes are still checked, the signature is not.
    ``pipeline_hash`` and ``input_shape`` (the feature shape without the batch dimension) are what the
    device runs; ``None`` skips that check (the serve worker checks each request instead). Not
    thread-safe: one thread owns it.

    >>> asm = ModelAssembler(fleet="demo", model="digits", public_key=None, pipeline_hash=None)
    >>> asm.receive_chunk(1, 0, b"bytes", now=0.0)    # no manifest yet: held as an orphan
    []
    >>> asm.stats().orphan_chunks
    1
    """

    def __init__(
        self,
        *,
        fleet: str,
        model: str,
        public_key=None,
        pipeline_hash: str | None,
        input_shape: Sequence[int] | None = None,
        assemble_timeout: float = 120.0,
        max_model_bytes: int = 256 * 1024 * 1024,
        max_orphan_bytes: int = 32 * 1024 * 1024,
        max_orphan_chunks: int = 1024,
        max_orphan_versions: int = 2,
        orphan_ttl: float = 60.0,
        refetch_after: float = 3.0,
        reconnect_quiet: float = 2.0,
    ) -> None:
        self.fleet = validate_id(fleet, kind="fleet")
        self.model = validate_id(model, kind="model")
        self.public_key = public_key
        self.pipeline_hash = pipeline_hash
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
        self.assemble_timeout = float(assemble_timeout)
        self.max_model_bytes = int(max_model_bytes)
        self.max_orphan_bytes = int(max_orphan_bytes)
        self.max_orphan_chunks = int(max_orphan_chunks)
        self.max_orphan_versions = int(max_orphan_versions)
        self.orphan_ttl = float(orphan_ttl)
        self.refetch_after = float(refetch_after)
        self.reconnect_quiet = float(reconnect_quiet)

        self.serving: int | None = None  # the version the caller serves (set by ``served``)
        self._pending: _Assembly | None = None
        self._orphans: dict[int, _Orphans] = {}
        self._orphan_bytes = 0
        self._orphan_chunks = 0
        self._orphans_dropped = 0
        self._refetches = 0
        self._refetch_wait = self.refetch_after  # between re-subscriptions for a missing manifest
        self._last_refetch = 0.0
        self._resume_handled: float | None = None  # the resumed_at that tick already decided on
        self._refused: int | None = None  # the newest verified version refused: it and older ones are ignored
        self._can_refetch = True  # as passed to the current tick

    # -- inputs -----------------------------------------------------------------------------------
    def receive(self, parsed: ParsedTopic, payload: bytes, now: float, *, wall: float | None = None
                ) -> list[AssemblyEvent]:
        """A message on one of this model's topics (manifest or chunk); others are not for it: ``[]``."""
        if parsed.model != self.model:
            return []
        if parsed.channel == "model":
            return self.receive_manifest(payload, now, wall=wall)
        if parsed.channel == "model_chunk" and parsed.version is not None and parsed.chunk is not None:
            return self.receive_chunk(parsed.version, parsed.chunk, payload, now)
        return []

    def receive_manifest(self, payload: bytes, now: float, *, wall: float | None = None
                         ) -> list[AssemblyEvent]:
        """A message on the model's manifest topic, received at monotonic time ``now``."""
        if not payload:  # unverifiable, so it decides nothing
            return [Cleared(self.serving)]
        pending = self._pending
        if pending is not None and pending.manifest_payload == payload:
            return []  # the same retained manifest again, already verified
        try:  # verify first: until this returns, the payload decides nothing
            manifest, signed_by = open_manifest(payload, public_key=self.public_key, fleet=self.fleet,
                                                model=self.model)
        except ModelRejected as exc:
            return [Rejected(_claimed_version(payload), exc)]  # the claimed version: for the report only
        version = manifest.version
        if (self.serving is not None and version <= self.serving) or (pending is not None
                                                                      and version <= pending.version):
            return [Stale(version, self.serving)]  # the same version re-signed does not restart it either
        if self._refused is not None and version <= self._refused:
            return []  # refused already; the retained manifest comes again on every reconnect
        # A verified manifest names the newest version: older pending chunks can never be served.
        self._pending = None
        for old in [v for v in self._orphans if v < version]:
            self._drop_orphans(old)
        try:
            if manifest.size > self.max_model_bytes:
                raise ModelRejected("too_large", f"v{version} is {manifest.size} bytes; this device takes "
                                    f"at most {self.max_model_bytes} (max_model_bytes)")
            self.check_compatible(manifest)
        except ModelRejected as exc:
            return self.refuse(version, exc)  # drops its orphans too
        asm = _Assembly(version=version, manifest=manifest, manifest_payload=bytes(payload),
                        signed_by=signed_by, manifest_seen=now, manifest_wall=wall, last_progress=now,
                        refetch_wait=self.refetch_after)
        self._pending = asm
        events: list[AssemblyEvent] = []
        bad: list[ModelRejected] = []
        group = self._orphans.get(version)
        for index, data in self._drop_orphans(version).items():
            try:
                verify_chunk(manifest, index, data, digest=group.digests.get(index) if group else None)
            except ModelRejected as exc:
                bad.append(exc)
            else:
                asm.chunks[index] = data
                asm.nbytes += len(data)
        if group is not None and not bad:
            asm.whole = group.whole  # it hashed exactly these chunks, in order
        asm.whole.advance(asm.chunks)
        if len(manifest.chunks) == 1 and manifest.chunks[0] == EMPTY_SHA256:
            asm.add(0, b"", now)  # an empty model: its one chunk is never sent
        if bad:
            events.append(Rejected(version, bad[0]))
        events.append(Announced(version, len(asm.chunks), len(manifest.chunks)))
        if asm.complete():
            events += self._finish(asm)
        return events

    def receive_chunk(self, version: int, index: int, payload: bytes, now: float) -> list[AssemblyEvent]:
        """A message on chunk topic ``index`` of ``version``, received at monotonic time ``now``."""
        if self.serving is not None and version <= self.serving:
            return []
        pending = self._pending
        if pending is not None and version == pending.version:
            if not payload:  # the cloud clears chunks with an empty retained message
                return []
            try:
                verify_chunk(pending.manifest, index, payload)
            except ModelRejected as exc:
                return [Rejected(version, exc)]  # the genuine chunk may still come: keep waiting
            if index not in pending.chunks:
                pending.add(index, payload, now)
            return self._finish(pending) if pending.complete() else []
        if (pending is not None and version < pending.version) or (self._refused is not None
                                                                   and version <= self._refused):
            return []  # superseded or refused
        self._add_orphan(version, index, payload, now)
        return []

    def tick(self, now: float, *, resumed_at: float | None = None, last_heard: float = 0.0,
             can_refetch: bool = True) -> list[AssemblyEvent]:
        """Time passed: drop old orphans, ask for a refetch, report a stalled version.

        ``resumed_at`` is when the connection last came back with its session resumed (None if it
        never did), ``last_heard`` when a model message last arrived, both monotonic like ``now``.
        ``can_refetch=False`` (nobody can re-subscribe): no :class:`Refetch`, and no refetch backoff.
        """
        events: list[AssemblyEvent] = []
        self._can_refetch = can_refetch
        if resumed_at is not None and resumed_at != self._resume_handled \
                and now - resumed_at > self.reconnect_quiet:
            self._resume_handled = resumed_at
            if last_heard < resumed_at:  # the broker resent nothing: ask for the retained state
                events += self._refetch(now, "a resumed session brought no model message")
        for version in [v for v, g in self._orphans.items() if now - g.first_seen > self.orphan_ttl]:
            self._orphans_dropped += len(self._orphans[version].chunks)
            self._drop_orphans(version)
        asm = self._pending
        if asm is None:
            # Chunks of a newer version but no manifest (a broker such as amqtt may fan a manifest out
            # before it stores it as retained, so a new subscriber can miss it): ask again, with backoff.
            oldest = min((g.first_seen for g in self._orphans.values()), default=None)
            if oldest is not None and now - oldest > self._refetch_wait \
                    and now - self._last_refetch > self._refetch_wait:
                events += self._refetch(now, "chunks of a newer version but no manifest")
            return events
        if now - asm.last_progress > asm.refetch_wait:
            # Chunks were lost (dropped as orphans, or by the broker): subscribing again makes the
            # broker resend every retained chunk; those already here are skipped.
            asm.refetches += 1
            asm.last_progress = now
            asm.refetch_wait = min(REFETCH_MAX_S, asm.refetch_wait * 2)
            events += self._refetch(now, f"v{asm.version}: {len(asm.chunks)}/{len(asm.manifest.chunks)} "
                                    "chunks, none new for a while")
        if not asm.stuck_reported and now - asm.manifest_seen > self.assemble_timeout:
            asm.stuck_reported = True
            missing = [i for i in range(len(asm.manifest.chunks)) if i not in asm.chunks]
            events.append(Rejected(asm.version, ModelRejected(
                "missing_chunk", f"chunks {missing[:10]} of v{asm.version} have not arrived after "
                f"{self.assemble_timeout:.0f}s; still waiting")))
        return events

    # -- what the caller did with a Ready package -------------------------------------------------
    def served(self, version: int) -> None:
        """The caller now serves ``version`` (swapped in, or loaded from disk at start-up)."""
        self.serving = version
        for v in [v for v in self._orphans if v <= version]:
            self._drop_orphans(v)
        self._refetch_wait = self.refetch_after

    def refuse(self, version: int, exc: ModelRejected) -> list[AssemblyEvent]:
        """A verified version this receiver cannot use: from now on its manifest and chunks, and those of
        every older version, are ignored."""
        self._refused = max(version, self._refused or version)
        if self._pending is not None and self._pending.version <= self._refused:
            self._pending = None
        for v in [v for v in self._orphans if v <= self._refused]:
            self._drop_orphans(v)
        return [Rejected(version, exc)]

    # -- checks -----------------------------------------------------------------------------------
    def check_compatible(self, manifest: ModelManifest) -> None:
        """Raise ModelRejected unless the manifest fits this device's pipeline and features."""
        if self.pipeline_hash is not None and manifest.pipeline_hash != self.pipeline_hash:
            raise ModelRejected("incompatible_pipeline", f"v{manifest.version} was trained on pipeline "
                                f"{manifest.pipeline_hash!r}, this device runs {self.pipeline_hash!r}")
        spec = manifest.input
        dtype = spec.get("dtype", "float32")
        if dtype not in INPUT_DTYPE_NAMES:
            raise ModelRejected("incompatible_input", f"v{manifest.version} takes dtype {dtype!r}; "
                                f"supported: {sorted(INPUT_DTYPE_NAMES)}")
        shape = spec.get("shape")
        if shape is not None and not (isinstance(shape, list) and all(isinstance(d, (int, str)) or d is None
                                                                       for d in shape)):
            raise ModelRejected("incompatible_input",
                                f"v{manifest.version} has a malformed input shape {shape!r}")
        if shape is not None and self.input_shape is not None:
            check_input_shape(manifest.version, shape, self.input_shape)

    def verify_stored(self, manifest_payload: bytes, data: bytes) -> ModelPackage:
        """Verify a package read back from disk exactly like one from the broker; raise ModelRejected."""
        manifest, _, _ = parse_manifest(manifest_payload)
        chunks = {i: data[i * manifest.chunk_size:(i + 1) * manifest.chunk_size]
                  for i in range(len(manifest.chunks))}
        package = verify_package(manifest_payload, chunks, public_key=self.public_key, fleet=self.fleet,
                                 model=self.model)
        self.check_compatible(package.manifest)
        check_onnx_self_contained(package.data, what=f"the stored v{package.manifest.version}")
        return package

    # -- reports ----------------------------------------------------------------------------------
    @property
    def pending_version(self) -> int | None:
        return self._pending.version if self._pending is not None else None

    def stats(self) -> AssemblerStats:
        a = self._pending
        return AssemblerStats(
            pending=(a.version, len(a.chunks), len(a.manifest.chunks)) if a is not None else None,
            pending_bytes=a.nbytes if a is not None else 0,
            orphan_bytes=self._orphan_bytes,
            orphan_chunks=self._orphan_chunks,
            orphan_versions=len(self._orphans),
            orphans_dropped=self._orphans_dropped,
            refetches=self._refetches,
        )

    # -- internals --------------------------------------------------------------------------------
    def _finish(self, asm: _Assembly) -> list[AssemblyEvent]:
        """All chunks are here: join them and verify the whole package."""
        self._pending = None  # the package holds the bytes now, or the version is refused
        try:
            package = assemble_package(asm.manifest, asm.chunks, signed_by=asm.signed_by,
                                       chunks_verified=True, whole=asm.whole.result(len(asm.manifest.chunks)))
            # before ONNX Runtime sees it: it would open the files external data names
            check_onnx_self_contained(package.parts, what=f"v{asm.version}")
        except ModelRejected as exc:
            return self.refuse(asm.version, exc)
        return [Ready(package=package, manifest_payload=asm.manifest_payload, manifest_seen=asm.manifest_seen,
                      manifest_wall=asm.manifest_wall)]

    def _add_orphan(self, version: int, index: int, payload: bytes, now: float) -> None:
        """Hold an unverifiable chunk, within the caps; O(1) whatever is already held."""
        group = self._orphans.get(version)
        if not payload:
            if group is not None and index in group.chunks:
                self._orphan_bytes -= len(group.chunks[index])
                group.nbytes -= len(group.chunks.pop(index))
                group.digests.pop(index, None)
                self._orphan_chunks -= 1
                if index < group.whole.count:
                    group.whole = _Prefix()
            return
        old = len(group.chunks[index]) if group is not None and index in group.chunks else None
        growth = len(payload) - (old or 0)
        if (old is None and self._orphan_chunks >= self.max_orphan_chunks) \
                or self._orphan_bytes + growth > self.max_orphan_bytes:
            self._orphans_dropped += 1  # fetched again by a re-subscription once its manifest verifies
            return
        if group is None:
            if len(self._orphans) >= self.max_orphan_versions:
                lowest = min(self._orphans)  # at most max_orphan_versions entries: O(1)
                if lowest > version:
                    self._orphans_dropped += 1
                    return
                self._orphans_dropped += len(self._drop_orphans(lowest))
                if self._orphan_chunks >= self.max_orphan_chunks:
                    self._orphans_dropped += 1
                    return
            group = self._orphans[version] = _Orphans(first_seen=now)
        group.chunks[index] = payload
        group.digests[index] = hashlib.sha256(payload).hexdigest()
        if index < group.whole.count:  # a chunk it hashed was replaced: start again
            group.whole = _Prefix()
        group.whole.advance(group.chunks)
        group.nbytes += growth
        self._orphan_bytes += growth
        if old is None:
            self._orphan_chunks += 1

    def _drop_orphans(self, version: int) -> dict[int, bytes]:
        group = self._orphans.pop(version, None)
        if group is None:
            return {}
        self._orphan_bytes -= group.nbytes
        self._orphan_chunks -= len(group.chunks)
        return group.chunks

    def _refetch(self, now: float, why: str) -> list[AssemblyEvent]:
        if not self._can_refetch:
            return []
        self._last_refetch = now
        self._refetch_wait = min(REFETCH_MAX_S, self._refetch_wait * 2)
        self._refetches += 1
        return [Refetch(why)]


def _claimed_version(payload: bytes) -> int | None:
    """The version a refused manifest claims, unverified, to name it in the error report."""
    try:
        return parse_manifest(payload)[0].version
    except ModelRejected:
        return None


def shape_fits(shape: Sequence[int], dims: Sequence[int]) -> bool:
    """Whether ``shape`` matches ``dims``, where -1 in ``dims`` takes any size."""
    return len(shape) == len(dims) and all(d == -1 or d == n for d, n in zip(dims, shape, strict=True))


def check_input_shape(version: int, model_shape: Sequence[Any], features: tuple[int, ...]) -> None:
    """The model's input (batch dimension first, or none) must accept the device's feature shape."""
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in model_shape]
    for candidate in ([dims[1:]] if len(dims) >= 2 else []) + [dims]:
        if shape_fits(features, candidate):
            return
        if candidate and all(d > 0 for d in candidate) and math.prod(candidate) == math.prod(features):
            return  # same number of values: the runtime reshapes (e.g. 8x8 image -> 64 features)
    raise ModelRejected("incompatible_input", f"v{version} takes input shape {list(model_shape)}, "
                        f"this device's features are {list(features)}")
