"""Capture in blocks: the block paths equal the per-sample ones byte for byte (no broker needed)."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.device import PRESETS, FrameError, Pipeline, Spool


def _frames(preset: str) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    if preset == "digits":
        return [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(9)]
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(5)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_block_preprocessing_equals_per_sample_for_every_preset(preset):
    p, frames = Pipeline.from_preset(preset), _frames(preset)
    block = p.run_block(frames)
    for got, frame in zip(block, frames, strict=True):
        want = p(frame)
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("spec", [
    {"ops": [{"op": "crop", "x": 1, "y": 2, "width": 5, "height": 4}, {"op": "cast", "dtype": "float16"}]},
    {"ops": [{"op": "grayscale"}, {"op": "normalize", "mean": 10, "std": 3}, {"op": "cast", "dtype": "uint8"}]},
    {"ops": [{"op": "normalize", "mean": [1, 2, 3], "std": [2, 2, 2]}, {"op": "reshape", "shape": [-1]}]},
    {"ops": [{"op": "resize", "width": 4, "height": 4}, {"op": "laplacian"}, {"op": "reshape", "shape": [-1]}]},
])
def test_block_ops_equal_per_sample_on_colour_frames(spec):
    p, frames = Pipeline(spec), _frames("camera-gray-32")
    for got, frame in zip(p.run_block(frames), frames, strict=True):
        assert got.tobytes() == p(frame).tobytes() and got.shape == p(frame).shape


def test_a_bad_frame_in_a_block_is_that_frames_error_only():
    p = Pipeline.from_preset("digits")
    frames = [np.zeros((8, 8), np.uint8), np.zeros((2, 2, 2, 2), np.uint8), np.ones((8, 8), np.uint8)]
    out = p.run_block(frames)
    assert isinstance(out[1], FrameError)
    assert out[0].tobytes() == p(frames[0]).tobytes() and out[2].tobytes() == p(frames[2]).tobytes()
    crop = Pipeline({"ops": [{"op": "crop", "width": 6, "height": 6}]})  # one shape, all too small
    assert all(isinstance(e, FrameError) for e in crop.run_block([np.zeros((4, 4), np.uint8)] * 3))


def test_append_many_equals_repeated_append(tmp_path):
    xs = [np.full((1, 8, 8), i, np.float32) for i in range(40)]
    ys = [i % 10 for i in range(40)]
    ts = [1000.0 + i for i in range(40)]
    with Spool(tmp_path / "one") as one, Spool(tmp_path / "many", commit_every=16) as many:
        seqs = [one.append_nowait(x, y, ts=t, pipeline="h") for x, y, t in zip(xs, ys, ts, strict=True)]
        assert many.append_many(xs, ys, ts=ts, pipeline="h") == seqs == list(range(40))
        one.flush(), many.flush()
        assert one.read_after(-1, 100) == many.read_after(-1, 100)
        assert (one.depth, one.bytes, one.next_seq) == (many.depth, many.bytes, many.next_seq)


def test_append_block_skips_seqs_like_skip_seq(tmp_path):
    body = Spool.encode_body(np.zeros(4, np.float32), 1)
    with Spool(tmp_path / "a") as a, Spool(tmp_path / "b") as b:
        a.append_block([body, None, body], ts=[1.0, 2.0, 3.0], pipeline="h")
        b.append_nowait(np.zeros(4, np.float32), 1, ts=1.0, pipeline="h")
        b.skip_seq()
        b.append_nowait(np.zeros(4, np.float32), 1, ts=3.0, pipeline="h")
        a.flush(), b.flush()
        assert a.read_after(-1, 10) == b.read_after(-1, 10) and [r.seq for r in a.read_after(-1, 10)] == [0, 2]
        assert a.next_seq == b.next_seq == 3
