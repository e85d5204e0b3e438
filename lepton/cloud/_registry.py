"""The model registry: every trained version on disk, what is deployed where, and rollback.

Layout under the dataset directory ``DIR``::

    DIR/models/{name}/{version}/model.onnx        the bytes that ship (int8 or fp32)
    DIR/models/{name}/{version}/model.fp32.onnx   the fp32 export, when int8 ships
    DIR/models/{name}/{version}/manifest.json     the manifest fields (input, labels, pipeline, metrics, ...)
    DIR/models/{name}/{version}/report.json       the training report; written last = version complete
    DIR/models/{name}/{version}/package.json      the signed manifest payload as last published
    DIR/models/{name}/deployed.json               {fleet: {version, chunks, published_at, broker, prefix}}
    DIR/models/{name}/high_water                  the highest version ever allocated

Versions only go up: a number is reserved with an atomic ``mkdir`` above the high-water mark, so two
trainers never get the same number and a deleted version's number is never reused. Every file is
written with :func:`lepton._fs.write_atomic` (fsync of the file and of its folder), so the high-water
mark and a complete version survive a power cut. A rollback is a
new, higher version carrying an old version's weights (``parent`` = the old version), so devices
move forward to it like to any update.
"""

from __future__ import annotations

import builtins  # the method Registry.list hides the type inside the class
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton._fs import fsync_dir, write_atomic
from lepton.errors import ConfigError, ModelRejected
from lepton.protocol import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PREFIX,
    build_package,
    check_onnx_self_contained,
    validate_id,
)

log = logging.getLogger(__name__)

__all__ = ["ModelVersion", "Registry"]

MANIFEST_FIELDS = ("input", "labels", "pipeline", "metrics", "quantization", "parent", "calibration")


@dataclass(frozen=True)
class ModelVersion:
    """One version on disk."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any]
    report: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / "model.onnx"

    def data(self) -> bytes:
        return self.model_path.read_bytes()

    @property
    def status(self) -> str:
        return str(self.report.get("status", "kept"))

    @property
    def accuracy(self) -> float | None:
        return self.manifest.get("metrics", {}).get("val_accuracy")

    @property
    def parent(self) -> int | None:
        return self.manifest.get("parent")

    def summary(self) -> dict[str, Any]:
        metrics = self.manifest.get("metrics", {})
        return {
            "name": self.name,
            "version": self.version,
            "status": self.status,
            "parent": self.parent,
            "created": self.manifest.get("created"),
            "quantization": self.manifest.get("quantization"),
            "size_bytes": self.manifest.get("size"),
            "sha256": self.manifest.get("sha256"),
            "val_accuracy": metrics.get("val_accuracy"),
            "labels": len(self.manifest.get("labels", [])),
            "pipeline": self.manifest.get("pipeline", {}).get("hash"),
            "fleet": self.report.get("fleet"),
            "gate": (self.report.get("gate") or {}).get("reason"),
        }


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


class Registry:
    """Model versions under ``{root}/models``; ``root`` is the dataset directory (``--data``).

    Example (after three ``lepton train`` runs on ``--data data``)::

        reg = Registry("data")
        [v.version for v in reg.list("digits")]   # [1, 2, 3]
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.models = self.root / "models"

    # -- reading --------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.models.is_dir():
            return []
        return sorted(p.name for p in self.models.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _dir(self, name: str) -> Path:
        return self.models / validate_id(name, kind="model")

    def _numbers(self, name: str) -> list[int]:
        d = self._dir(name)
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())

    def versions(self, name: str) -> list[int]:
        """Complete versions (report written), oldest first."""
        return [v for v in self._numbers(name) if (self._dir(name) / str(v) / "report.json").exists()]

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        versions = self.versions(name)
        if not versions:
            raise ConfigError(
                f"no versions of model {name!r} under {self.models}; train one with `lepton train`"
            )
        if version is None:
            version = versions[-1]
        if version not in versions:
            raise ConfigError(f"model {name!r} has no version {version}; it has {versions}")
        path = self._dir(name) / str(version)
        return ModelVersion(
            name=name,
            version=version,
            path=path,
            manifest=json.loads((path / "manifest.json").read_text()),
            report=json.loads((path / "report.json").read_text()),
        )

    def list(self, name: str) -> list[ModelVersion]:
        return [self.get(name, v) for v in self.versions(name)]

    def deployments(self, name: str) -> dict[str, dict[str, Any]]:
        path = self._dir(name) / "deployed.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def deployed(self, name: str, fleet: str | None = None) -> ModelVersion | None:
        """The version last published to ``fleet`` (any fleet: the most recent publication)."""
        deps = self.deployments(name)
        if fleet is not None:
            entry = deps.get(fleet)
        else:
            entry = max(deps.values(), key=lambda e: e.get("published_at", 0), default=None)
        if entry is None or entry["version"] not in self.versions(name):
            return None
        return self.get(name, entry["version"])

    # -- writing --------------------------------------------------------------------------------------
    def _allocate(self, name: str) -> tuple[int, Path]:
        d = self._dir(name)
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            for parent in (d.parent, d.parent.parent):  # the new folders survive a power cut too
                fsync_dir(parent)
        mark = d / "high_water"
        while True:
            high = int(mark.read_text()) if mark.exists() else 0
            version = max([high, *self._numbers(name)]) + 1
            try:
                (d / str(version)).mkdir()
            except FileExistsError:
                continue
            # Durable before the number is used: the rename's directory fsync also makes the new
            # version folder's entry durable, so after a power cut the number is still taken.
            write_atomic(mark, str(version).encode())
            return version, d / str(version)

    def create(
        self,
        name: str,
        *,
        model: bytes,
        input_spec: dict[str, Any],
        labels: builtins.list[str],
        pipeline: dict[str, Any],
        metrics: dict[str, Any],
        quantization: str,
        parent: int | None,
        report: dict[str, Any],
        fp32: bytes | None = None,
        calibration: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Store a new version (next number) and return it."""
        import hashlib

        version, path = self._allocate(name)
        try:
            write_atomic(path / "model.onnx", model)
            if fp32 is not None and fp32 != model:
                write_atomic(path / "model.fp32.onnx", fp32)
            manifest = {
                "name": name,
                "version": version,
                "input": dict(input_spec),
                "labels": list(labels),
                "pipeline": dict(pipeline),
                "metrics": dict(metrics),
                "quantization": quantization,
                "parent": parent,
                "calibration": dict(calibration) if calibration is not None else None,
                "sha256": hashlib.sha256(model).hexdigest(),
                "size": len(model),
                "created": round(time.time(), 3),
            }
            _write_json(path / "manifest.json", manifest)
            report = {
                **report,
                "model": name,
                "version": version,
                "parent": parent,
                "status": report.get("status", "kept"),
            }
            _write_json(path / "report.json", report)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        log.info(
            "registry: stored %s v%d (%d bytes, %s) in %s", name, version, len(model), quantization, path
        )
        return self.get(name, version)

    def update_report(self, name: str, version: int, **changes: Any) -> ModelVersion:
        mv = self.get(name, version)
        _write_json(mv.path / "report.json", {**mv.report, **changes})
        return self.get(name, version)

    def build(
        self,
        name: str,
        version: int,
        *,
        fleet: str,
        private_key=None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> tuple[bytes, builtins.list[bytes]]:  # noqa: ANN001
        """The manifest payload (signed for ``fleet`` and ``name``) and chunk payloads of a stored version."""
        mv = self.get(name, version)
        m = mv.manifest
        data = mv.data()
        try:  # devices refuse it anyway (external_data); say so before anything is published
            check_onnx_self_contained(data, what=f"{mv.model_path}")
        except ModelRejected as exc:
            raise ConfigError(f"{exc.detail}; it cannot be published") from None
        return build_package(
            fleet=fleet,
            name=name,
            version=version,
            data=data,
            input_spec=m["input"],
            labels=m["labels"],
            pipeline=m["pipeline"],
            metrics=m["metrics"],
            parent=m["parent"],
            quantization=m["quantization"],
            chunk_size=chunk_size,
            private_key=private_key,
            created=m["created"],
            calibration=m.get("calibration"),
        )

    def publish(
        self,
        name: str,
        version: int,
        *,
        url: str,
        fleet: str,
        prefix: str = DEFAULT_PREFIX,
        private_key=None,  # noqa: ANN001
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        verify: bool = True,
        timeout: float = 30.0,
    ):
        """Publish a stored version to ``fleet`` (topics ``{prefix}/{fleet}/models/...``) and record it as
        deployed there; returns PublishResult. Deployments are keyed by fleet: one registry (one
        ``--data`` folder) serves one prefix."""
        from lepton.cloud._delivery import publish_package
        from lepton.protocol import BrokerURL

        previous = self.deployments(name).get(fleet)
        if previous is not None and previous["version"] > version:
            raise ConfigError(
                f"{name} v{previous['version']} is deployed to {fleet}; devices never move back to "
                f"v{version}. Use `lepton models rollback {name} --to {version}` to ship its weights "
                "as a new version"
            )
        payload, chunks = self.build(
            name, version, fleet=fleet, private_key=private_key, chunk_size=chunk_size
        )
        supersedes = {}
        if previous is not None and previous["version"] != version:
            supersedes[previous["version"]] = previous["chunks"]
        # The signer's public key: the broker's retained manifest counts only if it verifies with it.
        public_key = private_key.public_key() if private_key is not None else None
        result = publish_package(
            url, fleet, payload, chunks, supersedes=supersedes, public_key=public_key, verify=verify,
            timeout=timeout, prefix=prefix,
        )
        mv = self.get(name, version)
        write_atomic(mv.path / "package.json", payload)
        deps = self.deployments(name)
        deps[fleet] = {
            "version": version,
            "chunks": len(chunks),
            "chunk_size": chunk_size,
            "published_at": round(time.time(), 3),
            "broker": str(BrokerURL.parse(url)),
            "prefix": prefix,
            "signed": private_key is not None,
        }
        _write_json(self._dir(name) / "deployed.json", deps)
        self.update_report(
            name,
            version,
            status="published",
            publication={**result.to_dict(), "fleet": fleet, "prefix": prefix,
                         "signed": private_key is not None},
        )
        return result

    def rollback(self, name: str, to: int, *, reason: str | None = None) -> ModelVersion:
        """A new, higher version with the weights, labels and pipeline of version ``to`` (parent = ``to``)."""
        src = self.get(name, to)
        m = src.manifest
        fp32 = src.path / "model.fp32.onnx"
        metrics = {**m["metrics"], "rolled_back_from": to}
        report = {
            "status": "kept",
            "rollback_of": to,
            "fleet": src.report.get("fleet"),
            "reason": reason or f"rollback to the weights of v{to}",
            "data": src.report.get("data"),
            "export": src.report.get("export"),
        }
        return self.create(
            name,
            model=src.data(),
            input_spec=m["input"],
            labels=m["labels"],
            pipeline=m["pipeline"],
            metrics=metrics,
            quantization=m["quantization"],
            parent=to,
            report=report,
            fp32=fp32.read_bytes() if fp32.exists() else None,
            calibration=m.get("calibration"),
        )
