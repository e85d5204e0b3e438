"""The contract with the cloud: what lepton.cloud exports (fp32 and int8 QDQ ONNX) is what a device serves.

Tests may use torch to MAKE models; the runtime itself never imports it (see test_runtime.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from lepton.protocol import Topics, build_package
from tests.device.test_runtime import feed, make_keys, make_runtime, messages, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


def test_cloud_exported_fp32_and_int8_models_hot_swap_on_the_device(tmp_path, keys, fleet):
    import torch

    from lepton.cloud._export import export_onnx, quantize_int8
    from lepton.cloud._nets import build_network
    from lepton.device import Pipeline, open_source

    pipeline = Pipeline.from_preset("digits")
    frames = [(pipeline(f), label) for f, label in open_source("digits", once=True)][:64]
    shape = frames[0][0].shape  # (1, 8, 8)
    torch.manual_seed(0)
    net = build_network(shape, 10)
    fp32 = export_onnx(net, shape)
    int8 = quantize_int8(fp32, (np.stack([x for x, _ in frames[i:i + 16]]) for i in range(0, 64, 16)))
    assert len(int8) < len(fp32)

    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    runtime = make_runtime(fleet, tmp_path, public, pipeline_hash=pipeline.hash, input_shape=shape)
    labels = [str(i) for i in range(10)]
    try:
        for version, data, quant in ((1, fp32, "none"), (2, int8, "int8")):
            manifest, chunks = build_package(
                fleet=fleet,
                name="digits", version=version, data=data, labels=labels, quantization=quant,
                input_spec={"name": "input", "shape": [-1, *shape], "dtype": "float32", "output": "logits"},
                pipeline={"hash": pipeline.hash, "spec": None}, private_key=private)
            feed(runtime, messages(topics, version, manifest, chunks))
            wait_for(lambda v=version: runtime.version == v, 60, f"v{version}")
            net.eval()  # export_onnx restores training mode; BatchNorm must use its running stats here
            with torch.no_grad():
                expected = net(torch.from_numpy(np.stack([x for x, _ in frames]))).argmax(1).numpy()
            got = np.array([runtime.predict(x).index for x, _ in frames])
            agreement = float((got == expected).mean())
            assert agreement >= (1.0 if quant == "none" else 0.8), agreement  # int8 may flip near-ties
            assert runtime.status()["model_quantization"] == quant
        assert runtime.telemetry()["inference_failures"] == 0
    finally:
        runtime.close()
