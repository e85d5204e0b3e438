"""Every room's errors live in lepton.errors; the rooms re-export the same classes, and importing them
stays light (the device side imports lepton.errors)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import lepton.errors as errors

MOVED = {  # name -> (room package, private module that raised it before, bases)
    "FrameError": ("lepton.device", "lepton.device._pipeline", (errors.LeptonError, ValueError)),
    "SpoolFull": ("lepton.device", "lepton.device._spool", (errors.LeptonError,)),
    "ExportError": ("lepton.cloud", "lepton.cloud._export", (errors.LeptonError,)),
    "DeliveryError": ("lepton.cloud", "lepton.cloud._delivery", (errors.LeptonError,)),
}


@pytest.mark.parametrize("name", sorted(MOVED))
def test_room_errors_are_the_classes_of_lepton_errors(name):
    import importlib

    package, module, bases = MOVED[name]
    cls = getattr(errors, name)

    assert name in errors.__all__ and cls.__module__ == "lepton.errors"
    assert cls.__bases__ == bases
    assert getattr(importlib.import_module(package), name) is cls and name in importlib.import_module(
        package).__all__
    assert getattr(importlib.import_module(module), name) is cls  # existing imports keep working


def test_child_crashed_carries_its_data():
    exc = errors.ChildCrashed("dev-0", -9, "/tmp/w/logs/dev-0.log")

    assert isinstance(exc, errors.LeptonError) and not isinstance(exc, errors.ConfigError)
    assert (exc.name, exc.returncode, exc.log) == ("dev-0", -9, "/tmp/w/logs/dev-0.log")
    assert "dev-0" in str(exc) and "-9" in str(exc) and "dev-0.log" in str(exc)


def test_the_errors_import_no_heavy_dependency():
    code = textwrap.dedent("""
        import json, sys
        from lepton.errors import DeliveryError, ExportError, FrameError, SpoolFull
        from lepton.cloud import DeliveryError as D, ExportError as E  # lazily, from lepton.errors
        assert D is DeliveryError and E is ExportError
        print(json.dumps(sorted(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = json.loads(out.stdout)
    heavy = ("torch", "pytorch_lightning", "lightning", "pyarrow", "onnx", "onnxruntime", "cv2", "sklearn",
             "lepton.device", "lepton.cloud._export", "lepton.cloud._delivery")
    assert [m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy)] == []
