"""The training-data selection rules on their own: column batches in, choices and report entries out
(no Parquet file, no torch; the scan that feeds them is covered by test_training*.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lepton.cloud._data_config import DataConfig
from lepton.cloud._data_select import (
    Census,
    Selection,
    SplitCounts,
    apply_cap,
    choose,
    is_validation,
    split_sizes,
    validation_report,
)
from lepton.errors import ConfigError


def _cols(rows: list[tuple]) -> dict[str, list]:
    """``(device, seq, label, pipeline, dtype, shape)`` rows as one column batch (labels resolved)."""
    names = ["device", "seq", "label", "pipeline", "dtype", "shape"]
    cols: dict[str, list] = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    cols["label_source"] = ["device" if r[2] is not None else None for r in rows]
    return cols


def _census(rows: list[tuple]) -> Census:
    census = Census()
    census.add(_cols(rows))
    return census


def _config(**kw: object) -> DataConfig:
    return DataConfig(**{"root": Path("/nonexistent"), "fleet": "f1", **kw})


def _fleet(devices: dict[str, int], pipeline: str = "p0", labels: tuple[str, ...] = ("a", "b")) -> list:
    return [
        (d, s, labels[s % len(labels)], pipeline, "float32", [4])
        for d, n in devices.items()
        for s in range(n)
    ]


class _NoRows:
    def batches(self, columns: list[str]):  # noqa: ANN201
        return iter(())


def _selection(choice, trusted: frozenset[str] = frozenset()) -> Selection:  # noqa: ANN001
    return Selection(pipeline=choice.pipeline, dtype=choice.dtype, shape=choice.shape,
                     label_index={lab: i for i, lab in enumerate(choice.labels)}, val_fraction=0.2,
                     rows=_NoRows(), trusted=trusted)


def test_census_counts_labelled_rows_per_pipeline_and_unlabelled_rows_apart():
    census = _census([*_fleet({"cam-1": 4}), ("cam-2", 0, None, "p0", "float32", [4])])

    assert (census.rows, census.unlabelled) == (5, 1)
    assert census.pipelines == Counter({"p0": 4}) and census.pipeline_devices == {"p0": {"cam-1"}}
    assert census.kinds == Counter({("p0", "float32", (4,)): 4}) and census.sources == Counter({"device": 4})


def test_the_pipeline_of_most_devices_wins_over_one_device_sending_most_samples():
    census = _census(_fleet({"cam-1": 10, "cam-2": 10}, "p0") + _fleet({"evil": 500}, "invented"))

    choice = choose(census, _config())

    assert (choice.pipeline, choice.pinned_by) == ("p0", "devices")
    assert (choice.dtype, choice.shape) == ("float32", (4,))
    assert choice.labels == ("a", "b") and choice.present == {"a": 10, "b": 10}


def test_a_pinned_pipeline_is_used_and_a_missing_one_is_refused_naming_what_there_is():
    census = _census(_fleet({"cam-1": 10}, "p0") + _fleet({"cam-2": 4}, "p1"))

    pinned = choose(census, _config(pipeline="p1", pinned_by="the deployed model"))
    with pytest.raises(ConfigError, match=r"'p9' \(pinned by --pipeline\).*p0 \(10 samples\)"):
        choose(census, _config(pipeline="p9"))

    assert (pinned.pipeline, pinned.pinned_by) == ("p1", "the deployed model")


@pytest.mark.parametrize(
    ("rows", "kw", "message"),
    [
        ([("cam-1", 0, None, "p0", "float32", [4])], {}, "no labelled samples for fleet 'f1'"),
        ([("cam-1", 0, "a", "p0", "complex", [4])], {}, "dtype 'complex'"),
        ([("cam-1", 0, "a", "p0", "float32", [])], {}, "are scalars"),
        (_fleet({"cam-1": 4}, labels=("a",)), {}, "only the label"),
        (_fleet({"cam-1": 4}), {"trusted_devices": ("cam-9",)}, "--trusted-devices: .* from cam-9"),
    ],
    ids=["unlabelled", "dtype", "scalar", "one-class", "unknown-trusted"],
)
def test_what_cannot_be_trained_on_is_refused_with_the_fix(rows, kw, message):
    with pytest.raises(ConfigError, match=message):
        choose(_census(rows), _config(**kw))


def test_split_counts_put_every_row_on_a_stable_side_and_count_unknown_labels():
    rows = _fleet({"cam-1": 50, "cam-2": 50}) + [("cam-1", 99, "zebra", "p0", "float32", [4])]
    choice = choose(_census(_fleet({"cam-1": 50, "cam-2": 50})), _config())
    counts = SplitCounts(_selection(choice))

    counts.add(_cols(rows))

    assert counts.unknown == 1 and not counts.trusted_val
    for device in ("cam-1", "cam-2"):
        assert list(counts.sides[device]) == [is_validation(device, s, 0.2) for s in range(50)]
        assert len(counts.capped[device]) == 50


def test_a_dominant_device_is_capped_and_trusted_validation_rows_stay_out_of_the_pool():
    fleet = _fleet({"cam-1": 100, "cam-2": 100, "cam-3": 100, "evil": 900})
    cfg = _config(trusted_devices=("cam-1",))
    choice = choose(_census(fleet), cfg)
    sel = _selection(choice, trusted=frozenset(cfg.trusted_devices))
    counts = SplitCounts(sel)
    counts.add(_cols(fleet))

    devices = apply_cap(sel, counts.capped, counts.sides, cfg.max_device_share)
    n_train, n_val = split_sizes(devices, counts.trusted_val, from_file=0)
    validation: dict = {"trusted": cfg.trusted}
    validation_report(cfg, validation, samples=n_val, from_file=0)

    trusted_val = sum(is_validation("cam-1", s, 0.2) for s in range(100))
    per_device = devices["per_device"]
    assert counts.trusted_val == Counter({"cam-1": trusted_val}) and n_val == trusted_val
    assert per_device["cam-1"]["trusted_val"] == trusted_val and "val_used" not in per_device["evil"]
    assert per_device["evil"]["train_used"] <= 0.34 * n_train + 1 and devices["dropped"] > 0
    assert n_train == sum(d["train_used"] for d in per_device.values())
    assert "evil" in sel.thresholds and "cam-2" not in sel.thresholds
    assert validation == {"trusted": True, "source": "trusted-devices", "samples": n_val,
                          "devices": ["cam-1"], "trusted_device_samples": n_val}


def test_the_fleet_split_is_reported_as_untrusted():
    validation: dict = {"trusted": False}

    validation_report(_config(), validation, samples=7, from_file=0)

    assert validation["source"] == "fleet-split" and validation["samples"] == 7
    assert validation["warning"].startswith("UNTRUSTED validation")
