"""Samples and acks envelopes, JSON reports: round trips, and a corpus of bad payloads.

Every decode failure must be a ProtocolError naming the field; nothing else may escape a decoder,
whatever bytes arrive.
"""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lepton.errors import ProtocolError
from lepton.protocol import (
    DTYPES,
    MAX_SEQ,
    Sample,
    decode_acks,
    decode_json,
    decode_samples,
    decode_samples_lenient,
    encode_acks,
    encode_json,
    encode_samples,
    encode_telemetry,
    pipeline_hash,
    seqs_to_ranges,
    telemetry_fields,
)

SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
labels = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=256))
metas = st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-1000, 1000),
                                                                                st.text(max_size=8)),
                                              min_size=1, max_size=3))


@st.composite
def samples(draw):
    dtype = np.dtype(draw(st.sampled_from(sorted(DTYPES))))
    x = draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)))
    return Sample(seq=draw(st.integers(0, MAX_SEQ)),
                  ts=draw(st.floats(0, 4e9, allow_nan=False, allow_infinity=False)),
                  x=x, y=draw(labels), meta=draw(metas))


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(device=ids, batch=st.lists(samples(), min_size=1, max_size=4),
       pipeline=st.one_of(st.none(), st.text(max_size=128)))
def test_samples_envelope_round_trips(device, batch, pipeline):
    payload = encode_samples(device, batch, pipeline=pipeline)

    envelope = decode_samples(payload, expected_device=device)

    assert envelope.device == device and envelope.pipeline == pipeline
    assert len(envelope.samples) == len(batch)
    for got, sent in zip(envelope.samples, batch, strict=True):
        assert (got.seq, got.ts, got.y, got.meta) == (sent.seq, sent.ts, sent.y, sent.meta)
        assert got.x.dtype == sent.x.dtype and got.x.shape == sent.x.shape
        assert got.x.tobytes() == sent.x.tobytes()


def test_one_sample_is_a_list_of_one():
    payload = encode_samples("cam-1", [Sample(seq=7, ts=1.5, x=np.ones(3, np.uint8), y="cat")])

    body = msgpack.unpackb(payload, raw=False)

    assert set(body) == {"v", "device", "samples"}
    assert body["v"] == 1 and isinstance(body["samples"], list) and len(body["samples"]) == 1
    assert set(body["samples"][0]) == {"seq", "ts", "x", "y"}  # meta only when given


def test_int_timestamp_and_meta_are_accepted():
    body = {"v": 1, "device": "d", "samples": [
        {"seq": 0, "ts": 1700000000, "x": {"dtype": "uint8", "shape": [1], "data": b"\x05"}, "y": None,
         "meta": {"source": "camera0", "w": 32}}]}

    sample = decode_samples(msgpack.packb(body)).samples[0]

    assert sample.ts == 1700000000.0 and isinstance(sample.ts, float)
    assert sample.meta == {"source": "camera0", "w": 32}
    assert sample.x.tolist() == [5]


@pytest.mark.parametrize("kwargs, field", [
    (dict(device="bad/id"), "device"),
    (dict(device=""), "device"),
    (dict(samples=[]), "samples"),
    (dict(samples=[Sample(seq=-1, ts=0.0, x=np.zeros(1))]), "samples[].seq"),
    (dict(samples=[Sample(seq=True, ts=0.0, x=np.zeros(1))]), "samples[].seq"),
    (dict(samples=[Sample(seq=2**63, ts=0.0, x=np.zeros(1))]), "samples[].seq"),
    (dict(samples=[Sample(seq=0, ts=0.0, x=np.zeros(1), y=1.5)]), "samples[].y"),
    (dict(samples=[Sample(seq=0, ts=0.0, x=np.zeros(1), y="x" * 257)]), "samples[].y"),
    (dict(samples=[Sample(seq=0, ts=0.0, x=np.zeros(1, np.complex64))]), "x.dtype"),
])
def test_encoding_refuses_what_decoding_would_refuse(kwargs, field):
    args = dict(device="cam-1", samples=[Sample(seq=0, ts=0.0, x=np.zeros(1))]) | kwargs

    with pytest.raises(ProtocolError) as info:
        encode_samples(args["device"], args["samples"])

    assert info.value.field == field


# ------------------------------------------------------------------------------------------------
# the bad payload corpus
# ------------------------------------------------------------------------------------------------
GOOD_SAMPLE = {"seq": 3, "ts": 1700000000.25, "x": {"dtype": "float32", "shape": [2, 2], "data": b"\0" * 16},
               "y": 1}
GOOD = {"v": 1, "device": "cam-1", "pipeline": "0123456789abcdef", "samples": [GOOD_SAMPLE]}
GOOD_PAYLOAD = msgpack.packb(GOOD, use_bin_type=True)


def with_sample(**changes) -> dict:
    sample = {k: v for k, v in {**GOOD_SAMPLE, **changes}.items() if v is not DROP}
    return {**GOOD, "samples": [sample]}


def with_tensor(**changes) -> dict:
    return with_sample(x={k: v for k, v in {**GOOD_SAMPLE["x"], **changes}.items() if v is not DROP})


def without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


DROP = object()

# name -> (envelope object to msgpack, or raw bytes; the field the error must name)
BAD_SAMPLES: dict[str, tuple[object, str]] = {
    # envelope shape
    "empty payload": (b"", "payload"),
    "nil": (None, "envelope"),
    "list envelope": ([1, "cam-1", []], "envelope"),
    "int envelope": (5, "envelope"),
    "string envelope": ("hello", "envelope"),
    "binary envelope": (b"\x01\x02", "envelope"),
    "non-string map keys": ({1: 1, 2: "cam-1"}, "payload"),
    "trailing garbage": (GOOD_PAYLOAD + b"\xc0", "payload"),
    "reserved msgpack byte": (b"\xc1", "payload"),
    "json instead of msgpack": (json.dumps({"v": 1}).encode(), "payload"),
    # version
    "v missing": (without("v"), "v"),
    "v 0": ({**GOOD, "v": 0}, "v"),
    "v 2": ({**GOOD, "v": 2}, "v"),
    "v string": ({**GOOD, "v": "1"}, "v"),
    "v true": ({**GOOD, "v": True}, "v"),
    "v float": ({**GOOD, "v": 1.0}, "v"),
    "v nil": ({**GOOD, "v": None}, "v"),
    # device
    "device missing": (without("device"), "device"),
    "device int": ({**GOOD, "device": 7}, "device"),
    "device bytes": ({**GOOD, "device": b"cam-1"}, "device"),
    "device with slash": ({**GOOD, "device": "cam/1"}, "device"),
    "device with wildcard": ({**GOOD, "device": "cam+"}, "device"),
    "device empty": ({**GOOD, "device": ""}, "device"),
    "device too long": ({**GOOD, "device": "d" * 65}, "device"),
    "device non-ascii": ({**GOOD, "device": "caméra"}, "device"),
    # pipeline
    "pipeline int": ({**GOOD, "pipeline": 5}, "pipeline"),
    "pipeline too long": ({**GOOD, "pipeline": "p" * 129}, "pipeline"),
    # samples list
    "samples missing": (without("samples"), "samples"),
    "samples empty": ({**GOOD, "samples": []}, "samples"),
    "samples map": ({**GOOD, "samples": GOOD_SAMPLE}, "samples"),
    "samples nil": ({**GOOD, "samples": None}, "samples"),
    "sample is a list": ({**GOOD, "samples": [[3, 0.0]]}, "samples[0]"),
    "sample is nil": ({**GOOD, "samples": [None]}, "samples[0]"),
    # seq
    "seq missing": (with_sample(seq=DROP), "samples[0].seq"),
    "seq negative": (with_sample(seq=-1), "samples[0].seq"),
    "seq above 2**63-1": (with_sample(seq=2**63), "samples[0].seq"),
    "seq float": (with_sample(seq=3.0), "samples[0].seq"),
    "seq string": (with_sample(seq="3"), "samples[0].seq"),
    "seq bool": (with_sample(seq=True), "samples[0].seq"),
    "seq nil": (with_sample(seq=None), "samples[0].seq"),
    # ts
    "ts missing": (with_sample(ts=DROP), "samples[0].ts"),
    "ts string": (with_sample(ts="2024-01-01"), "samples[0].ts"),
    "ts nan": (with_sample(ts=math.nan), "samples[0].ts"),
    "ts infinite": (with_sample(ts=math.inf), "samples[0].ts"),
    "ts bool": (with_sample(ts=False), "samples[0].ts"),
    "ts nil": (with_sample(ts=None), "samples[0].ts"),
    # y and meta
    "y float": (with_sample(y=1.5), "samples[0].y"),
    "y list": (with_sample(y=[1]), "samples[0].y"),
    "y bool": (with_sample(y=True), "samples[0].y"),
    "y bytes": (with_sample(y=b"cat"), "samples[0].y"),
    "y string too long": (with_sample(y="c" * 257), "samples[0].y"),
    "y uint64 out of int64 range": (with_sample(y=2**63), "samples[0].y"),
    "meta list": (with_sample(meta=[1, 2]), "samples[0].meta"),
    "meta string": (with_sample(meta="camera0"), "samples[0].meta"),
    # tensor
    "x missing": (with_sample(x=DROP), "samples[0].x"),
    "x bytes": (with_sample(x=b"\0" * 16), "samples[0].x"),
    "x list": (with_sample(x=[[0.0, 0.0], [0.0, 0.0]]), "samples[0].x"),
    "unknown dtype": (with_tensor(dtype="float128"), "samples[0].x.dtype"),
    "object dtype": (with_tensor(dtype="object"), "samples[0].x.dtype"),
    "pickle dtype": (with_tensor(dtype="pickle"), "samples[0].x.dtype"),
    "dtype nil": (with_tensor(dtype=None), "samples[0].x.dtype"),
    "shape missing": (with_tensor(shape=DROP), "samples[0].x.shape"),
    "shape string": (with_tensor(shape="2x2"), "samples[0].x.shape"),
    "shape negative": (with_tensor(shape=[-4]), "samples[0].x.shape"),
    "shape float": (with_tensor(shape=[2.0, 2.0]), "samples[0].x.shape"),
    "huge shape": (with_tensor(shape=[2**31, 2**31, 2**31]), "samples[0].x.shape"),
    "data missing": (with_tensor(data=DROP), "samples[0].x.data"),
    "data string": (with_tensor(data="\0" * 16), "samples[0].x.data"),
    "size mismatch short": (with_tensor(data=b"\0" * 12), "samples[0].x.data"),
    "size mismatch long": (with_tensor(data=b"\0" * 20), "samples[0].x.data"),
    "size mismatch shape": (with_tensor(shape=[2, 3]), "samples[0].x.data"),
}


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_bad_samples_payloads_raise_protocol_error_naming_the_field(case):
    obj, field = BAD_SAMPLES[case]
    payload = obj if isinstance(obj, bytes) and case != "binary envelope" else msgpack.packb(obj)

    with pytest.raises(ProtocolError) as info:
        decode_samples(payload)

    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


# One value of every msgpack type; for each field, every value outside its allowed types must be refused.
UNIVERSE = {"nil": None, "true": True, "one": 1, "minus one": -1, "float": 1.5, "str": "s", "bin": b"b",
            "array": [1], "map": {"k": 1}}
ALLOWED = {  # path -> names in UNIVERSE that are valid there
    "v": {"one"}, "device": {"str"}, "pipeline": {"nil", "str"}, "samples": set(),
    "seq": {"one"}, "ts": {"one", "minus one", "float"}, "x": set(), "y": {"nil", "one", "minus one", "str"},
    "meta": {"nil", "map"}, "dtype": set(), "shape": set(), "data": set(),
}


def _replace(path: str, value: object) -> dict:
    if path in GOOD:
        return {**GOOD, path: value}
    if path in GOOD_SAMPLE:
        return with_sample(**{path: value})
    if path == "meta":
        return with_sample(meta=value)
    return with_tensor(**{path: value})


@pytest.mark.parametrize("path", sorted(ALLOWED))
def test_wrong_types_everywhere_raise_protocol_error(path):
    for name, value in UNIVERSE.items():
        payload = msgpack.packb(_replace(path, value), use_bin_type=True)
        if name in ALLOWED[path]:
            decode_samples(payload)
            continue
        with pytest.raises(ProtocolError) as info:
            decode_samples(payload)
        where = path if path in GOOD else "samples[0]"
        assert info.value.field.startswith(where), (path, name, info.value.field)


def test_every_truncation_of_a_valid_payload_is_a_protocol_error():
    for cut in range(len(GOOD_PAYLOAD)):
        with pytest.raises(ProtocolError) as info:
            decode_samples(GOOD_PAYLOAD[:cut])
        assert info.value.field == "payload", cut


def test_the_good_payload_of_the_corpus_decodes():
    envelope = decode_samples(GOOD_PAYLOAD, expected_device="cam-1")

    assert envelope.samples[0].seq == 3 and envelope.samples[0].x.shape == (2, 2)


def test_topic_device_mismatch_is_refused():
    with pytest.raises(ProtocolError) as info:
        decode_samples(GOOD_PAYLOAD, expected_device="cam-2")

    assert info.value.field == "device"


@pytest.mark.parametrize("payload", ["text", None, 42, [1, 2]])
def test_a_payload_that_is_not_bytes_is_refused(payload):
    with pytest.raises(ProtocolError) as info:
        decode_samples(payload)
    assert info.value.field == "payload"


def test_payload_and_tensor_limits_are_configurable():
    with pytest.raises(ProtocolError) as info:
        decode_samples(GOOD_PAYLOAD, max_payload_bytes=len(GOOD_PAYLOAD) - 1)
    assert info.value.field == "payload"

    with pytest.raises(ProtocolError) as info:
        decode_samples(GOOD_PAYLOAD, max_tensor_bytes=15)
    assert info.value.field == "samples[0].x.shape"


def test_decoders_accept_bytearray_and_memoryview():
    assert decode_samples(bytearray(GOOD_PAYLOAD)).device == "cam-1"
    assert decode_samples(memoryview(GOOD_PAYLOAD)).device == "cam-1"


def test_lenient_decoding_keeps_good_samples_beside_bad_ones():
    bad = {**GOOD_SAMPLE, "seq": -5}
    other = {**GOOD_SAMPLE, "seq": 4, "x": {**GOOD_SAMPLE["x"], "dtype": "object"}}
    payload = msgpack.packb({**GOOD, "samples": [GOOD_SAMPLE, bad, {**GOOD_SAMPLE, "seq": 9}, other]})

    envelope, rejected = decode_samples_lenient(payload)

    assert [s.seq for s in envelope.samples] == [3, 9]
    assert [(i, e.field) for i, _, e in rejected] == [(1, "samples[1].seq"), (3, "samples[3].x.dtype")]
    assert rejected[0][1] == bad
    with pytest.raises(ProtocolError) as info:
        decode_samples(payload)
    assert info.value.field == "samples[1].seq"


def test_lenient_decoding_still_refuses_a_broken_envelope():
    with pytest.raises(ProtocolError):
        decode_samples_lenient(msgpack.packb({**GOOD, "v": 2}))


# ------------------------------------------------------------------------------------------------
# acks
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(st.sets(st.one_of(st.integers(0, 300), st.integers(MAX_SEQ - 5, MAX_SEQ)), max_size=80))
def test_acks_round_trip_through_ranges(seqs):
    ranges = seqs_to_ranges(seqs)

    decoded = decode_acks(encode_acks(ranges))

    covered = {s for first, last in decoded for s in range(first, last + 1)}
    assert covered == seqs
    # sorted, disjoint and merged
    assert all(a[1] + 1 < b[0] for a, b in zip(decoded, decoded[1:], strict=False))


def test_acks_wire_format():
    assert msgpack.unpackb(encode_acks([[0, 9], [12, 12]])) == {"v": 1, "ranges": [[0, 9], [12, 12]]}
    assert decode_acks(msgpack.packb({"v": 1, "ranges": []})) == []


@pytest.mark.parametrize("ranges", [[[5, 4]], [[-1, 3]], [[0, 2**63]], [[True, 3]]])
def test_encode_acks_refuses_bad_ranges(ranges):
    with pytest.raises(ProtocolError):
        encode_acks(ranges)


BAD_ACKS: dict[str, tuple[object, str]] = {
    "empty payload": (b"", "payload"),
    "truncated": (msgpack.packb({"v": 1, "ranges": [[0, 5]]})[:-1], "payload"),
    "non-map": ([[0, 5]], "acks"),
    "nil": (None, "acks"),
    "v missing": ({"ranges": [[0, 1]]}, "v"),
    "v 2": ({"v": 2, "ranges": [[0, 1]]}, "v"),
    "v true": ({"v": True, "ranges": [[0, 1]]}, "v"),
    "ranges missing": ({"v": 1}, "ranges"),
    "ranges map": ({"v": 1, "ranges": {"0": 1}}, "ranges"),
    "ranges flat": ({"v": 1, "ranges": [0, 5]}, "ranges[0]"),
    "range of three": ({"v": 1, "ranges": [[0, 1, 2]]}, "ranges[0]"),
    "range of one": ({"v": 1, "ranges": [[0]]}, "ranges[0]"),
    "reversed range": ({"v": 1, "ranges": [[0, 1], [9, 3]]}, "ranges[1]"),
    "negative seq": ({"v": 1, "ranges": [[-1, 3]]}, "ranges[0][0]"),
    "string seq": ({"v": 1, "ranges": [[0, "3"]]}, "ranges[0][1]"),
    "float seq": ({"v": 1, "ranges": [[0.0, 3]]}, "ranges[0][0]"),
    "seq too large": ({"v": 1, "ranges": [[0, 2**64 - 1]]}, "ranges[0][1]"),
}


@pytest.mark.parametrize("path, allowed", [("v", {"one"}), ("ranges", set()), ("range", set()),
                                           ("first", {"one"}), ("last", {"one"})])
def test_wrong_types_everywhere_in_acks_raise_protocol_error(path, allowed):
    for name, value in UNIVERSE.items():
        body: dict = {"v": 1, "ranges": [[1, 1]]}
        if path in ("v", "ranges"):
            body[path] = value
        elif path == "range":
            body["ranges"] = [value]
        else:
            body["ranges"] = [[value, 1] if path == "first" else [1, value]]
        payload = msgpack.packb(body, use_bin_type=True)
        if name in allowed:
            assert decode_acks(payload) == [(1, 1)]
            continue
        with pytest.raises(ProtocolError):
            decode_acks(payload)


@pytest.mark.parametrize("case", BAD_ACKS)
def test_bad_acks_raise_protocol_error_naming_the_field(case):
    obj, field = BAD_ACKS[case]
    payload = obj if isinstance(obj, bytes) else msgpack.packb(obj)

    with pytest.raises(ProtocolError) as info:
        decode_acks(payload)

    assert info.value.field == field


# ------------------------------------------------------------------------------------------------
# fuzz: nothing but ProtocolError escapes
# ------------------------------------------------------------------------------------------------
KEYS = ["v", "device", "samples", "seq", "ts", "x", "y", "meta", "dtype", "shape", "data", "ranges",
        "pipeline", "other"]
msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20),
              st.binary(max_size=40)),
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.sampled_from(KEYS), children, max_size=6)),
    max_leaves=30,
)


def _only_protocol_errors(payload: bytes) -> None:
    for decode in (decode_samples, decode_acks, lambda p: decode_samples_lenient(p)):
        try:
            decode(payload)
        except ProtocolError:
            pass


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_error(payload):
    _only_protocol_errors(payload)


@SETTINGS
@given(msgpack_values)
def test_random_msgpack_objects_raise_only_protocol_error(obj):
    _only_protocol_errors(msgpack.packb(obj, use_bin_type=True))


@SETTINGS
@given(st.sampled_from(["v", "device", "pipeline", "samples"]), msgpack_values)
def test_a_good_envelope_with_one_random_field_raises_only_protocol_error(key, value):
    _only_protocol_errors(msgpack.packb({**GOOD, key: value}, use_bin_type=True))


@SETTINGS
@given(st.sampled_from(["seq", "ts", "x", "y", "meta"]), msgpack_values)
def test_a_good_sample_with_one_random_field_raises_only_protocol_error(key, value):
    _only_protocol_errors(msgpack.packb(with_sample(**{key: value}), use_bin_type=True))


@SETTINGS
@given(st.data())
def test_random_byte_flips_of_a_good_payload_raise_only_protocol_error(data):
    payload = bytearray(GOOD_PAYLOAD)
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    _only_protocol_errors(bytes(payload))


# ------------------------------------------------------------------------------------------------
# JSON reports and pipeline hashes
# ------------------------------------------------------------------------------------------------
def test_json_reports_round_trip_with_version_and_timestamp():
    payload = encode_json({"state": "online", "count": np.int64(3), "vec": np.arange(2, dtype=np.float32)})

    body = decode_json(payload)

    assert body["v"] == 1 and isinstance(body["ts"], float)
    assert body["state"] == "online" and body["count"] == 3 and body["vec"] == [0.0, 1.0]
    assert payload == json.dumps(body, separators=(",", ":"), sort_keys=True).encode()  # compact, sorted


@pytest.mark.parametrize("payload, field", [
    (b"", "json"), (b"{", "json"), (b"\xff\xfe", "json"), (b"[1, 2]", "json"), (b'"online"', "json"),
    (b'{"state": "online"}', "json.v"), (b'{"v": 2}', "json.v"), (b'{"v": true}', "json.v"),
    (b"[" * 100_000, "json"),
])
def test_bad_json_reports_raise_protocol_error(payload, field):
    with pytest.raises(ProtocolError) as info:
        decode_json(payload)
    assert info.value.field == field


def test_pipeline_hash_is_canonical():
    a = pipeline_hash({"ops": [{"op": "resize", "size": [8, 8]}], "dtype": "float32"})
    b = pipeline_hash({"dtype": "float32", "ops": [{"size": [8, 8], "op": "resize"}]})

    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert pipeline_hash({"ops": []}) != a


@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**63 - 1),
            st.floats(allow_nan=False, allow_infinity=False, width=64),
            st.sampled_from(["float32", "uint8", "int64", "bool", "float16"]),
            st.lists(st.integers(0, 4), max_size=3),
            st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20)),
            st.one_of(st.none(), st.just({}),
                      st.dictionaries(st.text(max_size=5), st.integers(-1000, 1000), max_size=3)),
        ),
        min_size=1,
        max_size=6,
    ),
    st.one_of(st.none(), st.text(min_size=1, max_size=16)),
)
def test_packed_bodies_make_the_same_bytes_as_encode_samples(items, pipeline):
    from lepton.protocol import encode_sample_body, encode_samples_packed

    samples = [Sample(seq=seq, ts=ts, x=np.zeros(shape, dtype=dtype), y=y, meta=meta)
               for seq, ts, dtype, shape, y, meta in items]

    packed = encode_samples_packed(
        "cam-1", [(s.seq, s.ts, encode_sample_body(s.x, s.y, s.meta)) for s in samples], pipeline=pipeline
    )

    assert packed == encode_samples("cam-1", samples, pipeline=pipeline)
    assert decode_samples(packed, expected_device="cam-1").samples[-1].seq == samples[-1].seq


def test_packed_envelope_refuses_a_body_it_did_not_make():
    from lepton.protocol import encode_samples_packed

    with pytest.raises(ProtocolError) as exc:
        encode_samples_packed("cam-1", [(0, 1.0, msgpack.packb([1, 2]))])
    assert exc.value.field == "samples[].body"
    with pytest.raises(ProtocolError):
        encode_samples_packed("cam-1", [])


def test_telemetry_is_flat_name_to_number_with_unknowns_left_out():
    body = {"connected": True, "retrying": np.bool_(False), "spool_depth": np.int64(3), "uptime_s": 1.5,
            "preprocess_ms": None, "edge_accuracy": float("nan"), "answer_ms_p99": float("inf")}

    out = telemetry_fields(body)
    decoded = decode_json(encode_telemetry(body))

    assert out == {"connected": 1, "retrying": 0, "spool_depth": 3, "uptime_s": 1.5}
    assert all(type(v) in (int, float) for v in out.values())
    assert {k: v for k, v in decoded.items() if k not in ("v", "ts")} == out


@pytest.mark.parametrize("value", ["cam-1", {"p50": 1.0}, [1, 2], b"x"])
def test_telemetry_refuses_what_a_chart_cannot_plot_naming_the_field(value):
    with pytest.raises(ProtocolError) as info:
        telemetry_fields({"spool_depth": 1, "bad": value})
    assert info.value.field == "bad"


def test_the_sample_body_fast_path_is_byte_for_byte_msgpack():
    from lepton.protocol import encode_sample_body, encode_tensor

    rng = np.random.default_rng(1)
    arrays = [
        rng.normal(size=(1, 8, 8)).astype(np.float32),  # the digits preset, 256 bytes: bin16
        rng.normal(size=(7,)).astype(np.float32),  # 28 bytes: bin8
        rng.integers(0, 255, (300, 300), dtype=np.uint8),  # 90,000 bytes: bin32
        np.zeros((), np.float64),  # a scalar, shape []
        rng.integers(0, 2, (3, 5)).astype(bool),
        rng.integers(-9, 9, (2, 2, 2)).astype(np.int64),
    ]
    labels = [None, 0, 7, 127, 128, -1, -33, 2**40, "cat", "é" * 40]
    for x in arrays:
        for y in labels:
            expected = msgpack.packb({"x": encode_tensor(x), "y": y}, use_bin_type=True)
            assert encode_sample_body(x, y) == expected, (x.dtype, x.shape, y)
    # What the fast path leaves to the general one gives the same bytes as before: converted dtypes,
    # non-contiguous views, meta, and refusals.
    view = rng.normal(size=(8, 8)).astype(np.float32)[:, ::2]
    assert encode_sample_body(view, 1) == msgpack.packb({"x": encode_tensor(view), "y": 1}, use_bin_type=True)
    big_endian = np.arange(4, dtype=">f4")
    assert msgpack.unpackb(encode_sample_body(big_endian, 1))["x"]["data"] == np.arange(4, dtype="<f4").tobytes()
    with_meta = msgpack.unpackb(encode_sample_body(arrays[1], 1, {"k": 1}))
    assert with_meta["meta"] == {"k": 1} and with_meta["y"] == 1
    with pytest.raises(ProtocolError):
        encode_sample_body(arrays[1], True)  # a bool is not a label
    with pytest.raises(ProtocolError):
        encode_sample_body(np.zeros(3, np.complex64), 1)
