"""The cloud side: ingest (exactly-once Parquet dataset), training, export, compression, model delivery.

Needs the ``cloud`` extra (torch, pytorch-lightning, onnx, onnxruntime, pyarrow, cryptography).
"""

__all__: list[str] = []

# Training, export, registry and delivery (issue 5). Imported lazily: they pull in torch, Lightning
# and ONNX Runtime, which the ingest worker does not need at start-up.
_TRAINING_API = {
    "Classifier": "lepton.cloud._nets", "MLP": "lepton.cloud._nets", "SmallCNN": "lepton.cloud._nets",
    "build_network": "lepton.cloud._nets",
    "DataConfig": "lepton.cloud._data", "DatasetInfo": "lepton.cloud._data",
    "ParquetDataModule": "lepton.cloud._data",
    "ExportConfig": "lepton.cloud._export", "ExportError": "lepton.errors",
    "ExportResult": "lepton.cloud._export", "export_and_compress": "lepton.cloud._export",
    "export_onnx": "lepton.cloud._export", "quantize_int8": "lepton.cloud._export",
    "ModelVersion": "lepton.cloud._registry", "Registry": "lepton.cloud._registry",
    "DeliveryError": "lepton.errors", "PublishResult": "lepton.cloud._delivery",
    "fetch_model": "lepton.cloud._delivery", "publish_package": "lepton.cloud._delivery",
    "BestWeights": "lepton.cloud._training", "ExportCallback": "lepton.cloud._training",
    "RegistryCallback": "lepton.cloud._training", "TrainConfig": "lepton.cloud._training",
    "TrainResult": "lepton.cloud._training", "train": "lepton.cloud._training",
}
__all__ += sorted(_TRAINING_API)

# Dataset and ingest worker (issue 4); lazy as well so `import lepton.cloud` stays cheap.
_INGEST_API = {
    "SCHEMA": "lepton.cloud._dataset", "Dataset": "lepton.cloud._dataset",
    "decode_x": "lepton.cloud._dataset", "raw_sample_rows": "lepton.cloud._dataset",
    "samples_to_table": "lepton.cloud._dataset", "write_parquet_atomic": "lepton.cloud._dataset",
    "IngestWorker": "lepton.cloud._ingest", "WorkerConfig": "lepton.cloud._ingest",
    "SampleIndex": "lepton.cloud._index", "SqliteIndex": "lepton.cloud._index",
    "compact": "lepton.cloud._index",
}
__all__ += sorted(_INGEST_API)


def __getattr__(name: str):
    module = _TRAINING_API.get(name) or _INGEST_API.get(name)
    if module is None:
        raise AttributeError(f"module 'lepton.cloud' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
