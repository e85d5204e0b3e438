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

This module is the shell around :class:`~lepton.protocol.ModelAssembler`, which holds every
rule of the model channel (verify first, orphan caps, timeouts, refetch, the whole-package checks)
without I/O. The shell moves messages and the time to it and carries out what it decides: build an
``InferenceSession``, swap, store the last good model, re-subscribe, report.

How a swap happens, and why it never stalls inference:

* ``handle_message`` only parses the topic and queues the payload (bounded in bytes); it never
  blocks, raises, or touches the disk.
* One background thread (the *worker*) hands each message to the assembler. For a verified package
  it writes the ONNX bytes to disk, builds a new ``InferenceSession`` from that file, warms it up,
  swaps, and then commits it (fsync) as the last good model.
* The swap is one reference assignment (``self._current = loaded``). ``predict`` reads the reference
  once per call, so an inference in flight finishes on the old session and the next one uses the new;
  the old session is freed when its last inference returns.

A rejected model (any :data:`~lepton.protocol.REJECT_REASONS` code) leaves the current model serving;
the reason goes to ``status()["model_error"]``, the log, and ``on_change``. A version not newer than the
one served is ignored (``stale_version``), which is not an error: it is how a device sees the retained
manifest again after every reconnect.

Who owns what (each field has one writer; the constructor writes them all before the worker starts):

* paho's network thread: ``_last_heard`` and ``_resumed_at`` (the worker only reads them, passing
  them to the assembler's ``tick``);
* the worker thread: ``_core`` (the assembler; nobody else touches it), ``_snapshot`` (its
  immutable :class:`~lepton.protocol.AssemblerStats`, replaced whole after every event, so
  ``status()`` and ``buffers()`` read a consistent copy from any thread), ``_current`` and ``_error``
  (replaced whole, read once by other threads);
* ``_inbox_lock``: ``_inbox_bytes`` and ``_inbox_dropped`` (the network thread adds, the worker
  subtracts);
* ``_stats_lock``: the inference counters, latencies, accuracy and ``_last_failure_log`` (inference
  threads), ``_swaps``, ``_rejections``, ``_stale`` and ``_swap_log`` (the worker; an inference marks
  ``first_inference_ts`` in the last entry).

Disk: the worker stages, fsyncs and removes model files; the constructor reads the last good model.
Nothing here touches the disk on paho's network thread.
"""

from __future__ import annotations

import logging
import math
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton.device._modelstore import ModelStore
from lepton.errors import ModelRejected, ProtocolError
from lepton.protocol import (
    INPUT_DTYPE_NAMES,
    Announced,
    AssemblerStats,
    AssemblyEvent,
    Cleared,
    ModelAssembler,
    ModelManifest,
    ModelPackage,
    Ready,
    Refetch,
    Rejected,
    Stale,
    Topics,
    check_input_shape,
    shape_fits,
    validate_id,
)

log = logging.getLogger(__name__)

__all__ = ["ModelRuntime", "Prediction"]

#: numpy dtypes a manifest may name for the model input.
INPUT_DTYPES = {name: np.dtype(name).type for name in INPUT_DTYPE_NAMES}
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64",
}
LATENCY_WINDOW = 2048
#: Models larger than this are built without ONNX Runtime's weight prepacking. ``predict`` runs one
#: sample at a time, where a large model is a matrix-vector product bound by memory: prepacking does not
#: speed it up (0.85 ms with, 0.78 ms without on bench/hotswap.py's 21 MB MLP) but makes a second copy
#: of every weight and most of the session build (43 -> 26 ms alone; with 10 device processes on 2 cores
#: see README, "What limits the throughput figures"). Small models keep it (the 1 MB MLP: 0.019 ms
#: with, 0.028 ms without).
PREPACK_MAX_BYTES = 8 * 1024 * 1024
#: The worker drops its reference to a swapped-out model after this long even if someone else still
#: holds it (see ``_free_retired``).
RETIRED_MAX_S = 60.0
ACCURACY_VERSIONS_KEPT = 8


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




#: the numbers of the last swap the telemetry carries, as ``last_swap_{field}`` (its ``source`` is the
#: status's ``model_source``)
LAST_SWAP_FIELDS = ("version", "previous", "manifest_ts", "ready_ms", "verify_ms", "stage_ms", "load_ms",
                    "swapped_ts", "first_inference_ts")


class ModelRuntime:
    """Serves the current model of one model name and hot-swaps newer verified versions.

    ``public_key=None`` means the device runs with ``--no-verify``: hashes are still checked, the
    signature is not. ``pipeline_hash`` (the hash of the device's preprocessing spec) must equal the
    model's; ``None`` skips that check. ``input_shape`` is the feature shape the pipeline produces,
    without the batch dimension; ``None`` skips the shape check. The limits and timeouts are the
    assembler's (see :class:`~lepton.protocol.ModelAssembler`), except ``max_inbox_bytes``,
    the bound of the queue between paho's thread and the worker. ``prepack_max_bytes``: a model larger
    than this is built with ONNX Runtime's weight prepacking off (see :data:`PREPACK_MAX_BYTES`); None
    always prepacks.
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
        prepack_max_bytes: int | None = PREPACK_MAX_BYTES,
    ) -> None:
        self.topics = topics
        self.model = validate_id(model, kind="model")
        self.public_key = public_key
        self.pipeline_hash = pipeline_hash
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
        self.on_change = on_change
        self.providers = list(providers)
        self.intra_op_threads = int(intra_op_threads)
        self.max_inbox_bytes = int(max_inbox_bytes)
        self.on_resubscribe = on_resubscribe
        self.warmup_runs = int(warmup_runs)
        self.prepack_max_bytes = prepack_max_bytes
        self.store = ModelStore(store_dir, self.model)

        self._core = ModelAssembler(
            fleet=topics.fleet, model=self.model, public_key=public_key, pipeline_hash=pipeline_hash,
            input_shape=self.input_shape, assemble_timeout=assemble_timeout, max_model_bytes=max_model_bytes,
            max_orphan_bytes=max_orphan_bytes, max_orphan_chunks=max_orphan_chunks,
            max_orphan_versions=max_orphan_versions, orphan_ttl=orphan_ttl, refetch_after=refetch_after,
            reconnect_quiet=reconnect_quiet)
        self._snapshot: AssemblerStats = self._core.stats()
        self._current: _Loaded | None = None  # THE swap point: assigned whole, read once per predict
        self._retired: list[tuple[float, _Loaded]] = []  # (when, swapped out): the worker frees them
        self._error: dict[str, Any] | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox_lock = threading.Lock()
        self._inbox_bytes = 0  # payload bytes queued for the worker
        self._inbox_dropped = 0
        self._resumed_at: float | None = None
        self._last_heard = 0.0
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
        Called from paho's network thread.
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
                # Logits: the calibrated confidence is softmax(logits / T), T from the signed manifest.
                scores = scores / current.manifest.temperature
                scores = np.exp(scores - scores.max())
                scores /= scores.sum()
            index = int(np.argmax(scores))
            confidence = float(scores[index])
        except Exception as exc:  # noqa: BLE001 - counted and logged; the device keeps running
            now = time.monotonic()
            with self._stats_lock:
                self._failures += 1
                loud = now - self._last_failure_log > 10
                if loud:
                    self._last_failure_log = now
            if loud:
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
        if shape_fits(arr.shape, shape):
            arr = arr[np.newaxis, ...]
        elif not (arr.ndim == len(shape) + 1 and arr.shape[0] == 1 and shape_fits(arr.shape[1:], shape)):
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
    # reports (any thread)
    # ------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Fields merged into the device's retained status (see docs/protocol.md, "Predictions")."""
        current = self._current
        snap = self._snapshot  # published whole by the worker: consistent, and never a live dict
        error = self._error
        with self._stats_lock:
            accuracy = {str(v): {"accuracy": round(c / n, 4) if n else None, "correct": c, "samples": n}
                        for v, (c, n) in sorted(self._accuracy.items())}
        body: dict[str, Any] = {
            "model": self.model,
            "model_version": current.manifest.version if current else None,
            "model_sha256": current.manifest.sha256 if current else None,
            "model_source": current.source if current else None,
            "model_quantization": current.manifest.quantization if current else None,
            "model_error": dict(error) if error else None,
            "model_pending": snap.pending_summary,
            "model_verify": self.public_key is not None,
            "accuracy": accuracy,
        }
        return body

    def telemetry(self) -> dict[str, Any]:
        """Counters for the device's telemetry report: flat ``name -> number`` (None until known, left
        out on the wire), the last swap as ``last_swap_{field}`` for each of LAST_SWAP_FIELDS."""
        buffers = self.buffers()
        with self._stats_lock:
            lat = np.fromiter(self._latencies, dtype=np.float64)
            n = self._inferences
            body = {
                "model_version": self.version,
                "inferences": n,
                "inference_failures": self._failures,
                "inference_ms_mean": round(self._latency_sum / n, 4) if n else None,
                "inference_ms_p50": round(float(np.percentile(lat, 50)), 4) if lat.size else None,
                "inference_ms_p99": round(float(np.percentile(lat, 99)), 4) if lat.size else None,
                "swaps": self._swaps,
                "model_rejections": self._rejections,
                "model_stale_ignored": self._stale,
                **buffers,
            }
            if self._swap_log:
                last = self._swap_log[-1]
                body.update({f"last_swap_{key}": last.get(key) for key in LAST_SWAP_FIELDS})
        return body

    def swap_history(self) -> list[dict[str, Any]]:
        """One entry per swap: version, manifest_ts (wall clock when its manifest arrived), ready_ms
        (manifest to verified and warmed up; verify_ms, stage_ms, load_ms split it), swapped_ts,
        first_inference_ts."""
        with self._stats_lock:
            return [dict(entry) for entry in self._swap_log]

    def buffers(self) -> dict[str, int]:
        """What the runtime holds for versions it does not serve yet, and what it dropped."""
        snap = self._snapshot
        with self._inbox_lock:
            inbox_bytes, inbox_dropped = self._inbox_bytes, self._inbox_dropped
        return {
            "model_pending_bytes": snap.pending_bytes,
            "model_orphan_bytes": snap.orphan_bytes,
            "model_orphan_chunks": snap.orphan_chunks,
            "model_orphan_versions": snap.orphan_versions,
            "model_orphans_dropped": snap.orphans_dropped,
            "model_refetches": snap.refetches,
            "model_inbox_bytes": inbox_bytes,
            "model_inbox_dropped": inbox_dropped,
        }

    # ------------------------------------------------------------------------------------------
    # the worker thread: feed the assembler, carry out its decisions
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
                self._free_retired()
                if item:
                    parsed, payload, mono, wall = item
                    with self._inbox_lock:
                        self._inbox_bytes -= len(payload)
                    t0 = time.perf_counter()  # a Ready package was joined and verified inside this call
                    events = self._core.receive(parsed, payload, mono, wall=wall)
                    self._apply(events, verify_ms=(time.perf_counter() - t0) * 1000.0)
                self._apply(self._core.tick(time.monotonic(), resumed_at=self._resumed_at,
                                            last_heard=self._last_heard,
                                            can_refetch=self.on_resubscribe is not None))
                self._free_retired()
                time.sleep(0)  # hand the GIL to a waiting inference thread now, not after the 5 ms interval
            except Exception:  # noqa: BLE001 - a bug here must not stop future swaps
                log.exception("model runtime: unexpected error while handling a model message")

    def _apply(self, events: list[AssemblyEvent], *, verify_ms: float = 0.0) -> None:
        """Publish the assembler's new state, then carry out each decision."""
        self._snapshot = self._core.stats()
        for event in events:
            if isinstance(event, Ready):
                self._finish(event, verify_ms=verify_ms)
            elif isinstance(event, Rejected):
                self._reject(event.version, event.error)
            elif isinstance(event, Refetch):
                self._refetch(event.why)
            elif isinstance(event, Stale):
                with self._stats_lock:
                    self._stale += 1
                (log.debug if event.version == event.serving else log.info)(
                    "model %s v%d ignored (stale_version): serving v%s", self.model, event.version,
                    event.serving)
            elif isinstance(event, Announced):
                log.info("model %s v%d announced: %d/%d chunks here", self.model, event.version, event.have,
                         event.of)
            elif isinstance(event, Cleared):
                log.info("model %s: retained manifest cleared; keeping v%s", self.model, event.serving)

    def _free_retired(self) -> None:
        """Free the sessions swapped out, here on the worker, once no inference holds them any more.

        Freeing a large session unmaps tens of MB; done by whichever thread drops the last reference,
        which would be an inference thread (the one in flight at the swap, or the next one) and pause
        it for milliseconds. The worker keeps the last reference instead and drops it as soon as the
        reference count shows nobody else holds it (an inference in flight finishes first).
        """
        keep = []
        now = time.monotonic()
        while self._retired:
            since, old = self._retired.pop()
            # getrefcount counts ``old`` and its own argument: 2 means nobody else holds it (nor its
            # session: the _Loaded's field and the argument). Someone holding it for a minute (not an
            # inference) frees it themselves: the worker never keeps old models for good.
            if (sys.getrefcount(old) > 2 or sys.getrefcount(old.session) > 2) and now - since < RETIRED_MAX_S:
                keep.append((since, old))
            del old  # the last reference unless kept: the session is freed here
        self._retired = keep

    def _refetch(self, why: str) -> None:
        if self.on_resubscribe is None:  # it asks only when it can (can_refetch), unless set to None since
            return
        log.info("model %s: %s; re-subscribing to fetch the retained messages again", self.model, why)
        try:
            self.on_resubscribe()
        except Exception:  # noqa: BLE001 - the agent's callback must not break the runtime
            log.exception("model runtime: on_resubscribe callback failed")

    def _finish(self, ready: Ready, *, verify_ms: float) -> None:
        """A verified package: stage it on disk, load and warm it up, swap, commit it as the last good one."""
        package, version = ready.package, ready.version
        t1 = time.perf_counter()
        path: Path | None = None
        try:  # staged on disk first: ONNX Runtime loads a file without holding the GIL for long
            path = self.store.stage(version, package.parts)  # chunk by chunk: never joined in memory
        except OSError as exc:
            log.warning("model %s v%d: cannot write it to %s (%s); loading it from memory",
                        self.model, version, self.store.directory, exc)
        t2 = time.perf_counter()
        try:
            loaded = self._load(package, source="broker", path=path)
        except ModelRejected as exc:
            if path is not None:
                self.store.discard(version)
            self._apply(self._core.refuse(version, exc))
            return
        current = self.version
        if current is not None and version <= current:  # cannot happen with one worker; stay safe
            return
        t3 = time.perf_counter()
        ready_ms = (time.monotonic() - ready.manifest_seen) * 1000.0
        steps = {"verify_ms": round(verify_ms, 3), "stage_ms": round((t2 - t1) * 1000, 3),
                 "load_ms": round((t3 - t2) * 1000, 3)}
        self._swap(loaded, manifest_wall=ready.manifest_wall, ready_ms=ready_ms, steps=steps)
        self._core.served(version)
        self._snapshot = self._core.stats()
        if path is not None:  # after the swap: serving does not wait for fsync
            try:
                self.store.commit(ready.manifest_payload, version)
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
        retired = self._current
        with self._stats_lock:
            self._swap_log.append(entry)
            del self._swap_log[:-64]
            entry["swapped_ts"] = time.time()
            self._current = loaded  # the swap: one reference assignment
            if loaded.source == "broker":
                self._swaps += 1
        if retired is not None:
            self._retired.append((time.monotonic(), retired))  # freed by the worker (_free_retired)
        del retired
        self._error = None
        log.info("model %s: now serving v%d (was %s, from %s, %d bytes, sha256 %s)", self.model,
                 loaded.manifest.version, f"v{previous}" if previous else "none", loaded.source,
                 loaded.manifest.size, loaded.manifest.sha256[:12])
        self._notify()

    def _reject(self, version: int | None, exc: ModelRejected) -> None:
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
    # loading
    # ------------------------------------------------------------------------------------------
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
            if self.prepack_max_bytes is not None and manifest.size > self.prepack_max_bytes:
                options.add_session_config_entry("session.disable_prepacking", "1")
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
            check_input_shape(manifest.version, dims, self.input_shape)
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
        """At start-up (before the worker runs): serve the last good model, verified like a new one."""
        stored = self.store.load()
        if stored is None:
            return
        payload, data, path = stored
        try:
            package = self._core.verify_stored(payload, data)
            loaded = self._load(package, source="disk", path=path)
        except ModelRejected as exc:
            self._error = {"reason": exc.reason, "message": f"stored model {path}: {exc.detail}",
                           "version": None, "ts": round(time.time(), 3)}
            log.warning("not serving the stored model %s (%s): %s", path, exc.reason, exc.detail)
            return
        self._swap(loaded, manifest_wall=None, ready_ms=None)
        self._core.served(package.manifest.version)
        self._snapshot = self._core.stats()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
