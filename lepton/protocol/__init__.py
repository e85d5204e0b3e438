"""Protocol v1: the one wire contract that devices and the cloud share.

Topics, ids, the tensor codec, samples/acks envelopes, JSON reports, broker URLs and model packages.
Everything here is pure Python + numpy + msgpack (+ paho for connections); see ``docs/protocol.md``.
"""

from lepton.protocol._codec import DEFAULT_MAX_TENSOR_BYTES, DTYPES, decode_tensor, encode_tensor
from lepton.protocol._envelope import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_SEQ,
    PROTOCOL_VERSION,
    Sample,
    SamplesEnvelope,
    decode_acks,
    decode_json,
    decode_samples,
    decode_samples_lenient,
    encode_acks,
    encode_json,
    encode_samples,
    pipeline_hash,
    seqs_to_ranges,
)
from lepton.protocol._ids import ID_PATTERN, validate_id
from lepton.protocol._models import (
    DEFAULT_CHUNK_SIZE,
    REJECT_REASONS,
    ModelManifest,
    ModelPackage,
    build_package,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    parse_manifest,
    verify_chunk,
    verify_package,
    verify_signature,
)
from lepton.protocol._mqtt import BrokerURL, connect, new_client
from lepton.protocol._topics import DEFAULT_PREFIX, DEVICE_CHANNELS, ParsedTopic, Topics

__all__ = [
    "BrokerURL",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "DEFAULT_MAX_TENSOR_BYTES",
    "DEFAULT_PREFIX",
    "DEVICE_CHANNELS",
    "DTYPES",
    "ID_PATTERN",
    "MAX_SEQ",
    "ModelManifest",
    "ModelPackage",
    "PROTOCOL_VERSION",
    "ParsedTopic",
    "REJECT_REASONS",
    "Sample",
    "SamplesEnvelope",
    "Topics",
    "build_package",
    "connect",
    "decode_acks",
    "decode_json",
    "decode_samples",
    "decode_samples_lenient",
    "decode_tensor",
    "encode_acks",
    "encode_json",
    "encode_samples",
    "encode_tensor",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "new_client",
    "parse_manifest",
    "pipeline_hash",
    "seqs_to_ranges",
    "validate_id",
    "verify_chunk",
    "verify_package",
    "verify_signature",
]
