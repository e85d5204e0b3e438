"""Training data: a Lightning DataModule over the fleet's Parquet dataset.

The dataset is ``{root}/{fleet}/data/*.parquet`` (files whose name starts with ``.`` are in progress
and ignored), one row per sample: ``device, seq, ts, label, dtype, shape, x, pipeline, received_at,
meta`` with ``x`` the raw little-endian C-order tensor bytes.

Which rows a model trains and is judged on (one pipeline, the trusted or hashed validation split,
the per-device cap) is decided by the I/O-free rules of :mod:`lepton.cloud._data_select`; the
settings and the report are in :mod:`lepton.cloud._data_config`. This module reads the files and
feeds those rules, in named steps (:meth:`ParquetDataModule._scan`).

Memory: a first pass reads only the small columns. The feature tensors are then cached in memory
when they fit in ``cache_bytes`` (fast epochs); otherwise every epoch streams the Parquet record
batches again through a bounded shuffle buffer, so the dataset never has to fit in memory.

Owning thread: a :class:`ParquetDataModule` (its scan, its cache, its selection) and the streaming
datasets it makes are used by the one thread that trains (Lightning's loop in the training process;
the DataLoaders run no worker processes), which is also the only thread that advances a stream's
epoch.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lepton.cloud._data_config import DataConfig, DatasetInfo, dataset_files, parquet_files
from lepton.cloud._data_select import (
    META_COLUMNS,
    Census,
    Choice,
    Selection,
    SplitCounts,
    apply_cap,
    choose,
    split_sizes,
    validation_report,
)
from lepton.cloud._labels import LabelResolver, LabelStore
from lepton.errors import ConfigError

log = logging.getLogger(__name__)

# DataConfig and DatasetInfo are re-exported: lepton.cloud._training imports them from here.
__all__ = ["DataConfig", "DatasetInfo", "ParquetDataModule"]

LABEL_SOURCES_ALL = ("human", "device", "teacher")


def _pq():
    import pyarrow.parquet as pq

    return pq


class _Rows:
    """Row iteration over record batches, with the selection rules applied.

    With a ``resolver`` (fleet rows), the ``label`` column is the label the sample trains with, by
    source precedence, and a ``label_source`` column says where it came from; without one (a trusted
    validation file) the files' labels are used as they are.
    """

    def __init__(self, files: list[Path], *, read_rows: int, resolver: LabelResolver | None = None) -> None:
        self.files = files
        self.read_rows = read_rows
        self.resolver = resolver
        # Nothing to overlay: the device labels stand, and the per-row pass is skipped.
        self._plain = resolver is None or (not len(resolver) and "device" in resolver.sources)

    def _relabel(self, cols: dict[str, list]) -> None:
        labels = cols["label"]
        if self._plain:
            if self.resolver is not None:
                cols["label_source"] = ["device" if v is not None else None for v in labels]
            return
        assert self.resolver is not None  # without one, _plain is True
        resolve = self.resolver.resolve
        out = [resolve(d, q, v) for d, q, v in zip(cols["device"], cols["seq"], labels, strict=True)]
        cols["label"] = [lab for lab, _ in out]
        cols["label_source"] = [src for _, src in out]

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
                if "label" in cols and "device" in cols and "seq" in cols:
                    self._relabel(cols)
                yield cols


class _StreamDataset(IterableDataset):
    """Streams one split from Parquet each epoch; shuffles through a bounded buffer."""

    def __init__(
        self, rows: _Rows, selection: Selection, split: str, *, shuffle_buffer: int, seed: int
    ) -> None:
        self.rows, self.selection, self.split = rows, selection, split
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0

    def __iter__(self):
        source = self.selection.iter_split(self.split)
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

    Example (the demo's digits, ingested under ``data/demo/data``)::

        dm = ParquetDataModule(DataConfig(root="data", fleet="demo"))
        dm.info.labels, dm.info.shape   # (('0', '1', ..., '9'), (1, 8, 8))
    """

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        self.config = config
        self._info: DatasetInfo | None = None
        self._selection: Selection | None = None
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
        """The first pass: count what is there, choose what to train on, split, cap and report."""
        cfg = self.config
        self._rows = rows = self._fleet_rows()
        census = Census()
        for cols in rows.batches(META_COLUMNS):
            census.add(cols)
        choice = choose(census, cfg)
        val_rows = (
            _Rows(parquet_files(cfg.val_data), read_rows=cfg.read_rows) if cfg.val_data is not None else None
        )
        sel = self._selection = Selection(
            pipeline=choice.pipeline,
            dtype=choice.dtype,
            shape=choice.shape,
            label_index={lab: i for i, lab in enumerate(choice.labels)},
            val_fraction=cfg.val_fraction,
            rows=rows,
            val_rows=val_rows,
            trusted=frozenset(cfg.trusted_devices),
        )
        validation: dict[str, Any] = {"trusted": cfg.trusted}
        n_trusted_file = self._scan_val_data(val_rows, sel, validation) if val_rows is not None else 0
        # Second small pass over the keys only: sides, per-device counts, cap ranks.
        counts = SplitCounts(sel)
        for cols in rows.batches(META_COLUMNS):
            counts.add(cols)
        devices = apply_cap(sel, counts.capped, counts.sides, cfg.max_device_share)
        n_train, n_val = split_sizes(devices, counts.trusted_val, from_file=n_trusted_file)
        validation_report(cfg, validation, samples=n_val, from_file=n_trusted_file)
        if n_train == 0 or n_val == 0:
            where, pipeline = validation["source"], choice.pipeline
            raise ConfigError(
                f"{n_train} training and {n_val} validation samples ({where}) of pipeline {pipeline!r}: "
                "too few to train; collect more data"
                + (" or trust more devices" if cfg.trusted_devices else "")
            )
        self._info = info = self._report(census, choice, counts, devices, validation, n_train=n_train,
                                         n_val=n_val, overlap=len(sel.exclude))
        self._log_report(info)
        feature_bytes = (n_train + n_val) * math.prod(choice.shape) * 4
        if feature_bytes <= cfg.cache_bytes:
            self._cache = {split: self._materialize(split) for split in ("train", "val")}

    def _fleet_rows(self) -> _Rows:
        """The fleet's visible files, read with the late labels resolved by source precedence."""
        cfg = self.config
        files = dataset_files(cfg.root, cfg.fleet)
        if not files:
            raise ConfigError(
                f"no Parquet files under {cfg.root / cfg.fleet / 'data'}; check --data and --fleet "
                "(the ingest worker writes DIR/FLEET/data/*.parquet)"
            )
        store = LabelStore(cfg.root, cfg.fleet)
        resolver = store.resolver(cfg.label_sources, min_teacher_confidence=cfg.min_teacher_confidence)
        return _Rows(files, read_rows=cfg.read_rows, resolver=resolver)

    def _report(
        self,
        census: Census,
        choice: Choice,
        counts: SplitCounts,
        devices: dict[str, Any],
        validation: dict[str, Any],
        *,
        n_train: int,
        n_val: int,
        overlap: int,
    ) -> DatasetInfo:
        cfg = self.config
        assert self._rows is not None and self._rows.resolver is not None  # fleet rows have one
        resolver = self._rows.resolver
        pipeline, dtype, shape = choice.pipeline, choice.dtype, choice.shape
        return DatasetInfo(
            pipeline=pipeline,
            dtype=dtype,
            shape=tuple(shape),
            labels=choice.labels,
            files=len(self._rows.files),
            rows=census.rows,
            train_samples=n_train,
            val_samples=n_val,
            unlabelled=census.unlabelled,
            other_pipelines=sum(n for p, n in census.pipelines.items() if p != pipeline),
            other_shapes=sum(
                n for k, n in census.kinds.items() if k[0] == pipeline and k[1:] != (dtype, shape)
            ),
            unknown_labels=counts.unknown,
            pipelines={str(p): n for p, n in census.pipelines.items()},
            class_counts={lab: choice.present.get(lab, 0) for lab in choice.labels},
            pipeline_pinned_by=choice.pinned_by,
            validation=validation,
            devices={**devices, "val_data_overlap_left_out": overlap},
            label_sources={
                "precedence": list(cfg.label_sources),
                "min_teacher_confidence": cfg.min_teacher_confidence,
                "rows": {s: census.sources.get(s, 0) for s in LABEL_SOURCES_ALL},
                "late_labels": len(resolver),
                "ignored": dict(resolver.ignored),
            },
        )

    def _log_report(self, info: DatasetInfo) -> None:
        cfg = self.config
        if not cfg.trusted:
            log.warning("dataset %s/%s: %s", cfg.root, cfg.fleet, info.validation["warning"])
        if info.devices["dropped"]:
            log.warning(
                "dataset %s/%s: %d training samples dropped so no device holds more than %.0f%%",
                cfg.root,
                cfg.fleet,
                info.devices["dropped"],
                100 * info.devices["effective_share"],
            )
        log.info(
            "dataset %s/%s: pipeline %s (%s), shape %s, %d train / %d val (%s), %d other pipelines, "
            "%d unlabelled",
            cfg.root,
            cfg.fleet,
            info.pipeline,
            info.pipeline_pinned_by,
            info.shape,
            info.train_samples,
            info.val_samples,
            info.validation["source"],
            info.other_pipelines,
            info.unlabelled,
        )

    def _scan_val_data(self, val_rows: _Rows, sel: Selection, validation: dict[str, Any]) -> int:
        """Count the trusted file's usable rows; remember their (device, seq) to keep the fleet's copy out."""
        cfg = self.config
        n = unknown = other = 0
        seen: Counter = Counter()
        for cols in val_rows.batches(META_COLUMNS):
            for i in range(len(cols["label"])):
                if cols["label"][i] is None:
                    continue
                if sel.index_of(cols, i) is None:
                    if cols["pipeline"][i] == sel.pipeline and str(cols["label"][i]) not in sel.label_index:
                        unknown += 1
                    else:
                        other += 1
                        seen[cols["pipeline"][i]] += 1
                    continue
                n += 1
                if cols["device"][i] is not None and cols["seq"][i] is not None:
                    sel.exclude.add((cols["device"][i], cols["seq"][i]))
        if n == 0:
            found = ", ".join(f"{p} ({k})" for p, k in seen.most_common(5)) or "no labelled rows"
            raise ConfigError(
                f"--val-data {cfg.val_data}: no labelled samples of pipeline {sel.pipeline!r} with dtype "
                f"{sel.dtype} and shape {sel.shape} (it has: {found}); give samples of the model's pipeline"
            )
        validation.update(
            path=str(cfg.val_data), val_data_samples=n, val_data_unknown_labels=unknown, val_data_other=other
        )
        return n

    def _materialize(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        assert self._selection is not None and self._rows is not None
        xs, ys = [], []
        for x, y in self._selection.iter_split(split):
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
            tensors = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
            gen = torch.Generator().manual_seed(self.config.seed)
            return DataLoader(tensors, batch_size=bs, shuffle=split == "train", generator=gen)
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
        for x1, y1 in self._selection.iter_split(split):
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
