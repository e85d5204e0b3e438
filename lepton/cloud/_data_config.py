"""Training data settings (:class:`DataConfig`), the first pass's report (:class:`DatasetInfo`) and
where the Parquet files are.

The selection rules these settings steer are described in :mod:`lepton.cloud._data_select`; the
dataset itself is read by :mod:`lepton.cloud._data`. A :class:`DataConfig` is frozen; a
:class:`DatasetInfo` is filled once by the thread that scans the dataset (the training process's
main thread) and only read afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton.cloud._labels import DEFAULT_LABEL_SOURCES, parse_label_sources
from lepton.errors import ConfigError
from lepton.protocol import validate_id

__all__ = ["DataConfig", "DatasetInfo", "dataset_files", "parquet_files"]


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

