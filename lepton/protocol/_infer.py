"""Payloads of protocol v1 for collaborative inference: infer requests and their answers (msgpack).

A device asks the cloud to classify one sample on ``devices/{id}/infer`` and the cloud answers on
``devices/{id}/answers`` (see docs/protocol.md, "Cloud inference"). The rules are those of the samples
envelope (:mod:`lepton.protocol._envelope`): msgpack maps with str keys, ``"v": 1`` as an int, ids
validated, tensors as TENSOR maps (:mod:`lepton.protocol._codec`), and every decoder raises
:class:`~lepton.errors.ProtocolError` naming the field, and nothing else, whatever bytes arrive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from lepton.errors import ProtocolError
from lepton.protocol._codec import DTYPES, check_tensor, encode_tensor
from lepton.protocol._envelope import (
    MAX_LABEL_CHARS,
    PROTOCOL_VERSION,
    _check_label,
    _check_seq,
    _check_version,
    _unpack,
)
from lepton.protocol._ids import validate_id

__all__ = [
    "ANSWER_ERRORS",
    "DEFAULT_MAX_INFER_BYTES",
    "InferAnswer",
    "InferRequest",
    "decode_answer",
    "decode_infer",
    "encode_answer",
    "encode_infer",
    "peek_seq",
]

#: Default ceiling for one infer request: one tensor, well under the shipped brokers' max_packet_size.
DEFAULT_MAX_INFER_BYTES = 4 * 1024 * 1024
#: Ceiling for one answer (it carries no tensor).
MAX_ANSWER_BYTES = 64 * 1024
MAX_PIPELINE_CHARS = 128
MAX_ERROR_CODE_CHARS = 64
MAX_ERROR_MESSAGE_CHARS = 1024

#: Error codes of an answer (``error.code``). Receivers treat a code they do not know as a failure
#: of the request like any other: new codes may appear within v1.
ANSWER_ERRORS = {
    "bad_request": "the request is not a valid infer request (the message names the field)",
    "no_model": "the worker has no verified model yet",
    "wrong_pipeline": "the request's pipeline is not the one the cloud model was trained on",
    "wrong_shape": "the tensor's shape or dtype does not fit the cloud model's input",
    "expired": "the request's deadline had passed when the worker reached it",
    "overloaded": "the worker's queue was full: the request was shed without being run",
    "inference_failed": "ONNX Runtime failed on the request",
}


@dataclass(frozen=True)
class InferRequest:
    """One sample a device asks the cloud to classify.

    ``seq`` is the sample's seq (the request id); ``deadline`` is the Unix time after which the device
    no longer waits for the answer (None: no deadline).
    """

    device: str
    seq: int
    x: np.ndarray
    pipeline: str | None = None
    edge_label: int | str | None = None
    edge_confidence: float | None = None
    edge_version: int | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class InferAnswer:
    """The cloud's answer to one request: a label, or an error code (``error``) with a message."""

    seq: int | None
    label: str | None = None
    index: int | None = None
    confidence: float | None = None
    version: int | None = None
    model: str | None = None
    latency_ms: float = 0.0
    worker: str | None = None
    error: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ------------------------------------------------------------------------------------------------
# requests
# ------------------------------------------------------------------------------------------------
def encode_infer(request: InferRequest) -> bytes:
    """Encode an infer request as a protocol v1 msgpack map (every key written, nil when unset).

    >>> r = InferRequest(device="cam-1", seq=7, x=np.zeros(4, np.float32), deadline=1700000000.25)
    >>> decode_infer(encode_infer(r), expected_device="cam-1").seq
    7
    """
    validate_id(request.device, kind="device")
    _check_seq(request.seq, "seq")
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "device": request.device,
        "seq": request.seq,
        "x": encode_tensor(request.x),
        "pipeline": _check_pipeline(request.pipeline),
        "edge_label": _check_label(request.edge_label, "edge_label"),
        "edge_confidence": _check_confidence(request.edge_confidence, "edge_confidence"),
        "edge_version": _check_version_number(request.edge_version, "edge_version"),
        "deadline": _check_time(request.deadline, "deadline"),
    }
    return msgpack.packb(body, use_bin_type=True)


def decode_infer(
    payload: bytes | bytearray | memoryview,
    *,
    expected_device: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_INFER_BYTES,
    max_tensor_bytes: int | None = None,
) -> InferRequest:
    """Decode an infer request strictly; any bad field raises ProtocolError naming it.

    ``expected_device`` is the ``{device}`` level of the topic it arrived on; the request's ``device``
    must equal it. The tensor is a read-only view of the payload's memory (no copy).
    """
    body = _unpack(payload, max_payload_bytes)
    if type(body) is not dict:
        raise ProtocolError(f"an infer request must be a map, got {type(body).__name__}", field="request")
    _check_version(body.get("v"), "v")
    device = validate_id(body.get("device"), kind="device")
    if expected_device is not None and device != expected_device:
        raise ProtocolError(f"request device {device!r} does not match topic device {expected_device!r}",
                            field="device")
    seq: int = body.get("seq")  # type: ignore[assignment]  # checked on the next line
    _check_seq(seq, "seq")
    limit = max_payload_bytes if max_tensor_bytes is None else max_tensor_bytes
    dtype, shape, data, count = check_tensor(body.get("x"), field="x", max_bytes=limit)
    x = np.frombuffer(data, dtype=DTYPES[dtype], count=count).reshape(shape)
    x.flags.writeable = False
    edge_label = body.get("edge_label")
    return InferRequest(
        device=device,
        seq=seq,
        x=x,
        pipeline=_check_pipeline(body.get("pipeline")),
        edge_label=None if edge_label is None else _check_label(edge_label, "edge_label"),
        edge_confidence=_check_confidence(body.get("edge_confidence"), "edge_confidence"),
        edge_version=_check_version_number(body.get("edge_version"), "edge_version"),
        deadline=_check_time(body.get("deadline"), "deadline"),
    )


def peek_seq(payload: bytes | bytearray | memoryview, *, max_payload_bytes: int = DEFAULT_MAX_INFER_BYTES
             ) -> int | None:
    """The ``seq`` of a request that failed to decode, when it is readable; else None.

    Lets a receiver answer a bad request with its id (``bad_request``) instead of with silence.
    Never raises.
    """
    try:
        body = _unpack(payload, max_payload_bytes)
    except ProtocolError:
        return None
    if type(body) is not dict:
        return None
    seq = body.get("seq")
    try:
        _check_seq(seq, "seq")
    except ProtocolError:
        return None
    return seq


# ------------------------------------------------------------------------------------------------
# answers
# ------------------------------------------------------------------------------------------------
def encode_answer(answer: InferAnswer) -> bytes:
    """Encode an answer as a protocol v1 msgpack map (every key written, nil when unset).

    An answer carries either a label (``error`` nil) or an error ``{"code", "message"}`` (``label``,
    ``index`` and ``confidence`` nil). A message longer than 1024 characters is cut.

    >>> a = decode_answer(encode_answer(InferAnswer(seq=7, error="overloaded", message="queue full")))
    >>> a.error, a.label
    ('overloaded', None)
    """
    if answer.seq is not None:
        _check_seq(answer.seq, "seq")
    error: dict[str, str] | None = None
    if answer.error is not None:
        _check_error_code(answer.error)
        error = {"code": answer.error, "message": str(answer.message or "")[:MAX_ERROR_MESSAGE_CHARS]}
        label = index = confidence = None
    else:
        if answer.seq is None:
            raise ProtocolError("an answer without a seq must carry an error", field="seq")
        label = _check_answer_label(answer.label)
        index = _check_index(answer.index)
        confidence = _check_confidence(answer.confidence, "confidence")
        if label is None or index is None or confidence is None:
            raise ProtocolError("an answer without an error carries label, index and confidence",
                                field="label")
    body = {
        "v": PROTOCOL_VERSION,
        "seq": answer.seq,
        "label": label,
        "index": index,
        "confidence": confidence,
        "version": _check_version_number(answer.version, "version"),
        "model": None if answer.model is None else validate_id(answer.model, kind="model"),
        "latency_ms": _check_latency(answer.latency_ms),
        "worker": None if answer.worker is None else validate_id(answer.worker, kind="worker"),
        "error": error,
    }
    return msgpack.packb(body, use_bin_type=True)


def decode_answer(payload: bytes | bytearray | memoryview) -> InferAnswer:
    """Decode an answer strictly; any bad field raises ProtocolError naming it."""
    body = _unpack(payload, MAX_ANSWER_BYTES)
    if type(body) is not dict:
        raise ProtocolError(f"an answer must be a map, got {type(body).__name__}", field="answer")
    _check_version(body.get("v"), "v")
    seq = body.get("seq")
    if seq is not None:
        _check_seq(seq, "seq")
    model, worker = body.get("model"), body.get("worker")
    common: dict[str, Any] = dict(
        seq=seq,
        version=_check_version_number(body.get("version"), "version"),
        model=None if model is None else validate_id(model, kind="model"),
        latency_ms=_check_latency(body.get("latency_ms")),
        worker=None if worker is None else validate_id(worker, kind="worker"),
    )
    error = body.get("error")
    if error is not None:
        if type(error) is not dict:
            raise ProtocolError(f"error must be a map or nil, got {type(error).__name__}", field="error")
        code, message = error.get("code"), error.get("message")
        _check_error_code(code)
        if type(message) is not str or len(message) > MAX_ERROR_MESSAGE_CHARS:
            raise ProtocolError(f"error.message must be a string of <= {MAX_ERROR_MESSAGE_CHARS} characters",
                                field="error.message")
        return InferAnswer(error=code, message=message, **common)
    if seq is None:
        raise ProtocolError("seq is nil only in an answer that carries an error", field="seq")
    label = body.get("label")
    index = body.get("index")
    confidence = body.get("confidence")
    if label is None or index is None or confidence is None:
        given = (("label", label), ("index", index), ("confidence", confidence))
        missing = [k for k, v in given if v is None]
        raise ProtocolError("an answer without an error carries label, index and confidence",
                            field=missing[0])
    return InferAnswer(label=_check_answer_label(label), index=_check_index(index),
                       confidence=_check_confidence(confidence, "confidence"), **common)


# ------------------------------------------------------------------------------------------------
# field rules
# ------------------------------------------------------------------------------------------------
def _check_pipeline(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is not str or len(value) > MAX_PIPELINE_CHARS:
        raise ProtocolError(f"pipeline must be a string of at most {MAX_PIPELINE_CHARS} characters or nil",
                            field="pipeline")
    return value


def _check_confidence(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if type(value) not in (float, int) or not 0.0 <= value <= 1.0:  # NaN fails the comparison
        raise ProtocolError(f"{where} must be a number in [0, 1] or nil, got {value!r:.40}", field=where)
    return float(value)


def _check_version_number(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 1 <= value < 2**63:
        raise ProtocolError(f"{where} must be a model version (an int >= 1) or nil, got {value!r:.40}",
                            field=where)
    return value


def _check_time(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if type(value) not in (float, int) or not math.isfinite(value) or value < 0:
        raise ProtocolError(f"{where} must be finite, non-negative Unix seconds or nil, got {value!r:.40}",
                            field=where)
    return float(value)


def _check_latency(value: Any) -> float:
    if type(value) not in (float, int) or not math.isfinite(value) or value < 0:
        raise ProtocolError(f"latency_ms must be a finite number >= 0, got {value!r:.40}", field="latency_ms")
    return float(value)


def _check_index(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value < 2**31:
        raise ProtocolError(f"index must be an int in [0, 2**31-1], got {value!r:.40}", field="index")
    return value


def _check_answer_label(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is not str or len(value) > MAX_LABEL_CHARS:
        raise ProtocolError(f"label must be a string of <= {MAX_LABEL_CHARS} characters, got {value!r:.40}",
                            field="label")
    return value


def _check_error_code(code: Any) -> None:
    if type(code) is not str or not 1 <= len(code) <= MAX_ERROR_CODE_CHARS:
        raise ProtocolError(f"error.code must be a string of 1-{MAX_ERROR_CODE_CHARS} characters, "
                            f"got {code!r:.40}", field="error.code")
