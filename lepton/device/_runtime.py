"""On-device inference with ONNX Runtime and zero-downtime model hot-swap.

The device agent feeds every MQTT message to :meth:`ModelRuntime.handle_message` (from paho's network
thread) and calls :meth:`ModelRuntime.predict` for every captured sample::

    runtime = ModelRuntime(topics=Topics(fleet="f1"), model="digits", store_dir=Path("spool/models"),
                           public_key=load_public_key("lepton.pub"), pipeline_hash=spec_hash,
                           input_shape=(1, 8, 8), on_change=lambda status: publish_status())
    for topic_filter, qos in runtime.subscriptions():
        client.subscribe(topic_filter, qos)
    ...
    prediction = runtime.predict(features)      # None until a model is loaded

How a swap happens, and why it never stalls inference:

* ``handle_message`` only parses the topic and queues the payload; it never blocks or raises.
* One background thread verifies a manifest before it lets it decide anything (size, Ed25519
  signature, then the signed fleet and model against the topic, see
  :func:`~lepton.protocol.open_manifest`): a forged or replayed manifest supersedes nothing, clears
  nothing and pins no version. Chunks of a version with a verified manifest are checked against
  their sha256 as they arrive and kept; chunks of any other version are *orphans*, unverifiable, and
  only a bounded number of them (``max_orphan_bytes``, ``max_orphan_chunks``, ``max_orphan_versions``)
  is held, in O(1) per chunk. Whatever was dropped is fetched again by re-subscribing (the broker
  resends the retained chunks), which ``on_resubscribe`` does when a verified version stops making
  progress. Then it verifies the whole package (sha256, size, pipeline hash, input shape/dtype, no
  ONNX external data), writes it to disk, builds a new ``InferenceSession`` from that file, warms it
  up, swaps, and then commits it (fsync) as the last good model.
* The swap is one reference assignment (``self._current = loaded``). ``predict`` reads the reference
  once per call, so an inference in flight finishes on the old session and the next one uses the new;
  the old session is freed when its last inference returns.

A rejected model (any :data:`~lepton.protocol.REJECT_REASONS` code) leaves the current model serving;
the reason goes to ``status()["model_error"]``, the log, and ``on_change``. A version not newer than the
one served is ignored (``stale_version``), which is not an error: it is how a device sees the retained
manifest again after every reconnect.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.device._modelstore import ModelStore
from lepton.errors import ModelRejected, ProtocolError
from lepton.protocol import (
    ModelManifest,
    ModelPackage,
    Topics,
    assemble_package,
    check_onnx_self_contained,
    open_manifest,
    parse_manifest,
    validate_id,
    verify_chunk,
    verify_package,
)

log = logging.getLogger(__name__)

__all__ = ["ModelRuntime", "Prediction"]

#: numpy dtypes a manifest may name for the model input.
INPUT_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "uint8": np.uint8,
    "int8": np.int8, "int32": np.int32, "int64": np.int64,
}
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64",
}
LATENCY_WINDOW = 2048
ACCURACY_VERSIONS_KEPT = 8
#: sha256 of no bytes: the one chunk of an empty model, which is never sent (an empty retained
#: message clears the topic), so a receiver takes it as present.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
REJECTED_VERSIONS_KEPT = 16
REFETCH_MAX_S = 60.0


@dataclass(frozen=True)
class Prediction:
    """One inference: the label the model chose, its probability, how long it took, which version."""

    label: str
    index: int
    confidence: float
    latency_ms: float
    version: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as published in a ``predictions`` report (see docs/protocol.md, "Predictions")."""
        return asdict(self)


@dataclass(frozen=True)
class _Loaded:
    """A model ready to serve; replaced as a whole, never mutated."""

    manifest: ModelManifest
    session: Any  # onnxruntime.InferenceSession
    input_name: str
    output_name: str
    dtype: Any
    sample_shape: tuple[int, ...]  # the input shape without the batch dimension, -1 where dynamic
    batched: bool
    labels: tuple[str, ...]
    source: str  # "broker" or "disk"
    loaded_at: float


@dataclass
class _Assembly:
    """The chunks of the one version whose manifest verified and that is not served yet.

    Every chunk in ``chunks`` has been checked against the manifest (on arrival, or when the
    manifest came), so _finish does not hash them again.
    """

    version: int
    manifest: ModelManifest
    manifest_payload: bytes
    signed_by: str | None
    manifest_seen: float
    manifest_wall: float
    chunks: dict[int, bytes] = field(default_factory=dict)
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

    def complete(self) -> bool:
        return len(self.chunks) == len(self.manifest.chunks)


@dataclass
class _Orphans:
    """Chunks of a version without a verified manifest: unverifiable, so bounded and short-lived."""

    first_seen: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    nbytes: int = 0


class ModelRuntime:
    """Serves the current model of one model name and hot-swaps newer verified versions.

    ``public_key=None`` means the device runs with ``--no-verify``: hashes are still checked, the
    signature is not. ``pipeline_hash`` (the hash of the device's preprocessing spec) must equal the
    model's; ``None`` skips that check. ``input_shape`` is the feature shape the pipeline produces,
    without the batch dimension; ``None`` skips the shape check.
    """

    def __init__(
        self,
        *,
        topics: Topics,
        model: str,
        store_dir: Path,
        public_key=None,
        pipeline_hash: str | None,
        input_shape: tuple | None = None,
        on_change: Callable[[dict], None] | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 1,
        assemble_timeout: float = 120.0,
        max_model_bytes: int = 256 * 1024 * 1024,
        max_orphan_bytes: int = 32 * 1024 * 1024,
        max_orphan_chunks: int = 1024,
        max_orphan_versions: int = 2,
        max_inbox_bytes: int = 64 * 1024 * 1024,
        orphan_ttl: float = 60.0,
        refetch_after: float = 3.0,
        reconnect_quiet: float = 2.0,
        on_resubscribe: Callable[[], None] | None = None,
        warmup_runs: int = 2,
    ) -> None:
        self.topics = topics
        self.model = validate_id(model, kind="model")
        self.public_key = public_key
        self.pipeline_hash = pipeline_hash
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
        self.on_change = on_change
        self.providers = list(providers)
        self.intra_op_threads = int(intra_op_threads)
        self.assemble_timeout = float(assemble_timeout)
        self.max_model_bytes = int(max_model_bytes)
        self.max_orphan_bytes = int(max_orphan_bytes)
        self.max_orphan_chunks = int(max_orphan_chunks)
        self.max_orphan_versions = int(max_orphan_versions)
        self.max_inbox_bytes = int(max_inbox_bytes)
        self.orphan_ttl = float(orphan_ttl)
        self.refetch_after = float(refetch_after)
        self.reconnect_quiet = float(reconnect_quiet)
        self.on_resubscribe = on_resubscribe
        self.warmup_runs = int(warmup_runs)
        self.store = ModelStore(store_dir, self.model)

        self._current: _Loaded | None = None  # THE swap point: assigned whole, read once per predict
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox_lock = threading.Lock()
        self._inbox_bytes = 0  # payload bytes queued for the worker
        self._inbox_dropped = 0
        # Owned by the worker thread (others only read the ints, for reports):
        self._pending: _Assembly | None = None
        self._orphans: dict[int, _Orphans] = {}
        self._orphan_bytes = 0
        self._orphan_chunks = 0
        self._orphans_dropped = 0
        self._refetches = 0
        self._refetch_wait = float(refetch_after)  # between re-subscriptions for a missing manifest
        self._last_refetch = 0.0
        self._resumed_at: float | None = None  # set by on_connected (network thread), cleared by the worker
        self._last_heard = 0.0  # written by handle_message (network thread)
        self._rejected_versions: dict[int, str] = {}  # verified manifests refused: version -> reason
        self._error: dict[str, Any] | None = None
        self._stats_lock = threading.Lock()
        self._inferences = 0
        self._failures = 0
        self._latency_sum = 0.0
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._accuracy: dict[int, list[int]] = {}  # version -> [correct, total]
        self._swaps = 0
        self._rejections = 0
        self._stale = 0
        self._swap_log: list[dict[str, Any]] = []
        self._last_failure_log = 0.0
        self._closed = threading.Event()

        self._load_from_disk()
        self._worker = threading.Thread(target=self._run, name=f"lepton-runtime-{self.model}", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------
    # wiring
    # ------------------------------------------------------------------------------------------
    def subscriptions(self) -> list[tuple[str, int]]:
        """Topic filters (with QoS) to subscribe on every (re)connect: the manifest and its chunks.

        QoS 0 on purpose: a broker queues no QoS 0 message for an offline persistent session, so a
        device that was away does not download every version published meanwhile; it gets the
        current one from the retained messages that every (re)subscription brings. The cloud
        publishes model messages at QoS 0 too (amqtt queues by the publisher's QoS).
        """
        return [(self.topics.model_filter(self.model), 0)]

    def on_connected(self, *, session_present: bool) -> list[tuple[str, int]]:
        """What to subscribe right after a CONNACK; the caller subscribes to the returned filters.

        A new session subscribes now. A resumed session already holds the subscription, and brokers
        differ: amqtt resends the retained messages of a resumed session's filters on its own,
        Mosquitto does not (MQTT sends retained messages on SUBSCRIBE only). Subscribing again at once
        would make amqtt send the current model twice, so the runtime waits ``reconnect_quiet``
        seconds and re-subscribes (``on_resubscribe``) only if no model message came meanwhile.
        """
        if not session_present or self.on_resubscribe is None:
            return self.subscriptions()
        self._resumed_at = time.monotonic()
        return []

    def handle_message(self, topic: str, payload: bytes, retain: bool) -> bool:
        """Queue a model message for the background thread; return True if it was one of ours.

        Called from paho's network thread: it parses the topic and returns, never raises.
        """
        try:
            parsed = self.topics.parse(topic)
        except ProtocolError:
            return False
        except Exception:  # noqa: BLE001 - the network thread must never die here
            log.exception("model runtime: cannot parse topic %r", topic)
            return False
        if parsed.channel not in ("model", "model_chunk") or parsed.model != self.model:
            return False
        self._last_heard = time.monotonic()
        if not self._closed.is_set():
            try:
                data = bytes(payload) if payload is not None else b""
            except TypeError:
                log.warning("model runtime: ignoring a non-bytes payload on %s", topic)
                return True
            with self._inbox_lock:  # the queue is unverified input too: bounded in bytes
                if self._inbox_bytes + len(data) > self.max_inbox_bytes:
                    self._inbox_dropped += 1  # fetched again by a re-subscription if it was genuine
                    return True
                self._inbox_bytes += len(data)
            self._inbox.put((parsed, data, time.monotonic(), time.time()))
        return True

    def close(self) -> None:
        """Stop the background thread; the current model stays usable until the runtime is dropped."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._inbox.put(None)
        if self._worker is not threading.current_thread():
            self._worker.join(timeout=10)

    # ------------------------------------------------------------------------------------------
    # inference
    # ------------------------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        current = self._current
        return current.manifest.version if current is not None else None

    @property
    def labels(self) -> tuple[str, ...]:
        current = self._current
        return current.labels if current is not None else ()

    def predict(self, x: np.ndarray) -> Prediction | None:
        """Run one sample through the current model; None while no model is loaded or if it fails.

        ``x`` is one feature tensor as the pipeline produces it (a leading batch axis of 1 is accepted
        too). A failure is counted in telemetry and logged, never raised: inference must not take the
        device down.
        """
        current = self._current  # read once: a swap between here and run() does not affect this call
        if current is None:
            return None
        start = time.perf_counter()
        try:
            feed = self._prepare(current, x)
            out = current.session.run([current.output_name], {current.input_name: feed})[0]
            scores = np.asarray(out, dtype=np.float64).reshape(-1) if out.ndim <= 1 else \
                np.asarray(out[0], dtype=np.float64).reshape(-1)
            if scores.size == 0 or not np.all(np.isfinite(scores)):
                raise ValueError(f"model output has no finite scores (shape {out.shape})")
            if not (np.all(scores >= 0) and abs(float(scores.sum()) - 1.0) < 1e-3):
                scores = np.exp(scores - scores.max())
                scores /= scores.sum()
            index = int(np.argmax(scores))
            confidence = float(scores[index])
        except Exception as exc:  # noqa: BLE001 - counted and logged; the device keeps running
            with self._stats_lock:
                self._failures += 1
            now = time.monotonic()
            if now - self._last_failure_log > 10:
                self._last_failure_log = now
                log.warning("inference failed on %s v%d: %s", self.model, current.manifest.version, exc)
            return None
        latency_ms = (time.perf_counter() - start) * 1000.0
        version = current.manifest.version
        label = current.labels[index] if index < len(current.labels) else str(index)
        with self._stats_lock:
            self._inferences += 1
            self._latency_sum += latency_ms
            self._latencies.append(latency_ms)
            if self._swap_log and self._swap_log[-1]["version"] == version \
                    and self._swap_log[-1]["first_inference_ts"] is None:
                self._swap_log[-1]["first_inference_ts"] = time.time()
        return Prediction(label=label, index=index, confidence=confidence, latency_ms=latency_ms,
                          version=version)

    @staticmethod
    def _prepare(current: _Loaded, x: np.ndarray) -> np.ndarray:
        arr = np.asarray(x)
        if arr.dtype != current.dtype:
            arr = arr.astype(current.dtype)
        if not current.batched:
            return arr
        shape = current.sample_shape
        if _fits(arr.shape, shape):
            arr = arr[np.newaxis, ...]
        elif not (arr.ndim == len(shape) + 1 and arr.shape[0] == 1 and _fits(arr.shape[1:], shape)):
            if all(d > 0 for d in shape) and arr.size == math.prod(shape):
                arr = arr.reshape((1, *shape))  # e.g. an (8, 8) image for a model that takes 64 features
        return np.ascontiguousarray(arr)

    def record_truth(self, prediction: Prediction, label: Any) -> None:
        """Count whether ``prediction`` was right; accuracy is kept per model version."""
        if prediction is None or label is None:
            return
        with self._stats_lock:
            entry = self._accuracy.setdefault(prediction.version, [0, 0])
            entry[0] += int(str(prediction.label) == str(label))
            entry[1] += 1
            while len(self._accuracy) > ACCURACY_VERSIONS_KEPT:
                del self._accuracy[min(self._accuracy)]

    # ------------------------------------------------------------------------------------------
    # reports
    # ------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Fields merged into the device's retained status (see docs/protocol.md, "Predictions")."""
        current = self._current
        with self._stats_lock:
            accuracy = {str(v): {"accuracy": round(c / n, 4) if n else None, "correct": c, "samples": n}
                        for v, (c, n) in sorted(self._accuracy.items())}
        error = dict(self._error) if self._error else None
        pending = self._pending_summary()
        body: dict[str, Any] = {
            "model": self.model,
            "model_version": current.manifest.version if current else None,
            "model_sha256": current.manifest.sha256 if current else None,
            "model_source": current.source if current else None,
            "model_quantization": current.manifest.quantization if current else None,
            "model_error": error,
            "model_pending": pending,
            "model_verify": self.public_key is not None,
            "accuracy": accuracy,
        }
        return body

    def telemetry(self) -> dict[str, Any]:
        """Counters for the device's telemetry report."""
        with self._stats_lock:
            lat = np.fromiter(self._latencies, dtype=np.float64)
            n = self._inferences
            body = {
                "model_version": self.version,
                "inferences": n,
                "inference_failures": self._failures,
                "inference_ms": {
                    "mean": round(self._latency_sum / n, 4) if n else None,
                    "p50": round(float(np.percentile(lat, 50)), 4) if lat.size else None,
                    "p99": round(float(np.percentile(lat, 99)), 4) if lat.size else None,
                },
                "swaps": self._swaps,
                "model_rejections": self._rejections,
                "model_stale_ignored": self._stale,
                **self.buffers(),
            }
            if self._swap_log:
                body["last_swap"] = dict(self._swap_log[-1])
        return body

    def swap_history(self) -> list[dict[str, Any]]:
        """One entry per swap: version, manifest_ts (wall clock when its manifest arrived), ready_ms
        (manifest to verified and warmed up; verify_ms, stage_ms, load_ms split it), swapped_ts,
        first_inference_ts."""
        with self._stats_lock:
            return [dict(entry) for entry in self._swap_log]

    def buffers(self) -> dict[str, int]:
        """What the runtime holds for versions it does not serve yet, and what it dropped."""
        pending = self._pending
        return {
            "model_pending_bytes": pending.nbytes if pending is not None else 0,
            "model_orphan_bytes": self._orphan_bytes,
            "model_orphan_chunks": self._orphan_chunks,
            "model_orphan_versions": len(self._orphans),
            "model_orphans_dropped": self._orphans_dropped,
            "model_refetches": self._refetches,
            "model_inbox_bytes": self._inbox_bytes,
            "model_inbox_dropped": self._inbox_dropped,
        }

    def _pending_summary(self) -> dict[str, Any] | None:
        a = self._pending
        if a is None:
            return None
        return {"version": a.version, "chunks": len(a.chunks), "of": len(a.manifest.chunks)}

    # ------------------------------------------------------------------------------------------
    # background thread: assemble, verify, load, swap
    # ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=1.0)
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if item:
                    parsed, payload, mono, wall = item
                    with self._inbox_lock:
                        self._inbox_bytes -= len(payload)
                    if parsed.channel == "model":
                        self._on_manifest(payload, mono, wall)
                    else:
                        self._on_chunk(parsed.version, parsed.chunk, payload, mono)
                self._check_stuck()
                time.sleep(0)  # hand the GIL to a waiting inference thread now, not after the 5 ms interval
            except Exception:  # noqa: BLE001 - a bug here must not stop future swaps
                log.exception("model runtime: unexpected error while handling a model message")

    def _on_manifest(self, payload: bytes, mono: float, wall: float) -> None:
        if not payload:  # unverifiable, so it decides nothing
            log.info("model %s: retained manifest cleared; keeping v%s", self.model, self.version)
            return
        pending = self._pending
        if pending is not None and pending.manifest_payload == payload:
            return  # the same retained manifest again, already verified
        try:  # verify first: until this returns, the payload decides nothing
            manifest, signed_by = open_manifest(payload, public_key=self.public_key, fleet=self.topics.fleet,
                                                model=self.model)
        except ModelRejected as exc:
            self._reject(_claimed_version(payload), exc)  # for the report only: it decides nothing
            return
        version = manifest.version
        current = self.version
        if (current is not None and version <= current) or (pending is not None
                                                             and version < pending.version):
            self._stale += 1
            (log.debug if version == current else log.info)(
                "model %s v%d ignored (stale_version): serving v%s", self.model, version, current)
            return
        if version in self._rejected_versions:
            return  # refused already; the retained manifest comes again on every reconnect
        # A verified manifest names the newest version: older pending chunks can never be served.
        if pending is not None:
            self._pending = None
        for old in [v for v in self._orphans if v < version]:
            self._drop_orphans(old)
        try:
            if manifest.size > self.max_model_bytes:
                raise ModelRejected("too_large", f"v{version} is {manifest.size} bytes; this device takes "
                                    f"at most {self.max_model_bytes} (max_model_bytes)")
            self._check_compatible(manifest)
        except ModelRejected as exc:
            self._refuse(version, exc)
            self._drop_orphans(version)
            return
        asm = _Assembly(version=version, manifest=manifest, manifest_payload=payload, signed_by=signed_by,
                        manifest_seen=mono, manifest_wall=wall, last_progress=mono,
                        refetch_wait=self.refetch_after)
        self._pending = asm
        orphans = self._drop_orphans(version)
        bad = []
        for index, data in orphans.items():
            try:
                verify_chunk(manifest, index, data)
            except ModelRejected as exc:
                bad.append(exc)
            else:
                asm.add(index, data, mono)
        if len(manifest.chunks) == 1 and manifest.chunks[0] == EMPTY_SHA256:
            asm.add(0, b"", mono)  # an empty model: its one chunk is never sent
        if bad:
            self._reject(version, bad[0], keep_waiting=True)
        log.info("model %s v%d announced: %d/%d chunks here", self.model, version, len(asm.chunks),
                 len(manifest.chunks))
        if asm.complete():
            self._finish(asm)

    def _on_chunk(self, version: int, index: int, payload: bytes, now: float) -> None:
        current = self.version
        if current is not None and version <= current:
            return
        pending = self._pending
        if pending is not None and version == pending.version:
            if not payload:  # the cloud clears chunks with an empty retained message
                return
            try:
                verify_chunk(pending.manifest, index, payload)
            except ModelRejected as exc:
                self._reject(version, exc, keep_waiting=True)
                return
            if index not in pending.chunks:
                pending.add(index, payload, now)
            if pending.complete():
                self._finish(pending)
            return
        if (pending is not None and version < pending.version) or version in self._rejected_versions:
            return  # superseded or refused
        self._add_orphan(version, index, payload, now)

    def _add_orphan(self, version: int, index: int, payload: bytes, now: float) -> None:
        """Hold an unverifiable chunk, within the caps; O(1) whatever is already held."""
        group = self._orphans.get(version)
        if not payload:
            if group is not None and index in group.chunks:
                self._orphan_bytes -= len(group.chunks[index])
                group.nbytes -= len(group.chunks.pop(index))
                self._orphan_chunks -= 1
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

    def _refetch(self, now: float, why: str) -> None:
        if self.on_resubscribe is None:
            return
        self._last_refetch = now
        self._refetch_wait = min(REFETCH_MAX_S, self._refetch_wait * 2)
        with self._stats_lock:
            self._refetches += 1
        log.info("model %s: %s; re-subscribing to fetch the retained messages again", self.model, why)
        try:
            self.on_resubscribe()
        except Exception:  # noqa: BLE001 - the agent's callback must not break the runtime
            log.exception("model runtime: on_resubscribe callback failed")

    def _refuse(self, version: int, exc: ModelRejected) -> None:
        """A verified manifest that this device cannot use: remember it, so its chunks are dropped."""
        self._rejected_versions[version] = exc.reason
        while len(self._rejected_versions) > REJECTED_VERSIONS_KEPT:
            del self._rejected_versions[min(self._rejected_versions)]
        self._reject(version, exc)

    def _check_stuck(self) -> None:
        now = time.monotonic()
        resumed = self._resumed_at
        if resumed is not None and now - resumed > self.reconnect_quiet:
            self._resumed_at = None
            if self._last_heard < resumed:  # the broker resent nothing: ask for the retained state
                self._refetch(now, "a resumed session brought no model message")
        for version in [v for v, g in self._orphans.items() if now - g.first_seen > self.orphan_ttl]:
            self._orphans_dropped += len(self._orphans[version].chunks)
            self._drop_orphans(version)
        asm = self._pending
        if asm is None:
            # Chunks of a newer version but no manifest (a broker such as amqtt may fan a manifest out
            # before it stores it as retained, so a new subscriber can miss it): ask again, with backoff.
            if self._orphans and now - min(g.first_seen for g in self._orphans.values()) > self._refetch_wait \
                    and now - self._last_refetch > self._refetch_wait:
                self._refetch(now, "chunks of a newer version but no manifest")
            return
        if now - asm.last_progress > asm.refetch_wait:
            # Chunks were lost (dropped as orphans, or by the broker): subscribing again makes the
            # broker resend every retained chunk; those already here are skipped.
            asm.refetches += 1
            asm.last_progress = now
            asm.refetch_wait = min(REFETCH_MAX_S, asm.refetch_wait * 2)
            self._refetch(now, f"v{asm.version}: {len(asm.chunks)}/{len(asm.manifest.chunks)} chunks, "
                          "none new for a while")
        if not asm.stuck_reported and now - asm.manifest_seen > self.assemble_timeout:
            asm.stuck_reported = True
            missing = [i for i in range(len(asm.manifest.chunks)) if i not in asm.chunks]
            self._reject(asm.version, ModelRejected(
                "missing_chunk", f"chunks {missing[:10]} of v{asm.version} have not arrived after "
                f"{self.assemble_timeout:.0f}s; still waiting"), keep_waiting=True)

    def _finish(self, asm: _Assembly) -> None:
        """All chunks are here: verify the whole package, load and warm it up, store it, swap."""
        version = asm.version
        t0 = time.perf_counter()
        try:
            package = assemble_package(asm.manifest, asm.chunks, signed_by=asm.signed_by,
                                       chunks_verified=True)
        except ModelRejected as exc:
            self._pending = None
            self._refuse(version, exc)
            return
        self._pending = None  # the package holds the bytes now
        try:  # before ONNX Runtime sees it: it would open the files external data names
            check_onnx_self_contained(package.data, what=f"v{version}")
        except ModelRejected as exc:
            self._refuse(version, exc)
            return
        t1 = time.perf_counter()
        path: Path | None = None
        try:  # staged on disk first: ONNX Runtime loads a file without holding the GIL for long
            path = self.store.stage(version, package.data)
        except OSError as exc:
            log.warning("model %s v%d: cannot write it to %s (%s); loading it from memory",
                        self.model, version, self.store.directory, exc)
        t2 = time.perf_counter()
        try:
            loaded = self._load(package, source="broker", path=path)
        except ModelRejected as exc:
            if path is not None:
                self.store.discard(version)
            self._refuse(version, exc)
            return
        current = self.version
        if current is not None and version <= current:  # cannot happen with one worker; stay safe
            return
        t3 = time.perf_counter()
        ready_ms = (time.monotonic() - asm.manifest_seen) * 1000.0 if asm.manifest_seen else None
        steps = {"verify_ms": round((t1 - t0) * 1000, 3), "stage_ms": round((t2 - t1) * 1000, 3),
                 "load_ms": round((t3 - t2) * 1000, 3)}
        self._swap(loaded, manifest_wall=asm.manifest_wall, ready_ms=ready_ms, steps=steps)
        for v in [v for v in self._orphans if v <= version]:
            self._drop_orphans(v)
        self._refetch_wait = self.refetch_after
        if path is not None:  # after the swap: serving does not wait for fsync
            try:
                self.store.commit(asm.manifest_payload, version)
            except OSError as exc:  # serving matters more than the disk copy
                log.warning("model %s v%d: cannot store it as the last good model in %s: %s",
                            self.model, version, self.store.directory, exc)

    def _swap(self, loaded: _Loaded, *, manifest_wall: float | None, ready_ms: float | None,
              steps: dict[str, float] | None = None) -> None:
        previous = self.version
        entry = {"version": loaded.manifest.version, "previous": previous, "source": loaded.source,
                 "manifest_ts": manifest_wall,
                 "ready_ms": round(ready_ms, 3) if ready_ms is not None else None,
                 "swapped_ts": None, "first_inference_ts": None, **(steps or {})}
        with self._stats_lock:
            self._swap_log.append(entry)
            del self._swap_log[:-64]
            entry["swapped_ts"] = time.time()
            self._current = loaded  # the swap: one reference assignment
            if loaded.source == "broker":
                self._swaps += 1
        self._error = None
        log.info("model %s: now serving v%d (was %s, from %s, %d bytes, sha256 %s)", self.model,
                 loaded.manifest.version, f"v{previous}" if previous else "none", loaded.source,
                 loaded.manifest.size, loaded.manifest.sha256[:12])
        self._notify()

    def _reject(self, version: int | None, exc: ModelRejected, *, keep_waiting: bool = False) -> None:
        with self._stats_lock:
            self._rejections += 1
        error = {"reason": exc.reason, "message": exc.detail, "version": version, "ts": round(time.time(), 3)}
        before = self._error
        changed = before is None or (before["reason"], before["version"]) != (exc.reason, version)
        self._error = error
        # A repeat is logged at debug: whoever may write models/ must not be able to flood the log.
        (log.warning if changed else log.debug)(
            "model %s%s rejected (%s): %s; keeping %s", self.model, f" v{version}" if version else "",
            exc.reason, exc.detail, f"v{self.version}" if self.version else "no model")
        if changed:
            self._notify()

    def _notify(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(self.status())
        except Exception:  # noqa: BLE001 - the agent's callback must not break the runtime
            log.exception("model runtime: on_change callback failed")

    # ------------------------------------------------------------------------------------------
    # verification helpers
    # ------------------------------------------------------------------------------------------
    def _check_compatible(self, manifest: ModelManifest) -> None:
        if self.pipeline_hash is not None and manifest.pipeline_hash != self.pipeline_hash:
            raise ModelRejected("incompatible_pipeline", f"v{manifest.version} was trained on pipeline "
                                f"{manifest.pipeline_hash!r}, this device runs {self.pipeline_hash!r}")
        spec = manifest.input
        dtype = spec.get("dtype", "float32")
        if dtype not in INPUT_DTYPES:
            raise ModelRejected("incompatible_input", f"v{manifest.version} takes dtype {dtype!r}; "
                                f"supported: {sorted(INPUT_DTYPES)}")
        shape = spec.get("shape")
        if shape is not None and not (isinstance(shape, list) and all(isinstance(d, (int, str)) or d is None
                                                                       for d in shape)):
            raise ModelRejected("incompatible_input",
                                f"v{manifest.version} has a malformed input shape {shape!r}")
        if shape is not None and self.input_shape is not None:
            _check_shape(manifest.version, shape, self.input_shape)

    def _load(self, package: ModelPackage, *, source: str, path: Path | None = None) -> _Loaded:
        """Build an InferenceSession and warm it up; raise ModelRejected("load_failed").

        ``path`` is a file holding exactly ``package.data`` (already verified); loading from it keeps
        the GIL free, so inference threads are not held up while a large model loads.
        """
        import onnxruntime as ort

        manifest = package.manifest
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.intra_op_threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path) if path is not None else package.data,
                                           sess_options=options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelRejected("load_failed", f"ONNX Runtime cannot load v{manifest.version}: "
                                f"{_short(exc)}") from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelRejected("incompatible_input", f"v{manifest.version} has {len(inputs)} inputs and "
                                f"{len(outputs)} outputs; a Lepton model takes one tensor")
        node = inputs[0]
        dtype_name = _ORT_TYPES.get(node.type)
        if dtype_name is None:
            raise ModelRejected("incompatible_input", f"v{manifest.version} takes {node.type}")
        declared = manifest.input.get("dtype")
        if declared is not None and declared != dtype_name:
            raise ModelRejected("incompatible_input", f"v{manifest.version}: the manifest says {declared} "
                                f"but the ONNX graph takes {dtype_name}")
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in node.shape]
        if self.input_shape is not None:
            _check_shape(manifest.version, dims, self.input_shape)
        batched = len(dims) >= 2  # features are at least 1-D, so a batched input is at least 2-D
        sample_shape = tuple(dims[1:]) if batched else tuple(dims)
        dtype = INPUT_DTYPES[dtype_name]
        if self.input_shape is not None and len(self.input_shape) == len(sample_shape):
            warm = list(self.input_shape)
        else:
            warm = [d if d > 0 else 1 for d in sample_shape]
        warm_shape = [1, *warm] if batched else warm
        try:
            probe = np.zeros(warm_shape, dtype=dtype)
            for _ in range(max(1, self.warmup_runs)):
                out = np.asarray(session.run([outputs[0].name], {node.name: probe})[0])
        except Exception as exc:  # noqa: BLE001
            raise ModelRejected("load_failed", f"v{manifest.version} loads but does not run on a "
                                f"{warm_shape} {dtype_name} input: {_short(exc)}") from None
        classes = int(out.reshape(out.shape[0], -1).shape[1]) if batched and out.ndim >= 1 else int(out.size)
        labels = tuple(str(label) for label in manifest.labels)
        if labels and classes != len(labels):
            raise ModelRejected("load_failed", f"v{manifest.version} outputs {classes} scores but its "
                                f"manifest names {len(labels)} labels")
        return _Loaded(manifest=manifest, session=session, input_name=node.name, output_name=outputs[0].name,
                       dtype=dtype, sample_shape=sample_shape, batched=batched, labels=labels, source=source,
                       loaded_at=time.time())

    def _load_from_disk(self) -> None:
        stored = self.store.load()
        if stored is None:
            return
        payload, data, path = stored
        try:
            manifest, _, _ = parse_manifest(payload)
            chunks = {i: data[i * manifest.chunk_size:(i + 1) * manifest.chunk_size]
                      for i in range(len(manifest.chunks))}
            package = verify_package(payload, chunks, public_key=self.public_key, fleet=self.topics.fleet,
                                     model=self.model)
            self._check_compatible(package.manifest)
            check_onnx_self_contained(package.data, what=f"the stored v{package.manifest.version}")
            loaded = self._load(package, source="disk", path=path)
        except ModelRejected as exc:
            self._error = {"reason": exc.reason, "message": f"stored model {path}: {exc.detail}",
                           "version": None, "ts": round(time.time(), 3)}
            log.warning("not serving the stored model %s (%s): %s", path, exc.reason, exc.detail)
            return
        self._swap(loaded, manifest_wall=None, ready_ms=None)


def _claimed_version(payload: bytes) -> int | None:
    """The version a refused manifest claims, unverified, to name it in the error report."""
    try:
        return parse_manifest(payload)[0].version
    except ModelRejected:
        return None


def _fits(shape: Sequence[int], dims: Sequence[int]) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == n for d, n in zip(dims, shape, strict=True))


def _check_shape(version: int, model_shape: Sequence[Any], features: tuple[int, ...]) -> None:
    """The model's input (batch dimension first, or none) must accept the device's feature shape."""
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in model_shape]
    for candidate in ([dims[1:]] if len(dims) >= 2 else []) + [dims]:
        if _fits(features, candidate):
            return
        if candidate and all(d > 0 for d in candidate) and math.prod(candidate) == math.prod(features):
            return  # same number of values: the runtime reshapes (e.g. 8x8 image -> 64 features)
    raise ModelRejected("incompatible_input", f"v{version} takes input shape {list(model_shape)}, "
                        f"this device's features are {list(features)}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
