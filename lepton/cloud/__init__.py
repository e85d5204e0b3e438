"""The cloud side: ingest (exactly-once Parquet dataset), training, export, compression, model delivery.

Needs the ``cloud`` extra (torch, pytorch-lightning, onnx, onnxruntime, pyarrow, cryptography).
"""

__all__: list[str] = []
