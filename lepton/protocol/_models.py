"""Model packages: manifest, chunking, Ed25519 signatures and verification.

Wire layout (see docs/protocol.md, "Model delivery"):

* ``{root}/models/{model}/v/{version}/chunks/{i}`` — retained, the raw ONNX bytes of chunk ``i``;
* ``{root}/models/{model}`` — retained, the JSON envelope ``{"v": 1, "manifest": "<manifest JSON text>",
  "signature": {"alg": "ed25519", "key_id": hex, "sig": b64}}``.

The signature covers the *decoded* ``manifest`` string (the JSON string value, after JSON unescaping),
encoded as UTF-8: for a manifest made by :func:`build_package` (pure ASCII) those are the bytes between
the quotes. A verifier needs no JSON canonicalisation. The manifest names its fleet and model, which
every verifier checks against the topic it came on, and lists each chunk's sha256, so every chunk is
verifiable on its own and the whole model again by ``sha256``.

Verify first, then act: :func:`open_manifest` checks the payload's size, then the signature, then
the fields and the destination, before a caller may let the version decide anything (supersede,
clear, pin). :func:`parse_manifest` (no signature check) is only for display.

This module is shared by both sides: the device verifies, the cloud builds and signs. ``cryptography``
is imported only when a signature is made or checked.
"""

from __future__ import annotations

import base64
import bisect
import functools
import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.errors import ConfigError, ModelRejected, ProtocolError
from lepton.protocol._ids import validate_id

#: Stable reason codes of :class:`~lepton.errors.ModelRejected`.
REJECT_REASONS = {
    "bad_manifest": "the manifest is truncated, not JSON, or misses a required field",
    "unsigned": "the package carries no signature and verification is on",
    "bad_signature": "the signature does not verify with the configured public key",
    "unknown_key": "the package was signed by another key than the configured one",
    "missing_chunk": "a chunk named by the manifest has not arrived",
    "chunk_hash_mismatch": "a chunk's bytes do not match its sha256 in the manifest",
    "hash_mismatch": "the assembled model does not match the manifest's sha256 or size",
    "incompatible_pipeline": "the model was trained on another preprocessing pipeline than the device runs",
    "incompatible_input": "the model's input name, shape or dtype does not fit the device's features",
    "load_failed": "ONNX Runtime could not load or run the model",
    "stale_version": "the version is not newer than the one being served",
    "wrong_fleet": "the signed manifest names another fleet than the topic it was published on",
    "wrong_model": "the signed manifest names another model than the topic it was published on",
    "too_large": "the manifest or the model exceeds the receiver's size limits",
    "external_data": "the ONNX model refers to external data files, which Lepton never loads",
}

#: Largest manifest payload a verifier reads (about 14,000 chunk digests: a 1.3 GB model at 96 KiB).
MAX_MANIFEST_BYTES = 1024 * 1024

#: Default chunk size: comfortably under AWS IoT Core's 128 KB message limit.
DEFAULT_CHUNK_SIZE = 96 * 1024
MANIFEST_KIND = "lepton-model"
REQUIRED_FIELDS = (
    "fleet", "name", "version", "sha256", "size", "chunk_size", "chunks", "input", "labels", "pipeline",
)


@dataclass(frozen=True)
class ModelManifest:
    """The parsed manifest of one model version."""

    fleet: str
    name: str
    version: int
    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]
    input: dict[str, Any]
    labels: tuple[Any, ...]
    pipeline: dict[str, Any]
    metrics: dict[str, Any]
    created: float
    parent: int | None
    format: str = "onnx"
    quantization: str = "none"
    raw: dict[str, Any] | None = None
    #: ``{"method": "temperature", "temperature": T, ...}`` or None (uncalibrated: T = 1).
    calibration: dict[str, Any] | None = None

    @property
    def pipeline_hash(self) -> str | None:
        return self.pipeline.get("hash")

    @property
    def temperature(self) -> float:
        """Divide the logits by this before the softmax: the calibrated confidence (1.0 if none)."""
        return float((self.calibration or {}).get("temperature", 1.0))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw or {})


@dataclass(frozen=True)
class ModelPackage:
    """A verified model: manifest plus the exact ONNX bytes.

    The bytes are held as ``parts``, the verified chunks in order (a model of tens of MB is never
    copied whole to be checked or written: see :func:`assemble_package`); ``data`` joins them the first
    time it is read, for a caller that needs one ``bytes`` object.
    """

    manifest: ModelManifest
    parts: tuple[bytes, ...]
    signed_by: str | None

    @functools.cached_property
    def data(self) -> bytes:
        """The ONNX bytes as one object (joined on first use, then kept)."""
        return bytes(self.parts[0]) if len(self.parts) == 1 else b"".join(self.parts)


# ------------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------------
def key_id(public_key_raw: bytes) -> str:
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def generate_keypair(directory: str | Path, *, name: str = "lepton") -> tuple[Path, Path]:
    """Write ``{name}.key`` (private, PEM, mode 0600) and ``{name}.pub`` (public, PEM) into directory."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    if private.exists():
        raise ConfigError(f"{private} already exists; remove it or choose another --out directory")
    key = Ed25519PrivateKey.generate()
    private.touch(mode=0o600)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: str | Path):  # -> Ed25519PrivateKey
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"private key {path} not found; create one with `lepton keys generate`") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key; create one with `lepton keys generate`")
    return key


def load_public_key(path: str | Path):  # -> Ed25519PublicKey
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"public key {path} not found; copy the fleet's .pub file or pass --no-verify"
                          ) from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def _raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ------------------------------------------------------------------------------------------------
# building (cloud side)
# ------------------------------------------------------------------------------------------------
def build_package(
    *,
    fleet: str,
    name: str,
    version: int,
    data: bytes,
    input_spec: Mapping[str, Any],
    labels: list[Any],
    pipeline: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    parent: int | None = None,
    quantization: str = "none",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    private_key=None,
    created: float | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> tuple[bytes, list[bytes]]:
    """Build the retained manifest payload and the chunk payloads of one model version for ``fleet``.

    ``pipeline`` is ``{"hash": str, "spec": ...}``; ``input_spec`` is ``{"name", "shape", "dtype"}``
    with ``-1`` for the dynamic batch dimension. Signs with ``private_key`` (Ed25519) when given.
    """
    validate_id(fleet, kind="fleet")
    validate_id(name, kind="model")
    if type(version) is not int or version < 1:
        raise ProtocolError(f"version must be an int >= 1, got {version!r}", field="version")
    if chunk_size < 1024:
        raise ConfigError(f"chunk size {chunk_size} is too small; use at least 1024 bytes")
    chunks = [bytes(data[i:i + chunk_size]) for i in range(0, len(data), chunk_size)] or [b""]
    manifest = {
        "kind": MANIFEST_KIND,
        "fleet": fleet,
        "name": name,
        "version": version,
        "format": "onnx",
        "quantization": quantization,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "chunk_size": chunk_size,
        "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
        "input": dict(input_spec),
        "labels": list(labels),
        "pipeline": dict(pipeline),
        "metrics": dict(metrics or {}),
        "created": round(created if created is not None else time.time(), 3),
        "parent": parent,
    }
    if calibration is not None:  # optional: older readers ignore it, older manifests lack it (T = 1)
        _check_calibration(calibration)
        manifest["calibration"] = dict(calibration)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    envelope: dict[str, Any] = {"v": 1, "manifest": text, "signature": None}
    if private_key is not None:
        sig = private_key.sign(text.encode())
        envelope["signature"] = {
            "alg": "ed25519",
            "key_id": key_id(_raw_public(private_key.public_key())),
            "sig": base64.b64encode(sig).decode(),
        }
    return json.dumps(envelope, separators=(",", ":")).encode(), chunks


# ------------------------------------------------------------------------------------------------
# verifying (device side)
# ------------------------------------------------------------------------------------------------
def parse_manifest(payload: bytes) -> tuple[ModelManifest, bytes, dict[str, Any] | None]:
    """Parse the retained manifest payload, without checking the signature (for display only).

    Returns ``(manifest, signed_bytes, signature_or_None)``; raises ModelRejected("bad_manifest").
    Anything that acts on a manifest uses :func:`open_manifest`, which verifies first.
    """
    signed, signature = parse_envelope(payload)
    return _parse_body(signed), signed, signature


def parse_envelope(
    payload: bytes, *, max_bytes: int = MAX_MANIFEST_BYTES
) -> tuple[bytes, dict[str, Any] | None]:
    """The outer JSON of a manifest payload: ``(signed_bytes, signature_or_None)``, nothing trusted yet.

    Raises ModelRejected("too_large") above ``max_bytes`` (checked before any parsing) and
    ModelRejected("bad_manifest") for anything that is not ``{"v": 1, "manifest": str, "signature": ...}``.
    """
    try:
        size = len(payload)
    except TypeError:
        raise ModelRejected("bad_manifest", "the manifest payload is not bytes") from None
    if size > max_bytes:
        raise ModelRejected("too_large", f"the manifest payload is {size} bytes, over the {max_bytes} limit")
    try:
        outer = json.loads(bytes(payload))
        if not isinstance(outer, dict) or not isinstance(outer.get("manifest"), str):
            raise ValueError("expected {'v': 1, 'manifest': <string>, 'signature': ...}")
        # ``True == 1`` and ``1.0 == 1`` in Python, not on the wire: like the samples envelope, the int 1 only
        if type(outer.get("v")) is not int or outer["v"] != 1:
            raise ValueError(f"unsupported version {outer.get('v')!r}, expected the int 1")
        signed = outer["manifest"].encode()
        signature = outer.get("signature")
        if signature is not None and not isinstance(signature, dict):
            raise ValueError("signature must be an object or null")
    # RecursionError: deeply nested JSON; TypeError: payload is not bytes-like
    except (ValueError, UnicodeError, TypeError, RecursionError) as exc:
        raise ModelRejected("bad_manifest", f"cannot read the model manifest: {exc}") from None
    return signed, signature


def _parse_body(signed: bytes) -> ModelManifest:
    try:
        body = json.loads(signed)
        if not isinstance(body, dict) or body.get("kind") != MANIFEST_KIND:
            raise ValueError(f"manifest kind must be {MANIFEST_KIND!r}")
        missing = [f for f in REQUIRED_FIELDS if f not in body]
        if missing:
            raise ValueError(f"missing fields {missing}")
        validate_id(body["fleet"], kind="fleet")
        validate_id(body["name"], kind="model")
        if type(body["version"]) is not int or body["version"] < 1:
            raise ValueError("version must be an int >= 1")
        if type(body["size"]) is not int or body["size"] < 0:
            raise ValueError("size must be an int >= 0")
        if type(body["chunk_size"]) is not int or body["chunk_size"] < 1:
            raise ValueError("chunk_size must be an int >= 1")
        chunks = body["chunks"]
        if not isinstance(chunks, list) or not chunks or not all(isinstance(c, str) for c in chunks):
            raise ValueError("chunks must be a non-empty list of sha256 hex strings")
        if len(chunks) != max(1, -(-body["size"] // body["chunk_size"])):
            raise ValueError("chunk count does not fit size / chunk_size")
        if not all(_is_sha256(h) for h in [body["sha256"], *chunks]):
            raise ValueError("sha256 and chunks must be 64 lowercase hex digits")
        if not isinstance(body["input"], dict) or not isinstance(body["pipeline"], dict):
            raise ValueError("input and pipeline must be objects")
        pipe_hash = body["pipeline"].get("hash")
        if pipe_hash is not None and not isinstance(pipe_hash, str):
            raise ValueError("pipeline.hash must be a string or null")
        if not isinstance(body["labels"], list):
            raise ValueError("labels must be a list")
        if not isinstance(body.get("metrics") or {}, dict):
            raise ValueError("metrics must be an object")
        created = body.get("created") or 0.0
        if type(created) not in (int, float):
            raise ValueError("created must be a number of unix seconds")
        if body.get("calibration") is not None:
            _check_calibration(body["calibration"])
    except (ValueError, UnicodeError, ProtocolError, TypeError, RecursionError) as exc:
        raise ModelRejected("bad_manifest", f"cannot read the model manifest: {exc}") from None
    return ModelManifest(
        fleet=body["fleet"], name=body["name"], version=body["version"], sha256=body["sha256"],
        size=body["size"], chunk_size=body["chunk_size"], chunks=tuple(chunks), input=body["input"],
        labels=tuple(body["labels"]), pipeline=body["pipeline"], metrics=body.get("metrics") or {},
        created=float(created), parent=body.get("parent"),
        format=body.get("format", "onnx"), quantization=body.get("quantization", "none"), raw=body,
        calibration=body.get("calibration"),
    )


def _check_calibration(cal: Any) -> None:
    if not isinstance(cal, Mapping):
        raise ValueError("calibration must be an object or null")
    t: Any = cal.get("temperature")  # untrusted; the type() test below narrows it
    if type(t) not in (int, float) or not math.isfinite(t) or not 0.01 <= t <= 100.0:
        raise ValueError(f"calibration.temperature must be a number in [0.01, 100], got {t!r}")


def open_manifest(
    payload: bytes,
    *,
    public_key,
    fleet: str,
    model: str | None = None,
    max_bytes: int = MAX_MANIFEST_BYTES,
) -> tuple[ModelManifest, str | None]:
    """Verify, then parse: the one way to read a manifest that is allowed to decide anything.

    In this order: the payload's size (``too_large``), its envelope (``bad_manifest``), the Ed25519
    signature over the decoded manifest string (``unsigned``, ``unknown_key``, ``bad_signature``;
    skipped when ``public_key`` is None, i.e. ``--no-verify``), the fields (``bad_manifest``), then the
    destination: the signed ``fleet`` and ``name`` must be the ones of the topic it arrived on
    (``wrong_fleet``, ``wrong_model``), so a package signed for one fleet cannot be replayed on
    another that trusts the same key. Returns ``(manifest, signer_key_id_or_None)``.
    """
    signed, signature = parse_envelope(payload, max_bytes=max_bytes)
    signer = verify_signature(signed, signature, public_key)
    manifest = _parse_body(signed)
    check_destination(manifest, fleet=fleet, model=model)
    return manifest, signer


def check_destination(manifest: ModelManifest, *, fleet: str, model: str | None = None) -> None:
    """Raise ModelRejected("wrong_fleet"/"wrong_model") unless the manifest names this fleet and model."""
    if manifest.fleet != fleet:
        raise ModelRejected("wrong_fleet", f"v{manifest.version} is signed for fleet {manifest.fleet!r}, "
                            f"not {fleet!r}; publish it again for this fleet")
    if model is not None and manifest.name != model:
        raise ModelRejected("wrong_model", f"the manifest names model {manifest.name!r}, "
                            f"published under {model!r}")


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _is_sha256(value: object) -> bool:
    # a regex, not a generator over the characters: a 21 MB model's manifest lists 220 digests, checked
    # while the runtime's worker holds the GIL (1 ms of a swap's pause otherwise)
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def verify_signature(signed: bytes, signature: dict[str, Any] | None, public_key) -> str | None:
    """Check an Ed25519 signature; return the key id, or None when ``public_key`` is None (no check)."""
    if public_key is None:
        return None
    if not signature:
        raise ModelRejected("unsigned", "the model is not signed; sign it with `lepton train --key` "
                            "or start the device with --no-verify")
    from cryptography.exceptions import InvalidSignature

    raw = _raw_public(public_key)
    if signature.get("alg") != "ed25519":
        raise ModelRejected("bad_signature", f"unsupported signature algorithm {signature.get('alg')!r}")
    if signature.get("key_id") != key_id(raw):
        raise ModelRejected("unknown_key",
                            f"signed by key {signature.get('key_id')!r}, device trusts {key_id(raw)}")
    sig = signature.get("sig")
    if not isinstance(sig, str):
        raise ModelRejected("bad_signature", "the signature's 'sig' must be a base64 string")
    try:
        public_key.verify(base64.b64decode(sig, validate=True), signed)
    except (InvalidSignature, ValueError):
        raise ModelRejected("bad_signature", "the manifest signature does not verify") from None
    return key_id(raw)


def verify_chunk(manifest: ModelManifest, index: int, data: bytes, *, digest: str | None = None) -> None:
    """Check one chunk against the manifest; raise ModelRejected("chunk_hash_mismatch").

    ``digest`` is the sha256 hex of ``data`` when the caller computed it already (the assembler hashes
    an orphan chunk as it arrives, before its manifest came); otherwise ``data`` is hashed here.
    """
    if not 0 <= index < len(manifest.chunks):
        raise ModelRejected("chunk_hash_mismatch", f"chunk {index} is outside 0..{len(manifest.chunks) - 1}")
    if (digest if digest is not None else hashlib.sha256(data).hexdigest()) != manifest.chunks[index]:
        raise ModelRejected("chunk_hash_mismatch", f"chunk {index} of v{manifest.version} is corrupted")


def verify_package(
    manifest_payload: bytes,
    chunks: Mapping[int, bytes],
    *,
    public_key=None,
    fleet: str | None = None,
    model: str | None = None,
) -> ModelPackage:
    """Verify a manifest and its chunks; return the package or raise ModelRejected with a reason.

    With ``public_key=None`` the signature is not checked (a device started with ``--no-verify``);
    hashes always are. With ``fleet`` (and ``model``) the signed destination must match them.
    """
    if fleet is not None:
        manifest, signer = open_manifest(manifest_payload, public_key=public_key, fleet=fleet, model=model)
    else:
        signed, signature = parse_envelope(manifest_payload)
        signer = verify_signature(signed, signature, public_key)
        manifest = _parse_body(signed)
        if model is not None and manifest.name != model:
            check_destination(manifest, fleet=manifest.fleet, model=model)
    return assemble_package(manifest, chunks, signed_by=signer)


def assemble_package(
    manifest: ModelManifest,
    chunks: Mapping[int, bytes],
    *,
    signed_by: str | None,
    chunks_verified: bool = False,
    whole: tuple[str, int] | None = None,
) -> ModelPackage:
    """Join the chunks of a manifest whose signature the caller has already checked.

    Checks that no chunk is missing, each chunk's sha256 (unless ``chunks_verified``: a receiver that
    ran :func:`verify_chunk` on every chunk as it arrived need not hash them again) and the whole
    model's sha256 and size. ``whole`` is ``(sha256 hex, size)`` of exactly these chunks in index order
    when the caller hashed them as they came (the assembler does); otherwise they are hashed here, chunk
    by chunk (never joined). Raises ModelRejected with the reason.
    """
    missing = [i for i in range(len(manifest.chunks)) if i not in chunks]
    if missing:
        raise ModelRejected("missing_chunk", f"chunks {missing[:10]} of v{manifest.version} are missing")
    if not chunks_verified:
        for i in range(len(manifest.chunks)):
            verify_chunk(manifest, i, chunks[i])
    parts = tuple(chunks[i] for i in range(len(manifest.chunks)))
    if whole is None:
        hasher = hashlib.sha256()  # chunk by chunk: the digest of the joined bytes, without the copy
        for part in parts:
            hasher.update(part)
        whole = (hasher.hexdigest(), sum(len(p) for p in parts))
    if whole[1] != manifest.size or whole[0] != manifest.sha256:
        raise ModelRejected("hash_mismatch", f"assembled v{manifest.version} does not match its sha256/size")
    return ModelPackage(manifest=manifest, parts=parts, signed_by=signed_by)


# ------------------------------------------------------------------------------------------------
# ONNX: refuse external data without onnx or onnxruntime
# ------------------------------------------------------------------------------------------------
# Which fields of which ONNX protobuf messages hold other messages, as far as they can lead to a
# TensorProto (field numbers from onnx.proto). Everything else is skipped without being parsed.
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _FUNC, _TRAIN = range(8)
_ONNX_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAIN, 25: _FUNC},
    _TRAIN: {1: _GRAPH, 2: _GRAPH},
    _FUNC: {7: _NODE, 11: _ATTR},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ONNX_MAX_DEPTH = 64


def onnx_external_data(data: bytes | Sequence[bytes]) -> list[str]:
    """Names of the tensors of an ONNX model that keep their data in external files.

    A tensor has external data when its ``data_location`` is EXTERNAL (1) or it carries
    ``external_data`` entries. Onnxruntime would open the files they name, relative to the model and
    (before 1.24) even through ``../``: a model must be self-contained. This walks the protobuf wire
    format itself (model, graphs, nodes, attributes, subgraphs, sparse tensors, functions, training
    info), so the device needs neither ``onnx`` nor onnxruntime to check it. Raises
    ModelRejected("load_failed") when ``data`` is not a well-formed protobuf. ``data`` may be the
    model's parts in order (a :class:`ModelPackage`'s ``parts``): they are read in place, not joined.
    """
    found: list[str] = []
    if isinstance(data, (bytes, bytearray, memoryview)):
        view: memoryview | _Concat = memoryview(bytes(data))
    else:
        view = memoryview(data[0]) if len(data) == 1 else _Concat(data)
    _walk_onnx(view, 0, len(view), _MODEL, 0, found)  # type: ignore[arg-type]
    return found


class _Concat:
    """Read access to the concatenation of ``parts`` without joining them: what :func:`_walk_onnx`
    uses of a memoryview (``len``, one byte ``[i]``, a short slice ``[a:b]``). It reads field keys and
    lengths only and skips tensor data, so a few thousand lookups cover a model of any size."""

    def __init__(self, parts: Sequence[bytes]) -> None:
        self._parts = [memoryview(p) for p in parts if len(p)] or [memoryview(b"")]
        self._ends = list(itertools.accumulate(len(p) for p in self._parts))
        self._last = 0  # the part of the previous lookup: the walk mostly reads forward

    def __len__(self) -> int:
        return self._ends[-1]

    def _find(self, pos: int) -> int:
        i = self._last
        if not ((self._ends[i - 1] if i else 0) <= pos < self._ends[i]):
            i = self._last = bisect.bisect_right(self._ends, pos)
        return i

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(self))
            out = bytearray()
            while start < stop:
                i = self._find(start)
                begin = self._ends[i - 1] if i else 0
                take = min(stop, self._ends[i]) - start
                out += self._parts[i][start - begin:start - begin + take]
                start += take
            return bytes(out)
        if not 0 <= key < len(self):
            raise IndexError(key)
        i = self._find(key)
        return self._parts[i][key - (self._ends[i - 1] if i else 0)]


def check_onnx_self_contained(data: bytes | Sequence[bytes], *, what: str = "the model") -> None:
    """Raise ModelRejected("external_data") when an ONNX model refers to external data files."""
    external = onnx_external_data(data)
    if external:
        names = ", ".join(repr(n) for n in external[:5])
        raise ModelRejected("external_data", f"{what} keeps {len(external)} tensor(s) in external files "
                            f"({names}); export it with all weights inside the .onnx file")


def _varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ModelRejected("load_failed", "not an ONNX model: truncated or malformed protobuf")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _walk_onnx(view: memoryview, pos: int, end: int, kind: int, depth: int, found: list[str]) -> None:
    if depth > _ONNX_MAX_DEPTH:
        raise ModelRejected("load_failed", f"not a usable ONNX model: nested deeper than {_ONNX_MAX_DEPTH}")
    children = _ONNX_CHILDREN[kind]
    name = ""
    external = False
    while pos < end:
        key, pos = _varint(view, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ModelRejected("load_failed", "not an ONNX model: field number 0 in the protobuf")
        if wire == 0:
            value, pos = _varint(view, pos, end)
            if kind == _TENSOR and field == _TENSOR_DATA_LOCATION and value == 1:
                external = True
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(view, pos, end)
            if pos + length > end:
                raise ModelRejected("load_failed", "not an ONNX model: a field runs past its message")
            child = children.get(field)
            if child is not None:
                _walk_onnx(view, pos, pos + length, child, depth + 1, found)
            elif kind == _TENSOR and field == _TENSOR_EXTERNAL_DATA:
                external = True
            elif kind == _TENSOR and field == _TENSOR_NAME:
                name = bytes(view[pos:pos + min(length, 200)]).decode("utf-8", "replace")
            pos += length
        else:  # groups (3, 4) are not used by ONNX; 6, 7 do not exist
            raise ModelRejected("load_failed", f"not an ONNX model: protobuf wire type {wire}")
        if pos > end:
            raise ModelRejected("load_failed", "not an ONNX model: truncated protobuf")
    if external:
        found.append(name or "<unnamed>")
