"""Synthetic sensor windows whose class is the *shape* of a pattern, not where it is or how strong.

numpy only, so a device, a bench and a test can all generate the same data from a seed. Each sample
is a ``(channels, length)`` float32 window of Gaussian noise with a slow random baseline drift. One
channel, chosen at random, carries one short pattern at a random offset with a random gain. The
classes differ only in the pattern's shape, and every pattern is scaled to the same energy. So
neither the position nor the power of the signal tells the class: a model has to recognise the shape
wherever it is, which is what 1-D convolutions with pooling over time do and an MLP does not.

>>> x, y = sensor_shapes(6, seed=1)
>>> x.shape, x.dtype.name, sorted(set(y.tolist())) <= [0, 1, 2, 3]
((6, 3, 128), 'float32', True)
"""

from __future__ import annotations

import numpy as np

__all__ = ["SHAPES", "sensor_shapes"]

#: The pattern of each class, in class order.
SHAPES = ("sine", "square", "triangle", "sawtooth")


def _pattern(kind: str, width: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, width, endpoint=False)
    if kind == "sine":
        p = np.sin(2 * np.pi * t)
    elif kind == "square":
        p = np.where(t < 0.5, 1.0, -1.0)
    elif kind == "triangle":
        p = 1.0 - 4.0 * np.abs(t - 0.5)
    elif kind == "sawtooth":
        p = 2.0 * t - 1.0
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(kind)
    p = p - p.mean()
    return p / np.linalg.norm(p) * np.sqrt(width)  # unit power: the energy says nothing about the class


def sensor_shapes(
    n: int,
    *,
    channels: int = 3,
    length: int = 128,
    width: int = 24,
    noise: float = 0.6,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows ``x`` of shape ``(n, channels, length)`` (float32) and labels ``y`` (int64, 0..3)."""
    if not 0 < width <= length:
        raise ValueError(f"width must be in 1..length ({length}), got {width}")
    rng = np.random.default_rng(seed)
    patterns = np.stack([_pattern(k, width) for k in SHAPES])
    y = rng.integers(0, len(SHAPES), size=n)
    x = rng.normal(0.0, noise, size=(n, channels, length))
    # A slow baseline drift on every channel, so a plain mean or slope says nothing either.
    t = np.linspace(0.0, 1.0, length)
    x += rng.normal(0.0, 0.5, size=(n, channels, 1)) * np.sin(
        2 * np.pi * (t * rng.uniform(0.2, 1.0, size=(n, channels, 1)) + rng.uniform(0, 1, size=(n, channels, 1)))
    )
    offsets = rng.integers(0, length - width + 1, size=n)
    rows = rng.integers(0, channels, size=n)
    gains = rng.uniform(0.8, 1.2, size=n)
    for i in range(n):
        x[i, rows[i], offsets[i] : offsets[i] + width] += gains[i] * patterns[y[i]]
    return x.astype(np.float32), y.astype(np.int64)
