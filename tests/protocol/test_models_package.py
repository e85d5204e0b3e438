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
