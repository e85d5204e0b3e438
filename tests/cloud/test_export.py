"""ONNX export and int8 quantization: every built-in network exports, int8 is small and accurate."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lepton.cloud import (
    Classifier,
    DataConfig,
    ExportConfig,
    ExportError,
    ParquetDataModule,
    build_network,
    export_and_compress,
    export_onnx,
)
from lepton.cloud._export import compare_latency_ms, int8_decision, onnx_session
from lepton.cloud._nets import MLP, SmallCNN, TemporalCNN


@pytest.mark.parametrize(
    "shape, kind",
    [
        ((1, 8, 8), SmallCNN),
        ((8, 8), TemporalCNN),  # rank 2 is channels x time
        ((3, 128), TemporalCNN),
        ((2, 1000), TemporalCNN),
        ((3, 64, 64), SmallCNN),
        ((3, 224, 224), SmallCNN),
        ((1, 28, 20), SmallCNN),
        ((64,), MLP),
    ],
)
def test_builtin_network_exports_with_dynamic_batch(shape, kind):
    torch.manual_seed(0)
    net = build_network(shape, 7)
    assert isinstance(net, kind)
    net.train()

    model = export_onnx(net, shape, opset=17)

    assert net.training, "export must restore training mode"
    proto = onnx.load_from_string(model)
    assert proto.opset_import[0].version >= 17
    x = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    got = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    net.eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 7)
    assert np.max(np.abs(got - expected)) < 1e-4


def test_trained_digits_ships_int8_per_channel_qdq(trained_digits):
    _, _, version = trained_digits
    report = version.report["export"]

    assert report["shipped"] == "int8"
    assert report["max_abs_diff"] < 1e-3
    assert report["fp32_accuracy"] >= 0.95
    assert report["accuracy_drop_points"] <= report["max_int8_drop_points"] == 2.0
    assert report["int8_size_bytes"] <= 0.3 * report["fp32_size_bytes"]
    proto = onnx.load_from_string(version.data())
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = {i.name: i for i in proto.graph.initializer}
    # per-channel: the weight DequantizeLinear of every conv has one scale per output channel
    conv_inputs = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    per_channel = [
        n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in conv_inputs
    ]
    assert per_channel and all(
        len(weights[n.input[1]].dims) == 1 and weights[n.input[1]].dims[0] > 1 for n in per_channel
    )
    assert all(weights[n.input[0]].data_type == onnx.TensorProto.INT8 for n in per_channel)


def test_fp32_ships_with_reason_when_int8_drop_is_too_large(trained_digits):
    root, fleet, _ = trained_digits
    dm = ParquetDataModule(DataConfig(root=root, fleet=fleet))
    module = Classifier(input_shape=dm.input_shape, num_classes=len(dm.labels))

    result = export_and_compress(module, dm, ExportConfig(max_int8_drop_points=-100.0, latency_runs=5))

    assert result.quantization == "none"
    assert result.shipped == result.fp32
    assert result.int8 is not None and len(result.int8) < len(result.fp32)
    assert "shipping fp32" in result.report["reason"]
    assert result.report["shipped_accuracy"] == result.report["fp32_accuracy"]


@pytest.mark.parametrize(
    "drop, fp32_ms, int8_ms, speedup, shipped, words",
    [
        (0.5, 0.030, 0.020, True, "int8", "and faster"),
        (0.5, 0.020, 0.030, True, "none", "not faster here"),
        (0.5, 0.020, 0.020, True, "none", "not faster here"),  # a tie is not a speed-up
        (0.5, 0.020, 0.030, False, "int8", "slower, allowed"),
        (1.5, 0.030, 0.010, True, "none", "> 1 allowed"),  # faster but not accurate enough
        (float("nan"), 0.030, 0.010, True, "none", "> 1 allowed"),
    ],
)
def test_int8_ships_only_when_accurate_and_faster(drop, fp32_ms, int8_ms, speedup, shipped, words):
    quantization, reason = int8_decision(drop, fp32_ms, int8_ms, 1.0, require_speedup=speedup)

    assert quantization == shipped
    assert words in reason
    assert f"int8 {int8_ms:.3f} ms vs fp32 {fp32_ms:.3f} ms" in reason  # both latencies, always


def test_export_decision_follows_its_own_measured_latencies(trained_digits):
    """On this machine, whatever it is: int8 ships iff it was within tolerance and measured faster."""
    root, fleet, version = trained_digits
    dm = ParquetDataModule(DataConfig(root=root, fleet=fleet))
    module = Classifier(input_shape=dm.input_shape, num_classes=len(dm.labels))

    result = export_and_compress(module, dm, ExportConfig(max_int8_drop_points=100.0, latency_runs=50))

    r = result.report
    assert r["require_int8_speedup"] is True
    assert r["fp32_latency_ms"] > 0 and r["int8_latency_ms"] > 0
    assert r["int8_speedup"] == round(r["fp32_latency_ms"] / r["int8_latency_ms"], 3)
    faster = r["int8_latency_ms"] < r["fp32_latency_ms"]
    assert result.quantization == ("int8" if faster else "none")
    assert r["shipped"] == ("int8" if faster else "fp32")
    assert result.shipped == (result.int8 if faster else result.fp32)
    assert ("and faster" if faster else "not faster here") in r["reason"]


def test_interleaved_latency_tells_a_heavier_model_apart():
    """compare_latency_ms measures each session under the same load: a 128x wider MLP is slower."""
    small = onnx_session(export_onnx(MLP(input_shape=(1, 8, 8), num_classes=10, hidden=16), (1, 8, 8)))
    large = onnx_session(export_onnx(MLP(input_shape=(1, 8, 8), num_classes=10, hidden=2048), (1, 8, 8)))
    x = np.zeros((1, 1, 8, 8), np.float32)

    small_ms, large_ms = compare_latency_ms(small, large, x, runs=60)

    assert 0 < small_ms < large_ms


def test_unexportable_model_fails_with_a_message_naming_the_fix():
    class Spectral(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real

    with pytest.raises(ExportError, match="--module"):
        export_onnx(Spectral(), (1, 8, 8))
