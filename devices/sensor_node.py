#!/usr/bin/env python3
"""Vibration sensor node: a custom numpy source that turns 1 kHz accelerometer windows into FFT features.

The "sensor" simulates a motor at 50 Hz; a worn bearing adds a 157 Hz tone and impacts. Each window of
256 readings becomes 64 log-magnitude spectrum bins, shape (1, 64), labelled "ok" or "fault", so a
model can learn to tell them apart. It shows the SDK's Python API: any iterable of (frame, label).

    devices/sensor_node.py --broker mqtt://vib-1@localhost:1883 --password-file vib-1.pw \\
        --fleet plant --id vib-1 --rate 20
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
from _common import parser, run

RATE_HZ, WINDOW, BINS = 1000, 256, 64
#: The device-side pipeline: features are already computed by the source, just normalised.
PIPELINE = {
    "name": "vibration-fft64",
    "ops": [{"op": "normalize", "mean": 0.0, "std": 4.0}, {"op": "cast", "dtype": "float32"}],
}


def vibration_source(seed: int = 0, fault_rate: float = 0.3) -> Iterator[tuple[np.ndarray, str]]:
    """Endless (features, label) pairs from a simulated accelerometer."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / RATE_HZ
    hann = np.hanning(WINDOW)
    while True:
        fault = rng.random() < fault_rate
        signal = np.sin(2 * np.pi * 50 * t + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 0.2, WINDOW)
        if fault:
            signal += 0.6 * np.sin(2 * np.pi * 157 * t) + (rng.random(WINDOW) < 0.02) * rng.normal(
                0, 3, WINDOW
            )
        spectrum = np.abs(np.fft.rfft(signal * hann))[: BINS * 2].reshape(BINS, 2).mean(axis=1)
        yield np.log1p(spectrum).astype(np.float32).reshape(1, BINS), "fault" if fault else "ok"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulated sensor")
    args = p.parse_args(argv)
    return run(
        args,
        name="sensor_node",
        source=vibration_source(args.seed),
        pipeline=PIPELINE,
        batch_size=16,
        batch_ms=250,
    )


if __name__ == "__main__":
    sys.exit(main())
