"""docs/protocol.md's byte-level examples are what the code sends, byte for byte, so the page never rots."""

from __future__ import annotations

import re

import msgpack
import numpy as np

from lepton.protocol import Sample, decode_acks, decode_samples, encode_acks, encode_samples
from lepton.testing import PROJECT_ROOT

DOC = (PROJECT_ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def documented_example() -> tuple[bytes, list[int]]:
    """The annotated dump between the example markers: its bytes and each line's stated offset."""
    block = DOC.split("<!-- example-hex-begin -->", 1)[1].split("<!-- example-hex-end -->", 1)[0]
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
                  "lepton/{fleet}/deadletter`", "lepton/{fleet}/workers/{worker}/status`"):
        assert topic in DOC
    for reason in REJECT_REASONS:
        assert f"| `{reason}` |" in DOC
    for dtype in DTYPES:
        assert f"| `{dtype}`" in DOC
    for heading in ("## Status", "## Telemetry", "## Dead letters", "## Predictions", "## Model delivery"):
        assert f"\n{heading}\n" in DOC
