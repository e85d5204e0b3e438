"""The registry: monotonic versions on disk, rollback as a new version, `lepton models` CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from lepton.cli._main import main
from lepton.cloud import Registry, fetch_model
from lepton.errors import ConfigError



def other_weights(version) -> bytes:
    """A second valid ONNX model: the fp32 export when int8 shipped, else the shipped one re-labelled
    (the export ships fp32 alone when int8 loses too much accuracy, so model.fp32.onnx may not exist)."""
    fp32 = version.path / "model.fp32.onnx"
    if fp32.exists():
        return fp32.read_bytes()
    import onnx

    model = onnx.load_from_string(version.data())
    model.doc_string = "another version"
    return model.SerializeToString()

def _store(reg: Registry, data: bytes, *, manifest: dict, parent=None, status="kept"):
    return reg.create(
        "digits",
        model=data,
        input_spec=manifest["input"],
        labels=manifest["labels"],
        pipeline=manifest["pipeline"],
        metrics=manifest["metrics"],
        quantization=manifest["quantization"],
        parent=parent,
        report={"status": status, "fleet": "f"},
    )


def test_versions_only_go_up_even_after_a_version_is_deleted(tmp_path, trained_digits):
    _, _, version = trained_digits
    reg = Registry(tmp_path)
    versions = [_store(reg, version.data(), manifest=version.manifest).version for _ in range(3)]
    shutil.rmtree(reg.get("digits", 3).path)

    again = _store(reg, version.data(), manifest=version.manifest)

    assert versions == [1, 2, 3]
    assert again.version == 4
    assert reg.versions("digits") == [1, 2, 4]
    with pytest.raises(ConfigError, match="no version 3"):
        reg.get("digits", 3)


def test_rollback_republishes_old_weights_as_a_higher_version(
    amqtt_broker, fleet, tmp_path, trained_digits, keypair, capsys
):
    _, _, version = trained_digits
    reg = Registry(tmp_path)
    int8, fp32 = version.data(), other_weights(version)
    url = amqtt_broker.url("worker", "trainer", fleet=fleet)
    v1 = _store(reg, int8, manifest=version.manifest)
    v2 = _store(reg, fp32, manifest={**version.manifest, "quantization": "none"}, parent=1)
    reg.publish("digits", v1.version, url=url, fleet=fleet)
    reg.publish("digits", v2.version, url=url, fleet=fleet)

    code = main(
        [
            "models",
            "rollback",
            "digits",
            "--to",
            "1",
            "--data",
            str(tmp_path),
            "--publish",
            "--broker",
            url,
            "--fleet",
            fleet,
            "--key",
            str(keypair[0]),
            "--json",
        ]
    )

    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["version"] == 3 and out["parent"] == 1 and out["status"] == "published"
    assert out["publication"]["cleared"] == {"2": len(fp32) // (96 * 1024) + 1}
    package = fetch_model(amqtt_broker.url("device", "dev-1", fleet=fleet), fleet, "digits", keypair[1])
    assert package.manifest.version == 3 and package.manifest.parent == 1
    assert package.data == int8  # v1's weights, under a newer number
    assert package.manifest.quantization == version.manifest["quantization"]  # v1's, int8 or fp32
    assert reg.deployed("digits", fleet).version == 3
    assert reg.get("digits", 3).manifest["sha256"] == v1.manifest["sha256"]
    # the CLI's late-joiner view agrees
    device_url = amqtt_broker.url("device", "dev-2", fleet=fleet)
    out_file = tmp_path / "fetched.onnx"
    code = main(
        [
            "models",
            "fetch",
            "digits",
            "--broker",
            device_url,
            "--fleet",
            fleet,
            "--public-key",
            str(keypair[1]),
            "--out",
            str(out_file),
            "--json",
        ]
    )
    fetched = json.loads(capsys.readouterr().out)
    assert code == 0 and out_file.read_bytes() == int8
    assert fetched["manifest"]["version"] == 3 and fetched["signed_by"] == package.signed_by


def test_models_list_and_show_cli(tmp_path, trained_digits, capsys):
    _, _, version = trained_digits
    reg = Registry(tmp_path)
    _store(reg, version.data(), manifest=version.manifest)
    _store(reg, version.data(), manifest=version.manifest, parent=1, status="refused")

    assert main(["models", "list", "--data", str(tmp_path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert main(["models", "show", "digits", "--data", str(tmp_path), "--version", "1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert main(["models", "list", "--data", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert main(["models", "show", "digits", "--data", str(tmp_path), "--version", "9"]) == 2

    assert [(v["version"], v["status"], v["parent"]) for v in listing["models"]["digits"]["versions"]] == [
        (1, "kept", None),
        (2, "refused", 1),
    ]
    assert shown["manifest"]["version"] == 1 and shown["manifest"]["labels"] == [str(i) for i in range(10)]
    assert "refused" in table and "digits" in table
    assert "has no version 9" in capsys.readouterr().err


def test_an_older_version_is_never_published_over_a_newer_one(
    amqtt_broker, fleet, tmp_path, trained_digits, capsys
):
    _, _, version = trained_digits
    reg = Registry(tmp_path)
    url = amqtt_broker.url("worker", "trainer", fleet=fleet)
    _store(reg, version.data(), manifest=version.manifest)
    _store(reg, version.data(), manifest=version.manifest, parent=1)
    reg.publish("digits", 2, url=url, fleet=fleet)

    code = main(
        [
            "models",
            "publish",
            "digits",
            "--version",
            "1",
            "--data",
            str(tmp_path),
            "--broker",
            url,
            "--fleet",
            fleet,
        ]
    )

    assert code == 2
    assert "models rollback digits --to 1" in capsys.readouterr().err
    assert fetch_model(url, fleet, "digits", None).manifest.version == 2
