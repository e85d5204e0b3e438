"""Which samples a model trains and is judged on: the selection rules, without I/O.

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

Everything here takes column batches (``{name: [values]}``, what
:class:`~lepton.cloud._data._Rows` yields) or counts, and returns decisions and report entries; the
Parquet side is :mod:`lepton.cloud._data`. The objects are built and used by the one thread that
scans the dataset and trains (the training process's main thread; the DataLoaders run no workers).
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lepton.errors import ConfigError
from lepton.protocol import DTYPES

if TYPE_CHECKING:
    from lepton.cloud._data_config import DataConfig

log = logging.getLogger(__name__)

__all__ = [
    "META_COLUMNS",
    "Census",
    "Choice",
    "RowSource",
    "Selection",
    "SplitCounts",
    "apply_cap",
    "cap_rank",
    "choose",
    "device_caps",
    "is_validation",
    "sort_labels",
    "split_sizes",
    "validation_report",
]

META_COLUMNS = ["device", "seq", "label", "pipeline", "dtype", "shape"]
_SCALE = float(2**64)


def is_validation(device: str, seq: int, val_fraction: float) -> bool:
    """The deterministic split: a hash of (device, seq), the same in every retrain and process."""
    digest = hashlib.blake2b(f"{device}\x00{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE < val_fraction


def cap_rank(device: str, seq: int) -> float:
    """A second, independent hash: which of a capped device's samples are dropped (stable across
    retrains)."""
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


def sort_labels(labels) -> tuple[str, ...]:  # noqa: ANN001
    """Sort class names; decimal integer names sort numerically ("2" before "10").

    >>> sort_labels(["10", "2", "1"])
    ('1', '2', '10')
    """
    names = {str(x) for x in labels}
    if all(n.lstrip("-").isdigit() for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


class RowSource(Protocol):
    """Column batches of some Parquet files, labels resolved (:class:`~lepton.cloud._data._Rows`)."""

    def batches(self, columns: list[str]) -> Iterator[dict[str, list]]: ...


@dataclass
class Census:
    """The first pass over the fleet's rows: what is there, per pipeline, of the labelled ones."""

    rows: int = 0
    unlabelled: int = 0
    sources: Counter = field(default_factory=Counter)  # label source of every labelled fleet row
    pipelines: Counter = field(default_factory=Counter)
    pipeline_devices: dict[Any, set] = field(default_factory=dict)
    kinds: Counter = field(default_factory=Counter)  # (pipeline, dtype, shape) of labelled rows
    label_counts: Counter = field(default_factory=Counter)  # (pipeline, label)

    def add(self, cols: dict[str, list]) -> None:
        for i, label in enumerate(cols["label"]):
            self.rows += 1
            if label is None:
                self.unlabelled += 1
                continue
            self.sources[cols["label_source"][i]] += 1
            p = cols["pipeline"][i]
            self.pipelines[p] += 1
            self.pipeline_devices.setdefault(p, set()).add(cols["device"][i])
            self.kinds[(p, cols["dtype"][i], tuple(cols["shape"][i] or ()))] += 1
            self.label_counts[(p, str(label))] += 1


@dataclass(frozen=True)
class Choice:
    """What a model trains on: one pipeline, its majority dtype and shape, and the class list."""

    pipeline: str | None
    pinned_by: str
    dtype: str
    shape: tuple[int, ...]
    labels: tuple[str, ...]
    #: labelled rows of the pipeline per label
    present: dict[str, int]


def choose(census: Census, cfg: DataConfig) -> Choice:
    """The pipeline, dtype, shape and labels to train on; ConfigError naming the fix when there are none."""
    pipelines = census.pipelines
    if not pipelines:
        raise ConfigError(
            f"no labelled samples for fleet {cfg.fleet!r} under {cfg.root} ({census.rows} rows, "
            f"{census.unlabelled} unlabelled, label sources {','.join(cfg.label_sources)}); devices must "
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
        devices = census.pipeline_devices
        pipeline = max(pipelines, key=lambda p: (len(devices[p]), pipelines[p], p or ""))
        pinned_by = "devices"
    same = {k: n for k, n in census.kinds.items() if k[0] == pipeline}
    _, dtype, shape = max(same, key=lambda k: same[k])
    if dtype not in DTYPES:
        raise ConfigError(
            f"samples of pipeline {pipeline!r} have dtype {dtype!r}, not one of {sorted(DTYPES)}"
        )
    if not shape:
        raise ConfigError(
            f"samples of pipeline {pipeline!r} are scalars; a model needs at least 1-D features"
        )
    present = {lab: n for (p, lab), n in census.label_counts.items() if p == pipeline}
    labels = tuple(cfg.labels) if cfg.labels is not None else sort_labels(present)
    if len(labels) < 2:
        raise ConfigError(
            f"pipeline {pipeline!r} has only the label(s) {list(labels)}; need at least two classes"
        )
    senders = census.pipeline_devices[pipeline]
    unknown_trusted = sorted(set(cfg.trusted_devices) - senders)
    if unknown_trusted:
        known = ", ".join(sorted(str(d) for d in senders)[:10])
        raise ConfigError(
            f"--trusted-devices: no labelled samples of pipeline {pipeline!r} from "
            f"{', '.join(unknown_trusted)}; check the ids (devices with samples: {known})"
        )
    return Choice(pipeline=pipeline, pinned_by=pinned_by, dtype=dtype, shape=shape, labels=labels,
                  present=present)


class Selection:
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
        rows: RowSource,
        val_rows: RowSource | None = None,
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
        return limit is not None and side in self.capped_sides and cap_rank(device, seq) >= limit

    def iter_split(self, split: str) -> Iterator[tuple[np.ndarray, int]]:
        """``(x, label index)`` of one split, in file order."""
        if split == "val" and self.val_rows is not None:
            yield from self._iter(self.val_rows.batches(META_COLUMNS + ["x"]), None)
        if split == "train" or self.trusted or self.val_rows is None:
            yield from self._iter(self.rows.batches(META_COLUMNS + ["x"]), split)

    def _iter(self, batches: Iterable[dict[str, Any]], split: str | None) -> Iterator[tuple[np.ndarray, int]]:
        for cols in batches:
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


@dataclass
class SplitCounts:
    """The second pass, over the fleet rows' keys: sides, per-device counts, cap ranks."""

    selection: Selection
    #: labelled rows of the pipeline whose label is not in the class list
    unknown: int = 0
    #: device -> cap ranks of its rows in the capped pool
    capped: dict[str, array] = field(default_factory=dict)
    #: device -> 1 per capped row on the validation side
    sides: dict[str, bytearray] = field(default_factory=dict)
    #: device -> uncapped (trusted) validation rows
    trusted_val: Counter = field(default_factory=Counter)

    def add(self, cols: dict[str, list]) -> None:
        sel = self.selection
        for i in range(len(cols["label"])):
            if cols["label"][i] is None:
                continue
            idx = sel.index_of(cols, i)
            if idx is None:
                if cols["pipeline"][i] == sel.pipeline and str(cols["label"][i]) not in sel.label_index:
                    self.unknown += 1
                continue
            device, seq = cols["device"][i], cols["seq"][i]
            side = sel.fleet_side(device, seq)
            if side is None:
                continue
            if side not in sel.capped_sides:
                self.trusted_val[device] += 1
                continue
            self.capped.setdefault(device, array("d")).append(cap_rank(device, seq))
            self.sides.setdefault(device, bytearray()).append(side == "val")


def apply_cap(sel: Selection, ranks: dict[str, array], sides: dict[str, bytearray], max_share: float) -> dict:
    """Set ``sel.thresholds`` so no device exceeds the share of the capped pool; the report."""
    counts = {d: len(r) for d, r in ranks.items()}
    keep, share = device_caps(counts, max_share)
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
        "max_share": max_share,
        "effective_share": round(share, 6),
        "dropped": sum(counts.values()) - sum(keep.values()),
        "per_device": per_device,
    }
    return report


def split_sizes(devices: dict, trusted_val: Counter, *, from_file: int) -> tuple[int, int]:
    """``(train, validation)`` samples after the cap; adds each trusted device's validation rows to
    its ``devices["per_device"]`` entry."""
    per_device = devices["per_device"]
    n_train = sum(d["train_used"] for d in per_device.values())
    n_val = from_file + sum(trusted_val.values())
    n_val += sum(d.get("val_used", 0) for d in per_device.values())
    for device, n in trusted_val.items():
        entry = per_device.setdefault(str(device), {"train_offered": 0, "train_used": 0, "dropped": 0})
        entry["trusted_val"] = n
    return n_train, n_val


def validation_report(cfg: DataConfig, validation: dict[str, Any], *, samples: int, from_file: int) -> None:
    """Say in ``validation`` where the validation set came from (``samples`` rows, ``from_file`` of
    them from ``--val-data``), and warn when it is the fleet's own, untrusted split."""
    if cfg.trusted:
        parts = (["val-data"] if cfg.val_data is not None else []) + (
            ["trusted-devices"] if cfg.trusted_devices else []
        )
        validation.update(source="+".join(parts), samples=samples)
        if cfg.trusted_devices:
            validation["devices"] = list(cfg.trusted_devices)
            validation["trusted_device_samples"] = samples - from_file
    else:
        validation.update(
            source="fleet-split",
            samples=samples,
            warning="UNTRUSTED validation: the gate is judged on a split of the same samples devices "
            "sent, so a device sending wrong labels also skews the yardstick; give --val-data PATH "
            "or --trusted-devices ID,ID",
        )
