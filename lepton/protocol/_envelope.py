"""Payloads of protocol v1: samples envelopes (msgpack), acks (msgpack), JSON reports."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, NamedTuple, cast

import msgpack
import numpy as np

from lepton.errors import ProtocolError
from lepton.protocol._codec import DEFAULT_MAX_TENSOR_BYTES, DTYPES, MAX_RANK, check_tensor, encode_tensor
from lepton.protocol._ids import validate_id

PROTOCOL_VERSION = 1
MAX_SEQ = 2**63 - 1
#: Default ceiling for one whole samples payload.
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
MAX_SAMPLES_PER_ENVELOPE = 65_536
MAX_LABEL_CHARS = 256
#: Bounds of a sample's ``meta`` map: nesting depth (the map itself is level 1), entries (keys, list
#: items and scalars, counted over the whole tree) and characters of all its keys and strings.
MAX_META_DEPTH = 8
MAX_META_ITEMS = 1024
MAX_META_CHARS = 65_536


@dataclass(frozen=True)
class Sample:
    """One captured sample: a feature tensor with its per-device sequence number."""

    seq: int
    ts: float
    x: np.ndarray
    y: int | str | None = None
    meta: dict[str, Any] | None = field(default=None)


class RawSample(NamedTuple):
    """A validated sample whose tensor is still the payload's raw bytes (no numpy array).

    What a store that keeps tensors as bytes needs; :class:`Sample` is the same plus the array view.
    """

    seq: int
    ts: float
    y: int | str | None
    dtype: str
    shape: list[int]
    data: bytes | bytearray | memoryview
    meta: dict[str, Any] | None


class SampleColumns(NamedTuple):
    """The validated samples of one envelope, column by column (:func:`decode_samples_columns`).

    Entry ``i`` of every list is one sample, as :class:`RawSample` would hold it. ``uniform`` says every
    sample has the dtype and shape of the first (the common case: one device, one pipeline), which
    lets a store build its columns per envelope instead of per sample.
    """

    seq: list[int]
    ts: list[float]
    y: list[int | str | None]
    dtype: list[str]
    shape: list[list[int]]
    data: list[bytes | bytearray | memoryview]
    meta: list[dict[str, Any] | None]
    uniform: bool

    @classmethod
    def from_raw(cls, samples: Sequence[RawSample]) -> SampleColumns:
        """Columns of samples validated one by one (the per-sample rule path)."""
        if len(samples) == 1:  # the commonest envelope of all: spare zip its overhead
            ((seq0, ts0, y0, dtype0, shape0, data0, meta0),) = samples
            return cls([seq0], [ts0], [y0], [dtype0], [shape0], [data0], [meta0], True)
        cols = list(zip(*samples, strict=True)) if samples else [()] * 7
        seq, ts, y, dtype, shape, data, meta = (list(c) for c in cols)
        n = len(samples)
        uniform = bool(samples) and dtype.count(dtype[0]) == n and shape.count(shape[0]) == n
        return cls(seq, ts, y, dtype, shape, data, meta, uniform)


@dataclass(frozen=True)
class SamplesEnvelope:
    device: str
    samples: tuple[Sample, ...]
    pipeline: str | None = None


# ------------------------------------------------------------------------------------------------
# samples
# ------------------------------------------------------------------------------------------------
def encode_samples(device: str, samples: Iterable[Sample], *, pipeline: str | None = None) -> bytes:
    """Encode samples of one device as a protocol v1 msgpack envelope.

    >>> s = Sample(seq=0, ts=1.0, x=np.zeros(4, np.float32), y=3)
    >>> decode_samples(encode_samples("cam-1", [s])).samples[0].y
    3
    """
    validate_id(device, kind="device")
    items = []
    for sample in samples:
        _check_seq(sample.seq, "samples[].seq")
        item: dict[str, Any] = {"seq": sample.seq, "ts": float(sample.ts), "x": encode_tensor(sample.x),
                                "y": _check_label(sample.y, "samples[].y")}
        if sample.meta:
            check_meta(sample.meta, field="samples[].meta")
            item["meta"] = sample.meta
        items.append(item)
    if not items:
        raise ProtocolError("an envelope carries at least one sample", field="samples")
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "device": device, "samples": items}
    if pipeline is not None:
        body["pipeline"] = str(pipeline)
    return msgpack.packb(body, use_bin_type=True)


def encode_sample_body(
    x: np.ndarray, y: int | str | None = None, meta: dict[str, Any] | None = None
) -> bytes:
    """The part of one sample that does not change when it is resent: msgpack ``{"x", "y"[, "meta"]}``.

    A device stores this in its spool once, at capture, and builds every (re)send of the sample with
    :func:`encode_samples_packed`, so the tensor is never decoded and encoded again.

    A contiguous array of a wire dtype without ``meta`` (every sample of a device pipeline) takes a fast
    path that is byte for byte what msgpack makes: the bytes up to the tensor data are cached per
    ``(dtype, shape)``, and the data buffer is joined in as it is.
    """
    if not meta and type(x) is np.ndarray and x.size and x.flags.c_contiguous:
        head = _BODY_HEADS.get((x.dtype, x.shape)) or _body_head(x)
        if head is not None:
            y = _check_label(y, "y")
            n = x.nbytes
            size = (b"\xc4" + bytes((n,)) if n < 0x100
                    else b"\xc5" + n.to_bytes(2, "big") if n < 0x10000 else b"\xc6" + n.to_bytes(4, "big"))
            label = _FIXINT[y] if type(y) is int and 0 <= y < 128 else msgpack.packb(y, use_bin_type=True)
            return b"".join((head, size, x.data, _Y_KEY, label))
    item: dict[str, Any] = {"x": encode_tensor(x), "y": _check_label(y, "y")}
    if meta:
        check_meta(meta)
        item["meta"] = meta
    return msgpack.packb(item, use_bin_type=True)


#: ``(dtype, shape)`` -> a sample body's bytes up to the tensor data's bin header (encode_sample_body)
_BODY_HEADS: dict[tuple[np.dtype, tuple[int, ...]], bytes] = {}
_Y_KEY = msgpack.packb("y")
_FIXINT = tuple(bytes((i,)) for i in range(128))  # msgpack's positive fixints are the byte itself


def _body_head(x: np.ndarray) -> bytes | None:
    """The cached head for ``x``'s dtype and shape; None when ``x`` needs the general path (a dtype
    to convert or refuse, too many dimensions)."""
    name = x.dtype.name
    if DTYPES.get(name) != x.dtype or x.ndim > MAX_RANK:
        return None
    tensor = msgpack.packb({"dtype": name, "shape": list(x.shape), "data": b""}, use_bin_type=True)
    head = b"\x82" + msgpack.packb("x") + tensor[:-2]  # without the empty data's bin header c4 00
    if len(_BODY_HEADS) >= 256:  # a source whose frame shapes vary: keep the cache bounded
        _BODY_HEADS.clear()
    _BODY_HEADS[(x.dtype, x.shape)] = head
    return head


_SEQ_KEY = msgpack.packb("seq")
_TS_KEY = msgpack.packb("ts")


def encode_samples_packed(
    device: str, items: Iterable[tuple[int, float, bytes]], *, pipeline: str | None = None
) -> bytes:
    """Encode ``(seq, ts, body)`` items, each body from :func:`encode_sample_body`, into an envelope.

    The result is byte for byte what :func:`encode_samples` makes of the same samples: the sample map
    is ``seq``, ``ts`` and then the body's own entries, spliced without unpacking the body.
    """
    validate_id(device, kind="device")
    packer = msgpack.Packer(use_bin_type=True)
    parts: list[bytes] = []
    for seq, ts, body in items:
        _check_seq(seq, "samples[].seq")
        head = body[0] if body else 0
        if head not in (0x82, 0x83):  # fixmap of {"x", "y"} or {"x", "y", "meta"}
            raise ProtocolError("a sample body must come from encode_sample_body", field="samples[].body")
        parts.append(bytes((head + 2,)) + _SEQ_KEY + packer.pack(seq) + _TS_KEY + packer.pack(float(ts))
                     + body[1:])
    if not parts:
        raise ProtocolError("an envelope carries at least one sample", field="samples")
    out = [bytes((0x84 if pipeline is not None else 0x83,)), packer.pack("v"), packer.pack(PROTOCOL_VERSION),
           packer.pack("device"), packer.pack(device), packer.pack("samples"),
           packer.pack_array_header(len(parts))]
    out += parts
    if pipeline is not None:
        out += [packer.pack("pipeline"), packer.pack(str(pipeline))]
    return b"".join(out)


def _unpack(payload: bytes | bytearray | memoryview, max_bytes: int) -> Any:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"payload must be bytes, got {type(payload).__name__}", field="payload")
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {max_bytes}", field="payload")
    try:
        return msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=max_bytes, max_str_len=max_bytes, max_array_len=max_bytes, max_map_len=max_bytes,
        )
    except Exception as exc:  # msgpack raises many unrelated types (ValueError, ExtraData, TypeError...)
        raise ProtocolError(f"not valid msgpack ({type(exc).__name__}: {exc})", field="payload") from None


def decode_samples_raw(
    payload: bytes | bytearray | memoryview,
    *,
    expected_device: str | None = None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[str, str | None, list[RawSample], list[tuple[int, Any, ProtocolError]]]:
    """Validate an envelope without building arrays: ``(device, pipeline, good, bad)``.

    ``good`` holds :class:`RawSample` tuples, ``bad`` is ``[(index, raw_sample, error), ...]``. Raises
    ProtocolError when the envelope itself (version, device, samples list) is wrong. Every other
    decoder here is built on this one, so the rules of protocol v1 live in one place.
    """
    device, pipeline, raw_samples = _open_envelope(payload, expected_device, max_payload_bytes)
    good, bad = _check_samples(raw_samples, max_tensor_bytes)
    return device, pipeline, good, bad


def _open_envelope(
    payload: bytes | bytearray | memoryview, expected_device: str | None, max_payload_bytes: int
) -> tuple[str, str | None, list[Any]]:
    """The envelope's own rules (version, device, pipeline, samples list): ``(device, pipeline, raw
    samples)``; raises ProtocolError."""
    body = _unpack(payload, max_payload_bytes)
    if not isinstance(body, dict):
        raise ProtocolError(f"envelope must be a map, got {type(body).__name__}", field="envelope")
    _check_version(body.get("v"), "v")
    device = validate_id(body.get("device"), kind="device")
    if expected_device is not None and device != expected_device:
        raise ProtocolError(f"envelope device {device!r} does not match topic device {expected_device!r}",
                            field="device")
    pipeline = body.get("pipeline")
    if pipeline is not None and (not isinstance(pipeline, str) or len(pipeline) > 128):
        raise ProtocolError("pipeline must be a string of at most 128 characters", field="pipeline")
    raw_samples = body.get("samples")
    if not isinstance(raw_samples, list) or not raw_samples:
        raise ProtocolError("samples must be a non-empty list", field="samples")
    if len(raw_samples) > MAX_SAMPLES_PER_ENVELOPE:
        raise ProtocolError(f"more than {MAX_SAMPLES_PER_ENVELOPE} samples", field="samples")
    return device, pipeline, raw_samples


def decode_samples_columns(
    payload: bytes | bytearray | memoryview,
    *,
    expected_device: str | None = None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[str, str | None, SampleColumns, list[tuple[int, Any, ProtocolError]]]:
    """:func:`decode_samples_raw` with the good samples as columns: ``(device, pipeline, columns, bad)``.

    The same rules, checked per envelope where the samples share their structure: the first sample
    goes through the per-sample rules (:func:`decode_samples_raw`'s), and the others must have exactly
    its dtype and shape (and pass the seq, ts, label and meta rules), which is tested for the whole
    list at once with C-level ``map``/``set``/``min``/``max``. An envelope that is not uniform, or
    that holds any bad sample, is decoded sample by sample instead, so the result (and every error)
    is always what the per-sample rules give.
    """
    device, pipeline, raw_samples = _open_envelope(payload, expected_device, max_payload_bytes)
    if len(raw_samples) > 1:
        cols = _check_uniform(raw_samples, max_tensor_bytes)
        if cols is not None:
            return device, pipeline, cols, []
    good, bad = _check_samples(raw_samples, max_tensor_bytes)
    return device, pipeline, SampleColumns.from_raw(good), bad


_GET_SEQ, _GET_TS, _GET_X = itemgetter("seq"), itemgetter("ts"), itemgetter("x")
_GET_DTYPE, _GET_SHAPE, _GET_DATA = itemgetter("dtype"), itemgetter("shape"), itemgetter("data")
_LABEL_TYPES = frozenset({int, str, type(None)})
_INT = frozenset({int})
_BYTES = frozenset({bytes})


def _check_uniform(raws: list[Any], max_tensor_bytes: int) -> SampleColumns | None:
    """The samples as columns if every one passes the per-sample rules with the first sample's dtype
    and shape; None when anything differs or is wrong (the caller then checks sample by sample).

    Accepts a subset of what :func:`_check_sample` accepts, never more: each test below is that
    function's rule, or a narrower one (``ts`` a float, not an int; ``data`` bytes, as msgpack gives).
    """
    n = len(raws)
    if set(map(type, raws)) != {dict}:
        return None
    try:
        first = _check_sample(raws[0], 0, max_tensor_bytes)  # the per-sample rules, once
        seqs = list(map(_GET_SEQ, raws))
        tss = list(map(_GET_TS, raws))
        xs = list(map(_GET_X, raws))
        if set(map(type, xs)) != {dict}:
            return None
        dtypes = list(map(_GET_DTYPE, xs))
        shapes = list(map(_GET_SHAPE, xs))
        datas = list(map(_GET_DATA, xs))
    except (KeyError, ProtocolError):
        return None
    if set(map(type, seqs)) != _INT or min(seqs) < 0 or max(seqs) > MAX_SEQ:
        return None
    if set(map(type, tss)) != {float} or not all(map(math.isfinite, tss)):
        return None
    # dtype and shape equal to the first sample's (validated above); == alone would let 1.0 or True
    # pass for the int 1 in a shape, so the type of every dimension is checked too.
    if dtypes.count(first.dtype) != n or shapes.count(first.shape) != n:
        return None
    if first.shape and set(map(type, chain.from_iterable(shapes))) != _INT:
        return None
    if set(map(type, datas)) != _BYTES or set(map(len, datas)) != {len(first.data)}:
        return None
    if first.dtype == "bool" and b"".join(datas).translate(None, b"\x00\x01"):
        return None
    ys = list(map(dict.get, raws, repeat("y")))
    kinds = set(map(type, ys))
    if not kinds <= _LABEL_TYPES:
        return None
    if int in kinds:
        ints = cast("list[int]", ys if len(kinds) == 1 else [y for y in ys if type(y) is int])
        if min(ints) < -(2**63) or max(ints) >= 2**63:
            return None
    if str in kinds:
        strs = cast("list[str]", ys if len(kinds) == 1 else [y for y in ys if type(y) is str])
        if max(map(len, strs)) > MAX_LABEL_CHARS:
            return None
    metas = list(map(dict.get, raws, repeat("meta")))
    if metas.count(None) != n:
        try:
            for meta in metas:
                if meta is not None:
                    check_meta(meta)
        except ProtocolError:
            return None
    # The first shape n times: the shape lists of the payload (n containers the garbage collector
    # would keep scanning while the batch is held) are let go.
    return SampleColumns(seqs, tss, ys, [first.dtype] * n, [first.shape] * n, datas, metas, True)


def _check_samples(
    raw_samples: list[Any], max_tensor_bytes: int
) -> tuple[list[RawSample], list[tuple[int, Any, ProtocolError]]]:
    """The per-sample rules over every sample: ``(good, bad)`` as :func:`decode_samples_raw` returns."""
    good: list[RawSample] = []
    bad: list[tuple[int, Any, ProtocolError]] = []
    for i, raw in enumerate(raw_samples):
        try:
            good.append(_check_sample(raw, i, max_tensor_bytes))
        except ProtocolError as exc:
            bad.append((i, raw, exc))
    return good, bad


def decode_samples_lenient(
    payload: bytes | bytearray | memoryview,
    *,
    expected_device: str | None = None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[SamplesEnvelope, list[tuple[int, Any, ProtocolError]]]:
    """Decode an envelope, keeping its good samples and returning the bad ones separately.

    Returns ``(envelope_with_good_samples, [(index, raw_sample, error), ...])``. Raises ProtocolError
    when the envelope itself (version, device, samples list) is wrong, so that one bad sample does not
    cost the good ones beside it.
    """
    device, pipeline, good, bad = decode_samples_raw(
        payload, expected_device=expected_device, max_tensor_bytes=max_tensor_bytes,
        max_payload_bytes=max_payload_bytes,
    )
    samples = tuple(_to_sample(r) for r in good)
    return SamplesEnvelope(device=device, samples=samples, pipeline=pipeline), bad


def decode_samples(
    payload: bytes | bytearray | memoryview,
    *,
    expected_device: str | None = None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> SamplesEnvelope:
    """Decode a samples envelope strictly: any bad field raises ProtocolError naming it."""
    envelope, bad = decode_samples_lenient(
        payload, expected_device=expected_device, max_tensor_bytes=max_tensor_bytes,
        max_payload_bytes=max_payload_bytes,
    )
    if bad:
        raise bad[0][2]
    return envelope


def _check_sample(raw: Any, index: int, max_tensor_bytes: int) -> RawSample:
    # Runs once per sample on the ingest hot path: field names are built only when something is wrong.
    try:
        if type(raw) is not dict:
            raise ProtocolError(f"sample must be a map, got {type(raw).__name__}", field="")
        # Any: untrusted values, narrowed by the type() tests below (which mypy cannot follow)
        seq: Any = raw.get("seq")
        if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
            _check_seq(seq, "seq")
        ts: Any = raw.get("ts")
        if type(ts) not in (float, int) or not math.isfinite(ts):
            raise ProtocolError(f"ts must be a finite number of unix seconds, got {ts!r}", field="ts")
        dtype, shape, data, _ = check_tensor(raw.get("x"), field="x", max_bytes=max_tensor_bytes)
        y = raw.get("y")
        if y is not None:
            y = _check_label(y, "y")
        meta = raw.get("meta")
        if meta is not None:
            check_meta(meta)
    except ProtocolError as exc:
        where = f"samples[{index}]" + (f".{exc.field}" if exc.field else "")
        raise ProtocolError(exc.detail, field=where) from None
    return RawSample(seq, float(ts), y, dtype, shape, data, meta)


_META_SCALARS = (str, int, float, bool, type(None))


def check_meta(meta: Any, *, field: str = "meta") -> None:
    """Check that ``meta`` is what every store can keep as JSON: a map with string keys whose values are
    nil, booleans, 64-bit ints, finite floats, strings, arrays and maps, at most :data:`MAX_META_DEPTH`
    deep, with at most :data:`MAX_META_ITEMS` entries and :data:`MAX_META_CHARS` characters in all.

    Iterative, so a hostile depth costs no recursion; raises ProtocolError naming ``field``.
    """
    if type(meta) is not dict:
        raise ProtocolError(f"meta must be a map, got {type(meta).__name__}", field=field)
    items = chars = 0
    stack: list[tuple[Any, int]] = [(meta, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise ProtocolError(f"meta is nested deeper than {MAX_META_DEPTH} levels", field=field)
        if type(node) is dict:
            values = node.values()
            for key in node:
                if type(key) is not str:
                    raise ProtocolError(f"meta keys must be strings, got {type(key).__name__}", field=field)
                chars += len(key)
        else:
            values = node
        items += len(node)
        if items > MAX_META_ITEMS:
            raise ProtocolError(f"meta has more than {MAX_META_ITEMS} entries", field=field)
        for value in values:
            kind = type(value)
            if kind is dict or kind is list:
                stack.append((value, depth + 1))
            elif kind is str:
                chars += len(value)
            elif kind is float:
                if not math.isfinite(value):
                    raise ProtocolError(f"meta floats must be finite, got {value!r}", field=field)
            elif kind is int:
                if not -(2**63) <= value < 2**64:
                    raise ProtocolError("meta ints must fit in 64 bits", field=field)
            elif kind not in _META_SCALARS:
                raise ProtocolError(f"meta values must be JSON values, got {kind.__name__}", field=field)
        if chars > MAX_META_CHARS:
            raise ProtocolError(f"meta holds more than {MAX_META_CHARS} characters", field=field)


def _to_sample(r: RawSample) -> Sample:
    dtype = DTYPES[r.dtype]
    x = np.frombuffer(r.data, dtype=dtype, count=len(r.data) // dtype.itemsize).reshape(r.shape)
    x.flags.writeable = False
    return Sample(seq=r.seq, ts=r.ts, x=x, y=r.y, meta=r.meta)


def _check_version(v: Any, where: str) -> None:
    # ``True == 1`` and ``1.0 == 1`` in Python, but not on the wire: a C decoder reads an int.
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported version {v!r}, expected the int {PROTOCOL_VERSION}", field=where)


def _check_seq(seq: Any, where: str) -> None:
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise ProtocolError(f"seq must be an int in [0, 2**63-1], got {seq!r}", field=where)


def _check_label(y: Any, where: str) -> int | str | None:
    if y is None or (type(y) is int and -(2**63) <= y < 2**63):
        return y
    if isinstance(y, str) and len(y) <= MAX_LABEL_CHARS:
        return y
    raise ProtocolError(f"label must be an int, a string of <= {MAX_LABEL_CHARS} chars or nil, got {y!r:.40}",
                        field=where)


# ------------------------------------------------------------------------------------------------
# acks
# ------------------------------------------------------------------------------------------------
def seqs_to_ranges(seqs: Iterable[int]) -> list[list[int]]:
    """Collapse sequence numbers into sorted inclusive ``[first, last]`` ranges.

    >>> seqs_to_ranges([5, 1, 2, 3, 7])
    [[1, 3], [5, 5], [7, 7]]
    """
    unique = seqs if isinstance(seqs, (set, frozenset)) else set(seqs)
    if len(unique) > 64:  # vectorised: sort once, cut where a seq is not its predecessor + 1
        try:
            a = np.fromiter(unique, dtype=np.int64, count=len(unique))
        except (OverflowError, TypeError, ValueError):
            a = None  # outside int64 (or not ints): the loop below gives the same answer
        if a is not None:
            a.sort()
            cut = np.flatnonzero(np.diff(a) != 1) + 1
            firsts = a[np.concatenate(([0], cut))].tolist()
            lasts = a[np.concatenate((cut - 1, [len(a) - 1]))].tolist()
            return [list(r) for r in zip(firsts, lasts)]
    ranges: list[list[int]] = []
    for seq in sorted(unique):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges


def encode_acks(ranges: Sequence[Sequence[int]]) -> bytes:
    """Encode the acks payload ``{"v": 1, "ranges": [[first, last], ...]}`` (msgpack)."""
    clean = []
    for i, pair in enumerate(ranges):
        first, last = pair
        _check_seq(first, f"ranges[{i}][0]")
        _check_seq(last, f"ranges[{i}][1]")
        if last < first:
            raise ProtocolError(f"range [{first}, {last}] is reversed", field=f"ranges[{i}]")
        clean.append([first, last])
    return msgpack.packb({"v": PROTOCOL_VERSION, "ranges": clean}, use_bin_type=True)


def decode_acks(payload: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """Decode an acks payload into ``[(first, last), ...]`` inclusive ranges."""
    body = _unpack(payload, 16 * 1024 * 1024)
    if not isinstance(body, dict):
        raise ProtocolError(f"acks must be a map, got {type(body).__name__}", field="acks")
    _check_version(body.get("v"), "v")
    ranges = body.get("ranges")
    if not isinstance(ranges, list):
        raise ProtocolError("ranges must be a list", field="ranges")
    out = []
    for i, pair in enumerate(ranges):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ProtocolError("each range is [first_seq, last_seq]", field=f"ranges[{i}]")
        _check_seq(pair[0], f"ranges[{i}][0]")
        _check_seq(pair[1], f"ranges[{i}][1]")
        if pair[1] < pair[0]:
            raise ProtocolError(f"range {pair} is reversed", field=f"ranges[{i}]")
        out.append((pair[0], pair[1]))
    return out


# ------------------------------------------------------------------------------------------------
# JSON reports: status, telemetry, deadletter, predictions
# ------------------------------------------------------------------------------------------------
def encode_json(body: dict[str, Any]) -> bytes:
    """Encode a JSON report (status, telemetry, deadletter, predictions), stamping ``v`` and ``ts``."""
    out = {"v": PROTOCOL_VERSION, "ts": round(time.time(), 3)}
    out.update(body)
    return json.dumps(out, separators=(",", ":"), sort_keys=True, default=_json_default).encode()


def telemetry_fields(body: dict[str, Any]) -> dict[str, int | float]:
    """The flat ``name -> number`` body of a telemetry report (device or worker), which Grafana's MQTT
    data source charts as it is: a bool becomes 0 or 1, a value not known yet (None, NaN, infinity)
    is left out, and anything else (a str, a dict, a list) is a bug of the sender: ProtocolError names
    the field.

    >>> telemetry_fields({"connected": True, "spool_depth": 3, "preprocess_ms": None})
    {'connected': 1, 'spool_depth': 3}
    """
    out: dict[str, int | float] = {}
    for key, value in body.items():
        if isinstance(value, (np.bool_, np.integer, np.floating)):
            value = value.item()
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, int):
            out[key] = value
        elif isinstance(value, float):
            if math.isfinite(value):
                out[key] = value
        else:
            raise ProtocolError(f"telemetry field {key!r} must be a number, not {type(value).__name__} "
                                "(telemetry is flat name -> number; strings and objects go in the status)",
                                field=key)
    return out


def encode_telemetry(body: dict[str, Any]) -> bytes:
    """Encode a telemetry report: :func:`telemetry_fields` of ``body``, stamped like :func:`encode_json`."""
    return encode_json(telemetry_fields(body))


def decode_json(payload: bytes | bytearray | memoryview, *, field: str = "json") -> dict[str, Any]:
    """Decode a JSON report; raise ProtocolError if it is not a JSON object of protocol v1."""
    try:
        body = json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise ProtocolError(f"not valid JSON ({type(exc).__name__}: {exc})", field=field) from None
    if not isinstance(body, dict):
        raise ProtocolError("expected a JSON object", field=field)
    _check_version(body.get("v"), f"{field}.v")
    return body


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def pipeline_hash(spec: Any) -> str:
    """Canonical hash of a preprocessing spec: sha256 of its sorted, compact JSON, first 16 hex digits.

    Devices put it in every envelope; models carry it so a device refuses a model trained on other
    features.

    >>> pipeline_hash({"ops": []}) == pipeline_hash({"ops": []})
    True
    """
    import hashlib

    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
