"""The cloud never hands ONNX Runtime, nor ships, a model that keeps its data in external files."""

from __future__ import annotations

import pytest

from lepton.cloud import Registry
from lepton.cloud._export import ExportError, onnx_session
from lepton.errors import ConfigError
from tests.device.test_model_channel import external_data_model
from tests.device.test_runtime import INPUT_SPEC, LABELS, PIPE, make_onnx


def test_export_refuses_a_model_with_external_data_before_onnx_runtime(tmp_path):
    crafted = external_data_model(tmp_path, 5)

    with pytest.raises(ExportError, match="external files"):
        onnx_session(crafted)
    assert onnx_session(make_onnx(5)) is not None


def test_the_registry_refuses_to_publish_a_model_with_external_data(tmp_path):
    reg = Registry(tmp_path / "data")
    stored = reg.create("digits", model=external_data_model(tmp_path, 6), input_spec=INPUT_SPEC, labels=LABELS,
                        pipeline={"hash": PIPE, "spec": None}, metrics={}, quantization="none", parent=None,
                        report={"status": "kept", "fleet": "f1"})

    with pytest.raises(ConfigError, match="external files"):
        reg.build("digits", stored.version, fleet="f1")
