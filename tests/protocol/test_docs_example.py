"""docs/protocol.md's byte-level examples are what the code sends, byte for byte, so the page never rots."""

from __future__ import annotations

import re

import msgpack
import numpy as np

from lepton.protocol import (
    ANSWER_ERRORS,
    InferAnswer,
    InferRequest,
    Sample,
    decode_acks,
    decode_answer,
    decode_infer,
    decode_samples,
    encode_acks,
    encode_answer,
    encode_infer,
    encode_samples,
)
from lepton.testing import PROJECT_ROOT

DOC = (PROJECT_ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def documented_example(name: str = "example") -> tuple[bytes, list[int]]:
    """The annotated dump between the ``name`` markers: its bytes and each line's stated offset."""
    block = DOC.split(f"<!-- {name}-hex-begin -->", 1)[1].split(f"<!-- {name}-hex-end -->", 1)[0]
    lines = [line for line in block.splitlines() if re.match(r"^[0-9a-f]{4}  ", line)]
    data, offsets = bytearray(), []
    for line in lines:
        hex_part = line.split("|", 1)[0]
        offset, *pairs = hex_part.split()
        offsets.append(int(offset, 16))
        assert int(offset, 16) == len(data), f"offset {offset} but {len(data)} bytes before it: {line!r}"
        data += bytes(int(p, 16) for p in pairs)
    return bytes(data), offsets


def test_the_documented_samples_message_is_what_encode_samples_sends():
    documented, offsets = documented_example()

    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    payload = encode_samples("cam-1", [Sample(seq=0, ts=1700000000.5, x=x, y=3)], pipeline="a1b2c3d4e5f60718")

    assert len(offsets) > 20
    assert documented == payload
    assert f"The payload is {len(payload)} bytes" in DOC


def test_the_documented_samples_message_decodes_as_described():
    documented, _ = documented_example()

    envelope = decode_samples(documented, expected_device="cam-1")

    (sample,) = envelope.samples
    assert envelope.pipeline == "a1b2c3d4e5f60718"
    assert (sample.seq, sample.ts, sample.y) == (0, 1700000000.5, 3)
    assert sample.x.dtype == np.float32 and sample.x.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_the_documented_acks_example_is_what_encode_acks_sends():
    match = re.search(r"`(82 a1 76 01 [0-9a-f ]+)`", DOC)
    assert match, "the acks example hex is missing from docs/protocol.md"

    documented = bytes.fromhex(match.group(1))

    assert documented == encode_acks([[0, 9], [12, 12]])
    assert decode_acks(documented) == [(0, 9), (12, 12)]
    assert msgpack.unpackb(documented) == {"v": 1, "ranges": [[0, 9], [12, 12]]}


def test_every_topic_and_reject_reason_of_the_code_is_documented():
    from lepton.protocol import DEVICE_CHANNELS, DTYPES, REJECT_REASONS

    for channel in DEVICE_CHANNELS:
        assert f"lepton/{{fleet}}/devices/{{device}}/{channel}`" in DOC
    for topic in ("lepton/{fleet}/models/{model}`", "lepton/{fleet}/models/{model}/v/{version}/chunks/{i}`",
                  "lepton/{fleet}/deadletter`", "lepton/{fleet}/workers/{worker}/status`",
                  "lepton/{fleet}/workers/{worker}/telemetry`"):
        assert topic in DOC
    for reason in REJECT_REASONS:
        assert f"| `{reason}` |" in DOC
    for dtype in DTYPES:
        assert f"| `{dtype}`" in DOC
    for heading in ("## Status", "## Telemetry", "## Dead letters", "## Predictions", "## Model delivery",
                    "## Worker telemetry"):
        assert f"\n{heading}\n" in DOC


def test_the_documented_infer_request_is_what_encode_infer_sends_and_decodes_as_described():
    documented, offsets = documented_example("infer")

    payload = encode_infer(InferRequest(device="cam-1", seq=42, x=np.array([[1, 2], [3, 4]], np.float32),
                                        pipeline="a1b2c3d4e5f60718", edge_label=3, edge_confidence=0.5,
                                        edge_version=2, deadline=1700000000.25))
    request = decode_infer(documented, expected_device="cam-1")

    assert len(offsets) > 20 and documented == payload
    assert f"The payload is {len(payload)} bytes" in DOC
    edge = (request.edge_label, request.edge_confidence, request.edge_version)
    assert (request.seq, *edge, request.deadline) == (42, 3, 0.5, 2, 1700000000.25)
    assert request.x.tolist() == [[1.0, 2.0], [3.0, 4.0]] and request.pipeline == "a1b2c3d4e5f60718"


def test_the_documented_answers_are_what_encode_answer_sends():
    match = re.search(r"`(8a a1 76 01 [0-9a-f ]+)`", DOC)
    assert match, "the answer example hex is missing from docs/protocol.md"
    documented = bytes.fromhex(match.group(1))
    overloaded = re.search(r"`(a5 65 72 72 6f 72 82 [0-9a-f ]+) …`", DOC)
    assert overloaded, "the overloaded answer's tail is missing from docs/protocol.md"

    answer = InferAnswer(seq=42, label="3", index=3, confidence=0.75, version=5, model="digits-cloud",
                         latency_ms=1.5, worker="serve1")
    shed = encode_answer(InferAnswer(seq=43, error="overloaded", message="queue full", version=5,
                                     model="digits-cloud", latency_ms=0.0, worker="serve1"))

    assert documented == encode_answer(answer) and decode_answer(documented) == answer
    assert f"is these {len(documented)} bytes" in DOC
    assert bytes.fromhex(overloaded.group(1)) in shed


def test_every_answer_error_code_is_documented():
    for code in ANSWER_ERRORS:
        assert f"| `{code}` |" in DOC
    assert "\n## Cloud inference\n" in DOC


def documented_telemetry_fields(report: str) -> set[str]:
    """Every field name in the first column of the ``report`` telemetry tables (``device``, ``worker``,
    ``serve``) of docs/protocol.md, plus ``v`` and ``ts``."""
    names = {"v", "ts"}
    for block in DOC.split(f"<!-- telemetry-fields-begin {report} -->")[1:]:
        for line in block.split("<!-- telemetry-fields-end -->", 1)[0].splitlines():
            if line.startswith("| `"):
                names.update(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    return names


def test_the_telemetry_tables_name_only_fields_a_chart_can_plot():
    device, worker, serve = (documented_telemetry_fields(r) for r in ("device", "worker", "serve"))

    assert len(device) > 40 and len(worker) > 20 and len(serve) > 25  # all three tables were found
    assert {"inference_ms_p50", "last_swap_ready_ms", "connected"} <= device and "device" not in device
    assert {"quarantine_entries", "retrying"} <= worker and "quarantine" not in worker
    assert {f"errors_{code}" for code in ANSWER_ERRORS} | {"latency_ms_p99", "latency_n"} <= serve
    assert not {"worker", "fleet", "online", "last_error", "latency_ms"} & (worker | serve)
