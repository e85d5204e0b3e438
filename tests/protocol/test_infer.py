"""Infer requests and answers: round trips, and a corpus of hostile payloads.

As for samples envelopes, every decode failure must be a ProtocolError naming the field; nothing else
may escape a decoder, whatever bytes arrive.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lepton.errors import ProtocolError
from lepton.protocol import (
    ANSWER_ERRORS,
    DTYPES,
    MAX_SEQ,
    InferAnswer,
    InferRequest,
    decode_answer,
    decode_infer,
    encode_answer,
    encode_infer,
    peek_seq,
)

SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
labels = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=256))
unit = st.one_of(st.none(), st.floats(0, 1))
versions = st.one_of(st.none(), st.integers(1, 2**63 - 1))
times = st.one_of(st.none(), st.floats(0, 4e9, allow_nan=False, allow_infinity=False))


@st.composite
def requests(draw):
    dtype = np.dtype(draw(st.sampled_from(sorted(DTYPES))))
    x = draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)))
    return InferRequest(device=draw(ids), seq=draw(st.integers(0, MAX_SEQ)), x=x,
                        pipeline=draw(st.one_of(st.none(), st.text(max_size=128))), edge_label=draw(labels),
                        edge_confidence=draw(unit), edge_version=draw(versions), deadline=draw(times))


@st.composite
def answers(draw):
    common = dict(seq=draw(st.integers(0, MAX_SEQ)), version=draw(versions),
                  model=draw(st.one_of(st.none(), ids)), worker=draw(st.one_of(st.none(), ids)),
                  latency_ms=draw(st.floats(0, 1e6)))
    if draw(st.booleans()):
        return InferAnswer(error=draw(st.sampled_from(sorted(ANSWER_ERRORS))),
                           message=draw(st.text(max_size=1024)), **{**common, "seq": draw(st.one_of(
                               st.none(), st.integers(0, MAX_SEQ)))})
    return InferAnswer(label=draw(st.text(max_size=256)), index=draw(st.integers(0, 2**31 - 1)),
                       confidence=draw(st.floats(0, 1)), **common)


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(r=requests())
def test_infer_requests_round_trip(r):
    back = decode_infer(encode_infer(r), expected_device=r.device)

    assert (back.device, back.seq, back.pipeline, back.edge_label, back.edge_version) == \
        (r.device, r.seq, r.pipeline, r.edge_label, r.edge_version)
    assert back.edge_confidence == r.edge_confidence and back.deadline == r.deadline
    assert back.x.dtype == r.x.dtype and back.x.shape == r.x.shape
    assert back.x.tobytes() == np.ascontiguousarray(r.x).tobytes()   # bit-exact, NaNs included
    assert not back.x.flags.writeable


@SETTINGS
@given(a=answers())
def test_answers_round_trip(a):
    assert decode_answer(encode_answer(a)) == a


def test_every_key_is_written_and_unset_ones_are_nil_so_a_c_decoder_sees_one_shape():
    request = msgpack.unpackb(encode_infer(InferRequest(device="d", seq=1, x=np.zeros(1, np.uint8))))
    answer = msgpack.unpackb(encode_answer(InferAnswer(seq=1, error="no_model", message="none yet")))

    assert list(request) == ["v", "device", "seq", "x", "pipeline", "edge_label", "edge_confidence",
                             "edge_version", "deadline"]
    assert request["deadline"] is None and request["v"] == 1
    assert list(answer) == ["v", "seq", "label", "index", "confidence", "version", "model", "latency_ms",
                            "worker", "error"]
    assert answer["error"] == {"code": "no_model", "message": "none yet"} and answer["label"] is None


def test_absent_optional_keys_decode_as_nil():
    minimal = msgpack.packb({"v": 1, "device": "d", "seq": 3,
                             "x": {"dtype": "float32", "shape": [1], "data": b"\0\0\x80?"}})

    r = decode_infer(minimal)

    assert (r.seq, r.pipeline, r.edge_label, r.edge_confidence, r.edge_version, r.deadline) == \
        (3, None, None, None, None, None)
    assert r.x.tolist() == [1.0]


def test_a_long_error_message_is_cut_and_unknown_error_codes_still_decode():
    long = decode_answer(encode_answer(InferAnswer(seq=1, error="overloaded", message="x" * 5000)))
    future = decode_answer(msgpack.packb({"v": 1, "seq": 1, "latency_ms": 0,
                                          "error": {"code": "a_code_from_v1_later", "message": ""}}))

    assert len(long.message) == 1024
    assert future.error == "a_code_from_v1_later" and not future.ok


# ------------------------------------------------------------------------------------------------
# hostile payloads
# ------------------------------------------------------------------------------------------------
GOOD_X = {"dtype": "float32", "shape": [2], "data": b"\0" * 8}
BIG_X = {"dtype": "uint8", "shape": [2000], "data": b"\0" * 2000}


def _req(**changes):
    body = {"v": 1, "device": "cam-1", "seq": 1, "x": GOOD_X, "pipeline": None, "edge_label": None,
            "edge_confidence": None, "edge_version": None, "deadline": None}
    body.update(changes)
    return msgpack.packb({k: v for k, v in body.items() if v is not _DROP}, use_bin_type=True)


_DROP = object()


@pytest.mark.parametrize("payload, field", [
    (b"", "payload"), (b"\xc1", "payload"), (b"\x93\x01\x02\x03", "request"),
    (msgpack.packb(None), "request"),
    (_req(v=True), "v"), (_req(v=1.0), "v"), (_req(v=2), "v"), (_req(v=_DROP), "v"),
    (_req(device="a/b"), "device"), (_req(device=_DROP), "device"), (_req(device=b"cam-1"), "device"),
    (_req(seq=-1), "seq"), (_req(seq=2**63), "seq"), (_req(seq=True), "seq"), (_req(seq=1.0), "seq"),
    (_req(seq=_DROP), "seq"),
    (_req(x=_DROP), "x"), (_req(x={"dtype": "object", "shape": [1], "data": b"\0"}), "x.dtype"),
    (_req(x={"dtype": "float32", "shape": [2**40, 2**40], "data": b""}), "x.shape"),
    (_req(x={"dtype": "float32", "shape": [3], "data": b"\0" * 8}), "x.data"),
    (_req(pipeline="p" * 129), "pipeline"), (_req(pipeline=7), "pipeline"),
    (_req(edge_label=1.5), "edge_label"), (_req(edge_label="l" * 257), "edge_label"),
    (_req(edge_label=2**63), "edge_label"),
    (_req(edge_confidence=1.5), "edge_confidence"), (_req(edge_confidence=-0.1), "edge_confidence"),
    (_req(edge_confidence=math.nan), "edge_confidence"), (_req(edge_confidence=True), "edge_confidence"),
    (_req(edge_version=0), "edge_version"), (_req(edge_version=1.0), "edge_version"),
    (_req(deadline=math.inf), "deadline"), (_req(deadline=-1.0), "deadline"),
    (_req(deadline="soon"), "deadline"),
])
def test_a_hostile_request_is_a_protocol_error_naming_its_field(payload, field):
    with pytest.raises(ProtocolError) as caught:
        decode_infer(payload)

    assert caught.value.field == field


def test_the_request_must_name_the_device_of_its_topic_and_stay_under_the_size_limit():
    with pytest.raises(ProtocolError) as wrong_device:
        decode_infer(_req(device="cam-2"), expected_device="cam-1")
    with pytest.raises(ProtocolError) as too_big:
        decode_infer(_req(x=BIG_X), max_payload_bytes=1000)
    with pytest.raises(ProtocolError) as big_tensor:
        decode_infer(_req(x=BIG_X), max_tensor_bytes=1000)

    fields = (wrong_device.value.field, too_big.value.field, big_tensor.value.field)
    assert fields == ("device", "payload", "x.shape")


def _ans(**changes):
    body = {"v": 1, "seq": 1, "label": "3", "index": 3, "confidence": 0.5, "version": 1, "model": "m",
            "latency_ms": 1.0, "worker": "w", "error": None}
    body.update(changes)
    return msgpack.packb({k: v for k, v in body.items() if v is not _DROP}, use_bin_type=True)


@pytest.mark.parametrize("payload, field", [
    (b"\xc1", "payload"), (msgpack.packb([1]), "answer"), (b"\0" * 70_000, "payload"),
    (_ans(v=1.0), "v"), (_ans(seq=-1), "seq"), (_ans(seq=None), "seq"),
    (_ans(label=None), "label"), (_ans(label=3), "label"), (_ans(index=None), "index"),
    (_ans(index=-1), "index"),
    (_ans(confidence=None), "confidence"), (_ans(confidence=2.0), "confidence"),
    (_ans(version=0), "version"), (_ans(model="a b"), "model"), (_ans(worker="w/1"), "worker"),
    (_ans(latency_ms=None), "latency_ms"), (_ans(latency_ms=-1), "latency_ms"),
    (_ans(latency_ms=math.nan), "latency_ms"),
    (_ans(error="overloaded"), "error"), (_ans(error={"code": "", "message": ""}), "error.code"),
    (_ans(error={"code": "x" * 65, "message": ""}), "error.code"),
    (_ans(error={"code": "overloaded", "message": None}), "error.message"),
    (_ans(error={"code": "overloaded", "message": "m" * 1025}), "error.message"),
])
def test_a_hostile_answer_is_a_protocol_error_naming_its_field(payload, field):
    with pytest.raises(ProtocolError) as caught:
        decode_answer(payload)

    assert caught.value.field == field


@SETTINGS
@given(payload=st.binary(max_size=256))
def test_nothing_but_protocol_error_escapes_the_decoders(payload):
    for decode in (decode_infer, decode_answer):
        try:
            decode(payload)
        except ProtocolError:
            pass
    assert peek_seq(payload) is None or 0 <= peek_seq(payload) <= MAX_SEQ


@SETTINGS
@given(body=st.dictionaries(st.sampled_from(["v", "device", "seq", "x", "pipeline", "edge_label",
                                              "edge_confidence", "edge_version", "deadline", "label",
                                              "index", "confidence", "latency_ms", "error"]),
                            st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                                      st.floats(), st.text(max_size=8), st.binary(max_size=8),
                                      st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
                                      st.dictionaries(st.text(max_size=5), st.integers(0, 9), max_size=3))))
def test_maps_with_the_right_keys_and_wrong_values_fail_only_with_protocol_error(body):
    payload = msgpack.packb(body, use_bin_type=True)
    for decode in (decode_infer, decode_answer):
        try:
            decode(payload)
        except ProtocolError as exc:
            assert exc.field


def test_peek_seq_finds_the_id_of_a_request_that_fails_elsewhere():
    assert peek_seq(_req(device="a/b", seq=42)) == 42
    assert peek_seq(_req(seq=-3)) is None and peek_seq(b"\xc1") is None


def test_encoders_refuse_what_decoders_would_refuse():
    x = np.zeros(1, np.float32)
    with pytest.raises(ProtocolError, match="device"):
        encode_infer(InferRequest(device="a b", seq=1, x=x))
    with pytest.raises(ProtocolError, match="edge_confidence"):
        encode_infer(InferRequest(device="d", seq=1, x=x, edge_confidence=1.2))
    with pytest.raises(ProtocolError, match="label"):
        encode_answer(InferAnswer(seq=1, label="3"))                # no index or confidence, no error
    with pytest.raises(ProtocolError, match="seq"):
        encode_answer(InferAnswer(seq=None, label="3", index=3, confidence=0.5))
