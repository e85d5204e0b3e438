"""lepton keys generate: a usable key pair, never an overwrite."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lepton.cli import main
from lepton.protocol import build_package, load_private_key, load_public_key, verify_package


def test_generate_writes_a_pair_that_signs_and_verifies_a_model(tmp_path, capsys):
    code = main(["keys", "generate", "--out", str(tmp_path / "keys"), "--name", "fleet-a", "--json"])

    assert code == 0
    report = json.loads(capsys.readouterr().out)
    private, public = tmp_path / "keys" / "fleet-a.key", tmp_path / "keys" / "fleet-a.pub"
    assert report["private"] == str(private) and report["public"] == str(public)
    assert private.stat().st_mode & 0o777 == 0o600
    manifest, chunks = build_package(fleet="f1", name="m", version=1, data=b"onnx" * 500, input_spec={},
                                     labels=[0, 1],
                                     pipeline={}, private_key=load_private_key(private))
    package = verify_package(manifest, dict(enumerate(chunks)), public_key=load_public_key(public))
    assert package.signed_by == report["key_id"]


def test_generate_refuses_to_overwrite_an_existing_key(tmp_path, capsys):
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "lepton.key").read_bytes()
    capsys.readouterr()

    code = main(["keys", "generate", "--out", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lepton keys: error:")
    assert "lepton.key already exists" in err
    assert (tmp_path / "lepton.key").read_bytes() == before


def test_generate_refuses_when_only_the_public_key_exists(tmp_path, capsys):
    (tmp_path / "lepton.pub").write_text("trusted by devices")

    assert main(["keys", "generate", "--out", str(tmp_path)]) == 2
    assert "lepton.pub already exists" in capsys.readouterr().err
    assert (tmp_path / "lepton.pub").read_text() == "trusted by devices"


@pytest.mark.parametrize("name", ["../escape", "a b", ""])
def test_generate_refuses_a_name_that_is_not_an_id(tmp_path, capsys, name):
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", name]) == 2
    assert "--name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_generate_reports_an_unwritable_folder_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    assert main(["keys", "generate", "--out", str(blocker / "keys")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err


def test_the_installed_command_prints_paths_and_key_id(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lepton", "keys", "generate", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "lepton.key") in result.stdout and "key id" in result.stdout
