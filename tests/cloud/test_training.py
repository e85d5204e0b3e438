"""Training end to end: Parquet digits -> Lightning -> int8 ONNX -> gate -> signed retained model."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lepton.cli._main import main
from lepton.cloud import Classifier, DataConfig, ParquetDataModule, Registry, TrainConfig, fetch_model, train
from lepton.cloud._data_select import is_validation
from tests.cloud.conftest import DIGITS_HASH, write_dataset


class ShuffledLabels(Classifier):
    """A deliberately worse model for ``--module``: trains on labels shuffled within each batch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(batch_idx))
        return super().training_step((x, y[perm]), batch_idx)


def _train_cli(capsys, *args: str) -> tuple[int, dict]:
    code = main(["train", "--quiet", "--json", *args])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else {})


def _val_accuracy(model: bytes, x: np.ndarray, y: np.ndarray, labels) -> float:
    """Accuracy on the validation side of the (device, seq) split, computed independently of lepton."""
    # conftest.write_dataset: row i is device dev-{i % 3}, seq i // 3
    val = np.array([is_validation(f"dev-{i % 3}", i // 3, 0.2) for i in range(len(x))])
    logits = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x[val]})[0]
    predicted = np.array([int(labels[i]) for i in logits.argmax(1)])
    return float((predicted == y[val]).mean())


def test_digits_dataset_to_published_int8_model(broker, fleet, digits_dir, digits_arrays, keypair, capsys):
    private, public = keypair
    url = broker.url("worker", "trainer", fleet=fleet)

    code, report = _train_cli(
        capsys,
        "--data",
        str(digits_dir),
        "--fleet",
        fleet,
        "--model",
        "digits",
        "--epochs",
        "8",
        # an int8 package whatever the CPU and the training order (see tests/cloud/conftest.py)
        "--max-int8-drop",
        "2",
        "--allow-slower-int8",
        "--publish",
        "--broker",
        url,
        "--key",
        str(private),
    )

    assert code == 0
    assert report["status"] == "published"
    exp = report["export"]
    assert exp["shipped"] == "int8"
    assert exp["int8_accuracy"] >= 0.95
    assert exp["int8_size_bytes"] <= 0.3 * exp["fp32_size_bytes"]
    assert exp["max_abs_diff"] < 1e-3
    assert report["data"]["pipeline"] == DIGITS_HASH
    # a device that connects afterwards gets exactly the registry's bytes, signed, from retained messages
    package = fetch_model(broker.url("device", "dev-late", fleet=fleet), fleet, "digits", public)
    stored = Registry(digits_dir).get("digits", report["version"])
    assert package.data == stored.data()
    assert package.signed_by is not None
    m = package.manifest
    assert (m.version, m.quantization, m.labels) == (
        report["version"],
        "int8",
        tuple(str(i) for i in range(10)),
    )
    assert m.input["shape"] == [-1, 1, 8, 8] and m.input["dtype"] == "float32"
    assert m.pipeline == {"hash": DIGITS_HASH, "spec": None}
    assert m.metrics["fp32_size_bytes"] == exp["fp32_size_bytes"]
    # the signed manifest says why int8 shipped, with both latencies
    assert m.metrics["quantization_reason"] == exp["reason"]
    faster = exp["int8_latency_ms"] < exp["fp32_latency_ms"]
    assert ("and faster" if faster else "and slower, allowed") in exp["reason"]
    assert m.metrics["int8_latency_ms"] == round(exp["int8_latency_ms"], 4) > 0
    x, y = digits_arrays
    assert _val_accuracy(package.data, x, y, m.labels) >= 0.95


def test_gate_refuses_a_model_trained_on_shuffled_labels(amqtt_broker, fleet, digits_dir, keypair, capsys):
    url = amqtt_broker.url("worker", "trainer", fleet=fleet)
    common = [
        "--data",
        str(digits_dir),
        "--fleet",
        fleet,
        "--model",
        "digits",
        "--broker",
        url,
        "--key",
        str(keypair[0]),
        "--publish",
    ]
    code, good = _train_cli(capsys, *common, "--epochs", "6")
    assert code == 0 and good["status"] == "published"

    code, bad = _train_cli(capsys, *common, "--epochs", "3", "--module", f"{__name__}:ShuffledLabels")

    assert code == 5  # lepton.cli._exit.GATE_REFUSED
    gate = bad["gate"]
    assert bad["status"] == "refused" and not gate["passed"]
    assert gate["deployed_version"] == good["version"]
    assert gate["deployed_accuracy"] >= 0.95 > gate["new_accuracy"]
    registry = Registry(digits_dir)
    assert registry.get("digits", bad["version"]).status == "refused"  # kept on disk
    assert registry.deployed("digits", fleet).version == good["version"]
    assert fetch_model(url, fleet, "digits", keypair[1]).manifest.version == good["version"]  # not shipped


def test_a_comparable_retrain_passes_the_gate_and_names_its_parent(fleet, digits_dir):
    first = train(TrainConfig(data=digits_dir, fleet=fleet, model="digits", epochs=4))
    # mark it deployed without a broker: the registry's record is what the gate compares against
    (digits_dir / "models" / "digits" / "deployed.json").write_text(
        json.dumps({fleet: {"version": first.version.version, "chunks": 2, "published_at": 1.0}})
    )

    # Another seed of the same 4-epoch recipe lands anywhere in 0.98-0.995 on these 364 validation
    # samples (CI saw 0.9808 against 0.9945), so "comparable" gets a 3-point tolerance; the refusal of a
    # really worse model is test_gate_refuses_a_model_trained_on_shuffled_labels.
    second = train(TrainConfig(data=digits_dir, fleet=fleet, model="digits", epochs=4, seed=1,
                               tolerance_points=3.0))

    gate = second.report["gate"]
    assert second.status == "kept" and gate["passed"], gate
    assert gate["new_accuracy"] >= gate["deployed_accuracy"] - 0.03 and gate["tolerance_points"] == 3.0
    assert gate["deployed_version"] == first.version.version
    # the deployed model is scored by ONNX Runtime on the same validation set
    assert gate["deployed_accuracy"] == pytest.approx(first.report["export"]["shipped_accuracy"])
    assert second.version.version > first.version.version and second.version.parent == first.version.version
    assert second.check() is second


def test_split_is_by_device_and_seq_and_other_pipelines_are_left_out(tmp_path, fleet, digits_arrays):
    x, y = digits_arrays
    root = write_dataset(tmp_path, fleet, x, list(y))
    write_dataset(
        root, fleet, x[:100], list(y[:100]), pipeline="0123456789abcdef", name="other", seq_start=10_000
    )
    write_dataset(root, fleet, x[:50], [None] * 50, name="unlabelled", seq_start=20_000)
    cached = ParquetDataModule(DataConfig(root=root, fleet=fleet))
    streamed = ParquetDataModule(DataConfig(root=root, fleet=fleet, cache_bytes=0, shuffle_buffer=64))

    info = cached.info

    assert info.pipeline == DIGITS_HASH
    assert (info.other_pipelines, info.unlabelled, info.rows) == (100, 50, len(x) + 150)
    assert info.train_samples + info.val_samples == len(x)
    expected_val = sum(is_validation(f"dev-{i % 3}", i // 3, 0.2) for i in range(len(x)))
    assert info.val_samples == expected_val
    assert cached.cached and not streamed.cached
    vx_c, vy_c = map(np.concatenate, zip(*cached.iter_numpy("val"), strict=True))
    vx_s, vy_s = map(np.concatenate, zip(*streamed.iter_numpy("val"), strict=True))
    assert np.array_equal(vx_c, vx_s) and np.array_equal(vy_c, vy_s)
    train_y = np.concatenate([b[1].numpy() for b in streamed.train_dataloader()])
    assert sorted(train_y.tolist()) == sorted(
        np.concatenate([b[1] for b in cached.iter_numpy("train")]).tolist()
    )


def test_vectors_train_an_mlp_streaming_from_parquet(tmp_path, fleet, digits_arrays):
    x, y = digits_arrays
    root = write_dataset(tmp_path, fleet, x.reshape(len(x), 64), list(y), pipeline="flat64")

    # cache_bytes=0: every epoch streams record batches from Parquet through the shuffle buffer
    result = train(TrainConfig(data=root, fleet=fleet, model="flat", epochs=8, cache_bytes=0))

    assert result.report["training"]["module"] == "lepton.cloud.Classifier(MLP)"
    assert result.version.manifest["input"]["shape"] == [-1, 64]
    assert result.report["export"]["shipped_accuracy"] >= 0.9


def test_cli_rejects_bad_flags_in_one_line(tmp_path, fleet, digits_dir, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--fleet", fleet, "--model", "m"]) == 2
    assert main(["train", "--data", str(digits_dir), "--fleet", fleet, "--model", "m", "--publish"]) == 2
    assert main(["train", "--data", str(digits_dir), "--fleet", "nobody", "--model", "m"]) == 2
    assert (
        main(
            [
                "train",
                "--data",
                str(digits_dir),
                "--fleet",
                fleet,
                "--model",
                "m",
                "--module",
                "no.such:Thing",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("lepton train: error: ") for line in err)
    assert "--broker" in err[1] and "no Parquet files" in err[2] and "cannot import" in err[3]


def test_unreachable_broker_exits_3_keeps_the_version_and_models_publish_ships_it(
    amqtt_broker, fleet, digits_dir, keypair, capsys
):
    from lepton.broker import free_port

    dead = f"mqtt://trainer:pw@127.0.0.1:{free_port()}"
    code = main(
        [
            "train",
            "--quiet",
            "--data",
            str(digits_dir),
            "--fleet",
            fleet,
            "--model",
            "digits",
            "--epochs",
            "3",
            "--publish",
            "--broker",
            dead,
            "--key",
            str(keypair[0]),
        ]
    )
    err = capsys.readouterr().err
    registry = Registry(digits_dir)
    assert code == 3 and "cannot reach broker" in err
    assert registry.get("digits", 1).status == "publish_failed" and registry.deployed("digits", fleet) is None

    url = amqtt_broker.url("worker", "trainer", fleet=fleet)
    code = main(
        ["models", "publish", "digits", "--data", str(digits_dir), "--broker", url, "--key", str(keypair[0])]
    )

    assert code == 0
    assert registry.get("digits", 1).status == "published" and registry.deployed("digits", fleet).version == 1
    assert fetch_model(url, fleet, "digits", keypair[1]).data == registry.get("digits", 1).data()
