"""Training data: a Lightning DataModule over the fleet's Parquet dataset.

The dataset is ``{root}/{fleet}/data/*.parquet`` (files whose name starts with ``.`` are in progress
and ignored), one row per sample: ``device, seq, ts, label, dtype, shape, x, pipeline, received_at,
meta`` with ``x`` the raw little-endian C-order tensor bytes.

One model is trained on one preprocessing pipeline: samples of other pipelines, unlabelled samples
and samples whose shape/dtype differ from the pipeline's majority are left out and counted.

The train/validation split is a hash of ``(device, seq)``: a sample lands on the same side in every
retrain, so a validation sample never becomes training data later and accuracies of successive
versions are comparable on the same validation set. (Keep ``val_fraction`` fixed across retrains:
raising it moves former training samples into validation, which flatters the deployed model and
makes the gate stricter; lowering it is harmless.)

Memory: a first pass reads only the small columns. The feature tensors are then cached in memory
when they fit in ``cache_bytes`` (fast epochs); otherwise every epoch streams the Parquet record
batches again through a bounded shuffle buffer, so the dataset never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lepton.errors import ConfigError
from lepton.protocol import DTYPES, validate_id

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "DatasetInfo", "ParquetDataModule", "dataset_files", "is_validation", "sort_labels"]

META_COLUMNS = ["device", "seq", "label", "pipeline", "dtype", "shape"]
_SCALE = float(2**64)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the data is and how to split and batch it.

    ``pipeline`` selects the pipeline hash to train on (default: the one with most labelled samples).
    ``labels`` fixes the class list (default: every label of the selected samples, sorted).
    """

    root: Path
    fleet: str
    pipeline: str | None = None
    labels: tuple[str, ...] | None = None
    val_fraction: float = 0.2
    batch_size: int = 64
    cache_bytes: int = 256 * 1024 * 1024
    shuffle_buffer: int = 8192
    read_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        validate_id(self.fleet, kind="fleet")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")


@dataclass
class DatasetInfo:
    """What the first pass found; kept in the training report."""

    pipeline: str | None
    dtype: str
    shape: tuple[int, ...]
    labels: tuple[str, ...]
    files: int
    rows: int
    train_samples: int
    val_samples: int
    unlabelled: int
    other_pipelines: int
    other_shapes: int
    unknown_labels: int
    pipelines: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["shape"] = list(self.shape)
        d["labels"] = list(self.labels)
        return d


def dataset_files(root: str | Path, fleet: str) -> list[Path]:
    """The fleet's visible Parquet files, oldest first (the ingest side's :meth:`Dataset.files`, which
    also hides the sources of a compaction that is still finishing, so no sample is read twice)."""
    from lepton.cloud._dataset import Dataset

    return list(Dataset(root, validate_id(fleet, kind="fleet")).files())


def is_validation(device: str, seq: int, val_fraction: float) -> bool:
    """The deterministic split: a hash of (device, seq), the same in every retrain and process."""
    digest = hashlib.blake2b(f"{device}\x00{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE < val_fraction


def sort_labels(labels) -> tuple[str, ...]:  # noqa: ANN001
    """Sort class names; decimal integer names sort numerically ("2" before "10")."""
    names = {str(x) for x in labels}
    if all(n.lstrip("-").isdigit() for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _pq():
    import pyarrow.parquet as pq

    return pq


class _Rows:
    """Row iteration over record batches, with the selection rules applied."""

    def __init__(self, files: list[Path], *, read_rows: int) -> None:
        self.files = files
        self.read_rows = read_rows

    def batches(self, columns: list[str]) -> Iterator[dict[str, list]]:
        pq = _pq()
        for path in self.files:
            try:
                pf = pq.ParquetFile(path)
            except FileNotFoundError:
                # Compaction replaced the file after we listed it; its rows live in the new file,
                # which the next retrain picks up.
                log.warning("dataset file %s vanished while reading; skipped", path)
                continue
            present = [c for c in columns if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=self.read_rows, columns=present):
                cols = {name: batch.column(name).to_pylist() for name in present if name != "x"}
                if "x" in present:
                    cols["x"] = batch.column("x")
                for name in columns:
                    cols.setdefault(name, [None] * batch.num_rows)
                yield cols


class _Selection:
    """Which rows a model uses: pipeline, shape, dtype, known label; which side of the split."""

    def __init__(
        self,
        *,
        pipeline: str | None,
        dtype: str,
        shape: tuple[int, ...],
        label_index: dict[str, int],
        val_fraction: float,
    ) -> None:
        self.pipeline, self.dtype, self.shape = pipeline, dtype, list(shape)
        self.label_index = label_index
        self.val_fraction = val_fraction
        self.np_dtype = DTYPES[dtype]

    def iter_split(self, rows: _Rows, split: str) -> Iterator[tuple[np.ndarray, int]]:
        want_val = split == "val"
        for cols in rows.batches(META_COLUMNS + ["x"]):
            xs = cols["x"]
            for i, label in enumerate(cols["label"]):
                if label is None or cols["pipeline"][i] != self.pipeline:
                    continue
                if cols["dtype"][i] != self.dtype or list(cols["shape"][i] or []) != self.shape:
                    continue
                index = self.label_index.get(str(label))
                if index is None:
                    continue
                if is_validation(cols["device"][i], cols["seq"][i], self.val_fraction) != want_val:
                    continue
                try:
                    x = (
                        np.frombuffer(xs[i].as_py(), dtype=self.np_dtype)
                        .reshape(self.shape)
                        .astype(np.float32)
                    )
                except (ValueError, TypeError):  # bytes do not fit dtype x shape: skip, never crash training
                    log.warning(
                        "sample %s/%s: x does not hold %s %s; skipped",
                        cols["device"][i],
                        cols["seq"][i],
                        self.dtype,
                        self.shape,
                    )
                    continue
                yield x, index


class _StreamDataset(IterableDataset):
    """Streams one split from Parquet each epoch; shuffles through a bounded buffer."""

    def __init__(
        self, rows: _Rows, selection: _Selection, split: str, *, shuffle_buffer: int, seed: int
    ) -> None:
        self.rows, self.selection, self.split = rows, selection, split
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0

    def __iter__(self):
        source = self.selection.iter_split(self.rows, self.split)
        if self.split == "val" or self.shuffle_buffer <= 1:
            for x, y in source:
                yield torch.from_numpy(x), y
            return
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        buffer: list[tuple[np.ndarray, int]] = []
        for item in source:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = int(rng.integers(len(buffer)))
            out, buffer[j] = buffer[j], item
            yield torch.from_numpy(out[0]), out[1]
        rng.shuffle(buffer)
        for x, y in buffer:
            yield torch.from_numpy(x), y


class ParquetDataModule(pl.LightningDataModule):
    """Batches ``(x float32 [B, *shape], y int64 [B])`` of one pipeline's labelled samples.

    >>> dm = ParquetDataModule(DataConfig(root="data", fleet="demo"))   # doctest: +SKIP
    >>> dm.info.labels, dm.info.shape                                   # doctest: +SKIP
    (('0', '1', ..., '9'), (1, 8, 8))
    """

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        self.config = config
        self._info: DatasetInfo | None = None
        self._selection: _Selection | None = None
        self._rows: _Rows | None = None
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    # -- first pass ---------------------------------------------------------------------------------
    @property
    def info(self) -> DatasetInfo:
        if self._info is None:
            self._scan()
        assert self._info is not None
        return self._info

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.info.shape

    def _scan(self) -> None:
        cfg = self.config
        files = dataset_files(cfg.root, cfg.fleet)
        if not files:
            raise ConfigError(
                f"no Parquet files under {cfg.root / cfg.fleet / 'data'}; check --data and --fleet "
                "(the ingest worker writes DIR/FLEET/data/*.parquet)"
            )
        self._rows = _Rows(files, read_rows=cfg.read_rows)
        rows = unlabelled = 0
        pipelines: Counter = Counter()
        kinds: Counter = Counter()  # (pipeline, dtype, shape) of labelled rows
        label_counts: Counter = Counter()
        for cols in self._rows.batches(META_COLUMNS):
            for i, label in enumerate(cols["label"]):
                rows += 1
                if label is None:
                    unlabelled += 1
                    continue
                p = cols["pipeline"][i]
                pipelines[p] += 1
                kinds[(p, cols["dtype"][i], tuple(cols["shape"][i] or ()))] += 1
                label_counts[(p, str(label))] += 1
        if not pipelines:
            raise ConfigError(
                f"no labelled samples for fleet {cfg.fleet!r} under {cfg.root} ({rows} rows, "
                f"{unlabelled} unlabelled); devices must send labels to train on"
            )
        pipeline = cfg.pipeline
        if pipeline is None:
            pipeline = max(pipelines, key=lambda p: (pipelines[p], p or ""))
        elif pipeline not in pipelines:
            known = ", ".join(str(p) for p in pipelines)
            raise ConfigError(f"no labelled samples of pipeline {pipeline!r}; the dataset has: {known}")
        same = {k: n for k, n in kinds.items() if k[0] == pipeline}
        _, dtype, shape = max(same, key=lambda k: same[k])
        if dtype not in DTYPES:
            raise ConfigError(
                f"samples of pipeline {pipeline!r} have dtype {dtype!r}, not one of {sorted(DTYPES)}"
            )
        if not shape:
            raise ConfigError(
                f"samples of pipeline {pipeline!r} are scalars; a model needs at least 1-D features"
            )
        present = {lab: n for (p, lab), n in label_counts.items() if p == pipeline}
        labels = tuple(cfg.labels) if cfg.labels is not None else sort_labels(present)
        if len(labels) < 2:
            raise ConfigError(
                f"pipeline {pipeline!r} has only the label(s) {list(labels)}; need at least two classes"
            )
        index = {lab: i for i, lab in enumerate(labels)}
        self._selection = _Selection(
            pipeline=pipeline, dtype=dtype, shape=shape, label_index=index, val_fraction=cfg.val_fraction
        )
        # Second small pass over the keys only: split sizes of the selected rows.
        n_train = n_val = unknown = 0
        for cols in self._rows.batches(META_COLUMNS):
            for i, label in enumerate(cols["label"]):
                if label is None or cols["pipeline"][i] != pipeline or cols["dtype"][i] != dtype:
                    continue
                if tuple(cols["shape"][i] or ()) != shape:
                    continue
                if str(label) not in index:
                    unknown += 1
                elif is_validation(cols["device"][i], cols["seq"][i], cfg.val_fraction):
                    n_val += 1
                else:
                    n_train += 1
        if n_train == 0 or n_val == 0:
            raise ConfigError(
                f"{n_train} training and {n_val} validation samples: too few labelled samples "
                f"of pipeline {pipeline!r} to train; collect more data"
            )
        self._info = DatasetInfo(
            pipeline=pipeline,
            dtype=dtype,
            shape=tuple(shape),
            labels=labels,
            files=len(files),
            rows=rows,
            train_samples=n_train,
            val_samples=n_val,
            unlabelled=unlabelled,
            other_pipelines=sum(n for p, n in pipelines.items() if p != pipeline),
            other_shapes=sum(n for k, n in kinds.items() if k[0] == pipeline and k[1:] != (dtype, shape)),
            unknown_labels=unknown,
            pipelines={str(p): n for p, n in pipelines.items()},
            class_counts={lab: present.get(lab, 0) for lab in labels},
        )
        log.info(
            "dataset %s/%s: pipeline %s, shape %s, %d train / %d val, %d other pipelines, %d unlabelled",
            cfg.root,
            cfg.fleet,
            pipeline,
            shape,
            n_train,
            n_val,
            self._info.other_pipelines,
            unlabelled,
        )
        feature_bytes = (n_train + n_val) * math.prod(shape) * 4
        if feature_bytes <= cfg.cache_bytes:
            self._cache = {split: self._materialize(split) for split in ("train", "val")}

    def _materialize(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        assert self._selection is not None and self._rows is not None
        xs, ys = [], []
        for x, y in self._selection.iter_split(self._rows, split):
            xs.append(x)
            ys.append(y)
        empty = np.zeros((0, *self._selection.shape), np.float32)
        return (np.stack(xs) if xs else empty), np.asarray(ys, dtype=np.int64)

    @property
    def cached(self) -> bool:
        _ = self.info
        return self._cache is not None

    # -- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        _ = self.info

    def _loader(self, split: str, *, batch_size: int | None = None) -> DataLoader:
        bs = batch_size or self.config.batch_size
        _ = self.info
        if self._cache is not None:
            x, y = self._cache[split]
            ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
            gen = torch.Generator().manual_seed(self.config.seed)
            return DataLoader(ds, batch_size=bs, shuffle=split == "train", generator=gen)
        assert self._rows is not None and self._selection is not None
        ds = _StreamDataset(
            self._rows,
            self._selection,
            split,
            shuffle_buffer=self.config.shuffle_buffer,
            seed=self.config.seed,
        )
        return DataLoader(ds, batch_size=bs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    # -- numpy access for export, calibration and the gate -------------------------------------------
    def iter_numpy(
        self, split: str, *, batch_size: int = 256, limit: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(x, y)`` numpy batches of a split in a stable order (no shuffling)."""
        _ = self.info
        seen = 0
        if self._cache is not None:
            x, y = self._cache[split]
            stop = len(x) if limit is None else min(limit, len(x))
            for i in range(0, stop, batch_size):
                j = min(i + batch_size, stop)
                yield x[i:j], y[i:j]
            return
        assert self._rows is not None and self._selection is not None
        xs: list[np.ndarray] = []
        ys: list[int] = []
        for x1, y1 in self._selection.iter_split(self._rows, split):
            if limit is not None and seen >= limit:
                break
            xs.append(x1)
            ys.append(y1)
            seen += 1
            if len(xs) == batch_size:
                yield np.stack(xs), np.asarray(ys, dtype=np.int64)
                xs, ys = [], []
        if xs:
            yield np.stack(xs), np.asarray(ys, dtype=np.int64)
