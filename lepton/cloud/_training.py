"""Train, export, gate, register and publish: one call, with the side effects in Lightning callbacks.

``train(TrainConfig(...))`` runs ``Trainer.fit`` with these callbacks, in this order:

* :class:`BestWeights` keeps the weights of the epoch with the best ``val_acc`` and restores them;
* :class:`ExportCallback` exports ONNX, checks it against PyTorch, quantizes to int8 and picks
  what ships (:func:`~lepton.cloud.export_and_compress`);
* :class:`RegistryCallback` runs the evaluation gate (the deployed version's ONNX, scored with
  ONNX Runtime on the *same* validation set), stores the version and, when asked and the gate
  passed, signs and publishes it.

Integrity: the validation set should be one devices cannot write (``val_data``,
``trusted_devices``; the report's ``validation`` says which was used and ``trusted: false`` when it is
the fleet's own split); no device holds more than ``max_device_share`` of the training set; the model
is pinned to the deployed version's pipeline (or ``pipeline``), and a version the gate cannot compare
with the deployed one is refused unless ``force_incomparable``.

Accuracies in reports are fractions (0.973); tolerances are percentage points (1.0 = 0.01).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl

from lepton.cloud._data import DataConfig, ParquetDataModule
from lepton.cloud._export import ExportConfig, ExportResult, export_and_compress, onnx_accuracy, onnx_session
from lepton.cloud._nets import make_module
from lepton.cloud._registry import ModelVersion, Registry
from lepton.errors import ConfigError, GateRefused
from lepton.protocol import DEFAULT_CHUNK_SIZE, validate_id

log = logging.getLogger(__name__)

__all__ = [
    "BestWeights",
    "ExportCallback",
    "RegistryCallback",
    "TrainConfig",
    "TrainResult",
    "evaluate_deployed",
    "train",
]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything ``lepton train`` can set. ``data`` is the dataset directory (``DIR/{fleet}/data``)."""

    data: Path
    fleet: str
    model: str
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    val_fraction: float = 0.2
    patience: int = 6
    seed: int = 0
    module: str | None = None
    #: Pin the pipeline to train on; None pins the deployed version's (else: the most devices' one).
    pipeline: str | None = None
    pipeline_spec: Any = None
    #: A validation set devices cannot write: Parquet file/folder in the dataset schema.
    val_data: Path | None = None
    #: Devices whose validation-side samples form the validation set (with or without ``val_data``).
    trusted_devices: tuple[str, ...] = ()
    #: No device holds more than this share of the training set (1.0: no cap).
    max_device_share: float = 0.34
    #: Ship (publish) a version the gate cannot compare with the deployed one (other pipeline/shape).
    force_incomparable: bool = False
    #: The gate passes when new accuracy >= deployed accuracy - tolerance_points / 100.
    tolerance_points: float = 1.0
    export: ExportConfig = field(default_factory=ExportConfig)
    publish: bool = False
    broker: str | None = None
    key: Path | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    progress: bool = False
    cache_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        validate_id(self.fleet, kind="fleet", flag="--fleet")
        validate_id(self.model, kind="model", flag="--model")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.tolerance_points < 0:
            raise ConfigError(f"--tolerance must be >= 0 percentage points, got {self.tolerance_points}")
        if self.publish and not self.broker:
            raise ConfigError("--publish needs --broker mqtt://user:password@host:port")
        if self.chunk_size < 1024:
            raise ConfigError(f"--chunk-size {self.chunk_size} is too small; use at least 1024 bytes")
        if self.key is not None and not Path(self.key).is_file():
            raise ConfigError(f"private key {self.key} not found; create one with `lepton keys generate`")
        if self.val_data is not None:
            object.__setattr__(self, "val_data", Path(self.val_data))
        object.__setattr__(self, "trusted_devices", tuple(self.trusted_devices))
        self.data_config()  # every data flag is checked now, before a key is loaded or a scan starts

    def data_config(self, *, deployed: ModelVersion | None = None) -> DataConfig:
        """The data settings; the pipeline is pinned to ``pipeline``, else to ``deployed``'s."""
        pin: dict[str, Any] = {}
        if self.pipeline is not None:
            pin = {"pipeline": self.pipeline, "pin_pipeline": True, "pinned_by": "--pipeline"}
        elif deployed is not None:
            pin = {
                "pipeline": deployed.manifest.get("pipeline", {}).get("hash"),
                "pin_pipeline": True,
                "pinned_by": f"deployed v{deployed.version}",
            }
        return DataConfig(
            root=self.data,
            fleet=self.fleet,
            **pin,
            val_data=self.val_data,
            trusted_devices=self.trusted_devices,
            max_device_share=self.max_device_share,
            val_fraction=self.val_fraction,
            batch_size=self.batch_size,
            cache_bytes=self.cache_bytes,
            seed=self.seed,
        )


@dataclass
class TrainResult:
    """What happened: ``status`` is ``published``, ``kept`` (trained, not asked to publish) or ``refused``."""

    version: ModelVersion
    status: str
    report: dict[str, Any]

    @property
    def gate_passed(self) -> bool:
        return bool(self.report["gate"]["passed"])

    def check(self) -> TrainResult:
        """Raise :class:`~lepton.errors.GateRefused` when the gate kept this version from shipping."""
        gate = self.report["gate"]
        if not gate["passed"]:
            raise GateRefused(
                f"{self.version.name} v{self.version.version}: {gate['reason']}",
                new_accuracy=gate["new_accuracy"],
                deployed_accuracy=gate["deployed_accuracy"],
            )
        return self


# ------------------------------------------------------------------------------------------------
# callbacks
# ------------------------------------------------------------------------------------------------
class BestWeights(pl.Callback):
    """Keep the weights of the best validation epoch and load them back when fitting ends."""

    def __init__(self, monitor: str = "val_acc") -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._state: dict[str, Any] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            self._state = copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)


class ExportCallback(pl.Callback):
    """Export to ONNX, verify, quantize; the result is in ``.result`` after fitting."""

    def __init__(self, config: ExportConfig) -> None:
        self.config = config
        self.result: ExportResult | None = None
        self.seconds = 0.0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        self.result = export_and_compress(pl_module, trainer.datamodule, self.config)
        self.seconds = time.perf_counter() - started


class RegistryCallback(pl.Callback):
    """Gate, store and (optionally) publish the exported model; the result is in ``.result``."""

    def __init__(
        self,
        config: TrainConfig,
        export: ExportCallback,
        registry: Registry,
        *,
        extra_report: dict[str, Any] | None = None,
        private_key=None,  # noqa: ANN001 - Ed25519PrivateKey; cryptography is imported lazily
    ) -> None:
        self.config, self.export, self.registry = config, export, registry
        self.private_key = private_key
        self.extra_report = extra_report or {}
        self.result: TrainResult | None = None
        self.seconds = 0.0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        try:
            self._finish(trainer)
        finally:
            self.seconds = time.perf_counter() - started

    def _finish(self, trainer: pl.Trainer) -> None:
        cfg, exported = self.config, self.export.result
        if exported is None:
            raise RuntimeError("RegistryCallback must come after ExportCallback")
        dm: ParquetDataModule = trainer.datamodule
        info = dm.info
        new_acc = exported.shipped_accuracy
        gate = gate_decision(
            new_acc,
            evaluate_deployed(self.registry, cfg.model, cfg.fleet, dm),
            cfg.tolerance_points,
            force_incomparable=cfg.force_incomparable,
        )
        gate["validation"] = {k: info.validation.get(k) for k in ("source", "trusted", "samples")}
        refused = not gate["passed"]
        shape = list(info.shape)
        metrics = {
            "val_accuracy": round(new_acc, 6),
            "fp32_accuracy": round(exported.report["fp32_accuracy"], 6),
            "int8_accuracy": (
                round(exported.report["int8_accuracy"], 6) if "int8_accuracy" in exported.report else None
            ),
            "fp32_size_bytes": exported.report["fp32_size_bytes"],
            "size_bytes": len(exported.shipped),
            "val_samples": info.val_samples,
            "train_samples": info.train_samples,
            "max_abs_diff": exported.report["max_abs_diff"],
            # Which model shipped and why: accuracy within tolerance and faster at batch 1 (cloud/_export.py).
            "quantization_reason": exported.report["reason"],
            "fp32_latency_ms": round(exported.report["fp32_latency_ms"], 4),
            "int8_latency_ms": (
                round(exported.report["int8_latency_ms"], 4) if "int8_latency_ms" in exported.report else None
            ),
        }
        report = {
            **self.extra_report,
            "fleet": cfg.fleet,
            "status": "refused" if refused else "kept",
            "gate": gate,
            "validation": info.validation,
            "devices": info.devices,
            "data": info.to_dict(),
            "export": exported.report,
        }
        deployed = self.registry.deployed(cfg.model, cfg.fleet)
        version = self.registry.create(
            cfg.model,
            model=exported.shipped,
            fp32=exported.fp32,
            input_spec={
                "name": self.export.config.input_name,
                "shape": [-1, *shape],
                "dtype": "float32",
                "output": self.export.config.output_name,
            },
            labels=list(info.labels),
            pipeline={"hash": info.pipeline, "spec": cfg.pipeline_spec},
            metrics=metrics,
            quantization=exported.quantization,
            parent=deployed.version if deployed is not None else None,
            report=report,
        )
        status = "refused" if refused else "kept"
        if refused:
            log.warning("gate refused %s v%d: %s", cfg.model, version.version, gate["reason"])
        elif cfg.publish:
            key = self.private_key
            if key is None:
                log.warning(
                    "publishing %s v%d unsigned: devices that verify will reject it; pass --key",
                    cfg.model,
                    version.version,
                )
            try:
                self.registry.publish(
                    cfg.model,
                    version.version,
                    url=cfg.broker,
                    fleet=cfg.fleet,
                    private_key=key,
                    chunk_size=cfg.chunk_size,
                )
            except Exception as exc:
                self.registry.update_report(
                    cfg.model, version.version, status="publish_failed", publish_error=str(exc)
                )
                raise
            status = "published"
        version = self.registry.get(cfg.model, version.version)
        self.result = TrainResult(version=version, status=status, report=version.report)


# ------------------------------------------------------------------------------------------------
# the gate
# ------------------------------------------------------------------------------------------------
def evaluate_deployed(
    registry: Registry, name: str, fleet: str, dm: ParquetDataModule
) -> dict[str, Any] | None:
    """Score the version deployed to ``fleet`` on ``dm``'s validation set with ONNX Runtime.

    Returns None when nothing is deployed, else ``{"version", "comparable", "accuracy"|"reason"}``.
    Class indices are matched by label name, so a new class does not break the comparison.
    """
    deployed = registry.deployed(name, fleet)
    if deployed is None:
        return None
    m, info = deployed.manifest, dm.info
    out: dict[str, Any] = {"version": deployed.version, "comparable": False}
    if m["pipeline"].get("hash") != info.pipeline:
        trained_on = m["pipeline"].get("hash")
        out["reason"] = f"v{deployed.version} was trained on pipeline {trained_on!r}, not {info.pipeline!r}"
        return out
    if list(m["input"].get("shape", []))[1:] != list(info.shape):
        out["reason"] = (
            f"v{deployed.version} takes input shape {m['input'].get('shape')}, data has {list(info.shape)}"
        )
        return out
    index = {lab: i for i, lab in enumerate(info.labels)}
    label_map = np.asarray([index.get(str(lab), -1) for lab in m["labels"]], dtype=np.int64)
    try:
        session = onnx_session(deployed.data())
        acc, n = onnx_accuracy(session, dm.iter_numpy("val"), label_map=label_map)
    except Exception as exc:  # noqa: BLE001 - a broken deployed model must not block a fix
        out["reason"] = f"v{deployed.version} could not be evaluated: {exc}"
        return out
    out.update(comparable=True, accuracy=acc, val_samples=n)
    return out


def gate_decision(
    new_accuracy: float,
    deployed: dict[str, Any] | None,
    tolerance_points: float,
    *,
    force_incomparable: bool = False,
) -> dict[str, Any]:
    """Pass or refuse: new >= deployed - tolerance on the same validation set.

    A version that cannot be compared with the deployed one (another pipeline or input shape, or a
    deployed model that fails to run) is refused unless ``force_incomparable``: shipping it is how a
    device inventing a pipeline hash would take the fleet's model over.
    """
    gate: dict[str, Any] = {
        "new_accuracy": new_accuracy,
        "tolerance_points": tolerance_points,
        "deployed_version": None,
        "deployed_accuracy": None,
        "comparable": deployed is not None and bool(deployed["comparable"]),
        "forced": False,
    }
    if deployed is None:
        return {**gate, "passed": True, "reason": "no deployed version to compare with"}
    gate["deployed_version"] = deployed["version"]
    if not deployed["comparable"]:
        if force_incomparable:
            return {
                **gate,
                "passed": True,
                "forced": True,
                "reason": f"not comparable ({deployed['reason']}); shipped because of --force-incomparable",
            }
        return {
            **gate,
            "passed": False,
            "reason": f"not comparable: {deployed['reason']}; the new version is kept on disk and not "
            "shipped (pass --force-incomparable to ship it anyway)",
        }
    dep = deployed["accuracy"]
    gate["deployed_accuracy"] = dep
    floor = dep - tolerance_points / 100.0
    if new_accuracy + 1e-12 >= floor:
        return {
            **gate,
            "passed": True,
            "reason": f"new accuracy {new_accuracy:.4f} >= deployed v{deployed['version']} {dep:.4f} "
            f"- {tolerance_points:g} points on the same validation set",
        }
    return {
        **gate,
        "passed": False,
        "reason": f"new accuracy {new_accuracy:.4f} < deployed v{deployed['version']} {dep:.4f} "
        f"- {tolerance_points:g} points on the same validation set; the new version is kept "
        "on disk and not shipped",
    }


# ------------------------------------------------------------------------------------------------
# the whole run
# ------------------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    *,
    datamodule: ParquetDataModule | None = None,
    module: pl.LightningModule | None = None,
    callbacks: list[pl.Callback] | None = None,
) -> TrainResult:
    """Train on the fleet's dataset, export, gate, store and optionally publish one model version.

    ``datamodule`` and ``module`` override the built-in ones (e.g. a subclass that changes the data);
    ``callbacks`` run after the built-in ones. Raises ConfigError for unusable data or flags,
    BrokerConnectionError / DeliveryError when publishing fails (the version stays on disk).

    >>> result = train(TrainConfig(data="data", fleet="demo", model="digits", epochs=10))  # doctest: +SKIP
    >>> result.status, result.report["gate"]["new_accuracy"]                                # doctest: +SKIP
    ('kept', 0.98)
    """
    from lepton.protocol import load_private_key

    # Fail on a bad key before minutes of training, not after.
    private_key = load_private_key(config.key) if config.key is not None else None
    pl.seed_everything(config.seed, workers=True, verbose=False)
    registry = Registry(config.data)
    dm = datamodule or ParquetDataModule(
        config.data_config(deployed=registry.deployed(config.model, config.fleet))
    )
    info = dm.info
    model = module or make_module(info.shape, len(info.labels), module=config.module, lr=config.lr)
    best = BestWeights()
    export_cb = ExportCallback(config.export)
    registry_cb = RegistryCallback(
        config,
        export_cb,
        registry,
        extra_report={
            "training": {
                "module": config.module
                or f"lepton.cloud.Classifier({type(getattr(model, 'net', model)).__name__})",
                "epochs": config.epochs,
                "batch_size": config.batch_size,
                "lr": config.lr,
                "seed": config.seed,
            },
        },
        private_key=private_key,
    )
    cbs: list[pl.Callback] = [
        best,
        pl.callbacks.EarlyStopping(
            monitor="val_acc", mode="max", patience=config.patience, strict=False, check_finite=False
        ),
    ]
    if config.progress:
        cbs.append(pl.callbacks.TQDMProgressBar(refresh_rate=5))
    cbs += [export_cb, registry_cb, *(callbacks or [])]
    _quiet_lightning()
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        callbacks=cbs,
        deterministic=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    started = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        # Lightning prints its bars and tips to stdout; `lepton train --json` keeps stdout for the report.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*(LeafSpec|TreeSpec|isinstance\\(treespec).*")
        warnings.filterwarnings("ignore", category=UserWarning, module="pytorch_lightning.*")
        trainer.fit(model, datamodule=dm)
    elapsed = time.perf_counter() - started
    result = registry_cb.result
    if result is None:
        raise RuntimeError("training ended without a result (interrupted?)")
    training = {
        **result.report.get("training", {}),
        "time_s": round(elapsed - export_cb.seconds - registry_cb.seconds, 2),
        "export_s": round(export_cb.seconds, 2),
        "gate_store_publish_s": round(registry_cb.seconds, 2),
        "total_s": round(elapsed, 2),
        "epochs_run": trainer.current_epoch,
        "best_epoch": best.best_epoch,
        "best_val_acc_torch": best.best,
    }
    version = registry.update_report(config.model, result.version.version, training=training)
    return TrainResult(version=version, status=result.status, report=version.report)


def _quiet_lightning() -> None:
    # "GPU available: False, used: False" and similar notes are noise in a worker's log.
    for name in (
        "pytorch_lightning.utilities.rank_zero",
        "pytorch_lightning.accelerators.cuda",
        "lightning.pytorch.utilities.rank_zero",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


def report_path(result: TrainResult) -> Path:
    return result.version.path / "report.json"
