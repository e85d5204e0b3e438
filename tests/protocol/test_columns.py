"""The per-envelope (columnar) decoder gives exactly what the per-sample rules give.

``decode_samples_columns`` checks a uniform envelope with whole-list tests; anything it does not
certify goes through the per-sample rules of ``decode_samples_raw``. So on every payload, good or bad,
its result and its errors must equal those of ``decode_samples_raw`` turned into columns.
"""

from __future__ import annotations

import copy

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.errors import ProtocolError
from lepton.protocol import (
    DTYPES,
    MAX_SEQ,
    Sample,
    SampleColumns,
    decode_samples_columns,
    decode_samples_raw,
    encode_samples,
)
from lepton.protocol._envelope import _check_uniform

_MISSING = object()


def _reference(payload: bytes, **kw):  # noqa: ANN003, ANN202
    device, pipeline, good, bad = decode_samples_raw(payload, **kw)
    return device, pipeline, SampleColumns.from_raw(good), [(i, e.field, str(e)) for i, _raw, e in bad]


def _columnar(payload: bytes, **kw):  # noqa: ANN003, ANN202
    device, pipeline, cols, bad = decode_samples_columns(payload, **kw)
    return device, pipeline, cols, [(i, e.field, str(e)) for i, _raw, e in bad]


def _body(dtype: str = "float32", n: int = 4) -> dict:
    x = (np.arange(4) % 2).astype(DTYPES[dtype]).reshape(1, 4)
    samples = [Sample(seq=10 + k, ts=1.5 + k, x=x, y=k % 3, meta=None) for k in range(n)]
    return msgpack.unpackb(encode_samples("cam-1", samples, pipeline="p1"), raw=False)


# (where, key, value): one change to one sample of a uniform envelope; valid or not, both decoders
# must agree on it.
MUTATIONS = [
    ("sample", None, 5), ("sample", None, None), ("sample", None, []),
    ("sample", "extra", 1),
    ("sample", "seq", -1), ("sample", "seq", MAX_SEQ), ("sample", "seq", 2**63), ("sample", "seq", True),
    ("sample", "seq", 1.0), ("sample", "seq", "3"), ("sample", "seq", _MISSING),
    ("sample", "ts", 5), ("sample", "ts", float("nan")), ("sample", "ts", float("inf")),
    ("sample", "ts", True), ("sample", "ts", "1"), ("sample", "ts", _MISSING),
    ("sample", "x", 5), ("sample", "x", _MISSING),
    ("x", "dtype", "float64"), ("x", "dtype", "int8"), ("x", "dtype", "nope"), ("x", "dtype", 3),
    ("x", "dtype", _MISSING),
    ("x", "shape", [True, 4]), ("x", "shape", [1.0, 4]), ("x", "shape", [4, 1]), ("x", "shape", [4]),
    ("x", "shape", [2, 2]), ("x", "shape", []), ("x", "shape", [-1]), ("x", "shape", [1, 4, 1]),
    ("x", "shape", "1,4"), ("x", "shape", _MISSING),
    ("x", "data", b""), ("x", "data", b"\x00" * 64), ("x", "data", b"\x02" * 16), ("x", "data", "text"),
    ("x", "data", _MISSING),
    ("sample", "y", None), ("sample", "y", _MISSING), ("sample", "y", True), ("sample", "y", 2**63),
    ("sample", "y", -(2**63)), ("sample", "y", 2**63 - 1), ("sample", "y", "a" * 256),
    ("sample", "y", "a" * 257), ("sample", "y", 1.5), ("sample", "y", [1]), ("sample", "y", "cat"),
    ("sample", "meta", {}), ("sample", "meta", {"a": [1, 2]}), ("sample", "meta", {"a": float("nan")}),
    ("sample", "meta", "text"), ("sample", "meta", {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}),
    ("sample", "meta", {"k": "v" * 70_000}),
]


def _mutate(body: dict, index: int, where: str, key, value) -> dict:  # noqa: ANN001
    body = copy.deepcopy(body)
    if key is None:
        body["samples"][index] = value
        return body
    target = body["samples"][index] if where == "sample" else body["samples"][index]["x"]
    if value is _MISSING:
        del target[key]
    else:
        target[key] = value
    return body


def test_a_good_uniform_envelope_takes_the_per_envelope_path():
    for dtype in sorted(DTYPES):
        raws = _body(dtype)["samples"]
        cols = _check_uniform(raws, 1 << 20)
        assert cols is not None and cols.uniform, dtype
        assert cols == SampleColumns.from_raw(decode_samples_raw(encode_samples(
            "cam-1", [Sample(seq=10 + k, ts=1.5 + k, x=(np.arange(4) % 2).astype(DTYPES[dtype]).reshape(1, 4),
                             y=k % 3) for k in range(4)], pipeline="p1"))[2])


@pytest.mark.parametrize("dtype", ["float32", "bool"])
@pytest.mark.parametrize("index", [0, 2])
@pytest.mark.parametrize(("where", "key", "value"), MUTATIONS)
def test_one_change_anywhere_gives_the_per_sample_result(dtype, index, where, key, value):  # noqa: ANN001
    payload = msgpack.packb(_mutate(_body(dtype), index, where, key, value), use_bin_type=True)
    try:
        expected = _reference(payload, expected_device="cam-1", max_tensor_bytes=1 << 20)
    except ProtocolError as exc:
        with pytest.raises(ProtocolError) as got:
            _columnar(payload, expected_device="cam-1", max_tensor_bytes=1 << 20)
        assert (got.value.field, str(got.value)) == (exc.field, str(exc))
        return
    assert _columnar(payload, expected_device="cam-1", max_tensor_bytes=1 << 20) == expected


def test_the_tensor_limit_applies_to_every_sample():
    payload = msgpack.packb(_body("float64"), use_bin_type=True)  # 32 bytes per tensor
    _d, _p, cols, bad = decode_samples_columns(payload, max_tensor_bytes=31)
    assert not cols.seq and [e.field for _i, _r, e in bad] == [f"samples[{i}].x.shape" for i in range(4)]


labels = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=300), st.booleans())
metas = st.one_of(st.none(), st.just({}),
                  st.dictionaries(st.text(max_size=4), st.integers(-5, 5), max_size=3))


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**64 - 1), st.one_of(st.floats(), st.integers(-10, 10)), labels, metas,
            st.sampled_from(["float32", "uint8", "bool"]), st.sampled_from([[4], [2, 2], [0], []]),
        ),
        min_size=1, max_size=8,
    )
)
def test_random_envelopes_give_the_per_sample_result(items):  # noqa: ANN001
    samples = []
    for seq, ts, y, meta, dtype, shape in items:
        count = int(np.prod(shape)) if shape else 1
        data = bytes(count * DTYPES[dtype].itemsize)
        sample = {"seq": seq, "ts": ts, "x": {"dtype": dtype, "shape": shape, "data": data}, "y": y}
        if meta is not None:
            sample["meta"] = meta
        samples.append(sample)
    payload = msgpack.packb({"v": 1, "device": "cam-1", "samples": samples}, use_bin_type=True)
    assert _columnar(payload) == _reference(payload)
