"""Every ``>>>`` example in lepton/ runs, and none is skipped.

Modules are found by their source text, so a new example is picked up without editing this file;
an example that cannot run (it needs a broker URL or a dataset) is written as a plain ``::`` block.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lepton"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if ">>>" in p.read_text(encoding="utf-8"))


def test_examples_are_found():
    # the discovery below is what runs the examples; a broken glob must not pass silently
    assert len(SOURCES) >= 10, [str(p) for p in SOURCES]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module_name(p))
def test_module_examples_run(path: Path):
    text = path.read_text(encoding="utf-8")
    assert "doctest: +SKIP" not in text, f"{path}: run the example, or write it as a plain '::' block"
    module = importlib.import_module(_module_name(path))

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)

    assert result.attempted > 0, f"{path} has '>>>' but doctest found no example in it"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {path} (see above)"
