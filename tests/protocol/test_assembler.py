"""ModelAssembler: every rule of the model channel, without a broker, a thread or a sleep.

One assembler serves both receivers (a device's runtime and the cloud serve worker), so the cases that
came from the serve worker's former copy are here too (the section at the end).

Packages are built with lepton.protocol's own builder and signed with real Ed25519 keys; time is the
``now`` each call passes. The model bytes are hand-written ONNX protobuf (a ModelProto whose
producer_name pads it to any size), because the assembler checks only that the protobuf is well formed
and self-contained; loading it is the runtime's job (tests/device/test_runtime.py).
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lepton.errors import ModelRejected
from lepton.protocol import (
    REJECT_REASONS,
    Announced,
    Cleared,
    ModelAssembler,
    Ready,
    Refetch,
    Rejected,
    Stale,
    Topics,
    build_package,
)
from lepton.protocol._assembler import EMPTY_SHA256, REFETCH_MAX_S

FLEET, MODEL, PIPE = "f1", "digits", "0123456789abcdef"
INPUT = {"name": "x", "shape": [-1, 64], "dtype": "float32"}
CHUNK = 1024
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def onnx_bytes(size: int, *, seed: int = 0) -> bytes:
    """A well-formed ONNX ModelProto of exactly ``size`` bytes: ir_version, then a producer_name."""
    head = _varint(1 << 3) + _varint(9)  # ir_version = 9
    for n in range(size - len(head) - 1, max(-1, size - len(head) - 12), -1):
        body = head + _field(2, bytes(97 + (seed + i) % 26 for i in range(n)))
        if len(body) == size:
            return body
    raise AssertionError(f"no ModelProto of {size} bytes")


def onnx_with_external_data() -> bytes:
    """A ModelProto whose graph's initializer "w" keeps its data in an external file."""
    tensor = _field(8, b"w") + _varint(14 << 3) + _varint(1)  # name, data_location = EXTERNAL
    return _varint(1 << 3) + _varint(9) + _field(7, _field(5, tensor))


def pkg(version: int, data: bytes | None = None, *, key=KEY, fleet: str = FLEET, name: str = MODEL,
        pipeline: str = PIPE, input_spec: dict | None = None):
    """(manifest payload, chunk payloads) exactly as the cloud publishes them."""
    data = onnx_bytes(3 * CHUNK + 100, seed=version) if data is None else data
    return build_package(fleet=fleet, name=name, version=version, data=data, input_spec=input_spec or INPUT,
                         labels=[str(i) for i in range(10)], pipeline={"hash": pipeline, "spec": {}},
                         chunk_size=CHUNK, private_key=key, created=1700000000.0)


def core(**kw) -> ModelAssembler:
    kw.setdefault("public_key", KEY.public_key())
    kw.setdefault("pipeline_hash", PIPE)
    kw.setdefault("input_shape", (64,))
    return ModelAssembler(fleet=FLEET, model=MODEL, **kw)


def only(events, kind):
    found = [e for e in events if isinstance(e, kind)]
    assert len(found) == 1, events
    return found[0]


def reasons(events) -> list[str]:
    return [e.error.reason for e in events if isinstance(e, Rejected)]


def chunks_in(c: ModelAssembler, version: int, chunks, now: float = 0.0, indices=None) -> list:
    events = []
    for i in indices if indices is not None else range(len(chunks)):
        events += c.receive_chunk(version, i, chunks[i], now)
    return events


def tampered(payload: bytes, **edits) -> bytes:
    """The manifest with fields changed after signing (the signature no longer covers it)."""
    outer = json.loads(payload)
    body = json.loads(outer["manifest"])
    body.update(edits)
    outer["manifest"] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps(outer).encode()


# ------------------------------------------------------------------------------------------------
# a package in
# ------------------------------------------------------------------------------------------------
def test_manifest_then_chunks_is_ready_with_the_exact_bytes():
    c = core()
    data = onnx_bytes(3 * CHUNK + 100)
    manifest, chunks = pkg(1, data)

    first = c.receive_manifest(manifest, 10.0, wall=1700000001.5)
    waiting = chunks_in(c, 1, chunks, 11.0, indices=range(len(chunks) - 1))
    stats = c.stats()
    done = c.receive_chunk(1, len(chunks) - 1, chunks[-1], 12.0)

    assert first == [Announced(1, 0, 4)]
    assert waiting == []  # waiting
    assert stats.pending == (1, 3, 4) and stats.pending_bytes == 3 * CHUNK
    ready = only(done, Ready)
    assert ready.package.data == data and ready.version == 1 and ready.manifest_payload == manifest
    assert ready.manifest_seen == 10.0 and ready.manifest_wall == 1700000001.5
    assert ready.package.signed_by is not None
    assert c.stats().pending is None and c.stats().pending_bytes == 0


def test_chunks_before_the_manifest_are_orphans_until_it_verifies():
    c = core()
    manifest, chunks = pkg(1)

    assert chunks_in(c, 1, chunks, 1.0) == []
    held = c.stats()
    events = c.receive_manifest(manifest, 2.0)

    assert (held.orphan_chunks, held.orphan_versions) == (4, 1)
    assert held.orphan_bytes == sum(map(len, chunks))
    assert only(events, Announced) == Announced(1, 4, 4)
    assert only(events, Ready).package.data == b"".join(chunks)
    assert c.stats().orphan_bytes == 0 and c.stats().orphan_chunks == 0


def test_duplicate_chunks_and_the_same_manifest_again_change_nothing():
    c = core()
    manifest, chunks = pkg(1)
    c.receive_manifest(manifest, 0.0)
    c.receive_chunk(1, 0, chunks[0], 0.0)

    again = c.receive_manifest(manifest, 1.0) + c.receive_chunk(1, 0, chunks[0], 1.0)

    assert again == []
    assert c.stats().pending == (1, 1, 4) and c.stats().pending_bytes == len(chunks[0])
    assert only(chunks_in(c, 1, chunks, 2.0, indices=[1, 2, 3]), Ready).version == 1


def test_an_empty_model_is_ready_on_its_manifest_alone():
    c = core()
    manifest, chunks = pkg(1, b"")

    events = c.receive_manifest(manifest, 0.0)

    assert json.loads(json.loads(manifest)["manifest"])["chunks"] == [EMPTY_SHA256]
    assert chunks == [b""]
    assert only(events, Ready).package.data == b""


def test_no_verify_skips_the_signature_but_not_the_hashes():
    c = core(public_key=None)
    manifest, chunks = pkg(1, key=None)
    wrong_size = tampered(pkg(2, key=None)[0], size=3 * CHUNK + 99)  # same chunk count, one byte less

    ready = only(c.receive_manifest(manifest, 0.0) + chunks_in(c, 1, chunks), Ready)
    c.served(1)
    _, chunks2 = pkg(2, key=None)
    refused = c.receive_manifest(wrong_size, 1.0) + chunks_in(c, 2, chunks2, 1.0)

    assert ready.package.signed_by is None
    assert reasons(refused) == ["hash_mismatch"]


# ------------------------------------------------------------------------------------------------
# verify first: a manifest that does not verify decides nothing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("forgery, reason", [
    (lambda: pkg(10**12, key=None)[0], "unsigned"),
    (lambda: pkg(10**12, key=OTHER_KEY)[0], "unknown_key"),
    (lambda: tampered(pkg(2)[0], version=10**12), "bad_signature"),
    (lambda: pkg(10**12, fleet="otherfleet")[0], "wrong_fleet"),
    (lambda: pkg(10**12, name="faces")[0], "wrong_model"),
    (lambda: b'{"v": 2, "manifest": "{}", "signature": null}', "bad_manifest"),
    (lambda: b"x" * (1024 * 1024 + 1), "too_large"),
])
def test_a_manifest_that_does_not_verify_supersedes_nothing(forgery, reason):
    c = core()
    m2, chunks2 = pkg(2)
    c.receive_manifest(m2, 0.0)
    chunks_in(c, 2, chunks2, 0.0, indices=[0, 1])

    events = c.receive_manifest(forgery(), 1.0)

    rejected = only(events, Rejected)
    assert rejected.error.reason == reason and reason in REJECT_REASONS
    if reason in ("unsigned", "unknown_key", "bad_signature", "wrong_fleet", "wrong_model"):
        assert rejected.version == 10**12  # the claimed version, named in the report only
    assert c.stats().pending == (2, 2, 4)  # v2 still being assembled
    assert only(chunks_in(c, 2, chunks2, 2.0, indices=[2, 3]), Ready).version == 2


def test_a_forged_manifest_does_not_claim_the_orphans_of_its_version():
    c = core()
    forged, _ = pkg(5, key=OTHER_KEY)
    genuine, chunks = pkg(5)
    chunks_in(c, 5, chunks, 0.0)

    assert reasons(c.receive_manifest(forged, 1.0)) == ["unknown_key"]
    assert c.stats().orphan_chunks == 4
    assert only(c.receive_manifest(genuine, 2.0), Ready).package.data == b"".join(chunks)


def test_an_empty_manifest_payload_clears_nothing():
    c = core()
    c.served(3)

    assert c.receive_manifest(b"", 0.0) == [Cleared(3)]
    assert c.serving == 3


# ------------------------------------------------------------------------------------------------
# ordering: stale, superseded
# ------------------------------------------------------------------------------------------------
def test_a_version_not_newer_than_the_served_one_is_stale_and_its_chunks_ignored():
    c = core()
    c.served(3)
    m3, chunks3 = pkg(3)
    m2, _ = pkg(2)

    assert c.receive_manifest(m3, 0.0) == [Stale(3, 3)]
    assert c.receive_manifest(m2, 0.0) == [Stale(2, 3)]
    assert chunks_in(c, 3, chunks3) == []
    assert c.stats().orphan_chunks == 0 and c.stats().pending is None


def test_a_newer_manifest_supersedes_the_pending_one_and_older_orphans():
    c = core()
    m2, chunks2 = pkg(2)
    m4, chunks4 = pkg(4)
    chunks_in(c, 3, pkg(3)[1], 0.0)  # orphans of v3
    c.receive_manifest(m2, 0.0)
    chunks_in(c, 2, chunks2, 0.0, indices=[0])
    held = c.stats()

    events = c.receive_manifest(m4, 1.0)
    late = c.receive_chunk(2, 1, chunks2[1], 2.0) + c.receive_manifest(m2, 2.0)

    assert held.orphan_versions == 1 and held.pending == (2, 1, 4)
    assert events == [Announced(4, 0, 4)]
    assert late == [Stale(2, None)]  # older than the one being assembled
    assert c.stats().orphan_versions == 0 and c.stats().pending == (4, 0, 4)
    assert only(chunks_in(c, 4, chunks4, 3.0), Ready).version == 4


def test_a_second_manifest_of_the_version_being_assembled_is_stale_and_keeps_its_chunks():
    c = core()
    first, chunks = pkg(2)
    resigned = build_package(fleet=FLEET, name=MODEL, version=2, data=b"".join(chunks), input_spec=INPUT,
                             labels=[str(i) for i in range(10)], pipeline={"hash": PIPE, "spec": {}},
                             chunk_size=CHUNK, private_key=KEY, created=1700000999.0)[0]
    c.receive_manifest(first, 0.0)
    chunks_in(c, 2, chunks, 0.0, indices=[0, 1])

    events = c.receive_manifest(resigned, 1.0)

    assert resigned != first and events == [Stale(2, None)]
    assert c.stats().pending == (2, 2, 4)  # not restarted: the chunks already here still count
    assert only(chunks_in(c, 2, chunks, 2.0, indices=[2, 3]), Ready).manifest_payload == first


def test_served_drops_orphans_up_to_that_version_and_ignores_its_chunks():
    c = core()
    _, chunks1 = pkg(1)
    _, chunks2 = pkg(2)
    chunks_in(c, 1, chunks1, 0.0)
    chunks_in(c, 2, chunks2, 0.0)

    c.served(1)

    assert c.stats().orphan_versions == 1 and c.stats().orphan_chunks == len(chunks2)
    assert chunks_in(c, 1, chunks1) == [] and c.stats().orphan_chunks == len(chunks2)


# ------------------------------------------------------------------------------------------------
# refusals of a verified version
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, build, reason", [
    ({"max_model_bytes": 3 * CHUNK}, {}, "too_large"),
    ({}, {"pipeline": "fedcba9876543210"}, "incompatible_pipeline"),
    ({}, {"input_spec": {"name": "x", "shape": [-1, 64], "dtype": "complex64"}}, "incompatible_input"),
    ({}, {"input_spec": {"name": "x", "shape": [-1, 10], "dtype": "float32"}}, "incompatible_input"),
    ({}, {"input_spec": {"name": "x", "shape": "64", "dtype": "float32"}}, "incompatible_input"),
])
def test_a_verified_manifest_that_does_not_fit_the_device_is_refused_once(kwargs, build, reason):
    c = core(**kwargs)
    manifest, chunks = pkg(2, **build)
    chunks_in(c, 2, chunks, 0.0, indices=[0])

    first = c.receive_manifest(manifest, 1.0)
    again = c.receive_manifest(manifest, 2.0) + chunks_in(c, 2, chunks, 2.0)

    assert [(e.version, e.error.reason) for e in first] == [(2, reason)]
    assert again == []  # the retained manifest comes on every reconnect: refused already
    assert c.stats().orphan_chunks == 0 and c.stats().pending is None


def test_an_image_feature_shape_fits_a_flat_model_of_the_same_size():
    c = core(input_shape=(8, 8))
    manifest, chunks = pkg(1)

    assert only(c.receive_manifest(manifest, 0.0) + chunks_in(c, 1, chunks), Ready).version == 1


def test_without_a_pipeline_hash_or_input_shape_those_checks_are_skipped():
    c = core(pipeline_hash=None, input_shape=None)
    manifest, chunks = pkg(1, pipeline="fedcba9876543210",
                           input_spec={"name": "x", "shape": [-1, 3, 3], "dtype": "uint8"})

    assert only(c.receive_manifest(manifest, 0.0) + chunks_in(c, 1, chunks), Ready).version == 1


def test_a_corrupted_chunk_is_rejected_and_the_genuine_one_still_completes_the_version():
    c = core()
    manifest, chunks = pkg(1)
    c.receive_manifest(manifest, 0.0)
    chunks_in(c, 1, chunks, 0.0, indices=[0, 1, 2])

    bad = c.receive_chunk(1, 3, b"not the chunk", 1.0)
    out_of_range = c.receive_chunk(1, 99, b"x", 1.0)
    good = c.receive_chunk(1, 3, chunks[3], 2.0)

    assert reasons(bad) == ["chunk_hash_mismatch"] and bad[0].version == 1
    assert reasons(out_of_range) == ["chunk_hash_mismatch"]
    assert only(good, Ready).version == 1


def test_a_corrupted_orphan_is_reported_when_its_manifest_verifies_and_the_version_waits():
    c = core()
    manifest, chunks = pkg(1)
    c.receive_chunk(1, 0, b"forged chunk", 0.0)
    chunks_in(c, 1, chunks, 0.0, indices=[1, 2, 3])

    events = c.receive_manifest(manifest, 1.0)

    assert reasons(events) == ["chunk_hash_mismatch"] and only(events, Announced) == Announced(1, 3, 4)
    assert only(c.receive_chunk(1, 0, chunks[0], 2.0), Ready).version == 1


@pytest.mark.parametrize("order", ["manifest first", "chunks first"])
def test_the_whole_sha256_is_checked_even_when_every_chunk_matches(order):
    """The whole digest is computed as chunks come (orphans included); it is still compared, once."""
    c = core(public_key=None)  # --no-verify: the edited manifest is taken, its hashes still checked
    manifest, chunks = pkg(1)
    wrong = tampered(manifest, sha256="0" * 64)

    if order == "manifest first":
        events = c.receive_manifest(wrong, 0.0) + chunks_in(c, 1, chunks, 1.0)
    else:
        events = chunks_in(c, 1, chunks, 0.0) + c.receive_manifest(wrong, 1.0)

    assert reasons(events) == ["hash_mismatch"] and not [e for e in events if isinstance(e, Ready)]


def test_orphans_replaced_removed_or_out_of_order_still_give_the_exact_bytes():
    """An orphan is hashed on arrival; replacing or removing one that was hashed already starts the
    running whole digest again, so what is checked is always exactly the chunks held."""
    c = core()
    data = onnx_bytes(5 * CHUNK + 7)
    manifest, chunks = pkg(1, data)
    c.receive_chunk(1, 0, b"forged chunk zero", 0.0)
    chunks_in(c, 1, chunks, 0.0, indices=[1, 2])
    c.receive_chunk(1, 0, chunks[0], 0.1)  # the genuine chunk replaces the forged one
    c.receive_chunk(1, 2, b"", 0.2)  # cleared, then sent again, after the later ones
    chunks_in(c, 1, chunks, 0.3, indices=[5, 4, 3, 2])

    events = c.receive_manifest(manifest, 1.0)

    assert reasons(events) == [] and only(events, Ready).package.data == data


def test_onnx_external_data_is_refused_before_anything_loads_it():
    c = core()
    manifest, chunks = pkg(1, onnx_with_external_data())

    events = c.receive_manifest(manifest, 0.0) + chunks_in(c, 1, chunks)

    assert reasons(events) == ["external_data"] and "'w'" in only(events, Rejected).error.detail
    assert c.receive_manifest(manifest, 1.0) == []  # refused: not assembled again


def test_bytes_that_are_not_an_onnx_protobuf_are_refused():
    c = core()
    manifest, chunks = pkg(1, b"\x07" * 2000)  # wire type 7 does not exist

    assert reasons(c.receive_manifest(manifest, 0.0) + chunks_in(c, 1, chunks)) == ["load_failed"]


def test_a_version_that_fails_to_load_is_refused_and_remembered():
    c = core()
    manifest, chunks = pkg(1)
    ready = only(c.receive_manifest(manifest, 0.0) + chunks_in(c, 1, chunks), Ready)

    refused = c.refuse(ready.version, ModelRejected("load_failed", "ONNX Runtime said no"))

    assert reasons(refused) == ["load_failed"]
    assert c.receive_manifest(manifest, 1.0) == [] and chunks_in(c, 1, chunks, 1.0) == []
    assert c.stats().orphan_chunks == 0 and c.serving is None


def test_a_refused_version_is_a_floor_that_older_versions_never_pass_again():
    c = core(pipeline_hash="fedcba9876543210")  # every package below is refused
    manifests = {v: pkg(v, b"")[0] for v in (3, 5, 40)}
    _, chunks4 = pkg(4)
    c.served(2)

    first = [reasons(c.receive_manifest(manifests[v], float(v))) for v in (3, 5)]
    older = c.receive_manifest(manifests[3], 10.0) + chunks_in(c, 4, chunks4, 10.0)
    newer = c.receive_manifest(manifests[40], 11.0)

    assert first == [["incompatible_pipeline"], ["incompatible_pipeline"]]
    assert older == [] and c.stats().orphan_chunks == 0  # below the newest refused version: ignored
    assert reasons(newer) == ["incompatible_pipeline"] and c.serving == 2
    assert c.receive_manifest(manifests[40], 12.0) == []  # O(1) memory, however many were refused


def test_refusing_a_version_drops_the_orphans_at_and_below_it():
    c = core(orphan_ttl=10**6)
    for version in (3, 4, 6):
        c.receive_chunk(version, 0, b"x", 0.0)

    c.refuse(4, ModelRejected("load_failed", "ONNX Runtime said no"))

    assert c.stats().orphan_versions == 1 and c.receive_chunk(4, 1, b"y", 1.0) == []


# ------------------------------------------------------------------------------------------------
# orphans: bounded in bytes, chunks, versions and time
# ------------------------------------------------------------------------------------------------
def test_orphan_chunks_are_capped_in_count():
    c = core(max_orphan_chunks=3)

    for i in range(10):
        c.receive_chunk(7, i, b"x", 0.0)

    assert c.stats().orphan_chunks == 3 and c.stats().orphans_dropped == 7


def test_orphan_chunks_are_capped_in_bytes_and_a_replaced_chunk_counts_once():
    c = core(max_orphan_bytes=100)
    c.receive_chunk(7, 0, b"a" * 60, 0.0)
    c.receive_chunk(7, 0, b"b" * 90, 0.0)  # replaces: 90 bytes held, not 150

    c.receive_chunk(7, 1, b"c" * 20, 0.0)  # 110 > 100: dropped

    stats = c.stats()
    assert (stats.orphan_bytes, stats.orphan_chunks, stats.orphans_dropped) == (90, 1, 1)


def test_orphan_versions_are_capped_and_the_lowest_goes_first():
    c = core(max_orphan_versions=2)
    c.receive_chunk(5, 0, b"a", 0.0)
    c.receive_chunk(6, 0, b"b", 0.0)
    c.receive_chunk(6, 1, b"b", 0.0)

    c.receive_chunk(7, 0, b"c", 0.0)  # v5 (one chunk) makes room
    c.receive_chunk(4, 0, b"d", 0.0)  # lower than everything held: dropped

    stats = c.stats()
    assert (stats.orphan_versions, stats.orphan_chunks, stats.orphans_dropped) == (2, 3, 2)


def test_an_empty_chunk_payload_removes_an_orphan():
    c = core()
    c.receive_chunk(7, 0, b"abc", 0.0)

    c.receive_chunk(7, 0, b"", 0.0)
    c.receive_chunk(7, 1, b"", 0.0)  # nothing there: nothing happens

    stats = c.stats()
    assert (stats.orphan_bytes, stats.orphan_chunks, stats.orphans_dropped) == (0, 0, 0)


def test_orphans_expire_after_their_ttl():
    c = core(orphan_ttl=60.0)
    c.receive_chunk(7, 0, b"a", 0.0)
    c.receive_chunk(7, 1, b"b", 0.0)

    kept = c.tick(60.0, can_refetch=False)
    held = c.stats().orphan_chunks
    c.tick(60.5, can_refetch=False)

    assert kept == [] and held == 2
    assert c.stats().orphan_chunks == 0 and c.stats().orphans_dropped == 2


# ------------------------------------------------------------------------------------------------
# time: refetch with backoff, the assemble timeout, a resumed session
# ------------------------------------------------------------------------------------------------
def test_a_stalled_version_is_refetched_with_exponential_backoff():
    c = core(refetch_after=3.0, assemble_timeout=10**6)
    manifest, chunks = pkg(1)
    c.receive_manifest(manifest, 0.0)

    asked = [t for t in (float(s) / 2 for s in range(0, 2 * 400)) if c.tick(t)]

    # 3 s without progress, then 6, 12, 24, 48, 60, 60, ...: each wait starts at the last refetch
    gaps = [b - a for a, b in zip([0.0, *asked], asked, strict=False)]
    assert gaps[:7] == [3.5, 6.5, 12.5, 24.5, 48.5, REFETCH_MAX_S + 0.5, REFETCH_MAX_S + 0.5]
    assert c.stats().refetches == len(asked)


def test_progress_postpones_the_refetch():
    c = core(refetch_after=3.0)
    manifest, chunks = pkg(1)
    c.receive_manifest(manifest, 0.0)
    c.receive_chunk(1, 0, chunks[0], 2.5)

    assert c.tick(3.5) == []
    assert [type(e) for e in c.tick(5.6)] == [Refetch]


def test_the_assemble_timeout_reports_the_missing_chunks_once_and_keeps_waiting():
    c = core(assemble_timeout=120.0)
    manifest, chunks = pkg(1)
    c.receive_manifest(manifest, 0.0)
    chunks_in(c, 1, chunks, 0.0, indices=[0, 2])

    before = reasons(c.tick(120.0, can_refetch=False))
    at = reasons(c.tick(120.5, can_refetch=False))
    later = reasons(c.tick(500.0, can_refetch=False))

    assert before == [] and at == ["missing_chunk"] and later == []
    assert c.stats().pending == (1, 2, 4)
    assert only(chunks_in(c, 1, chunks, 501.0, indices=[1, 3]), Ready).version == 1


def test_orphans_without_a_manifest_ask_for_it_again():
    c = core(refetch_after=3.0)
    c.receive_chunk(7, 0, b"a", 0.0)

    first = c.tick(3.5)
    soon = c.tick(5.0)
    second = c.tick(10.0)  # backoff: 6 s after the first

    assert [type(e) for e in first] == [Refetch] and "no manifest" in first[0].why
    assert soon == [] and [type(e) for e in second] == [Refetch]


def test_serving_a_version_resets_the_refetch_backoff():
    c = core(refetch_after=3.0, orphan_ttl=10**6)
    c.receive_chunk(7, 0, b"a", 0.0)
    c.tick(3.5)
    c.tick(10.0)  # the wait is now 12 s
    c.served(6)

    assert c.tick(13.5) != []  # 3.5 s after the last refetch, 3 s wait again


def test_a_resumed_session_that_brings_nothing_refetches_once():
    c = core(reconnect_quiet=2.0)

    quiet = c.tick(101.9, resumed_at=100.0, last_heard=0.0)
    silent = c.tick(102.5, resumed_at=100.0, last_heard=0.0)
    again = c.tick(103.0, resumed_at=100.0, last_heard=0.0)
    heard = c.tick(203.0, resumed_at=200.0, last_heard=200.4)

    assert quiet == [] and [type(e) for e in silent] == [Refetch] and again == []
    assert heard == []  # the broker resent the retained messages itself
    assert c.stats().refetches == 1


def test_nobody_to_refetch_means_no_refetch_and_no_backoff():
    c = core(refetch_after=3.0, orphan_ttl=10**6)
    c.receive_chunk(7, 0, b"a", 0.0)

    assert c.tick(100.0, resumed_at=1.0, can_refetch=False) == []
    assert c.stats().refetches == 0
    assert [type(e) for e in c.tick(100.0)] == [Refetch]  # the backoff did not grow meanwhile


# ------------------------------------------------------------------------------------------------
# the stored model
# ------------------------------------------------------------------------------------------------
def test_a_stored_package_is_verified_like_one_from_the_broker():
    c = core()
    data = onnx_bytes(3 * CHUNK + 100)
    manifest, _ = pkg(4, data)
    other_pipe, _ = pkg(4, data, pipeline="fedcba9876543210")

    package = c.verify_stored(manifest, data)

    assert package.data == data and package.manifest.version == 4
    for payload, stored, reason in [(manifest, data[:-1] + b"!", "chunk_hash_mismatch"),
                                    (pkg(4, data, key=OTHER_KEY)[0], data, "unknown_key"),
                                    (other_pipe, data, "incompatible_pipeline"),
                                    (pkg(4, onnx_with_external_data())[0], onnx_with_external_data(),
                                     "external_data")]:
        with pytest.raises(ModelRejected) as info:
            c.verify_stored(payload, stored)
        assert info.value.reason == reason


# ------------------------------------------------------------------------------------------------
# a whole message in, by topic (the shells' one entry point), and the status summary
# ------------------------------------------------------------------------------------------------
def test_receive_dispatches_by_topic_and_ignores_other_models_and_channels():
    c = core()
    topics = Topics(fleet=FLEET)
    manifest, chunks = pkg(1)
    other_model = topics.parse(topics.model("faces"))

    ignored = c.receive(other_model, manifest, 0.0) + c.receive(topics.parse(topics.acks("cam-1")), b"x", 0.0)
    announced = c.receive(topics.parse(topics.model(MODEL)), manifest, 1.0, wall=5.0)
    events = []
    for i, data in enumerate(chunks):
        events += c.receive(topics.parse(topics.model_chunk(MODEL, 1, i)), data, 2.0)

    assert ignored == [] and announced == [Announced(1, 0, 4)]
    assert only(events, Ready).manifest_wall == 5.0


def test_the_pending_summary_is_the_status_model_pending_object():
    c = core()
    manifest, chunks = pkg(1)
    idle = c.stats().pending_summary
    c.receive_manifest(manifest, 0.0)
    c.receive_chunk(1, 0, chunks[0], 0.0)

    assert idle is None and c.stats().pending_summary == {"version": 1, "chunks": 1, "of": 4}


# ------------------------------------------------------------------------------------------------
# cases from the serve worker's former assembler (lepton serve gets its model like a device)
# ------------------------------------------------------------------------------------------------
def serve_core(**kw) -> ModelAssembler:
    """The assembler as the serve worker builds it: no pipeline or input check (requests are checked)."""
    return ModelAssembler(fleet=FLEET, model=MODEL, public_key=KEY.public_key(), pipeline_hash=None, **kw)


def test_serve_chunks_before_their_manifest_complete_the_package_in_any_order():
    c = serve_core()
    data = onnx_bytes(2 * CHUNK + 500)
    manifest, chunks = pkg(1, data)

    early = c.receive_chunk(1, 2, chunks[2], 0.0) + c.receive_chunk(1, 0, chunks[0], 0.0)
    on_manifest = c.receive_manifest(manifest, 0.1)
    done = c.receive_chunk(1, 1, chunks[1], 0.2)
    c.served(1)

    assert early == [] and on_manifest == [Announced(1, 2, 3)]
    assert only(done, Ready).package.data == data
    assert c.receive_manifest(manifest, 0.3) == [Stale(1, 1)]  # already assembled
    assert c.stats().orphan_bytes == 0


def test_serve_a_forged_or_replayed_manifest_decides_nothing_and_a_corrupt_chunk_waits_for_a_good_one():
    c = serve_core()
    genuine, chunks = pkg(2)
    forged, _ = pkg(9, key=OTHER_KEY)
    replayed, _ = pkg(10, fleet="other")

    c.receive_manifest(genuine, 0.0)
    rejected = [only(c.receive_manifest(p, 0.0), Rejected) for p in (forged, replayed, b"{")]
    bad = c.receive_chunk(2, 0, b"X" * CHUNK, 0.0)
    parts = chunks_in(c, 2, chunks, 0.0)

    assert [(r.version, r.error.reason) for r in rejected] == \
        [(9, "unknown_key"), (10, "wrong_fleet"), (None, "bad_manifest")]
    assert c.stats().pending is None and only(parts, Ready).version == 2  # v2 was still the one pending
    assert reasons(bad) == ["chunk_hash_mismatch"]


def test_serve_a_stalled_version_asks_for_a_resubscription_with_backoff():
    c = serve_core(refetch_after=3.0)
    manifest, chunks = pkg(1)
    c.receive_manifest(manifest, 100.0)
    c.receive_chunk(1, 0, chunks[0], 101.0)

    due = [t for t in (102.0, 104.5, 105.0, 108.0, 111.0) if c.tick(t)]

    assert due == [104.5, 111.0]  # 3 s after the last progress, then 6 s after that refetch
    assert c.stats().pending_summary == {"version": 1, "chunks": 1, "of": 4}
