"""The tensor codec: every allowed dtype and many shapes round-trip; anything else is a ProtocolError."""

from __future__ import annotations

import json

import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lepton.errors import ProtocolError
from lepton.protocol import DTYPES, decode_tensor, encode_tensor

SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def wire(tensor: dict) -> dict:
    """What a receiver sees: the TENSOR map after a msgpack round trip."""
    return msgpack.unpackb(msgpack.packb(tensor, use_bin_type=True), raw=False)


@st.composite
def arrays(draw):
    name = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    # Native byte order: the codec must turn it into little-endian itself.
    return draw(hnp.arrays(np.dtype(name), shape))


@SETTINGS
@given(arrays())
def test_every_dtype_and_shape_round_trips_bit_exactly(array):
    decoded = decode_tensor(wire(encode_tensor(array)))

    assert decoded.dtype.name == array.dtype.name
    assert decoded.shape == array.shape
    # Bytes, not values: NaN payloads and -0.0 must survive too.
    assert decoded.tobytes() == np.ascontiguousarray(array).tobytes()


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 0, 4), (1,), (2, 3), (1, 2, 3, 4), (0, 0, 0, 0)])
def test_each_dtype_with_edge_shapes(name, shape):
    array = (np.arange(int(np.prod(shape))) % 2).astype(name).reshape(shape)

    tensor = encode_tensor(array)
    decoded = decode_tensor(wire(tensor))

    assert tensor["dtype"] == name
    assert tensor["shape"] == list(shape)
    assert len(tensor["data"]) == array.size * array.itemsize
    assert decoded.shape == shape and decoded.dtype.name == name
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("name", ["int16", "int32", "int64", "float16", "float32", "float64"])
def test_big_endian_input_goes_out_little_endian(name):
    array = np.arange(6, dtype=np.dtype(name).newbyteorder(">")).reshape(2, 3)

    tensor = encode_tensor(array)

    assert bytes(tensor["data"]) == np.arange(6, dtype=np.dtype(name).newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(decode_tensor(wire(tensor)), array)


def test_non_contiguous_input_goes_out_in_c_order():
    fortran = np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4))
    strided = np.arange(24, dtype=np.float32)[::2].reshape(3, 4)

    for array in (fortran, strided, fortran.T):
        tensor = encode_tensor(array)
        assert bytes(tensor["data"]) == np.ascontiguousarray(array).tobytes()
        np.testing.assert_array_equal(decode_tensor(wire(tensor)), array)


def test_decoding_is_zero_copy_and_read_only():
    payload = msgpack.packb(encode_tensor(np.arange(4, dtype=np.float32)), use_bin_type=True)
    obj = msgpack.unpackb(payload, raw=False)

    decoded = decode_tensor(obj)

    assert not decoded.flags.owndata  # a view of the received bytes
    assert np.shares_memory(decoded, np.frombuffer(obj["data"], np.uint8))
    assert not decoded.flags.writeable
    with pytest.raises(ValueError):
        decoded[0] = 1.0


@pytest.mark.parametrize("dtype", ["object", "complex64", "complex128", "uint16", "uint32", "uint64", "U3",
                                   "datetime64[s]", "timedelta64[s]", "V4"])
def test_encoding_refuses_dtypes_outside_the_allow_list(dtype):
    array = np.zeros(3, dtype=dtype)

    with pytest.raises(ProtocolError) as info:
        encode_tensor(array)

    assert info.value.field == "x.dtype"


def test_encoding_refuses_rank_above_eight():
    with pytest.raises(ProtocolError):
        encode_tensor(np.zeros((1,) * 9, np.uint8))


def test_size_limit_is_configurable_and_inclusive():
    tensor = wire(encode_tensor(np.zeros(100, np.float32)))

    assert decode_tensor(tensor, max_bytes=400).size == 100
    with pytest.raises(ProtocolError) as info:
        decode_tensor(tensor, max_bytes=399)
    assert info.value.field == "x.shape"


def test_huge_shape_is_refused_without_allocating():
    tensor = {"dtype": "float64", "shape": [2**40, 2**40, 2**40], "data": b"\0" * 8}

    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as info:
            decode_tensor(tensor)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert "2**31-1" in str(info.value) and info.value.field == "x.shape"
    assert peak < 1_000_000


@pytest.mark.parametrize(
    "shape, ok",
    [([0, 2**31], False), ([2**31 - 1, 0], True), ([0, 2**16, 2**16], False), ([0, 2**15, 2**15], True),
     ([2**31], False)],
)
def test_every_dimension_and_their_extent_fit_int32(shape, ok):
    """Stores keep shapes as int32: an empty tensor like [0, 2**31] passed the byte check (0 bytes)
    and then made the dataset writer fail on every retry (issue 10)."""
    from lepton.protocol import check_tensor

    tensor = {"dtype": "uint8", "shape": shape, "data": b"" if 0 in shape else b"\0"}
    if ok:
        check_tensor(tensor)
    else:
        with pytest.raises(ProtocolError) as info:
            check_tensor(tensor)
        assert info.value.field == "x.shape"


@pytest.mark.parametrize(
    "meta, ok",
    [
        ({"source": "camera:0", "frame": [640, 480], "gain": 1.5, "on": True, "n": None}, True),
        ({b"k": 1}, False),
        ({"a": float("nan")}, False),
        ({"a": float("inf")}, False),
        ({"a": b"\x00"}, False),
        ({"a": 2**64}, False),
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}, True),  # 7 levels
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}}, False),  # 9 levels
        ({str(i): i for i in range(1025)}, False),
        ({"s": "x" * 70_000}, False),
        ([1, 2], False),
    ],
)
def test_meta_is_bounded_and_json(meta, ok):
    from lepton.protocol import check_meta

    if ok:
        check_meta(meta)
        json.dumps(meta, allow_nan=False)
    else:
        with pytest.raises(ProtocolError) as info:
            check_meta(meta)
        assert info.value.field == "meta"


def test_bool_data_must_be_zero_or_one():
    with pytest.raises(ProtocolError) as info:
        decode_tensor({"dtype": "bool", "shape": [3], "data": b"\x00\x01\x02"})
    assert info.value.field == "x.data"


GOOD = {"dtype": "float32", "shape": [2, 2], "data": b"\0" * 16}

BAD_TENSORS = {
    "not a map": ([GOOD["dtype"], GOOD["shape"], GOOD["data"]], "x"),
    "nil": (None, "x"),
    "bytes": (b"\0" * 16, "x"),
    "missing dtype": ({"shape": [2, 2], "data": b"\0" * 16}, "x.dtype"),
    "object dtype": ({**GOOD, "dtype": "object"}, "x.dtype"),
    "unknown dtype": ({**GOOD, "dtype": "float128"}, "x.dtype"),
    "numpy dtype string": ({**GOOD, "dtype": "<f4"}, "x.dtype"),
    "uppercase dtype": ({**GOOD, "dtype": "FLOAT32"}, "x.dtype"),
    "dtype as int": ({**GOOD, "dtype": 11}, "x.dtype"),
    "dtype as bytes": ({**GOOD, "dtype": b"float32"}, "x.dtype"),
    "missing shape": ({"dtype": "float32", "data": b"\0" * 16}, "x.shape"),
    "shape as int": ({**GOOD, "shape": 4}, "x.shape"),
    "shape as map": ({**GOOD, "shape": {"0": 2}}, "x.shape"),
    "negative dim": ({**GOOD, "shape": [-2, -2]}, "x.shape"),
    "float dim": ({**GOOD, "shape": [2.0, 2]}, "x.shape"),
    "bool dim": ({**GOOD, "shape": [True, 4]}, "x.shape"),
    "string dim": ({**GOOD, "shape": ["2", 2]}, "x.shape"),
    "nil dim": ({**GOOD, "shape": [None, 2]}, "x.shape"),
    "rank 9": ({**GOOD, "shape": [1] * 7 + [2, 2]}, "x.shape"),
    "huge shape": ({**GOOD, "shape": [2**62, 2**62]}, "x.shape"),
    "missing data": ({"dtype": "float32", "shape": [2, 2]}, "x.data"),
    "data as str": ({**GOOD, "data": "\0" * 16}, "x.data"),
    "data as list": ({**GOOD, "data": [0] * 16}, "x.data"),
    "data too short": ({**GOOD, "data": b"\0" * 15}, "x.data"),
    "data too long": ({**GOOD, "data": b"\0" * 17}, "x.data"),
    "data for another dtype": ({**GOOD, "dtype": "float64"}, "x.data"),
    "empty data for rank 0": ({**GOOD, "shape": [], "data": b""}, "x.data"),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensors_raise_protocol_error_naming_the_field(case):
    obj, field = BAD_TENSORS[case]

    with pytest.raises(ProtocolError) as info:
        decode_tensor(wire(obj) if obj is not None else obj)

    assert info.value.field == field


@SETTINGS
@given(st.dictionaries(st.sampled_from(["dtype", "shape", "data", "extra"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                                 st.text(max_size=10), st.binary(max_size=64),
                                 st.sampled_from(sorted(DTYPES)),
                                 st.lists(st.integers(-3, 2**40), max_size=9))))
def test_random_tensor_maps_raise_only_protocol_error(obj):
    try:
        array = decode_tensor(wire(obj))
    except ProtocolError:
        return
    assert array.nbytes == len(obj["data"])
