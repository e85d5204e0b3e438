"""Preprocessing ops on real images: UCI digits and frames of a video written here with cv2.VideoWriter."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits

from lepton.device import OPS, PRESETS, FrameError, Pipeline, open_source
from lepton.errors import ConfigError


@pytest.fixture(scope="module")
def video_frames(tmp_path_factory) -> list[np.ndarray]:
    """Ten 64x48 BGR frames of a white square moving over a red-to-blue background, through MJPEG."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(10):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, :32] = (0, 0, 200)  # red half (BGR)
        frame[:, 32:] = (200, 0, 0)  # blue half
        frame[10:30, 5 + 3 * i : 25 + 3 * i] = 255
        writer.write(frame)
    writer.release()
    frames = [f for f, _ in open_source(f"video:{path}", once=True)]
    assert len(frames) == 10
    return frames


@pytest.fixture(scope="module")
def digits_frames() -> tuple[np.ndarray, np.ndarray]:
    src = open_source("digits", once=True)
    return np.stack([f for f, _ in src]), load_digits().images


def run(ops: list[dict], frame: np.ndarray) -> np.ndarray:
    return Pipeline({"ops": ops})(frame)


def test_digits_preset_gives_cnn_ready_tensors(digits_frames):
    frames, raw = digits_frames
    p = Pipeline.from_preset("digits")
    out = np.stack([p(f) for f in frames[:200]])
    assert out.shape == (200, 1, 8, 8) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Same image as scikit-learn's 0..16 scale, up to the uint8 rounding of the source.
    np.testing.assert_allclose(out[:, 0], raw[:200] / 16.0, atol=1 / 255 + 1e-6)


def test_grayscale_uses_bgr_weights(video_frames):
    gray = run([{"op": "grayscale"}], video_frames[0])
    assert gray.shape == (48, 64) and gray.dtype == np.uint8
    # Red (BGR 0,0,200) is brighter in luma than blue (200,0,0): 0.299*200 vs 0.114*200.
    assert abs(int(gray[40, 5]) - 60) <= 6 and abs(int(gray[40, 60]) - 23) <= 6


@pytest.mark.parametrize(
    ("op", "noise"),
    [
        ({"op": "gaussian_blur", "ksize": 5}, "gaussian"),
        ({"op": "median_blur", "ksize": 3}, "salt-and-pepper"),
        ({"op": "bilateral", "d": 5, "sigma_color": 75, "sigma_space": 5}, "gaussian"),
    ],
)
def test_denoise_ops_reduce_noise_on_a_flat_region(video_frames, op, noise):
    clean = run([{"op": "grayscale"}], video_frames[3]).astype(np.float32)
    rng = np.random.default_rng(0)
    noisy = clean.copy()
    if noise == "gaussian":
        noisy += rng.normal(0, 20, noisy.shape).astype(np.float32)
    else:
        mask = rng.random(noisy.shape) < 0.05
        noisy[mask] = rng.choice([0.0, 255.0], mask.sum())
    out = run([op], noisy)
    assert out.shape == clean.shape
    flat = (slice(34, 46), slice(2, 28))  # inside the red half, away from the square and the border
    err_out = np.abs(out[flat] - clean[flat]).mean()
    err_in = np.abs(noisy[flat] - clean[flat]).mean()
    assert err_out < 0.6 * err_in


def test_edge_ops_fire_on_the_square_border_only(video_frames):
    gray = [{"op": "grayscale"}]
    frame = video_frames[0]
    canny = run([*gray, {"op": "canny", "threshold1": 50, "threshold2": 150}], frame)
    assert canny.dtype == np.uint8 and set(np.unique(canny)) <= {0, 255} and canny.any()
    assert not canny[15:25, 10:20].any()  # inside the white square: no edge
    sobel = run([*gray, {"op": "sobel"}], frame)
    lap = run([*gray, {"op": "laplacian", "absolute": True}], frame)
    for edges in (sobel, lap):
        assert edges.dtype == np.float32
        assert edges[20, 4:7].max() > 10 * (edges[20, 12:18].max() + 1)  # left border vs interior
    sx = run([*gray, {"op": "sobel", "mode": "x"}], frame)
    sy = run([*gray, {"op": "sobel", "mode": "y"}], frame)
    assert np.abs(sx[20, 3:8]).max() > np.abs(sy[20, 3:8]).max()  # a vertical border is an x-gradient


def test_resize_crop_normalize_cast_reshape(video_frames):
    f = video_frames[5]
    assert run([{"op": "resize", "width": 16, "height": 12}], f).shape == (12, 16, 3)
    crop = run([{"op": "crop", "x": 4, "y": 2, "width": 10, "height": 8}], f)
    np.testing.assert_array_equal(crop, f[2:10, 4:14])
    norm = run([{"op": "normalize", "mean": [100, 0, 50], "std": [2, 1, 4]}], f)
    np.testing.assert_allclose(norm[0, 0], (f[0, 0].astype(np.float32) - [100, 0, 50]) / [2, 1, 4], rtol=1e-6)
    for dtype in ("float16", "float32", "uint8"):
        assert run([{"op": "cast", "dtype": dtype}], norm).dtype == np.dtype(dtype)
    assert run([{"op": "cast", "dtype": "uint8"}], np.array([[-3.0, 300.0]], np.float32)).tolist() == [
        [0, 255]
    ]
    out = run(
        [
            {"op": "grayscale"},
            {"op": "resize", "width": 32, "height": 32},
            {"op": "reshape", "shape": [1, -1]},
        ],
        f,
    )
    assert out.shape == (1, 1024)


def test_hog_descriptor_shape_and_l2hys_bounds(video_frames):
    hog = run(
        [{"op": "grayscale"}, {"op": "resize", "width": 64, "height": 48}, {"op": "hog"}], video_frames[2]
    )
    # 8 px cells -> 6x8 cells, 2x2-cell blocks -> 5x7 blocks, 4 cells x 9 bins each.
    assert hog.shape == (5 * 7 * 4 * 9,) and hog.dtype == np.float32
    assert hog.min() >= 0 and hog.max() <= 1.0 and hog.any()
    other = run(
        [{"op": "grayscale"}, {"op": "resize", "width": 64, "height": 48}, {"op": "hog"}], video_frames[8]
    )
    assert not np.allclose(hog, other)  # the square moved


def test_color_hist_tells_red_from_blue(video_frames):
    f = video_frames[0]
    left, right = f[32:, :8], f[32:, -8:]  # below the white square
    h_left = run([{"op": "color_hist", "bins": 8}], np.ascontiguousarray(left))
    h_right = run([{"op": "color_hist", "bins": 8}], np.ascontiguousarray(right))
    assert h_left.shape == (24,)
    np.testing.assert_allclose(h_left.reshape(3, 8).sum(1), 1.0, rtol=1e-5)
    # channel 2 (red) is high on the left, channel 0 (blue) high on the right
    assert h_left.reshape(3, 8)[2, -2:].sum() > 0.8 and h_right.reshape(3, 8)[0, -2:].sum() > 0.8
    assert h_left.reshape(3, 8)[0, -2:].sum() < 0.1 and h_right.reshape(3, 8)[2, -2:].sum() < 0.1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_on_video_frames_and_digits(name, video_frames, digits_frames):
    p = Pipeline.from_preset(name)
    a, b = p(video_frames[0]), p(digits_frames[0][0])
    assert a.shape == b.shape and a.dtype == b.dtype and np.isfinite(a).all()


def test_every_op_runs_with_defaults_on_a_real_frame(video_frames):
    required = {
        "resize": {"width": 16, "height": 16},
        "crop": {"width": 8, "height": 8},
        "cast": {"dtype": "float32"},
        "reshape": {"shape": [-1]},
    }
    for name in OPS:
        op = {"op": name, **required.get(name, {})}
        ops = [{"op": "resize", "width": 32, "height": 32}, op]
        out = run(ops, video_frames[1])
        assert out.size > 0 and np.isfinite(out.astype(np.float64)).all(), name


# ------------------------------------------------------------------------------------------------
# the spec hash
# ------------------------------------------------------------------------------------------------
def test_hash_fills_defaults_and_ignores_names():
    a = Pipeline({"ops": [{"op": "gaussian_blur"}]})
    b = Pipeline({"ops": [{"op": "gaussian_blur", "ksize": 3, "sigma": 0}]})
    c = Pipeline({"name": "x", "description": "y", "ops": [{"sigma": 0.0, "op": "gaussian_blur"}]})
    assert a.hash == b.hash == c.hash
    assert Pipeline({"ops": []}).hash != a.hash


def _alternative(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2
    if isinstance(value, float):
        return value + 1.5
    if isinstance(value, list):
        return [*value[:-1], value[-1] + 1] if value[-1] != -1 else [*value[:-1], 64]
    return None


def test_hash_changes_when_any_parameter_changes():
    base_ops = {
        name: Pipeline({"ops": [{"op": name, **req}]}).ops[0]
        for name, req in {
            **{n: {} for n in OPS},
            "resize": {"width": 16, "height": 16},
            "crop": {"width": 8, "height": 8},
            "cast": {"dtype": "float32"},
            "reshape": {"shape": [1, 8, 8]},
        }.items()
    }
    seen = set()
    changed = 0
    for name, op in base_ops.items():
        h = Pipeline({"ops": [op]}).hash
        assert h not in seen
        seen.add(h)
        for param, value in op.items():
            if param == "op":
                continue
            alt = copy.deepcopy(op)
            new = _alternative(value)
            if new is None:  # a choice: take another allowed option
                options = {"mode": "x", "interpolation": "cubic", "dtype": "float16"}
                new = options[param] if value != options[param] else "y"
            alt[param] = new
            if name == "canny" and param == "aperture":
                alt[param] = 5
            assert Pipeline({"ops": [alt]}).hash != h, (name, param)
            changed += 1
    assert changed >= 25
    preset = PRESETS["digits"]
    reordered = {"ops": list(reversed(preset["ops"]))}
    assert Pipeline(reordered).hash != Pipeline(preset).hash


def test_hash_is_stable_across_processes():
    code = (
        "import json; from lepton.device import Pipeline, PRESETS; "
        "print(json.dumps({n: Pipeline.from_preset(n).hash for n in PRESETS}))"
    )
    outs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                check=True,
                env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin"},
            ).stdout
        )
        for seed in (1, 2)
    ]
    here = {n: Pipeline.from_preset(n).hash for n in PRESETS}
    assert outs[0] == outs[1] == here


def test_spec_files_json_and_toml_are_the_same_pipeline(tmp_path):
    spec = PRESETS["camera-gray-32"]
    (tmp_path / "p.json").write_text(json.dumps(spec))
    toml = "\n".join(
        "[[ops]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in op.items()) for op in spec["ops"]
    )
    (tmp_path / "p.toml").write_text(toml)
    assert (
        Pipeline.resolve(tmp_path / "p.json").hash
        == Pipeline.resolve(str(tmp_path / "p.toml")).hash
        == Pipeline.from_preset("camera-gray-32").hash
    )


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"ops": [{"op": "blur"}]}, ["op #0", "unknown op 'blur'", "known ops"]),
        (
            {"ops": [{"op": "grayscale"}, {"op": "gaussian_blur", "ksize": 4}]},
            ["op #1", "gaussian_blur", "odd"],
        ),
        ({"ops": [{"op": "resize", "width": 8}]}, ["resize", "missing required parameter 'height'"]),
        ({"ops": [{"op": "canny", "low": 3}]}, ["canny", "unknown parameter 'low'", "threshold1"]),
        ({"ops": [{"op": "cast", "dtype": "int64"}]}, ["cast", "float16, float32, uint8"]),
        ({"ops": [{"op": "normalize", "std": 0}]}, ["normalize", "std", "must not be 0"]),
        ({"ops": [{"op": "resize", "width": 8.0, "height": 8}]}, ["resize", "width", "integer"]),
        ({"steps": []}, ["unknown key 'steps'"]),
        ({"ops": "grayscale"}, ["must be a list"]),
    ],
)
def test_bad_specs_fail_at_build_time_naming_op_and_fix(spec, words):
    with pytest.raises(ConfigError) as err:
        Pipeline(spec)
    for word in words:
        assert word in str(err.value)


def test_frame_errors_are_per_frame_not_crashes(video_frames):
    p = Pipeline({"ops": [{"op": "crop", "x": 60, "y": 0, "width": 10, "height": 10}]})
    with pytest.raises(FrameError, match="outside the 64x48 frame"):
        p(video_frames[0])
    with pytest.raises(FrameError):
        Pipeline.from_preset("digits")(np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(FrameError, match="reshape"):
        Pipeline({"ops": [{"op": "reshape", "shape": [1, 8, 8]}]})(video_frames[0])
