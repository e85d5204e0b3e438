"""Fixtures for training/export/registry/delivery tests: a digits dataset in the ingest Parquet schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lepton.protocol import pipeline_hash

DIGITS_SPEC = {"preset": "digits", "shape": [1, 8, 8], "dtype": "float32", "scale": 1 / 16}
DIGITS_HASH = pipeline_hash(DIGITS_SPEC)


def write_dataset(root: Path, fleet: str, x: np.ndarray, labels, *, devices: int = 3,
                  pipeline: str | None = DIGITS_HASH, file_rows: int = 500, seq_start: int = 0,
                  name: str = "part") -> Path:
    """Write samples as the ingest worker does: DIR/{fleet}/data/*.parquet in the dataset schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = root / fleet / "data"
    data.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("device", pa.string()), ("seq", pa.int64()), ("ts", pa.float64()),
                        ("label", pa.string()), ("dtype", pa.string()), ("shape", pa.list_(pa.int32())),
                        ("x", pa.binary()), ("pipeline", pa.string()), ("received_at", pa.float64()),
                        ("meta", pa.string())])
    n = len(x)
    for part, start in enumerate(range(0, n, file_rows)):
        idx = range(start, min(start + file_rows, n))
        rows = {
            "device": [f"dev-{i % devices}" for i in idx],
            "seq": [seq_start + i // devices for i in idx],
            "ts": [1.7e9 + i for i in idx],
            "label": [None if labels[i] is None else str(labels[i]) for i in idx],
            "dtype": [x.dtype.name] * len(idx),
            "shape": [list(x.shape[1:])] * len(idx),
            "x": [np.ascontiguousarray(x[i]).astype(x.dtype.newbyteorder("<")).tobytes() for i in idx],
            "pipeline": [pipeline] * len(idx),
            "received_at": [1.7e9 + i + 0.1 for i in idx],
            "meta": [json.dumps({"i": i}) for i in idx],
        }
        pq.write_table(pa.table(rows, schema=schema), data / f"{name}-{part:04d}.parquet")
    return root


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, d.target


@pytest.fixture(scope="session")
def digits_arrays():
    return digits()


@pytest.fixture
def digits_dir(tmp_path, fleet, digits_arrays) -> Path:
    """DIR with the 1797 UCI digits of ``fleet`` as labelled samples of the digits pipeline."""
    x, y = digits_arrays
    return write_dataset(tmp_path / "data", fleet, x, list(y))


@pytest.fixture(scope="session")
def keypair(tmp_path_factory):
    from lepton.protocol import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory, digits_arrays):
    """One digits model trained once per session (not published): (DIR, fleet, ModelVersion).

    Read-only for the tests that share it; tests that change a registry make their own.
    """
    import uuid

    from lepton.cloud import TrainConfig, train

    fleet = f"s{uuid.uuid4().hex[:10]}"
    x, y = digits_arrays
    root = write_dataset(tmp_path_factory.mktemp("trained") / "data", fleet, x, list(y))
    result = train(TrainConfig(data=root, fleet=fleet, model="digits", epochs=6))
    return root, fleet, result.version
