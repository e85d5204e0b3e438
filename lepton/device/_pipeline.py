"""Declarative OpenCV/numpy preprocessing: a spec is a list of ops with parameters, and has a hash.

A spec is plain data, so it can live in a JSON or TOML file, travel in a model manifest and be hashed::

    {"ops": [{"op": "grayscale"}, {"op": "gaussian_blur", "ksize": 3},
             {"op": "resize", "width": 32, "height": 32}, {"op": "normalize", "mean": 0, "std": 255}]}

Every op and parameter is checked when the pipeline is built (unknown op, missing or bad parameter ->
:class:`~lepton.errors.ConfigError` naming the op and the fix), never on the first frame. Defaults are
filled in before hashing, so ``{"op": "gaussian_blur"}`` and ``{"op": "gaussian_blur", "ksize": 3}`` are
the same pipeline with the same hash, while changing any parameter changes the hash. The hash is
:func:`lepton.protocol.pipeline_hash` of ``{"ops": [...normalised ops...]}``: it goes into every samples
envelope and into every model manifest, so a device refuses a model trained on other features.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton.device._cv import cv2
from lepton.errors import ConfigError, FrameError
from lepton.protocol import pipeline_hash

log = logging.getLogger(__name__)

__all__ = ["FrameError", "PRESETS", "Pipeline", "load_pipeline", "OPS"]


# ------------------------------------------------------------------------------------------------
# parameter checkers: each returns the normalised value or raises ValueError with the expectation
# ------------------------------------------------------------------------------------------------
def _int(lo: int | None = None, hi: int | None = None, *, odd: bool = False) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int:
            raise ValueError(f"must be an integer, got {v!r}")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise ValueError(
                f"must be in [{lo}, {hi}], got {v}" if hi is not None else f"must be >= {lo}, got {v}"
            )
        if odd and v % 2 == 0:
            raise ValueError(f"must be odd, got {v}")
        return v

    return check


def _float(lo: float | None = None, *, nonzero: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}, got {v}")
        if nonzero and v == 0:
            raise ValueError("must not be 0")
        return float(v)

    return check


def _floats(*, nonzero: bool = False) -> Callable[[Any], float | list[float]]:
    one = _float(nonzero=nonzero)

    def check(v: Any) -> float | list[float]:
        if isinstance(v, list):
            if not 1 <= len(v) <= 4:
                raise ValueError("must be a number or a list of 1 to 4 numbers (one per channel)")
            return [one(x) for x in v]
        return one(v)

    return check


def _choice(*options: Any) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v not in options or type(v) is bool:
            raise ValueError(f"must be one of {', '.join(map(str, options))}, got {v!r}")
        return v

    return check


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _shape(v: Any) -> list[int]:
    if not isinstance(v, list) or not 1 <= len(v) <= 8 or any(type(d) is not int for d in v):
        raise ValueError(f"must be a list of 1 to 8 integers, got {v!r}")
    if sum(d == -1 for d in v) > 1 or any(d == 0 or d < -1 for d in v):
        raise ValueError(f"entries must be >= 1, with at most one -1, got {v!r}")
    return v


_REQUIRED = object()


@dataclass(frozen=True)
class _Op:
    name: str
    doc: str
    params: Mapping[str, tuple[Callable[[Any], Any], Any]]  # name -> (checker, default or _REQUIRED)
    build: Callable[[dict[str, Any]], Callable[[np.ndarray], np.ndarray]]
    #: the op on a stack of same-shape frames (N first), equal byte for byte to ``build`` on each frame;
    #: None: :meth:`Pipeline.run_block` applies ``build`` to each frame of the stack
    block: Callable[[dict[str, Any]], Callable[[np.ndarray], np.ndarray]] | None = None


# ------------------------------------------------------------------------------------------------
# op implementations: each build(params) returns frame -> frame
# ------------------------------------------------------------------------------------------------
def _to_gray(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim == 3 and img.shape[2] in (3, 4):
        src = img if img.dtype in (np.uint8, np.uint16, np.float32) else img.astype(np.float32)
        code = cv2().COLOR_BGR2GRAY if img.shape[2] == 3 else cv2().COLOR_BGRA2GRAY
        return cv2().cvtColor(src, code)
    raise FrameError(f"grayscale: expected an HxW or HxWx{{1,3,4}} image, got shape {img.shape}")


def _as_u8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _as_cv_float(img: np.ndarray) -> np.ndarray:
    return img if img.dtype in (np.uint8, np.float32) else img.astype(np.float32)


def _build_grayscale(p: dict[str, Any]):
    return _to_gray


def _build_gaussian(p: dict[str, Any]):
    k, sigma = p["ksize"], p["sigma"]
    return lambda img: cv2().GaussianBlur(_as_cv_float(img), (k, k), sigma)


def _build_median(p: dict[str, Any]):
    k = p["ksize"]

    def run(img: np.ndarray) -> np.ndarray:
        # OpenCV's median filter takes float32 only for ksize 3 and 5; larger kernels need 8-bit.
        return cv2().medianBlur(_as_cv_float(img) if k <= 5 else _as_u8(img), k)

    return run


def _build_bilateral(p: dict[str, Any]):
    d, sc, ss = p["d"], p["sigma_color"], p["sigma_space"]
    return lambda img: cv2().bilateralFilter(_as_cv_float(img), d, sc, ss)


def _build_laplacian(p: dict[str, Any]):
    k, absolute = p["ksize"], p["absolute"]

    def run(img: np.ndarray) -> np.ndarray:
        out = cv2().Laplacian(_as_cv_float(img), cv2().CV_32F, ksize=k)
        return np.abs(out) if absolute else out

    return run


def _build_sobel(p: dict[str, Any]):
    k, mode = p["ksize"], p["mode"]

    def run(img: np.ndarray) -> np.ndarray:
        src = _as_cv_float(img)
        if mode == "x":
            return cv2().Sobel(src, cv2().CV_32F, 1, 0, ksize=k)
        if mode == "y":
            return cv2().Sobel(src, cv2().CV_32F, 0, 1, ksize=k)
        gx = cv2().Sobel(src, cv2().CV_32F, 1, 0, ksize=k)
        gy = cv2().Sobel(src, cv2().CV_32F, 0, 1, ksize=k)
        return cv2().magnitude(gx, gy)

    return run


def _build_canny(p: dict[str, Any]):
    t1, t2, ap = p["threshold1"], p["threshold2"], p["aperture"]
    return lambda img: cv2().Canny(_as_u8(_to_gray(img)), t1, t2, apertureSize=ap)


_INTERP = {"area": "INTER_AREA", "linear": "INTER_LINEAR", "nearest": "INTER_NEAREST", "cubic": "INTER_CUBIC"}


def _build_resize(p: dict[str, Any]):
    w, h, interp = p["width"], p["height"], _INTERP[p["interpolation"]]

    def run(img: np.ndarray) -> np.ndarray:
        if img.shape[0] == h and img.shape[1] == w:
            return img
        return cv2().resize(_as_cv_float(img), (w, h), interpolation=getattr(cv2(), interp))

    return run


def _build_crop(p: dict[str, Any], lead: int = 0):
    """``lead=1``: the same crop on a stack of frames (N first), for :meth:`Pipeline.run_block`."""
    x, y, w, h = p["x"], p["y"], p["width"], p["height"]
    window = (slice(None),) * lead + (slice(y, y + h), slice(x, x + w))

    def run(img: np.ndarray) -> np.ndarray:
        if y + h > img.shape[lead] or x + w > img.shape[lead + 1]:
            raise FrameError(
                f"crop x={x} y={y} {w}x{h} falls outside the {img.shape[lead + 1]}x{img.shape[lead]} frame"
            )
        return img[window]

    return run


def _build_normalize(p: dict[str, Any], lead: int = 0):
    """``lead=1``: the same op on a stack of frames (N first), for :meth:`Pipeline.run_block`."""
    mean = np.asarray(p["mean"], np.float32)
    inv_std = (1.0 / np.asarray(p["std"], np.float32)).astype(np.float32)

    def run(img: np.ndarray) -> np.ndarray:
        if mean.ndim and (img.ndim != 3 + lead or img.shape[2 + lead] != mean.shape[0]):
            raise FrameError(
                f"normalize: {mean.shape[0]} per-channel means need an HxWx{mean.shape[0]} "
                f"image, got shape {img.shape[lead:]}"
            )
        return (img.astype(np.float32) - mean) * inv_std

    return run


def _build_cast(p: dict[str, Any]):
    dtype = p["dtype"]
    if dtype == "uint8":
        return _as_u8
    np_dtype = np.dtype(dtype)
    return lambda img: img.astype(np_dtype, copy=False)


def _build_reshape(p: dict[str, Any]):
    shape = tuple(p["shape"])

    def run(img: np.ndarray) -> np.ndarray:
        try:
            return img.reshape(shape)
        except ValueError:
            raise FrameError(f"reshape: cannot reshape {img.shape} into {list(shape)}") from None

    return run


def _build_hog(p: dict[str, Any]):
    cell, block, bins = p["cell"], p["block"], p["bins"]

    def run(img: np.ndarray) -> np.ndarray:
        # OpenCV 5 moved HOGDescriptor to opencv_contrib, so this is the Dalal-Triggs descriptor in numpy:
        # unsigned gradient orientations, magnitude-weighted cell histograms, L2-Hys normalised blocks.
        gray = _to_gray(img).astype(np.float32)
        gx = cv2().Sobel(gray, cv2().CV_32F, 1, 0, ksize=1)
        gy = cv2().Sobel(gray, cv2().CV_32F, 0, 1, ksize=1)
        mag, ang = cv2().cartToPolar(gx, gy, angleInDegrees=True)
        cy, cx = gray.shape[0] // cell, gray.shape[1] // cell
        if cy < block or cx < block:
            raise FrameError(
                f"hog: a {gray.shape[1]}x{gray.shape[0]} image is smaller than one block of "
                f"{block}x{block} cells of {cell} px; resize first"
            )
        mag, ang = mag[: cy * cell, : cx * cell], np.mod(ang[: cy * cell, : cx * cell], 180.0)
        idx = np.minimum((ang * (bins / 180.0)).astype(np.int32), bins - 1)
        cell_id = (np.arange(cy * cell)[:, None] // cell) * cx + (np.arange(cx * cell)[None, :] // cell)
        hist = np.bincount((cell_id * bins + idx).ravel(), weights=mag.ravel(), minlength=cy * cx * bins)
        hist = hist.reshape(cy, cx, bins)
        by, bx = cy - block + 1, cx - block + 1
        blocks = np.stack([hist[i : i + by, j : j + bx] for i in range(block) for j in range(block)], axis=2)
        blocks = blocks.reshape(by, bx, -1)
        blocks = blocks / np.sqrt((blocks**2).sum(-1, keepdims=True) + 1e-6)
        blocks = np.minimum(blocks, 0.2)
        blocks = blocks / np.sqrt((blocks**2).sum(-1, keepdims=True) + 1e-6)
        return blocks.reshape(-1).astype(np.float32)

    return run


def _build_color_hist(p: dict[str, Any]):
    bins = p["bins"]

    def run(img: np.ndarray) -> np.ndarray:
        src = _as_u8(img)
        if src.ndim == 2 or src.shape[2] == 1:  # same feature size for any frame: gray counts as B = G = R
            src = cv2().cvtColor(src.reshape(src.shape[:2]), cv2().COLOR_GRAY2BGR)
        out = []
        for c in range(3):
            h = cv2().calcHist([src], [c], None, [bins], [0, 256]).ravel()
            out.append(h / max(float(h.sum()), 1.0))
        return np.concatenate(out).astype(np.float32)

    return run


# ------------------------------------------------------------------------------------------------
# block implementations: each takes a C-contiguous stack of frames, N first, and returns a stack
# ------------------------------------------------------------------------------------------------
def _block_grayscale(p: dict[str, Any]):
    def run(stack: np.ndarray) -> np.ndarray:
        if stack.ndim == 3:
            return stack
        if stack.ndim == 4 and stack.shape[3] == 1:
            return stack[:, :, :, 0]
        if stack.ndim == 4 and stack.shape[3] in (3, 4):
            # cvtColor converts pixel by pixel: the N frames as one N*H-row image convert the same.
            n, h, w, c = stack.shape
            return _to_gray(stack.reshape(n * h, w, c)).reshape(n, h, w)
        raise FrameError(f"grayscale: expected an HxW or HxWx{{1,3,4}} image, got shape {stack.shape[1:]}")

    return run


def _block_resize(p: dict[str, Any]):
    w, h, one = p["width"], p["height"], _build_resize(p)

    def run(stack: np.ndarray) -> np.ndarray:
        if stack.shape[1] == h and stack.shape[2] == w:
            return stack
        return np.stack([one(frame) for frame in stack])

    return run


def _block_reshape(p: dict[str, Any]):
    shape = tuple(p["shape"])
    return lambda stack: stack.reshape((stack.shape[0], *shape))


OPS: dict[str, _Op] = {
    op.name: op
    for op in [
        _Op("grayscale", "BGR/BGRA -> single channel", {}, _build_grayscale, _block_grayscale),
        _Op(
            "gaussian_blur",
            "Gaussian denoise",
            {"ksize": (_int(1, 31, odd=True), 3), "sigma": (_float(0), 0.0)},
            _build_gaussian,
        ),
        _Op("median_blur", "median denoise", {"ksize": (_int(3, 31, odd=True), 3)}, _build_median),
        _Op(
            "bilateral",
            "edge-preserving bilateral denoise",
            {"d": (_int(1, 15), 5), "sigma_color": (_float(0), 75.0), "sigma_space": (_float(0), 75.0)},
            _build_bilateral,
        ),
        _Op(
            "laplacian",
            "Laplacian edges (float32)",
            {"ksize": (_int(1, 31, odd=True), 3), "absolute": (_bool, False)},
            _build_laplacian,
        ),
        _Op(
            "sobel",
            "Sobel gradient (float32)",
            {"ksize": (_int(1, 7, odd=True), 3), "mode": (_choice("magnitude", "x", "y"), "magnitude")},
            _build_sobel,
        ),
        _Op(
            "canny",
            "Canny edges (uint8 0/255)",
            {
                "threshold1": (_float(0), 100.0),
                "threshold2": (_float(0), 200.0),
                "aperture": (_choice(3, 5, 7), 3),
            },
            _build_canny,
        ),
        _Op(
            "resize",
            "resize to width x height",
            {
                "width": (_int(1, 8192), _REQUIRED),
                "height": (_int(1, 8192), _REQUIRED),
                "interpolation": (_choice(*_INTERP), "area"),
            },
            _build_resize,
            _block_resize,
        ),
        _Op(
            "crop",
            "keep a rectangle",
            {
                "x": (_int(0), 0),
                "y": (_int(0), 0),
                "width": (_int(1), _REQUIRED),
                "height": (_int(1), _REQUIRED),
            },
            _build_crop,
            functools.partial(_build_crop, lead=1),
        ),
        _Op(
            "normalize",
            "(x - mean) / std as float32",
            {"mean": (_floats(), 0.0), "std": (_floats(nonzero=True), 1.0)},
            _build_normalize,
            functools.partial(_build_normalize, lead=1),
        ),
        _Op(
            "cast",
            "dtype cast (uint8 clips and rounds)",
            {"dtype": (_choice("float16", "float32", "uint8"), _REQUIRED)},
            _build_cast,
            _build_cast,  # elementwise: the same function takes a stack
        ),
        _Op("reshape", "reshape, e.g. [1, 32, 32] for a CNN", {"shape": (_shape, _REQUIRED)}, _build_reshape,
            _block_reshape),
        _Op(
            "hog",
            "HOG descriptor (float32 vector)",
            {"cell": (_int(2, 64), 8), "block": (_int(1, 8), 2), "bins": (_int(2, 36), 9)},
            _build_hog,
        ),
        _Op(
            "color_hist",
            "B, G, R histograms, each summing to 1 (float32 vector of 3 x bins)",
            {"bins": (_int(2, 256), 16)},
            _build_color_hist,
        ),
    ]
}


#: Named specs for the common cases. ``digits`` maps an 8x8 digit (0..255) to float32 (1, 8, 8) in [0, 1],
#: the input a small CNN trains well on; ``camera-gray-32`` does the same for any camera frame at 32x32.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "ops": [
            {"op": "grayscale"},
            {"op": "resize", "width": 8, "height": 8},
            {"op": "normalize", "mean": 0, "std": 255},
            {"op": "reshape", "shape": [1, 8, 8]},
        ]
    },
    "camera-gray-32": {
        "ops": [
            {"op": "grayscale"},
            {"op": "gaussian_blur", "ksize": 3},
            {"op": "resize", "width": 32, "height": 32},
            {"op": "normalize", "mean": 0, "std": 255},
            {"op": "reshape", "shape": [1, 32, 32]},
        ]
    },
    "camera-edges-32": {
        "ops": [
            {"op": "grayscale"},
            {"op": "resize", "width": 32, "height": 32},
            {"op": "canny", "threshold1": 50, "threshold2": 150},
            {"op": "normalize", "mean": 0, "std": 255},
            {"op": "reshape", "shape": [1, 32, 32]},
        ]
    },
    "camera-hog": {
        "ops": [
            {"op": "grayscale"},
            {"op": "resize", "width": 64, "height": 64},
            {"op": "hog", "cell": 8, "block": 2, "bins": 9},
        ]
    },
    "color-hist": {
        "ops": [
            {"op": "resize", "width": 64, "height": 64},
            {"op": "color_hist", "bins": 16},
        ]
    },
}


def _fix_hint() -> str:
    return f"known ops: {', '.join(OPS)}"


def _normalise_op(i: int, raw: Any) -> dict[str, Any]:
    where = f"pipeline op #{i}"
    if not isinstance(raw, Mapping) or "op" not in raw:
        raise ConfigError(f'{where}: each op is an object like {{"op": "grayscale"}}, got {raw!r:.60}')
    name = raw["op"]
    if name not in OPS:
        raise ConfigError(f"{where}: unknown op {name!r}; {_fix_hint()}")
    op = OPS[name]
    extra = sorted(set(raw) - {"op"} - set(op.params))
    if extra:
        allowed = ", ".join(op.params) or "none"
        raise ConfigError(f"{where} ({name}): unknown parameter {extra[0]!r}; {name} takes: {allowed}")
    out: dict[str, Any] = {"op": name}
    for pname, (check, default) in op.params.items():
        if pname not in raw:
            if default is _REQUIRED:
                raise ConfigError(f"{where} ({name}): missing required parameter {pname!r}")
            out[pname] = default
            continue
        try:
            out[pname] = check(raw[pname])
        except ValueError as exc:
            raise ConfigError(f"{where} ({name}): parameter {pname!r} {exc}") from None
    return out


class Pipeline:
    """A validated preprocessing pipeline: call it on a frame to get the feature tensor.

    >>> p = Pipeline.from_preset("digits")
    >>> p(np.zeros((8, 8), np.uint8)).shape
    (1, 8, 8)
    >>> p.hash == Pipeline(PRESETS["digits"]).hash
    True
    """

    def __init__(self, spec: Mapping[str, Any], *, name: str | None = None) -> None:
        if not isinstance(spec, Mapping):
            raise ConfigError(f'a pipeline spec is an object {{"ops": [...]}}, got {type(spec).__name__}')
        unknown = sorted(set(spec) - {"ops", "name", "description"})
        if unknown:
            raise ConfigError(
                f'pipeline spec: unknown key {unknown[0]!r}; a spec has "ops" (and optional '
                '"name", "description")'
            )
        ops = spec.get("ops")
        if not isinstance(ops, list):
            raise ConfigError('pipeline spec: "ops" must be a list of ops like {"op": "grayscale"}')
        self.ops: list[dict[str, Any]] = [_normalise_op(i, raw) for i, raw in enumerate(ops)]
        self.name = name or (spec.get("name") if isinstance(spec.get("name"), str) else None)
        self.spec: dict[str, Any] = {"ops": self.ops}
        self.hash: str = pipeline_hash(self.spec)
        self._steps = [(op["op"], OPS[op["op"]].build(op)) for op in self.ops]
        # (step, per_frame): the op on a stack, or the per-frame step to apply to each frame of it
        self._block_steps: list[tuple[Callable[[np.ndarray], np.ndarray], bool]] = []
        for op, (_, step) in zip(self.ops, self._steps, strict=True):
            block = OPS[op["op"]].block
            self._block_steps.append((block(op), False) if block is not None else (step, True))

    @classmethod
    def from_preset(cls, name: str) -> Pipeline:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(PRESETS[name], name=name)

    @classmethod
    def from_file(cls, path: str | Path) -> Pipeline:
        return cls(load_pipeline(path), name=Path(path).stem)

    @classmethod
    def resolve(cls, value: Pipeline | Mapping[str, Any] | str | Path) -> Pipeline:
        """A Pipeline from a Pipeline, a spec dict, a preset name or a .json/.toml file path."""
        if isinstance(value, Pipeline):
            return value
        if isinstance(value, Mapping):
            return cls(value)
        if isinstance(value, str) and value in PRESETS:
            return cls.from_preset(value)
        if isinstance(value, (str, Path)) and Path(value).suffix.lower() in (".json", ".toml"):
            return cls.from_file(value)
        raise ConfigError(
            f"pipeline {value!r} is neither a preset ({', '.join(PRESETS)}) nor a .json/.toml file"
        )

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if not isinstance(frame, np.ndarray) or frame.ndim not in (2, 3) or frame.size == 0:
            raise FrameError(
                f"a frame is a non-empty HxW or HxWxC numpy array, got {type(frame).__name__} "
                f"{getattr(frame, 'shape', '')}"
            )
        out = frame
        for name, step in self._steps:
            try:
                out = step(out)
            except FrameError:
                raise
            except Exception as exc:  # OpenCV raises cv2.error for shapes/dtypes it cannot take
                raise FrameError(f"{name}: {type(exc).__name__}: {str(exc).strip()[:200]}") from None
        return np.ascontiguousarray(out)

    def _run_stacked(self, frames: Sequence[np.ndarray]) -> list[np.ndarray | FrameError] | None:
        """Every op once on the stack of ``frames`` (one shape and dtype), or None if any op failed."""
        stack = np.array(frames)  # one shape and dtype (checked by the caller): np.stack's result, faster
        try:
            for step, per_frame in self._block_steps:
                stack = np.stack([step(f) for f in stack]) if per_frame else step(stack)
        except Exception:  # noqa: BLE001 - the caller goes frame by frame, where each error is the frame's
            return None
        return list(np.ascontiguousarray(stack))

    def run_block(self, frames: Sequence[Any]) -> list[np.ndarray | FrameError]:
        """The pipeline on each frame, in order: its feature tensor, or the FrameError it raised.

        Byte for byte what calling the pipeline on each frame gives. Frames of one shape and dtype are
        stacked and each op runs once on the stack where it can (grayscale, crop, normalize, cast,
        reshape, and resize to the size they already have); the other ops loop over the stack. Anything
        else, or an op that fails on the stack, runs frame by frame, so each frame gets its own error.
        """
        if len(frames) > 1:
            first = frames[0]
            if (type(first) is np.ndarray and first.ndim in (2, 3) and first.size
                    and all(type(f) is np.ndarray and f.shape == first.shape and f.dtype == first.dtype
                            for f in frames)):
                stacked = self._run_stacked(frames)
                if stacked is not None:
                    return stacked
        out: list[np.ndarray | FrameError] = []
        for frame in frames:
            try:
                out.append(self(frame))
            except FrameError as exc:
                out.append(exc)
        return out

    def describe(self) -> str:
        return " -> ".join(op["op"] for op in self.ops) or "(identity)"

    def __repr__(self) -> str:
        return f"Pipeline({self.name or 'custom'}, hash={self.hash}, {self.describe()})"


def load_pipeline(path: str | Path) -> dict[str, Any]:
    """Read a spec from a ``.json`` or ``.toml`` file (TOML: ``[[ops]]`` tables with ``op = "..."``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"pipeline file {str(p)!r} not found; pass an existing .json/.toml file or --preset NAME"
        )
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            return tomllib.loads(p.read_text())
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"pipeline file {str(p)!r} is not valid {p.suffix.lstrip('.').upper() or 'JSON'}: {exc}"
        ) from None
