"""The cloud side: ingest (exactly-once Parquet dataset), training, export, compression, model delivery.

Needs the ``cloud`` extra (torch, pytorch-lightning, onnx, onnxruntime, pyarrow, cryptography).

Every name is imported on first use (``lepton.cloud.train`` imports torch then, not ``import
lepton.cloud``). The ``TYPE_CHECKING`` block below names the same objects for IDEs and type
checkers; ``tests/cloud/test_api.py`` keeps it equal to ``__all__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lepton.cloud._data import ParquetDataModule
    from lepton.cloud._data_config import DataConfig, DatasetInfo
    from lepton.cloud._dataset import (
        SCHEMA,
        Dataset,
        decode_x,
        raw_sample_rows,
        samples_to_table,
        write_parquet_atomic,
    )
    from lepton.cloud._delivery import PublishResult, fetch_model, publish_package
    from lepton.cloud._export import (
        ExportConfig,
        ExportResult,
        export_and_compress,
        export_onnx,
        quantize_int8,
    )
    from lepton.cloud._index import SampleIndex, SqliteIndex, compact, open_index
    from lepton.cloud._index_pg import PostgresIndex
    from lepton.cloud._serve import ServeWorker
    from lepton.cloud._serve_config import ServeConfig
    from lepton.cloud._ingest import IngestWorker
    from lepton.cloud._ingest_config import WorkerConfig
    from lepton.cloud._nets import MLP, Classifier, SmallCNN, build_network
    from lepton.cloud._registry import ModelVersion, Registry
    from lepton.cloud._callbacks import BestWeights, ExportCallback, on_global_zero
    from lepton.cloud._training import RegistryCallback, TrainConfig, TrainResult, train
    from lepton.errors import DeliveryError, ExportError

# Training, export, registry and delivery pull in torch, Lightning and ONNX Runtime, which the ingest
# worker does not need at start-up; the dataset and ingest names are lazy as well, so
# `import lepton.cloud` stays cheap. Name -> module that defines it.
_LAZY = {
    # training, export, registry, delivery (issue 5)
    "Classifier": "lepton.cloud._nets", "MLP": "lepton.cloud._nets", "SmallCNN": "lepton.cloud._nets",
    "build_network": "lepton.cloud._nets",
    "DataConfig": "lepton.cloud._data_config", "DatasetInfo": "lepton.cloud._data_config",
    "ParquetDataModule": "lepton.cloud._data",
    "ExportConfig": "lepton.cloud._export", "ExportError": "lepton.errors",
    "ExportResult": "lepton.cloud._export", "export_and_compress": "lepton.cloud._export",
    "export_onnx": "lepton.cloud._export", "quantize_int8": "lepton.cloud._export",
    "ModelVersion": "lepton.cloud._registry", "Registry": "lepton.cloud._registry",
    "DeliveryError": "lepton.errors", "PublishResult": "lepton.cloud._delivery",
    "fetch_model": "lepton.cloud._delivery", "publish_package": "lepton.cloud._delivery",
    "BestWeights": "lepton.cloud._callbacks", "ExportCallback": "lepton.cloud._callbacks",
    "RegistryCallback": "lepton.cloud._training", "TrainConfig": "lepton.cloud._training",
    "TrainResult": "lepton.cloud._training", "on_global_zero": "lepton.cloud._callbacks",
    "train": "lepton.cloud._training",
    # dataset and ingest worker (issue 4)
    "SCHEMA": "lepton.cloud._dataset", "Dataset": "lepton.cloud._dataset",
    "decode_x": "lepton.cloud._dataset", "raw_sample_rows": "lepton.cloud._dataset",
    "samples_to_table": "lepton.cloud._dataset", "write_parquet_atomic": "lepton.cloud._dataset",
    "IngestWorker": "lepton.cloud._ingest", "WorkerConfig": "lepton.cloud._ingest_config",
    "SampleIndex": "lepton.cloud._index", "SqliteIndex": "lepton.cloud._index",
    "compact": "lepton.cloud._index", "open_index": "lepton.cloud._index",
    "PostgresIndex": "lepton.cloud._index_pg",
    # joint inference: the serve worker answering escalated samples (lepton serve)
    "ServeConfig": "lepton.cloud._serve_config", "ServeWorker": "lepton.cloud._serve",
}

# A literal, so type checkers and linters read it; equal to _LAZY's keys (tests/cloud/test_api.py).
__all__ = [
    "BestWeights",
    "Classifier",
    "DataConfig",
    "Dataset",
    "DatasetInfo",
    "DeliveryError",
    "ExportCallback",
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "IngestWorker",
    "MLP",
    "ModelVersion",
    "ParquetDataModule",
    "PostgresIndex",
    "PublishResult",
    "Registry",
    "RegistryCallback",
    "SCHEMA",
    "SampleIndex",
    "ServeConfig",
    "ServeWorker",
    "SmallCNN",
    "SqliteIndex",
    "TrainConfig",
    "TrainResult",
    "WorkerConfig",
    "build_network",
    "compact",
    "decode_x",
    "export_and_compress",
    "export_onnx",
    "fetch_model",
    "on_global_zero",
    "open_index",
    "publish_package",
    "quantize_int8",
    "raw_sample_rows",
    "samples_to_table",
    "train",
    "write_parquet_atomic",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lepton.cloud' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
