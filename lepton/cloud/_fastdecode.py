"""Fast path of the samples decoder for the ingest worker: envelope -> dataset rows, no numpy.

The protocol's decoder (``decode_samples_lenient``) builds a numpy array and a ``Sample`` per sample; at
tens of thousands of samples per second that object work is most of the worker's CPU. This fast path
applies exactly the same acceptance rules (protocol v1, docs/protocol.md) straight on the msgpack
objects and returns rows ready for Arrow. It only ever accepts: on ANY doubt it returns ``None`` and
the worker falls back to the protocol's decoder, which stays the single authority on what is wrong
(dead-letter reasons and fields). A differential test (tests/cloud/test_ingest.py) checks both agree
on a corpus of valid and malformed payloads.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack

from lepton.protocol import DTYPES, MAX_SEQ, PROTOCOL_VERSION

__all__ = ["Row", "fast_rows"]

_ITEMSIZE = {name: dt.itemsize for name, dt in DTYPES.items()}
_MAX_SAMPLES = 65_536  # lepton.protocol._envelope.MAX_SAMPLES_PER_ENVELOPE
_MAX_LABEL = 256  # lepton.protocol._envelope.MAX_LABEL_CHARS
_MAX_RANK = 8  # lepton.protocol._codec.MAX_RANK
_INT64_MIN, _INT64_END = -(2**63), 2**63

#: A dataset row in schema order: (device, seq, ts, label, dtype, shape, x, pipeline, received_at, meta).
Row = tuple


def fast_rows(
    payload: bytes,
    device: str,
    *,
    max_tensor_bytes: int,
    max_payload_bytes: int,
    received_at: float = 0.0,
) -> tuple[str | None, list[Row]] | None:
    """``(pipeline, rows)`` of a fully valid envelope from ``device`` (rows in dataset schema order,
    stamped ``received_at``), or ``None`` if anything at all is unusual (then use the protocol's
    decoder)."""
    if len(payload) > max_payload_bytes:
        return None
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_payload_bytes,
            max_str_len=max_payload_bytes,
            max_array_len=max_payload_bytes,
            max_map_len=max_payload_bytes,
        )
    except Exception:  # msgpack raises many types; the protocol's decoder reports it properly
        return None
    if type(body) is not dict:
        return None
    v = body.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION or body.get("device") != device:
        return None
    pipeline = body.get("pipeline")
    if pipeline is not None and (type(pipeline) is not str or len(pipeline) > 128):
        return None
    samples = body.get("samples")
    if type(samples) is not list or not samples or len(samples) > _MAX_SAMPLES:
        return None
    rows: list[Row] = []
    append = rows.append
    isfinite = math.isfinite
    for raw in samples:
        if type(raw) is not dict:
            return None
        seq = raw.get("seq")
        if type(seq) is not int or seq < 0 or seq > MAX_SEQ:
            return None
        ts = raw.get("ts")
        tt = type(ts)
        if tt is int:
            ts = float(ts)
        elif tt is not float or not isfinite(ts):
            return None
        x = raw.get("x")
        if type(x) is not dict:
            return None
        dtype = x.get("dtype")
        itemsize = _ITEMSIZE.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            return None
        shape = x.get("shape")
        if type(shape) is not list or len(shape) > _MAX_RANK:
            return None
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                return None
            count *= d
        data = x.get("data")
        if type(data) is not bytes:
            return None
        expected = count * itemsize
        if expected > max_tensor_bytes or expected != len(data):
            return None
        if dtype == "bool" and data and max(data) > 1:
            return None
        y = raw.get("y")
        if y is None:
            label = None
        elif type(y) is int and _INT64_MIN <= y < _INT64_END:
            label = str(y)
        elif type(y) is str and len(y) <= _MAX_LABEL:
            label = y
        else:
            return None
        meta: Any = raw.get("meta")
        if meta is not None:
            if type(meta) is not dict:
                return None
            meta = json.dumps(meta, separators=(",", ":"), sort_keys=True, default=str) if meta else None
        append((device, seq, ts, label, dtype, shape, data, pipeline, received_at, meta))
    return pipeline, rows
