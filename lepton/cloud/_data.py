"""Training data: a Lightning DataModule over the fleet's Parquet dataset.

The dataset is ``{root}/{fleet}/data/*.parquet`` (files whose name starts with ``.`` are in progress
and ignored), one row per sample: ``device, seq, ts, label, dtype, shape, x, pipeline, received_at,
meta`` with ``x`` the raw little-endian C-order tensor bytes.

One model is trained on one preprocessing pipeline: samples of other pipelines, unlabelled samples
and samples whose shape/dtype differ from the pipeline's majority are left out and counted. The
pipeline is the pinned one (``pin_pipeline``: the deployed model's, or the operator's), else the one
sent by the most devices (then most samples), so one device inventing a pipeline cannot take over.

Validation (the set the gate and the best-epoch choice are judged on) comes from a source devices
cannot write when there is one: ``val_data`` (Parquet files in the dataset schema, e.g. samples
labelled by a person) and/or the validation side of ``trusted_devices``. Without either it is the
fleet's own split (``trusted: false`` in the report): a device that sends wrong labels then poisons
the yardstick as well as the training data.

No device dominates: each device keeps at most ``max_device_share`` of the untrusted samples (the
training set, plus the validation set when it is the fleet split, as one pool); the excess is
dropped by a stable hash of ``(device, seq)``, so
the same samples are dropped in every retrain. With fewer than ``1 / max_device_share`` devices the
cap is an equal share (``1 / devices``).

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
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lepton.cloud._labels import DEFAULT_LABEL_SOURCES, LabelResolver, LabelStore, parse_label_sources
from lepton.errors import ConfigError
from lepton.protocol import DTYPES, validate_id

log = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "DatasetInfo",
    "ParquetDataModule",
    "dataset_files",
    "device_caps",
    "is_validation",
    "parquet_files",
    "sort_labels",
]

META_COLUMNS = ["device", "seq", "label", "pipeline", "dtype", "shape"]
LABEL_SOURCES_ALL = ("human", "device", "teacher")
_SCALE = float(2**64)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the data is and how to split and batch it.

    ``pipeline`` selects the pipeline hash to train on; with ``pin_pipeline`` it is used even when
    None (samples without a pipeline hash), else None means the pipeline sent by most devices.
    ``labels`` fixes the class list (default: every label of the selected samples, sorted).
    ``val_data`` / ``trusted_devices`` give a validation set devices cannot write (see the module
    docstring); ``max_device_share`` caps each device's share of the training set (1.0: no cap).
    """

    root: Path
    fleet: str
    pipeline: str | None = None
    pin_pipeline: bool = False
    pinned_by: str | None = None
    val_data: Path | None = None
    trusted_devices: tuple[str, ...] = ()
    max_device_share: float = 0.34
    labels: tuple[str, ...] | None = None
    #: Label sources in precedence order (lepton/cloud/_labels.py): human, device, teacher.
    label_sources: tuple[str, ...] = DEFAULT_LABEL_SOURCES
    #: Teacher (cloud model) labels below this confidence are not trained on.
    min_teacher_confidence: float = 0.9
    val_fraction: float = 0.2
    batch_size: int = 64
    cache_bytes: int = 256 * 1024 * 1024
    shuffle_buffer: int = 8192
    read_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        validate_id(self.fleet, kind="fleet", flag="--fleet")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.max_device_share <= 1.0:
            raise ConfigError(
                f"--max-device-share must be a fraction in (0, 1], got {self.max_device_share}; "
                "e.g. 0.34 (1 turns the cap off)"
            )
        if self.pipeline is not None:
            object.__setattr__(self, "pin_pipeline", True)
        object.__setattr__(self, "trusted_devices", tuple(self.trusted_devices))
        object.__setattr__(self, "label_sources", parse_label_sources(self.label_sources))
        if not 0.0 <= self.min_teacher_confidence <= 1.0:
            raise ConfigError(
                f"--min-teacher-confidence must be in [0, 1], got {self.min_teacher_confidence}"
            )
        for device in self.trusted_devices:
            try:
                validate_id(device, kind="device")
            except ValueError:
                raise ConfigError(
                    f"--trusted-devices: {device!r} is not a device id; give ids separated by commas"
                ) from None
        if self.val_data is not None:
            object.__setattr__(self, "val_data", Path(self.val_data))
            parquet_files(self.val_data)  # fail on a bad path now, before a long scan

    @property
    def trusted(self) -> bool:
        return self.val_data is not None or bool(self.trusted_devices)


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
    pipeline_pinned_by: str = "devices"
    #: Where the validation set came from: ``{"source", "trusted", "samples", ...}``.
    validation: dict[str, Any] = field(default_factory=dict)
    #: The per-device cap: ``{"max_share", "effective_share", "dropped", "per_device": {...}}``.
    devices: dict[str, Any] = field(default_factory=dict)
    #: Where the labels came from: precedence, labelled rows per source, late labels ignored.
    label_sources: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d.pop("validation")
        d.pop("devices")
        d.pop("label_sources")
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


def _cap_rank(device: str, seq: int) -> float:
    # A second, independent hash: which of a capped device's samples are dropped (stable across retrains).
    digest = hashlib.blake2b(f"cap\x00{device}\x00{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def device_caps(counts: dict[str, int], max_share: float) -> tuple[dict[str, int], float]:
    """How many samples each device may keep so none holds more than ``max_share`` of the result.

    Returns ``(keep, share)``: ``keep[d] = min(counts[d], L)`` for the largest water level ``L`` with
    ``L <= share * sum(keep)``, where ``share = max(max_share, 1 / len(counts))`` (with fewer than
    ``1 / max_share`` devices no cap can hold, so each device gets an equal share).

    >>> device_caps({"a": 600, "b": 600, "c": 600, "poison": 1800}, 0.34)[0]["poison"]
    927
    """
    if not counts:
        return {}, max_share
    share = max(max_share, 1.0 / len(counts))
    if share >= 1.0:
        return dict(counts), 1.0
    lo, hi = 0, max(counts.values())
    # share * sum(min(c, L)) - L is concave with value 0 at L = 0, so the feasible L form one interval.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid <= share * sum(min(c, mid) for c in counts.values()) + 1e-9:
            lo = mid
        else:
            hi = mid - 1
    return {d: min(c, lo) for d, c in counts.items()}, share


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of ``--val-data``: one file, or a folder's ``*.parquet`` (hidden names skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
        if files:
            return files
        raise ConfigError(
            f"--val-data {path}: no *.parquet files in that folder; give a Parquet file or a folder "
            "of them in the dataset schema (docs/dataset.md)"
        )
    raise ConfigError(
        f"--val-data {path} not found; give a Parquet file or folder in the dataset schema (docs/dataset.md)"
    )


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


class _Selection:
    """Which rows a model uses (pipeline, shape, dtype, known label), which side of the split each
    fleet row is on, and which rows the per-device cap drops.

    Validation rows come from ``val_rows`` (all of them: a trusted file) and/or the validation side
    of ``trusted`` devices; without either, from the hash split of every device.
    """

    def __init__(
        self,
        *,
        pipeline: str | None,
        dtype: str,
        shape: tuple[int, ...],
        label_index: dict[str, int],
        val_fraction: float,
        rows: _Rows,
        val_rows: _Rows | None = None,
        trusted: frozenset[str] = frozenset(),
    ) -> None:
        self.pipeline, self.dtype, self.shape = pipeline, dtype, list(shape)
        self.label_index = label_index
        self.val_fraction = val_fraction
        self.np_dtype = DTYPES[dtype]
        self.rows, self.val_rows, self.trusted = rows, val_rows, trusted
        #: (device, seq) of the trusted file: the fleet's copy of such a sample is never trained on.
        self.exclude: set[tuple[str, int]] = set()
        #: device -> cap rank below which a row is kept (absent: not capped).
        self.thresholds: dict[str, float] = {}
        #: The cap covers the untrusted rows: training, plus validation when it is the fleet split.
        #: (One pool per device, so the split's hash noise never makes equal devices look unequal.)
        self.capped_sides = frozenset({"train"} if trusted or val_rows is not None else {"train", "val"})

    def index_of(self, cols: dict[str, list], i: int) -> int | None:
        label = cols["label"][i]
        if label is None or cols["pipeline"][i] != self.pipeline or cols["dtype"][i] != self.dtype:
            return None
        if list(cols["shape"][i] or []) != self.shape:
            return None
        return self.label_index.get(str(label))

    def fleet_side(self, device: str, seq: int) -> str | None:
        """``train``, ``val`` or None (left out) for a fleet row, before the cap."""
        if (device, seq) in self.exclude:
            return None
        if self.trusted:
            if device in self.trusted and is_validation(device, seq, self.val_fraction):
                return "val"
            return "train"
        if self.val_rows is not None:
            return "train"
        return "val" if is_validation(device, seq, self.val_fraction) else "train"

    def capped_out(self, side: str, device: str, seq: int) -> bool:
        limit = self.thresholds.get(device)
        return limit is not None and side in self.capped_sides and _cap_rank(device, seq) >= limit

    def iter_split(self, split: str) -> Iterator[tuple[np.ndarray, int]]:
        """``(x, label index)`` of one split, in file order."""
        if split == "val" and self.val_rows is not None:
            yield from self._iter(self.val_rows, None)
        if split == "train" or self.trusted or self.val_rows is None:
            yield from self._iter(self.rows, split)

    def _iter(self, rows: _Rows, split: str | None) -> Iterator[tuple[np.ndarray, int]]:
        for cols in rows.batches(META_COLUMNS + ["x"]):
            xs = cols["x"]
            for i in range(len(cols["label"])):
                index = self.index_of(cols, i)
                if index is None:
                    continue
                device, seq = cols["device"][i], cols["seq"][i]
                if split is not None:  # a fleet row (split None: every matching row of the trusted file)
                    if self.fleet_side(device, seq) != split or self.capped_out(split, device, seq):
                        continue
                try:
                    x = (
                        np.frombuffer(xs[i].as_py(), dtype=self.np_dtype)
                        .reshape(self.shape)
                        .astype(np.float32)
                    )
                except (ValueError, TypeError):  # bytes do not fit dtype x shape: skip, never crash training
                    log.warning(
                        "sample %s/%s: x does not hold %s %s; skipped", device, seq, self.dtype, self.shape
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
        store = LabelStore(cfg.root, cfg.fleet)
        resolver = store.resolver(cfg.label_sources, min_teacher_confidence=cfg.min_teacher_confidence)
        self._rows = _Rows(files, read_rows=cfg.read_rows, resolver=resolver)
        sources: Counter = Counter()  # label source of every labelled fleet row
        rows = unlabelled = 0
        pipelines: Counter = Counter()
        pipeline_devices: dict[Any, set] = {}
        kinds: Counter = Counter()  # (pipeline, dtype, shape) of labelled rows
        label_counts: Counter = Counter()
        for cols in self._rows.batches(META_COLUMNS):
            for i, label in enumerate(cols["label"]):
                rows += 1
                if label is None:
                    unlabelled += 1
                    continue
                sources[cols["label_source"][i]] += 1
                p = cols["pipeline"][i]
                pipelines[p] += 1
                pipeline_devices.setdefault(p, set()).add(cols["device"][i])
                kinds[(p, cols["dtype"][i], tuple(cols["shape"][i] or ()))] += 1
                label_counts[(p, str(label))] += 1
        if not pipelines:
            raise ConfigError(
                f"no labelled samples for fleet {cfg.fleet!r} under {cfg.root} ({rows} rows, "
                f"{unlabelled} unlabelled, label sources {','.join(cfg.label_sources)}); devices must "
                "send labels, or import some with `lepton dataset label --csv FILE`, or let `lepton "
                "serve --data DIR` record teacher labels"
            )
        if cfg.pin_pipeline:
            pipeline, pinned_by = cfg.pipeline, cfg.pinned_by or "--pipeline"
            if pipeline not in pipelines:
                known = ", ".join(f"{p} ({n} samples)" for p, n in pipelines.most_common(5))
                raise ConfigError(
                    f"no labelled samples of pipeline {pipeline!r} (pinned by {pinned_by}); the dataset "
                    f"has: {known}; pass --pipeline HASH to train on another one"
                )
        else:
            # Most devices first: one device sending many samples under an invented hash cannot win.
            pipeline = max(pipelines, key=lambda p: (len(pipeline_devices[p]), pipelines[p], p or ""))
            pinned_by = "devices"
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
        unknown_trusted = sorted(set(cfg.trusted_devices) - pipeline_devices[pipeline])
        if unknown_trusted:
            known = ", ".join(sorted(str(d) for d in pipeline_devices[pipeline])[:10])
            raise ConfigError(
                f"--trusted-devices: no labelled samples of pipeline {pipeline!r} from "
                f"{', '.join(unknown_trusted)}; check the ids (devices with samples: {known})"
            )
        val_rows = (
            _Rows(parquet_files(cfg.val_data), read_rows=cfg.read_rows) if cfg.val_data is not None else None
        )
        sel = self._selection = _Selection(
            pipeline=pipeline,
            dtype=dtype,
            shape=shape,
            label_index=index,
            val_fraction=cfg.val_fraction,
            rows=self._rows,
            val_rows=val_rows,
            trusted=frozenset(cfg.trusted_devices),
        )
        validation: dict[str, Any] = {"trusted": cfg.trusted}
        n_trusted_file = 0
        if val_rows is not None:
            n_trusted_file = self._scan_val_data(val_rows, sel, validation)
        # Second small pass over the keys only: sides, per-device counts, cap ranks.
        unknown = 0
        capped: dict[str, array] = {}  # device -> cap ranks of its rows in the capped pool
        sides: dict[str, bytearray] = {}  # device -> 1 per capped row on the validation side
        trusted_val: Counter = Counter()  # device -> uncapped (trusted) validation rows
        for cols in self._rows.batches(META_COLUMNS):
            for i in range(len(cols["label"])):
                if cols["label"][i] is None:
                    continue
                idx = sel.index_of(cols, i)
                if idx is None:
                    if cols["pipeline"][i] == pipeline and str(cols["label"][i]) not in index:
                        unknown += 1
                    continue
                device, seq = cols["device"][i], cols["seq"][i]
                side = sel.fleet_side(device, seq)
                if side is None:
                    continue
                if side not in sel.capped_sides:
                    trusted_val[device] += 1
                    continue
                capped.setdefault(device, array("d")).append(_cap_rank(device, seq))
                sides.setdefault(device, bytearray()).append(side == "val")
        overlap = len(sel.exclude)
        devices = self._apply_cap(sel, capped, sides)
        n_train = sum(d["train_used"] for d in devices["per_device"].values())
        n_val = n_trusted_file + sum(trusted_val.values())
        n_val += sum(d.get("val_used", 0) for d in devices["per_device"].values())
        for device, n in trusted_val.items():
            entry = devices["per_device"].setdefault(
                str(device), {"train_offered": 0, "train_used": 0, "dropped": 0}
            )
            entry["trusted_val"] = n
        if cfg.trusted:
            parts = (["val-data"] if cfg.val_data is not None else []) + (
                ["trusted-devices"] if cfg.trusted_devices else []
            )
            validation.update(source="+".join(parts), samples=n_val)
            if cfg.trusted_devices:
                validation["devices"] = list(cfg.trusted_devices)
                validation["trusted_device_samples"] = n_val - n_trusted_file
        else:
            validation.update(
                source="fleet-split",
                samples=n_val,
                warning="UNTRUSTED validation: the gate is judged on a split of the same samples devices "
                "sent, so a device sending wrong labels also skews the yardstick; give --val-data PATH "
                "or --trusted-devices ID,ID",
            )
        if n_train == 0 or n_val == 0:
            where = validation["source"]
            raise ConfigError(
                f"{n_train} training and {n_val} validation samples ({where}) of pipeline {pipeline!r}: "
                "too few to train; collect more data"
                + (" or trust more devices" if cfg.trusted_devices else "")
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
            pipeline_pinned_by=pinned_by,
            validation=validation,
            devices={**devices, "val_data_overlap_left_out": overlap},
            label_sources={
                "precedence": list(cfg.label_sources),
                "min_teacher_confidence": cfg.min_teacher_confidence,
                "rows": {s: sources.get(s, 0) for s in LABEL_SOURCES_ALL},
                "late_labels": len(resolver),
                "ignored": dict(resolver.ignored),
            },
        )
        if not cfg.trusted:
            log.warning("dataset %s/%s: %s", cfg.root, cfg.fleet, validation["warning"])
        if devices["dropped"]:
            log.warning(
                "dataset %s/%s: %d training samples dropped so no device holds more than %.0f%%",
                cfg.root,
                cfg.fleet,
                devices["dropped"],
                100 * devices["effective_share"],
            )
        log.info(
            "dataset %s/%s: pipeline %s (%s), shape %s, %d train / %d val (%s), %d other pipelines, "
            "%d unlabelled",
            cfg.root,
            cfg.fleet,
            pipeline,
            pinned_by,
            shape,
            n_train,
            n_val,
            validation["source"],
            self._info.other_pipelines,
            unlabelled,
        )
        feature_bytes = (n_train + n_val) * math.prod(shape) * 4
        if feature_bytes <= cfg.cache_bytes:
            self._cache = {split: self._materialize(split) for split in ("train", "val")}

    def _scan_val_data(self, val_rows: _Rows, sel: _Selection, validation: dict[str, Any]) -> int:
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

    def _apply_cap(self, sel: _Selection, ranks: dict[str, array], sides: dict[str, bytearray]) -> dict:
        """Set ``sel.thresholds`` so no device exceeds the share of the capped pool; the report."""
        counts = {d: len(r) for d, r in ranks.items()}
        keep, share = device_caps(counts, self.config.max_device_share)
        per_device: dict[str, dict[str, int]] = {}
        for device, r in ranks.items():
            rank, is_val = np.frombuffer(r, dtype=np.float64), np.frombuffer(sides[device], dtype=np.uint8)
            kept = np.ones(len(r), dtype=bool)
            k = keep[device]
            if k < len(r):
                limit = float(np.sort(rank)[k])  # keep the k lowest ranks
                sel.thresholds[device] = limit
                kept = rank < limit
            entry = {
                "train_offered": int((is_val == 0).sum()),
                "train_used": int((kept & (is_val == 0)).sum()),
                "dropped": len(r) - int(kept.sum()),
            }
            if "val" in sel.capped_sides:
                entry.update(val_offered=int(is_val.sum()), val_used=int((kept & (is_val == 1)).sum()))
            per_device[str(device)] = entry
        report = {
            "max_share": self.config.max_device_share,
            "effective_share": round(share, 6),
            "dropped": sum(counts.values()) - sum(keep.values()),
            "per_device": per_device,
        }
        return report

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
