"""Model packages: manifest, chunking, Ed25519 signatures and verification.

Wire layout (see docs/protocol.md, "Model delivery"):

* ``{root}/models/{model}/v/{version}/chunks/{i}`` — retained, the raw ONNX bytes of chunk ``i``;
* ``{root}/models/{model}`` — retained, the JSON envelope ``{"v": 1, "manifest": "<manifest JSON text>",
  "signature": {"alg": "ed25519", "key_id": hex, "sig": b64}}``.

The signature covers the UTF-8 bytes of the ``manifest`` string exactly as sent, so a verifier needs
no JSON canonicalisation. The manifest lists each chunk's sha256, so every chunk is verifiable on its
own and the whole model again by ``sha256``.

This module is shared by both sides: the device verifies, the cloud builds and signs. ``cryptography``
is imported only when a signature is made or checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping
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
}

#: Default chunk size: comfortably under AWS IoT Core's 128 KB message limit.
DEFAULT_CHUNK_SIZE = 96 * 1024
MANIFEST_KIND = "lepton-model"
REQUIRED_FIELDS = ("name", "version", "sha256", "size", "chunk_size", "chunks", "input", "labels", "pipeline")


@dataclass(frozen=True)
class ModelManifest:
    """The parsed manifest of one model version."""

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

    @property
    def pipeline_hash(self) -> str | None:
        return self.pipeline.get("hash")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw or {})


@dataclass(frozen=True)
class ModelPackage:
    """A verified model: manifest plus the exact ONNX bytes."""

    manifest: ModelManifest
    data: bytes
    signed_by: str | None


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
) -> tuple[bytes, list[bytes]]:
    """Build the retained manifest payload and the chunk payloads of one model version.

    ``pipeline`` is ``{"hash": str, "spec": ...}``; ``input_spec`` is ``{"name", "shape", "dtype"}``
    with ``-1`` for the dynamic batch dimension. Signs with ``private_key`` (Ed25519) when given.
    """
    validate_id(name, kind="model")
    if type(version) is not int or version < 1:
        raise ProtocolError(f"version must be an int >= 1, got {version!r}", field="version")
    if chunk_size < 1024:
        raise ConfigError(f"chunk size {chunk_size} is too small; use at least 1024 bytes")
    chunks = [bytes(data[i:i + chunk_size]) for i in range(0, len(data), chunk_size)] or [b""]
    manifest = {
        "kind": MANIFEST_KIND,
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
    """Parse the retained manifest payload, without checking the signature.

    Returns ``(manifest, signed_bytes, signature_or_None)``; raises ModelRejected("bad_manifest").
    """
    try:
        outer = json.loads(bytes(payload))
        if not isinstance(outer, dict) or outer.get("v") != 1 or not isinstance(outer.get("manifest"), str):
            raise ValueError("expected {'v': 1, 'manifest': <string>, 'signature': ...}")
        signed = outer["manifest"].encode()
        body = json.loads(signed)
        if not isinstance(body, dict) or body.get("kind") != MANIFEST_KIND:
            raise ValueError(f"manifest kind must be {MANIFEST_KIND!r}")
        missing = [f for f in REQUIRED_FIELDS if f not in body]
        if missing:
            raise ValueError(f"missing fields {missing}")
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
        if not isinstance(body["labels"], list):
            raise ValueError("labels must be a list")
        if not isinstance(body.get("metrics") or {}, dict):
            raise ValueError("metrics must be an object")
        created = body.get("created") or 0.0
        if type(created) not in (int, float):
            raise ValueError("created must be a number of unix seconds")
        signature = outer.get("signature")
        if signature is not None and not isinstance(signature, dict):
            raise ValueError("signature must be an object or null")
    # RecursionError: deeply nested JSON; TypeError: payload is not bytes-like
    except (ValueError, UnicodeDecodeError, ProtocolError, TypeError, RecursionError) as exc:
        raise ModelRejected("bad_manifest", f"cannot read the model manifest: {exc}") from None
    manifest = ModelManifest(
        name=body["name"], version=body["version"], sha256=body["sha256"], size=body["size"],
        chunk_size=body["chunk_size"], chunks=tuple(chunks), input=body["input"],
        labels=tuple(body["labels"]), pipeline=body["pipeline"], metrics=body.get("metrics") or {},
        created=float(created), parent=body.get("parent"),
        format=body.get("format", "onnx"), quantization=body.get("quantization", "none"), raw=body,
    )
    return manifest, signed, signature


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


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


def verify_chunk(manifest: ModelManifest, index: int, data: bytes) -> None:
    """Check one chunk against the manifest; raise ModelRejected("chunk_hash_mismatch")."""
    if not 0 <= index < len(manifest.chunks):
        raise ModelRejected("chunk_hash_mismatch", f"chunk {index} is outside 0..{len(manifest.chunks) - 1}")
    if hashlib.sha256(data).hexdigest() != manifest.chunks[index]:
        raise ModelRejected("chunk_hash_mismatch", f"chunk {index} of v{manifest.version} is corrupted")


def verify_package(
    manifest_payload: bytes,
    chunks: Mapping[int, bytes],
    *,
    public_key=None,
) -> ModelPackage:
    """Verify a manifest and its chunks; return the package or raise ModelRejected with a reason.

    With ``public_key=None`` the signature is not checked (a device started with ``--no-verify``);
    hashes always are.
    """
    manifest, signed, signature = parse_manifest(manifest_payload)
    signer = verify_signature(signed, signature, public_key)
    return assemble_package(manifest, chunks, signed_by=signer)


def assemble_package(
    manifest: ModelManifest,
    chunks: Mapping[int, bytes],
    *,
    signed_by: str | None,
    chunks_verified: bool = False,
) -> ModelPackage:
    """Join the chunks of a manifest whose signature the caller has already checked.

    Checks that no chunk is missing, each chunk's sha256 (unless ``chunks_verified``: a receiver that
    ran :func:`verify_chunk` on every chunk as it arrived need not hash them again) and the whole
    model's sha256 and size. Raises ModelRejected with the reason.
    """
    missing = [i for i in range(len(manifest.chunks)) if i not in chunks]
    if missing:
        raise ModelRejected("missing_chunk", f"chunks {missing[:10]} of v{manifest.version} are missing")
    if not chunks_verified:
        for i in range(len(manifest.chunks)):
            verify_chunk(manifest, i, chunks[i])
    data = b"".join(chunks[i] for i in range(len(manifest.chunks)))
    if len(data) != manifest.size or hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise ModelRejected("hash_mismatch", f"assembled v{manifest.version} does not match its sha256/size")
    return ModelPackage(manifest=manifest, data=data, signed_by=signed_by)
