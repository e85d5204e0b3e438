"""Training integrity (issue 10 item 5): a device cannot poison the gate's yardstick, dominate the
training set, or take the fleet's model over with an invented pipeline hash.

The scenario: three honest devices send the digits; a fourth re-sends the same images with wrong
labels. The trusted validation set (``--val-data``) is a separate Parquet file of digits no device
sent. Trainings are short (few epochs, fp32 only) so the file runs in a minute or two.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lepton.cli._main import main
from lepton.cloud import DataConfig, ExportConfig, ParquetDataModule, Registry, TrainConfig, train
from lepton.cloud._data_select import device_caps, is_validation
from lepton.cloud._gate import gate_decision
from lepton.errors import ConfigError
from tests.cloud.conftest import DIGITS_HASH

FAST = ExportConfig(quantize=False, latency_runs=5)
FAKE_PIPELINE = "deadbeefdeadbeef"


def write_device(root: Path, fleet: str, device: str, x, labels, *, pipeline=DIGITS_HASH, name=None) -> Path:
    """One device's samples (seq 0..n-1) in the ingest writer's schema, as ``DIR/FLEET/data/NAME.parquet``."""
    from lepton.cloud._dataset import samples_to_table, write_parquet_atomic
    from lepton.protocol import Sample

    data = root / fleet / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [
        (device, pipeline, Sample(seq=i, ts=1.7e9 + i, x=x[i], y=None if label is None else str(label)))
        for i, label in enumerate(labels)
    ]
    write_parquet_atomic(data / f"{name or device}.parquet", samples_to_table(rows))
    return root


@pytest.fixture(scope="module")
def split_digits():
    """(fleet x, fleet y, trusted x, trusted y): every 5th digit is held out as the trusted set."""
    from tests.cloud.conftest import digits

    x, y = digits()
    held = np.arange(len(x)) % 5 == 0
    return x[~held], y[~held], x[held], y[held]


def honest_fleet(root: Path, fleet: str, x, y, devices: int = 3) -> Path:
    for d in range(devices):
        write_device(root, fleet, f"cam-{d}", x[d::devices], list(y[d::devices]))
    return root


def trusted_file(tmp: Path, x, y) -> Path:
    """The operator's validation set: a Parquet file in the dataset schema that no device can write."""
    write_device(tmp, "lab", "lab", x, list(y))
    return tmp / "lab" / "data" / "lab.parquet"


def poisoner(root: Path, fleet: str, x, y) -> None:
    """A compromised device re-sends the fleet's images, every label shifted by one class."""
    write_device(root, fleet, "cam-evil", x, list((y + 1) % 10))


def accuracy(model: bytes, x: np.ndarray, y: np.ndarray, labels) -> float:
    """Accuracy computed without lepton: ONNX Runtime on the held-out digits."""
    logits = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return float((np.array([int(labels[i]) for i in logits.argmax(1)]) == y).mean())


def mark_deployed(root: Path, fleet: str, version: int) -> None:
    # The registry's record of what the fleet runs (what `lepton models publish` writes after publishing).
    (root / "models" / "digits" / "deployed.json").write_text(
        json.dumps({fleet: {"version": version, "chunks": 1, "published_at": 1.0}})
    )


def train_cli(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(["train", "--quiet", "--json", "--no-quantize", "--model", "digits", *args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else {}), captured.err


# ------------------------------------------------------------------------------------------------
# the cap and the data selection: no training
# ------------------------------------------------------------------------------------------------
def test_device_cap_is_a_water_level_that_no_device_can_exceed():
    keep, share = device_caps({"a": 479, "b": 479, "c": 479, "evil": 1437}, 0.34)
    assert keep == {"a": 479, "b": 479, "c": 479, "evil": 740} and share == 0.34
    assert keep["evil"] / sum(keep.values()) <= 0.34
    # already balanced: nothing dropped
    assert device_caps({"a": 599, "b": 599, "c": 599}, 0.34)[0] == {"a": 599, "b": 599, "c": 599}
    # fewer devices than 1/share: an equal share; a single device keeps everything; 1.0 = no cap
    assert device_caps({"a": 100, "b": 1000}, 0.34) == ({"a": 100, "b": 100}, 0.5)
    assert device_caps({"a": 100}, 0.34) == ({"a": 100}, 1.0)
    assert device_caps({"a": 1, "b": 1000}, 1.0)[0] == {"a": 1, "b": 1000}


def test_poisoner_is_capped_and_the_fleet_split_is_reported_untrusted(tmp_path, fleet, split_digits):
    x, y, _, _ = split_digits
    root = honest_fleet(tmp_path, fleet, x, y)
    poisoner(root, fleet, x, y)

    dm = ParquetDataModule(DataConfig(root=root, fleet=fleet))
    info = dm.info

    assert info.validation["source"] == "fleet-split" and info.validation["trusted"] is False
    assert "UNTRUSTED" in info.validation["warning"] and info.validation["samples"] == info.val_samples
    per = info.devices["per_device"]
    train_total = info.train_samples
    evil = per["cam-evil"]
    assert evil["dropped"] > 0
    # one pool per device (training + fleet-split validation): at most 34 % of all samples used
    assert evil["train_used"] + evil["val_used"] <= 0.34 * (train_total + info.val_samples) + 1
    assert all(per[f"cam-{d}"]["dropped"] == 0 for d in range(3))
    assert info.devices["dropped"] == evil["dropped"]
    assert sum(p["train_used"] for p in per.values()) == train_total
    assert sum(p["val_used"] for p in per.values()) == info.val_samples
    ys = np.concatenate([b[1] for b in dm.iter_numpy("train")])
    assert len(ys) == train_total  # the cached arrays hold exactly the capped selection
    # the streamed path drops the same rows
    streamed = ParquetDataModule(DataConfig(root=root, fleet=fleet, cache_bytes=0))
    assert sorted(np.concatenate([b[1].numpy() for b in streamed.train_dataloader()]).tolist()) == sorted(
        ys.tolist()
    )


def test_val_data_and_trusted_devices_form_the_validation_set(tmp_path, fleet, split_digits):
    x, y, tx, ty = split_digits
    root = honest_fleet(tmp_path / "data", fleet, x, y)
    poisoner(root, fleet, x, y)
    val = trusted_file(tmp_path / "trusted", tx, ty)

    by_file = ParquetDataModule(DataConfig(root=root, fleet=fleet, val_data=val)).info
    by_devices = ParquetDataModule(
        DataConfig(root=root, fleet=fleet, trusted_devices=("cam-0", "cam-1"))
    ).info
    both = ParquetDataModule(
        DataConfig(root=root, fleet=fleet, val_data=val.parent, trusted_devices=("cam-2",))
    )

    assert by_file.validation["source"] == "val-data" and by_file.validation["trusted"] is True
    assert by_file.val_samples == by_file.validation["samples"] == len(tx)
    # every fleet sample trains (capped), none is held out: the yardstick is the file
    assert by_file.devices["per_device"]["cam-0"]["train_offered"] == len(x[0::3])
    assert by_devices.validation["source"] == "trusted-devices"
    expected = sum(is_validation(f"cam-{d}", s, 0.2) for d in (0, 1) for s in range(len(x[d::3])))
    assert by_devices.val_samples == expected and by_devices.validation["devices"] == ["cam-0", "cam-1"]
    assert by_devices.devices["per_device"]["cam-evil"].get("val_offered") is None  # never validation
    assert by_devices.devices["per_device"]["cam-0"]["trusted_val"] == sum(
        is_validation("cam-0", s, 0.2) for s in range(len(x[0::3]))
    )
    assert both.info.validation["source"] == "val-data+trusted-devices"
    assert both.info.val_samples == len(tx) + sum(is_validation("cam-2", s, 0.2) for s in range(len(x[2::3])))
    vy = np.concatenate([b[1] for b in both.iter_numpy("val")])
    assert len(vy) == both.info.val_samples


def test_a_sample_in_val_data_is_never_trained_on(tmp_path, fleet, split_digits):
    x, y, _, _ = split_digits
    root = honest_fleet(tmp_path / "data", fleet, x, y)
    # the operator relabelled 40 of cam-0's samples by hand and saved them as the trusted set
    write_device(tmp_path / "t", "lab", "cam-0", x[0::3][:40], list(y[0::3][:40]))

    info = ParquetDataModule(
        DataConfig(root=root, fleet=fleet, val_data=tmp_path / "t" / "lab" / "data")
    ).info

    assert info.val_samples == 40 and info.devices["val_data_overlap_left_out"] == 40
    assert info.devices["per_device"]["cam-0"]["train_offered"] == len(x[0::3]) - 40


def test_first_version_takes_the_pipeline_of_most_devices_not_most_samples(tmp_path, fleet, split_digits):
    x, y, _, _ = split_digits
    root = honest_fleet(tmp_path, fleet, x, y)
    rng = np.random.default_rng(0)
    big = np.concatenate([x, x])
    write_device(root, fleet, "cam-evil", big, list(rng.integers(0, 10, len(big))), pipeline=FAKE_PIPELINE)

    info = ParquetDataModule(DataConfig(root=root, fleet=fleet)).info
    forced = ParquetDataModule(DataConfig(root=root, fleet=fleet, pipeline=FAKE_PIPELINE)).info

    assert info.pipelines[FAKE_PIPELINE] > info.pipelines[DIGITS_HASH]
    assert info.pipeline == DIGITS_HASH and info.pipeline_pinned_by == "devices"
    assert forced.pipeline == FAKE_PIPELINE and forced.pipeline_pinned_by == "--pipeline"


def test_gate_refuses_incomparable_versions_unless_forced():
    deployed = {"version": 1, "comparable": False, "reason": "v1 was trained on pipeline 'a', not 'b'"}

    refused = gate_decision(0.99, deployed, 1.0)
    forced = gate_decision(0.99, deployed, 1.0, force_incomparable=True)

    assert not refused["passed"] and "--force-incomparable" in refused["reason"]
    assert refused["comparable"] is False and refused["forced"] is False
    assert forced["passed"] and forced["forced"] is True


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-device-share", "0"], "--max-device-share"),
        (["--max-device-share", "1.5"], "--max-device-share"),
        (["--val-data", "/nonexistent/val.parquet"], "--val-data"),
        (["--trusted-devices", ","], "--trusted-devices"),
        (["--trusted-devices", "bad id!"], "--trusted-devices"),
        (["--trusted-devices", "cam-0,cam-nobody"], "cam-nobody"),
        (["--pipeline", "0123456789abcdef"], "--pipeline HASH"),
    ],
)
def test_bad_integrity_flags_exit_2_in_one_line(tmp_path, fleet, split_digits, capsys, flags, needle):
    x, y, _, _ = split_digits
    root = honest_fleet(tmp_path, fleet, x, y)

    code = main(["train", "--quiet", "--data", str(root), "--fleet", fleet, "--model", "digits", *flags])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lepton train: error: ") and needle in err[0]


def test_empty_val_data_folder_and_wrong_pipeline_val_data_exit_2(tmp_path, fleet, split_digits, capsys):
    x, y, tx, ty = split_digits
    root = honest_fleet(tmp_path / "data", fleet, x, y)
    (tmp_path / "empty").mkdir()
    write_device(tmp_path / "other", "lab", "lab", tx, list(ty), pipeline=FAKE_PIPELINE)
    base = ["train", "--quiet", "--data", str(root), "--fleet", fleet, "--model", "digits", "--val-data"]

    assert main([*base, str(tmp_path / "empty")]) == 2
    assert main([*base, str(tmp_path / "other" / "lab" / "data")]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no *.parquet files" in err[0]
    assert "no labelled samples of pipeline" in err[1] and FAKE_PIPELINE in err[1]


# ------------------------------------------------------------------------------------------------
# real training
# ------------------------------------------------------------------------------------------------
def test_label_poisoning_is_caught_by_the_trusted_gate_and_blunted_by_the_cap(
    tmp_path, fleet, split_digits, capsys
):
    x, y, tx, ty = split_digits
    root = honest_fleet(tmp_path / "data", fleet, x, y)
    val = trusted_file(tmp_path / "trusted", tx, ty)
    common = ["--data", str(root), "--fleet", fleet, "--epochs", "8"]
    code, v1, _ = train_cli(capsys, *common, "--val-data", str(val))
    assert code == 0 and v1["validation"]["trusted"] is True
    mark_deployed(root, fleet, v1["version"])
    registry = Registry(root)
    assert accuracy(registry.get("digits", v1["version"]).data(), tx, ty, [str(i) for i in range(10)]) >= 0.9

    poisoner(root, fleet, x, y)

    # What the old code did: judged on the fleet's own (poisoned) split, no cap -> the gate passed.
    code, old, err = train_cli(capsys, *common, "--max-device-share", "1")
    old_acc = accuracy(registry.get("digits", old["version"]).data(), tx, ty, [str(i) for i in range(10)])
    # The trusted yardstick sees through it.
    code_trusted, uncapped, _ = train_cli(capsys, *common, "--val-data", str(val), "--max-device-share", "1")
    # The defaults alone (no trusted set: fleet split, cap 0.34) keep the honest majority in charge.
    _, capped, _ = train_cli(capsys, *common)

    assert code == 0 and old["gate"]["passed"], old["gate"]  # the hole: poisoned yardstick, gate passes
    assert old["validation"] == {**old["validation"], "source": "fleet-split", "trusted": False}
    assert "UNTRUSTED" in err  # said loudly on stderr too
    assert old_acc < v1["gate"]["new_accuracy"] - 0.1  # ... while true accuracy fell
    assert code_trusted == 5 and uncapped["status"] == "refused"
    assert uncapped["gate"]["validation"] == {"source": "val-data", "trusted": True, "samples": len(tx)}
    assert uncapped["gate"]["new_accuracy"] < uncapped["gate"]["deployed_accuracy"] - 0.01
    assert registry.deployed("digits", fleet).version == v1["version"]
    assert capped["validation"]["trusted"] is False
    assert capped["devices"]["per_device"]["cam-evil"]["dropped"] > 0
    evil, used = capped["devices"]["per_device"]["cam-evil"], capped["data"]
    assert evil["train_used"] + evil["val_used"] <= 0.34 * (used["train_samples"] + used["val_samples"]) + 1
    capped_model = registry.get("digits", capped["version"]).data()
    capped_acc = accuracy(capped_model, tx, ty, [str(i) for i in range(10)])
    # A capped poisoner still holds up to a third of the set: the cap blunts it (0.85 in our runs, against
    # 0.46 uncapped); refusing it outright is the trusted validation set's job, asserted above.
    assert capped_acc >= 0.75 and capped_acc > old_acc + 0.1, (capped_acc, old_acc)


def test_pipeline_hijack_is_pinned_out_and_incomparable_needs_force(
    tmp_path, fleet, trained_digits, capsys
):
    src_root, src_fleet, v1 = trained_digits
    root = tmp_path / "data"
    shutil.copytree(src_root, root)
    if src_fleet != fleet:
        (root / src_fleet).rename(root / fleet)
    mark_deployed(root, fleet, v1.version)
    # 2x the honest samples under an invented pipeline hash, from one device
    rng = np.random.default_rng(1)
    noise = rng.random((3600, 1, 8, 8), dtype=np.float32)
    write_device(root, fleet, "cam-evil", noise, list(rng.integers(0, 10, 3600)), pipeline=FAKE_PIPELINE)
    common = ["--data", str(root), "--fleet", fleet, "--epochs", "2"]

    pinned = train(TrainConfig(data=root, fleet=fleet, model="digits", epochs=2, export=FAST))
    code, hijack, _ = train_cli(capsys, *common, "--pipeline", FAKE_PIPELINE)
    code_forced, forced, _ = train_cli(capsys, *common, "--pipeline", FAKE_PIPELINE, "--force-incomparable")

    data = pinned.report["data"]
    assert data["pipeline"] == DIGITS_HASH and data["pipeline_pinned_by"] == f"deployed v{v1.version}"
    assert data["other_pipelines"] == 3600
    assert pinned.report["gate"]["comparable"] is True
    assert code == 5 and hijack["status"] == "refused" and hijack["gate"]["comparable"] is False
    assert "not comparable" in hijack["gate"]["reason"] and "--force-incomparable" in hijack["gate"]["reason"]
    assert code_forced == 0 and forced["gate"]["passed"] and forced["gate"]["forced"] is True
    assert Registry(root).deployed("digits", fleet).version == v1.version  # nothing published


def test_train_config_rejects_bad_integrity_settings(tmp_path, fleet):
    with pytest.raises(ConfigError, match="--max-device-share"):
        TrainConfig(data=tmp_path, fleet=fleet, model="m", max_device_share=0)
    with pytest.raises(ConfigError, match="--val-data"):
        TrainConfig(data=tmp_path, fleet=fleet, model="m", val_data=tmp_path / "none.parquet")
