"""lepton.cloud's public names: visible to type checkers, lazy at run time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lepton.cloud

INIT = Path(lepton.cloud.__file__)
HEAVY = ("torch", "pytorch_lightning", "lightning", "onnx", "onnxruntime", "pyarrow", "sklearn")


def _type_checking_imports() -> dict[str, str]:
    """name -> module of every ``from M import name`` under ``if TYPE_CHECKING:`` in __init__.py."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    blocks = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    assert len(blocks) == 1, "lepton/cloud/__init__.py should have one `if TYPE_CHECKING:` block"
    found: dict[str, str] = {}
    for node in ast.walk(blocks[0]):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                found[alias.asname or alias.name] = node.module or ""
    return found


def test_import_lepton_cloud_imports_none_of_the_heavy_dependencies():
    code = (
        "import sys, lepton.cloud\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import lepton.cloud pulled in {out.stdout.strip()}"


def test_type_checkers_see_exactly_the_public_names_from_the_modules_that_serve_them():
    seen = _type_checking_imports()

    assert sorted(seen) == sorted(lepton.cloud.__all__)
    assert seen == lepton.cloud._LAZY  # the same module at type-check time and at run time


def test_every_public_name_resolves_and_dir_lists_it():
    for name in lepton.cloud.__all__:
        obj = getattr(lepton.cloud, name)
        module = sys.modules[lepton.cloud._LAZY[name]]
        assert obj is getattr(module, name), name
    assert set(lepton.cloud.__all__) <= set(dir(lepton.cloud))


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="'Trainer'"):
        lepton.cloud.Trainer  # noqa: B018
