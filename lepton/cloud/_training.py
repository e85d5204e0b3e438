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

Several processes (``devices``/``num_nodes``, DDP): every rank trains, and the epoch that counts is
chosen from ``val_acc`` reduced across ranks, so every rank restores the same weights. Export, the
registry and publishing run on global rank zero only; each such step then broadcasts its outcome
(value or error) from rank zero, so every rank returns the same :class:`TrainResult`, and a failure
on rank zero is an error on every rank instead of a peer waiting forever in a collective.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from lepton.cloud._callbacks import BestWeights, ExportCallback, on_global_zero
from lepton.cloud._data import DataConfig, ParquetDataModule
from lepton.cloud._export import ExportConfig
from lepton.cloud._gate import evaluate_deployed, gate_decision
from lepton.cloud._nets import TARGETS, choose_network, make_module
from lepton.cloud._registry import ModelVersion, Registry
from lepton.errors import ConfigError, GateRefused
from lepton.protocol import DEFAULT_CHUNK_SIZE, DEFAULT_PREFIX, Topics, validate_id

log = logging.getLogger(__name__)

#: ``--strategy`` values: "auto" is one process, or DDP when there are several.
STRATEGIES = ("auto", "ddp")

__all__ = [
    "BestWeights",
    "ExportCallback",
    "RegistryCallback",
    "TrainConfig",
    "TrainResult",
    "evaluate_deployed",
    "on_global_zero",
    "train",
]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything ``lepton train`` can set. ``data`` is the dataset directory (``DIR/{fleet}/data``)."""

    data: Path
    fleet: str
    model: str
    #: publishing goes to ``{prefix}/{fleet}/models/{model}``.
    prefix: str = DEFAULT_PREFIX
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    val_fraction: float = 0.2
    patience: int = 6
    seed: int = 0
    module: str | None = None
    #: Size of the built-in network: ``edge`` (small, int8 for devices) or ``cloud`` (larger, for serve).
    target: str = "edge"
    #: Pin the pipeline to train on; None pins the deployed version's (else: the most devices' one).
    pipeline: str | None = None
    pipeline_spec: Any = None
    #: A validation set devices cannot write: Parquet file/folder in the dataset schema.
    val_data: Path | None = None
    #: Devices whose validation-side samples form the validation set (with or without ``val_data``).
    trusted_devices: tuple[str, ...] = ()
    #: No device holds more than this share of the training set (1.0: no cap).
    max_device_share: float = 0.34
    #: Label sources in precedence order (lepton/cloud/_labels.py) and the teacher-confidence floor.
    label_sources: tuple[str, ...] = ("human", "device", "teacher")
    min_teacher_confidence: float = 0.9
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
    #: Processes per node, nodes, and how they train together (Lightning's Trainer arguments).
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        validate_id(self.fleet, kind="fleet", flag="--fleet")
        Topics(fleet=self.fleet, prefix=self.prefix)  # validates the prefix too
        validate_id(self.model, kind="model", flag="--model")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.target not in TARGETS:
            raise ConfigError(f"--target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if self.tolerance_points < 0:
            raise ConfigError(f"--tolerance must be >= 0 percentage points, got {self.tolerance_points}")
        if self.publish and not self.broker:
            raise ConfigError("--publish needs --broker mqtt://user:password@host:port")
        if self.devices < 1 or self.num_nodes < 1:
            raise ConfigError(
                f"--devices {self.devices} --num-nodes {self.num_nodes}: both must be >= 1 (processes per "
                "node, nodes)"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
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
            label_sources=self.label_sources,
            min_teacher_confidence=self.min_teacher_confidence,
            val_fraction=self.val_fraction,
            batch_size=self.batch_size,
            cache_bytes=self.cache_bytes,
            seed=self.seed,
        )


@dataclass
class TrainResult:
    """What happened: ``status`` is ``published``, ``kept`` (trained, not asked to publish) or ``refused``.

    Under DDP every rank gets the same result (broadcast from global rank zero, which did the writing);
    ``global_rank`` says which process holds this copy, so only rank zero prints or acts on it.
    """

    version: ModelVersion
    status: str
    report: dict[str, Any]
    global_rank: int = 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

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


class RegistryCallback(pl.Callback):
    """Gate, store and (optionally) publish the exported model; the result is in ``.result``.

    Runs on global rank zero only, so one run allocates one version and publishes it once; the
    :class:`TrainResult` is then broadcast, and ``.result`` is the same on every rank.
    """

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
            result = on_global_zero(trainer, "gate, registry and publish", lambda: self._finish(trainer))
            if result is not None:
                result.global_rank = trainer.global_rank
            self.result = result
        finally:
            self.seconds = time.perf_counter() - started

    def _finish(self, trainer: pl.Trainer) -> TrainResult:
        cfg, exported = self.config, self.export.result
        if exported is None:
            raise RuntimeError("RegistryCallback must come after ExportCallback")
        dm: ParquetDataModule = trainer.datamodule  # type: ignore[attr-defined]  # set by fit(), undeclared
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
            "labels": info.label_sources,
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
            calibration=_manifest_calibration(exported.calibration),
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
            assert cfg.broker is not None  # TrainConfig refuses --publish without --broker
            try:
                self.registry.publish(
                    cfg.model,
                    version.version,
                    url=cfg.broker,
                    fleet=cfg.fleet,
                    prefix=cfg.prefix,
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
        return TrainResult(version=version, status=status, report=version.report)


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
    With ``devices``/``num_nodes`` above 1 it is called on every rank (Lightning's launcher starts
    the other processes with the same command) and returns the same result on each.

    Example (a dataset the ingest worker wrote under ``data/demo/data``)::

        result = train(TrainConfig(data="data", fleet="demo", model="digits", epochs=10))
        result.status, result.report["gate"]["new_accuracy"]   # ('kept', 0.98)
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
    model = module or make_module(
        info.shape, len(info.labels), module=config.module, lr=config.lr, target=config.target
    )
    net = getattr(model, "net", model)
    architecture = {
        "class": type(net).__name__,
        "target": config.target,
        "parameters": sum(p.numel() for p in model.parameters()),
        "reason": (
            choose_network(info.shape, target=config.target)[2]
            if config.module is None and module is None
            else f"user module {config.module or type(model).__name__}"
        ),
    }
    best = BestWeights()
    export_cb = ExportCallback(config.export)
    registry_cb = RegistryCallback(
        config,
        export_cb,
        registry,
        extra_report={
            "training": {
                "module": config.module or f"lepton.cloud.Classifier({type(net).__name__})",
                "architecture": architecture,
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
    several = config.devices * config.num_nodes > 1
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy="ddp" if several or config.strategy == "ddp" else "auto",
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
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "strategy": "ddp" if trainer.world_size > 1 else "single",
    }

    def finish() -> TrainResult:
        version = registry.update_report(config.model, result.version.version, training=training)
        return TrainResult(version=version, status=result.status, report=version.report)

    final = on_global_zero(trainer, "the training report", finish)
    assert final is not None
    final.global_rank = trainer.global_rank
    _end_process_group()
    return final


def _end_process_group() -> None:
    """Tear down the DDP process group while the interpreter is still whole.

    Left to interpreter exit, gloo's threads are destroyed still joinable and the C++ runtime aborts the
    rank ("terminate called without an active exception", exit -6) after a successful run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _manifest_calibration(cal: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a device needs of the calibration (T), plus the ECE figures for the operator."""
    if not cal or not cal.get("samples"):
        return None
    keep = ("method", "temperature", "samples", "ece_raw", "ece_calibrated")
    return {k: cal[k] for k in keep if cal.get(k) is not None}


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
