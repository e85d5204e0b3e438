"""lepton/ type-checks clean: ``python -m mypy lepton`` with the ``[mypy]`` section of setup.cfg.

mypy keeps its cache in ``.mypy_cache/`` at the repository root (git-ignored): the first run analyses
torch and Lightning too (about 40 s on 2 cores), later runs only what changed (a few seconds).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path


from tests.conftest import missing_component

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_errors():
    if importlib.util.find_spec("mypy") is None:
        missing_component("mypy is not installed (pip install -e '.[test]')")

    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "setup.cfg", "lepton"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )

    output, exit_code = proc.stdout + proc.stderr, proc.returncode
    assert exit_code == 0, f"mypy lepton failed:\n{output}"
    # a config that silently matched nothing would pass too: the whole package was checked
    checked = re.search(r"no issues found in (\d+) source files", output)
    assert checked and int(checked.group(1)) >= 50, output
