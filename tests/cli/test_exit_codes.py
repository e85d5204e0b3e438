"""Exit codes, run as the real commands and programs: one table (lepton.exitcodes) for all of them;
a bad id or path is a usage error (2) with one line that names the flag, never a traceback; a crashed
demo child is a failure of its own (7), not a usage error."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lepton import exitcodes
from lepton.testing import PROJECT_ROOT

#: the broker is never reached: every case fails on its settings first
DEAD_BROKER = {"LEPTON_BROKER": "mqtt://u:p@127.0.0.1:1"}


def _run(argv: list[str], tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **DEAD_BROKER}
    env.pop("LEPTON_PASSWORD", None)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=PROJECT_ROOT, env=env)


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, what the one error line must name)."""
    afile = str(tmp / "afile")
    data = str(tmp / "data")
    return {
        "worker --fleet": (["-m", "lepton", "worker", "--fleet", "bad.fleet", "--data", data], "--fleet"),
        "worker --name": (["-m", "lepton", "worker", "--fleet", "f", "--name", "w/1", "--data", data],
                          "--name"),
        "worker --model": (["-m", "lepton", "worker", "--fleet", "f", "--data", data, "--train-every", "5",
                            "--model", "bad.m"], "--model"),
        "worker --data file": (["-m", "lepton", "worker", "--fleet", "f", "--data", afile], "--data"),
        "train --model": (["-m", "lepton", "train", "--fleet", "f", "--model", "bad.m", "--data", data],
                          "--model"),
        "dataset --fleet": (["-m", "lepton", "dataset", "stats", data, "--fleet", "bad.f"], "--fleet"),
        "models NAME": (["-m", "lepton", "models", "show", "bad.m", "--data", data], "NAME"),
        "models fetch --fleet": (["-m", "lepton", "models", "fetch", "m", "--fleet", "bad.f"], "--fleet"),
        "device --id": (["-m", "lepton", "device", "--fleet", "f", "--id", "bad.d", "--source", "digits"],
                        "bad.d"),
        "demo --workdir file": (["-m", "lepton", "demo", "--workdir", afile], "--workdir"),
        "folder_node --fleet": (["devices/folder_node.py", "--fleet", "bad.f", "--id", "c1",
                                 "--folder", data], "bad.f"),
        "ingest_worker --fleet": (["cloud_workers/ingest_worker.py", "--fleet", "bad.f", "--data", data],
                                  "--fleet"),
        "ingest_worker --data file": (["cloud_workers/ingest_worker.py", "--fleet", "f", "--data", afile],
                                      "--data"),
        "trainer --fleet": (["cloud_workers/trainer.py", "--fleet", "bad.f", "--model", "m", "--data", data,
                             "--once"], "--fleet"),
        "trainer --data missing": (["cloud_workers/trainer.py", "--fleet", "f", "--model", "m", "--data",
                                    str(tmp / "missing")], "--data"),
    }


CASES = list(_cases(Path("/x")))


@pytest.mark.parametrize("case", CASES)
def test_a_bad_id_or_path_is_a_usage_error_in_one_line(case, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "data").mkdir()
    argv, names = _cases(tmp_path)[case]

    proc = _run(argv, tmp_path)

    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == exitcodes.USAGE, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert re.match(r"^[\w ]+: error: ", lines[0]) and names in lines[0], lines[0]


def test_a_crashed_demo_child_is_a_failure_not_a_usage_error(tmp_path):
    """The worker child dies for real (its --data is a file): `lepton demo` says which child, where its
    log is, and exits CHILD_FAILED, even though the child itself exited with a usage error."""
    (tmp_path / "data").write_text("not a folder")

    proc = _run(["-m", "lepton", "demo", "--devices", "1", "--duration", "60", "--json",
                 "--workdir", str(tmp_path)], tmp_path, timeout=180)

    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    log = tmp_path / "logs" / "worker.log"
    assert proc.returncode == exitcodes.CHILD_FAILED != exitcodes.USAGE, proc.stderr[-2000:]
    assert lines[-1] == (f"lepton demo: error: the demo's worker process exited with code "
                         f"{exitcodes.USAGE}; see {log}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "lepton worker: error: cannot use --data" in log.read_text()


def test_one_exit_code_table_for_every_command_and_program():
    """No copies: lepton/exitcodes.py is the only module that gives an exit code a number, the CLI's
    `main`/`run*` functions and the programs' return names from it, and the README's table is it."""
    root = Path(PROJECT_ROOT)
    sources = [*(root / "lepton" / "cli").glob("*.py"), *(root / "devices").glob("*.py"),
               *(root / "cloud_workers").glob("*.py"), root / "lepton" / "_demo.py"]
    names = {n for n in exitcodes.__all__ if n.isupper() and n != "TABLE"}
    copies, literals = [], []
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets = [t for tgt in node.targets
                           for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])]
                if any(isinstance(t, ast.Name) and t.id in names for t in targets):
                    copies.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.FunctionDef) and (node.name == "main" or node.name.startswith("run")
                                                      or node.name == "check_and_train"):
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Constant) \
                            and isinstance(ret.value.value, int):
                        literals.append(f"{path.name}:{ret.lineno}")
    assert copies == [] and literals == [], (copies, literals)

    readme = Path(PROJECT_ROOT, "README.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme, re.M))
    assert {int(k): v for k, v in table.items()} == exitcodes.TABLE


def test_exitcodes_is_light_and_the_cli_help_shows_its_table():
    code = textwrap.dedent("""
        import json, sys
        from lepton import exitcodes
        from lepton.cli import _exit
        assert _exit.USAGE is exitcodes.USAGE and _exit.CHILD_FAILED == exitcodes.CHILD_FAILED
        print(json.dumps(sorted(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = json.loads(out.stdout)
    heavy = ("torch", "pyarrow", "lepton.cloud", "lepton.device", "cv2", "onnxruntime")
    assert [m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy)] == []

    help_text = subprocess.run([sys.executable, "-m", "lepton", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert " ".join(exitcodes.summary().split()) in " ".join(help_text.split())
