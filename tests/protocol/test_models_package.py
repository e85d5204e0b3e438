"""Model packages: a good package verifies; every kind of damage is refused with its own reason."""

from __future__ import annotations

import base64
import json
import random

import pytest

from lepton.errors import ConfigError, ModelRejected, ProtocolError
from lepton.protocol import (
    REJECT_REASONS,
    build_package,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    parse_manifest,
    verify_chunk,
    verify_package,
)

DATA = random.Random(7).randbytes(5120)  # 5 chunks of 1024, all different
ODD_DATA = DATA + b"tail"      # 6 chunks, the last one short


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(folder, name="fleet")
    other_private, other_public = generate_keypair(folder, name="other")
    return {"private": load_private_key(private), "public": load_public_key(public),
            "other_private": load_private_key(other_private), "other_public": load_public_key(other_public)}


def build(data=ODD_DATA, **overrides):
    kwargs = dict(fleet="f1", name="digits", version=3, data=data, input_spec={"name": "x", "shape": [-1, 1, 8, 8],
                                                                    "dtype": "float32"},
                  labels=list(range(10)), pipeline={"hash": "0123456789abcdef", "spec": {"ops": []}},
                  metrics={"accuracy": 0.97}, parent=2, quantization="int8", chunk_size=1024,
                  created=1700000000.0)
    kwargs.update(overrides)
    return build_package(**kwargs)


def reason(manifest, chunks, public_key) -> str:
    with pytest.raises(ModelRejected) as info:
        verify_package(manifest, chunks, public_key=public_key)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


def test_a_signed_package_verifies_and_reassembles(keys):
    manifest, chunks = build(private_key=keys["private"])

    package = verify_package(manifest, dict(enumerate(chunks)), public_key=keys["public"])

    assert package.data == ODD_DATA
    assert len(chunks) == 6 and all(len(c) == 1024 for c in chunks[:-1]) and len(chunks[-1]) == 4
    assert package.signed_by == key_id(keys["public"].public_bytes_raw())
    m = package.manifest
    assert (m.name, m.version, m.size, m.chunk_size, m.parent) == ("digits", 3, len(ODD_DATA), 1024, 2)
    assert m.pipeline_hash == "0123456789abcdef" and m.labels == tuple(range(10))
    assert m.quantization == "int8" and m.metrics == {"accuracy": 0.97} and m.created == 1700000000.0


def test_an_unsigned_package_verifies_when_no_key_is_configured():
    manifest, chunks = build()

    package = verify_package(manifest, dict(enumerate(chunks)), public_key=None)

    assert package.data == ODD_DATA and package.signed_by is None
    assert json.loads(manifest)["signature"] is None


def test_a_signed_package_also_verifies_without_a_key(keys):
    manifest, chunks = build(private_key=keys["private"])

    assert verify_package(manifest, dict(enumerate(chunks)), public_key=None).signed_by is None


def test_an_empty_model_is_one_empty_chunk():
    manifest, chunks = build(data=b"")

    assert chunks == [b""]
    assert verify_package(manifest, {0: b""}).data == b""


def test_the_signature_covers_the_exact_manifest_string(keys):
    manifest, _ = build(private_key=keys["private"])
    outer = json.loads(manifest)

    signature = base64.b64decode(outer["signature"]["sig"])

    keys["public"].verify(signature, outer["manifest"].encode())  # raises if not
    assert outer["signature"]["alg"] == "ed25519" and len(signature) == 64
    assert set(outer) == {"v", "manifest", "signature"} and outer["v"] == 1


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("offset", [0, -1])
def test_a_flipped_byte_in_any_chunk_is_chunk_hash_mismatch(keys, index, offset):
    manifest, chunks = build(private_key=keys["private"])
    damaged = dict(enumerate(chunks))
    flipped = bytearray(damaged[index])
    flipped[offset] ^= 0x01
    damaged[index] = bytes(flipped)

    assert reason(manifest, damaged, keys["public"]) == "chunk_hash_mismatch"
    with pytest.raises(ModelRejected):
        verify_chunk(parse_manifest(manifest)[0], index, damaged[index])


@pytest.mark.parametrize("index", range(6))
def test_a_missing_chunk_is_missing_chunk(keys, index):
    manifest, chunks = build(private_key=keys["private"])
    partial = {i: c for i, c in enumerate(chunks) if i != index}

    assert reason(manifest, partial, keys["public"]) == "missing_chunk"


def test_chunks_swapped_between_indices_are_refused():
    manifest, chunks = build(data=DATA)
    swapped = dict(enumerate(chunks))
    swapped[0], swapped[1] = swapped[1], swapped[0]

    assert reason(manifest, swapped, None) == "chunk_hash_mismatch"


def test_a_chunk_outside_the_manifest_is_refused():
    manifest, chunks = build()

    with pytest.raises(ModelRejected) as info:
        verify_chunk(parse_manifest(manifest)[0], len(chunks), b"extra")
    assert info.value.reason == "chunk_hash_mismatch"


def test_a_package_signed_by_another_key_is_unknown_key(keys):
    manifest, chunks = build(private_key=keys["other_private"])

    assert reason(manifest, dict(enumerate(chunks)), keys["public"]) == "unknown_key"


def test_a_tampered_manifest_with_the_same_key_id_is_bad_signature(keys):
    manifest, chunks = build(private_key=keys["private"])
    outer = json.loads(manifest)
    body = json.loads(outer["manifest"])
    body["metrics"]["accuracy"] = 1.0  # a lie the signature must catch
    outer["manifest"] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    tampered = json.dumps(outer).encode()

    assert reason(tampered, dict(enumerate(chunks)), keys["public"]) == "bad_signature"
    unchecked = verify_package(tampered, dict(enumerate(chunks)), public_key=None)
    assert unchecked.manifest.metrics["accuracy"] == 1.0


def test_a_re_serialised_manifest_no_longer_verifies(keys):
    """The signature is over the manifest string as sent: pretty-printing it breaks it on purpose."""
    manifest, chunks = build(private_key=keys["private"])
    outer = json.loads(manifest)
    outer["manifest"] = json.dumps(json.loads(outer["manifest"]), indent=2)

    assert reason(json.dumps(outer).encode(), dict(enumerate(chunks)), keys["public"]) == "bad_signature"


@pytest.mark.parametrize("signature", [
    {"alg": "rsa", "key_id": None, "sig": ""},
    {"alg": "ed25519", "key_id": "KEY", "sig": "not base64!"},
    {"alg": "ed25519", "key_id": "KEY", "sig": base64.b64encode(b"\0" * 64).decode()},
    {"alg": "ed25519", "key_id": "KEY", "sig": base64.b64encode(b"\0" * 10).decode()},
    {"alg": "ed25519", "key_id": "KEY", "sig": 12345},
    {"alg": "ed25519", "key_id": "KEY"},
])
def test_malformed_signatures_are_bad_signature(keys, signature):
    manifest, chunks = build(private_key=keys["private"])
    outer = json.loads(manifest)
    if signature.get("key_id") == "KEY":
        signature = {**signature, "key_id": outer["signature"]["key_id"]}
    outer["signature"] = signature

    assert reason(json.dumps(outer).encode(), dict(enumerate(chunks)), keys["public"]) == "bad_signature"


def test_an_unsigned_package_is_refused_when_a_key_is_configured(keys):
    manifest, chunks = build()

    assert reason(manifest, dict(enumerate(chunks)), keys["public"]) == "unsigned"


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -1])
def test_a_truncated_manifest_is_bad_manifest(keys, cut):
    manifest, chunks = build(private_key=keys["private"])

    assert reason(manifest[:cut], dict(enumerate(chunks)), keys["public"]) == "bad_manifest"


def _edit_manifest(**changes) -> bytes:
    manifest, _ = build()
    outer = json.loads(manifest)
    body = json.loads(outer["manifest"])
    for key, value in changes.items():
        if value is _DROP:
            del body[key]
        else:
            body[key] = value
    outer["manifest"] = json.dumps(body)
    return json.dumps(outer).encode()


_DROP = object()


@pytest.mark.parametrize("payload", [
    b"", b"null", b"[]", b'"text"', b"\xff\xfe", b"[" * 100_000,
    json.dumps({"v": 2, "manifest": "{}", "signature": None}).encode(),
    json.dumps({"v": 1, "manifest": {"name": "digits"}, "signature": None}).encode(),
    json.dumps({"v": 1, "manifest": "not json", "signature": None}).encode(),
    json.dumps({"v": 1, "manifest": "[]", "signature": None}).encode(),
    _edit_manifest(kind="something-else"),
    _edit_manifest(name="bad/name"),
    _edit_manifest(version=0),
    _edit_manifest(version="3"),
    _edit_manifest(size=-1),
    _edit_manifest(chunk_size=0),
    _edit_manifest(chunks=[]),
    _edit_manifest(chunks=["00" * 32]),  # count does not fit size / chunk_size
    _edit_manifest(chunks="abc"),
    _edit_manifest(sha256=None),
    _edit_manifest(labels=7),
    _edit_manifest(input=[1, 2]),
    _edit_manifest(pipeline="hash"),
    _edit_manifest(metrics=[0.9]),
    _edit_manifest(created="yesterday"),
    _edit_manifest(labels=_DROP),
    _edit_manifest(pipeline=_DROP),
], ids=lambda p: repr(p[:40]))
def test_malformed_manifests_are_bad_manifest(payload):
    with pytest.raises(ModelRejected) as info:
        parse_manifest(payload)
    assert info.value.reason == "bad_manifest"
    assert reason(payload, {}, None) == "bad_manifest"


@pytest.mark.parametrize("version", [True, 1.0, 2, "1", None])
def test_the_envelope_version_is_the_int_1_only(keys, version):
    # ``True == 1`` and ``1.0 == 1`` in Python, but not on the wire (as in the samples envelope). The
    # signature covers the inner manifest only, so a genuine signature does not make such an envelope valid.
    manifest, chunks = build(private_key=keys["private"])
    outer = json.loads(manifest)
    outer["v"] = version
    payload = json.dumps(outer).encode()

    with pytest.raises(ModelRejected) as info:
        parse_manifest(payload)

    assert info.value.reason == "bad_manifest" and repr(version) in info.value.detail
    assert reason(payload, dict(enumerate(chunks)), keys["public"]) == "bad_manifest"
    assert verify_package(manifest, dict(enumerate(chunks)), public_key=keys["public"]).data == ODD_DATA


def test_size_that_disagrees_with_the_chunks_is_hash_mismatch():
    # Same chunk count, one byte shorter: every chunk hash is right, the whole is not.
    manifest = _edit_manifest(size=len(ODD_DATA) - 1)
    _, chunks = build()

    assert reason(manifest, dict(enumerate(chunks)), None) == "hash_mismatch"


def test_build_refuses_bad_arguments():
    with pytest.raises(ProtocolError):
        build(name="bad name")
    with pytest.raises(ProtocolError):
        build(version=0)
    with pytest.raises(ConfigError):
        build(chunk_size=100)


def test_keys_are_written_once_with_a_private_mode(tmp_path):
    private, public = generate_keypair(tmp_path, name="k")

    assert private.stat().st_mode & 0o777 == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(ConfigError):
        generate_keypair(tmp_path, name="k")
    with pytest.raises(ConfigError):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(ConfigError):
        load_public_key(private)  # a private key is not a public key


# ------------------------------------------------------------------------------------------------
# issue 10 item 4: verify first, destination, size, decoded string, external data
# ------------------------------------------------------------------------------------------------
def test_the_signature_covers_the_decoded_manifest_string(keys):
    from lepton.protocol import open_manifest

    manifest, _ = build(private_key=keys["private"], labels=["é", "ü"])
    outer = json.loads(manifest)
    raw_utf8 = json.dumps(outer, ensure_ascii=False).encode()  # same string, other JSON escaping
    assert raw_utf8 != manifest

    parsed, signer = open_manifest(raw_utf8, public_key=keys["public"], fleet="f1", model="digits")

    assert parsed.labels == ("é", "ü") and signer == key_id(
        keys["public"].public_bytes(*_raw_formats()))


def _raw_formats():
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.Raw, serialization.PublicFormat.Raw


def test_the_signature_is_checked_before_the_fields(keys):
    from lepton.protocol import open_manifest

    manifest, _ = build(private_key=keys["private"])
    outer = json.loads(manifest)
    outer["manifest"] = outer["manifest"].replace('"version":3', '"version":"junk"')
    forged = json.dumps(outer).encode()

    with pytest.raises(ModelRejected) as info:
        open_manifest(forged, public_key=keys["public"], fleet="f1")
    assert info.value.reason == "bad_signature"  # not bad_manifest: nothing was read before the check


def test_an_oversized_manifest_is_refused_before_parsing():
    from lepton.protocol import MAX_MANIFEST_BYTES, open_manifest

    with pytest.raises(ModelRejected) as info:
        open_manifest(b"[" * (MAX_MANIFEST_BYTES + 1), public_key=None, fleet="f1")
    assert info.value.reason == "too_large"


def test_a_package_for_another_fleet_or_model_is_refused(keys):
    manifest, chunks = build(private_key=keys["private"])
    parts = dict(enumerate(chunks))

    with pytest.raises(ModelRejected) as fleet:
        verify_package(manifest, parts, public_key=keys["public"], fleet="f2", model="digits")
    with pytest.raises(ModelRejected) as model:
        verify_package(manifest, parts, public_key=keys["public"], fleet="f1", model="faces")
    assert verify_package(manifest, parts, public_key=keys["public"], fleet="f1", model="digits").data == ODD_DATA

    assert fleet.value.reason == "wrong_fleet" and model.value.reason == "wrong_model"


def test_a_manifest_without_its_fleet_is_bad_manifest():
    payload = _edit_manifest(fleet=_DROP)
    assert reason(payload, {}, None) == "bad_manifest"


def _external(tensor) -> None:
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../etc/passwd"


def _tiny_model(*, external_in: str | None = None) -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    then_c = numpy_helper.from_array(np.ones(2, np.float32), "c")
    if external_in == "subgraph":
        _external(then_c)
    then_g = helper.make_graph([helper.make_node("Identity", ["c"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])], initializer=[then_c])
    else_g = helper.make_graph([helper.make_node("Identity", ["c2"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
                               initializer=[numpy_helper.from_array(np.zeros(2, np.float32), "c2")])
    if external_in == "initializer":
        _external(w)
    sparse = []
    if external_in == "sparse":
        values = numpy_helper.from_array(np.ones(1, np.float32), "s")
        _external(values)
        sparse = [helper.make_sparse_tensor(values, numpy_helper.from_array(np.zeros(1, np.int64), "si"), [2])]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
        initializer=[w], sparse_initializer=sparse)
    return helper.make_model(graph).SerializeToString()


@pytest.mark.parametrize("where", ["initializer", "subgraph", "sparse"])
def test_external_data_is_found_anywhere_in_the_model(where):
    from lepton.protocol import check_onnx_self_contained, onnx_external_data

    assert onnx_external_data(_tiny_model()) == []
    found = onnx_external_data(_tiny_model(external_in=where))

    assert len(found) == 1
    with pytest.raises(ModelRejected) as info:
        check_onnx_self_contained(_tiny_model(external_in=where))
    assert info.value.reason == "external_data"


@pytest.mark.parametrize("garbage", [b"\x0a\xff\xff\xff\xff\x0f", b"\x0b", b"\x3a\x05ab", b"\x00\x01"])
def test_a_malformed_protobuf_is_load_failed(garbage):
    from lepton.protocol import onnx_external_data

    with pytest.raises(ModelRejected) as info:
        onnx_external_data(garbage)
    assert info.value.reason == "load_failed"


@pytest.mark.parametrize("where", [None, "initializer", "subgraph", "sparse"])
@pytest.mark.parametrize("size", [1, 3, 7, 64])
def test_external_data_is_found_in_a_model_given_as_parts(where, size):
    """A package's parts (its chunks, never joined) are walked exactly like the joined bytes, whatever
    field a part boundary splits."""
    from lepton.protocol import onnx_external_data

    data = _tiny_model(external_in=where)
    parts = [data[i:i + size] for i in range(0, len(data), size)]

    assert onnx_external_data(parts) == onnx_external_data(data)
    assert len(onnx_external_data(parts)) == (0 if where is None else 1)


@pytest.mark.parametrize("garbage", [b"\x0a\xff\xff\xff\xff\x0f", b"\x0b", b"\x3a\x05ab", b"\x00\x01"])
def test_a_malformed_protobuf_in_parts_is_load_failed(garbage):
    from lepton.protocol import onnx_external_data

    with pytest.raises(ModelRejected) as info:
        onnx_external_data([garbage[:1], garbage[1:]])
    assert info.value.reason == "load_failed"


def test_a_package_keeps_its_verified_chunks_and_joins_them_only_when_asked():
    from lepton.protocol import assemble_package

    manifest_payload, chunks = build()
    manifest = parse_manifest(manifest_payload)[0]
    package = assemble_package(manifest, dict(enumerate(chunks)), signed_by=None)

    assert len(chunks) == 6 and package.parts == tuple(chunks)
    assert all(a is b for a, b in zip(package.parts, chunks, strict=True))  # held, not copied
    assert package.data == ODD_DATA and package.data is package.data  # joined once, then kept
    swapped = dict(enumerate(chunks))
    swapped[0], swapped[1] = chunks[1], chunks[0]
    with pytest.raises(ModelRejected) as each:  # every chunk's hash
        assemble_package(manifest, swapped, signed_by=None)
    with pytest.raises(ModelRejected) as whole:  # and the whole, hashed part by part in index order
        assemble_package(manifest, swapped, signed_by=None, chunks_verified=True)
    assert (each.value.reason, whole.value.reason) == ("chunk_hash_mismatch", "hash_mismatch")
