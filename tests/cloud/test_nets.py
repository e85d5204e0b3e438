"""The built-in networks: which one a shape gets and why, edge vs cloud sizes, and the temporal CNN
on a sensor task where the class is a pattern's shape at a random offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton._synthetic import SHAPES, sensor_shapes
from lepton.cloud._nets import MLP, SmallCNN, TemporalCNN, build_network, choose_network
from lepton.errors import ConfigError

from .conftest import write_dataset


@pytest.mark.parametrize(
    "shape, cls",
    [((20,), MLP), ((3, 128), TemporalCNN), ((1, 500), TemporalCNN), ((3, 4), MLP), ((1, 8, 8), SmallCNN)],
)
def test_the_shape_picks_the_network_and_the_cloud_one_is_larger(shape, cls):
    tiny, edge = build_network(shape, 5, target="tiny"), build_network(shape, 5)
    cloud = build_network(shape, 5, target="cloud")

    assert type(tiny) is cls and type(edge) is cls and type(cloud) is cls
    size = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert size(cloud) >= 3.5 * size(edge) and size(edge) > 2 * size(tiny)  # "about 4x"
    x = torch.zeros((2, *shape))
    assert tiny.eval()(x).shape == edge.eval()(x).shape == cloud.eval()(x).shape == (2, 5)
    assert str(list(shape)) in choose_network(shape)[2]


def test_an_unknown_target_names_the_choices():
    with pytest.raises(ConfigError, match="choose one of tiny, edge, cloud"):
        choose_network((3, 128), target="gpu")


def test_the_synthetic_task_hides_the_class_from_position_and_power():
    x, y = sensor_shapes(4000, seed=3)
    power = (x**2).sum(axis=(1, 2))
    by_class = [power[y == k].mean() for k in range(len(SHAPES))]
    # Every class carries the same energy: the power of a window says nothing about its class.
    assert max(by_class) / min(by_class) < 1.02
    assert sorted(np.bincount(y).tolist())[0] > 900  # balanced


def test_temporal_cnn_beats_the_mlp_on_pattern_shape_at_random_offsets(tmp_path):
    """Real training through lepton's trainer: auto-chosen TemporalCNN vs the MLP (--module)."""
    from lepton.cloud import TrainConfig, train
    from lepton.cloud._export import ExportConfig

    x, y = sensor_shapes(3000, seed=0)
    root = write_dataset(tmp_path / "data", "sensors", x, list(y), pipeline="sensor-v1")
    fast = ExportConfig(quantize=False, latency_runs=5)
    common = dict(data=root, fleet="sensors", epochs=8, patience=8, export=fast)

    cnn = train(TrainConfig(model="tcnn", **common)).report
    mlp = train(TrainConfig(model="mlp", module="lepton.cloud._nets:MLP", **common)).report

    arch = cnn["training"]["architecture"]
    assert arch["class"] == "TemporalCNN" and "channels x time" in arch["reason"]
    assert mlp["training"]["architecture"]["class"] == "MLP"
    cnn_acc, mlp_acc = cnn["export"]["fp32_accuracy"], mlp["export"]["fp32_accuracy"]
    # Measured: TemporalCNN ~0.8, MLP ~0.27 (chance is 0.25) on 600 validation windows.
    assert cnn_acc >= 0.65, cnn_acc
    assert mlp_acc <= 0.45, mlp_acc
    assert cnn_acc - mlp_acc >= 0.3
