"""Where frames come from: camera, video file, image folder, scikit-learn digits, or any Python iterable.

A source yields ``(frame, label)`` pairs; ``label`` is ``None`` when unknown. Every source is checked when
it is opened (camera present, file decodable, folder with images...) so that a wrong ``--source`` fails at
start-up in one line instead of after the agent connected. Finite sources (video, folder, digits, lists)
replay from the start when they run out unless ``once=True``; a generator can only be read once.

    >>> src = open_source("digits", once=True)
    >>> frame, label = next(iter(src))
    >>> frame.shape, frame.dtype, type(label).__name__
    ((8, 8), dtype('uint8'), 'int')
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lepton.device._cv import cv2
from lepton.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Source", "open_source", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".pnm", ".tif", ".tiff", ".webp")
SPEC_FORMS = "camera:N, video:PATH, folder:PATH, digits or digits:I/N"
#: The one-line fix when the digits source has no scikit-learn.
DEMO_INSTALL = "pip install 'lepton[demo]'"

Item = tuple[np.ndarray, "int | str | None"]


class Source:
    """Base class: subclasses implement :meth:`_one_pass`; iteration handles replay and counters.

    ``skipped`` counts frames that could not be read (a corrupt image, an undecodable video frame);
    ``skipped_items`` names them (bounded) so the agent can report what was skipped.
    """

    kind = "custom"
    replayable = True
    #: True when the next frame may take a while to come (a camera, a generator reading a sensor): the
    #: agent then captures frame by frame; False lets it read several frames at once (lepton/device/_capture.py)
    waits = False

    def __init__(self, *, once: bool = False) -> None:
        self.once = once
        self.skipped = 0
        self.skipped_items: list[str] = []
        self.passes = 0

    def _one_pass(self) -> Iterator[Item]:
        raise NotImplementedError

    def _skip(self, what: str, why: str) -> None:
        self.skipped += 1
        if len(self.skipped_items) < 100:
            self.skipped_items.append(what)
        log.warning("source %s: skipped %s (%s)", self.describe(), what, why)

    def __iter__(self) -> Iterator[Item]:
        while True:
            produced = 0
            for item in self._one_pass():
                produced += 1
                yield item
            self.passes += 1
            if self.once or not self.replayable:
                return
            if produced == 0:
                log.warning("source %s produced no frame in a whole pass; stopping", self.describe())
                return

    def describe(self) -> str:
        return self.kind

    def close(self) -> None:
        """Release the device or file handle (idempotent)."""


class CameraSource(Source):
    kind = "camera"
    waits = True
    replayable = False  # a camera never runs out

    def __init__(self, index: int, *, once: bool = False) -> None:
        super().__init__(once=once)
        self.index = index
        if sys.platform.startswith("linux") and not Path(f"/dev/video{index}").exists():
            raise ConfigError(
                f"camera {index} not found (/dev/video{index} does not exist); plug a camera in, "
                "pick another index, or use --source video:PATH / folder:PATH / digits"
            )
        self._cap = cv2().VideoCapture(index)
        if not self._cap.isOpened():
            raise ConfigError(
                f"camera {index} cannot be opened (busy or no permission); check that no other "
                "process uses it and that you may read it"
            )

    def _one_pass(self) -> Iterator[Item]:
        failures = 0
        while failures < 30:
            ok, frame = self._cap.read()
            if not ok or frame is None:
                failures += 1
                continue
            failures = 0
            yield frame, None
        log.error("camera %d stopped delivering frames", self.index)

    def describe(self) -> str:
        return f"camera:{self.index}"

    def close(self) -> None:
        self._cap.release()


class VideoSource(Source):
    kind = "video"

    def __init__(self, path: str | Path, *, once: bool = False) -> None:
        super().__init__(once=once)
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"video file {str(self.path)!r} not found; pass an existing file as video:PATH")
        cap = cv2().VideoCapture(str(self.path))
        ok = cap.isOpened() and cap.read()[0]
        cap.release()
        if not ok:
            raise ConfigError(
                f"video file {str(self.path)!r} cannot be decoded by OpenCV; re-encode it "
                "(e.g. ffmpeg -i IN -c:v mjpeg OUT.avi) or pass another file"
            )

    def _one_pass(self) -> Iterator[Item]:
        cap = cv2().VideoCapture(str(self.path))
        try:
            while True:
                ok, frame = cap.read()
                if not ok or frame is None:
                    return
                yield frame, None
        finally:
            cap.release()

    def describe(self) -> str:
        return f"video:{self.path}"


class FolderSource(Source):
    """Every image under a folder, sorted; the label is the name of the first-level sub-folder.

    ``folder/cat/1.png`` has label ``"cat"``; an image directly in ``folder/`` has label ``None``. A file
    OpenCV cannot decode is skipped, counted once and named in :attr:`skipped_items`.
    """

    kind = "folder"

    def __init__(self, path: str | Path, *, once: bool = False) -> None:
        super().__init__(once=once)
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(
                f"image folder {str(self.path)!r} not found; pass an existing directory as "
                "folder:PATH (one sub-folder per label)"
            )
        self.files = sorted(
            p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise ConfigError(
                f"image folder {str(self.path)!r} holds no image ({', '.join(IMAGE_SUFFIXES)}); "
                "put images in sub-folders named after their label"
            )
        self._bad: set[Path] = set()

    def _one_pass(self) -> Iterator[Item]:
        for f in self.files:
            if f in self._bad:
                continue
            frame = cv2().imread(str(f), cv2().IMREAD_UNCHANGED)
            if frame is None or frame.size == 0:
                self._bad.add(f)
                self._skip(str(f.relative_to(self.path)), "OpenCV cannot decode it")
                continue
            rel = f.relative_to(self.path)
            yield frame, (rel.parts[0] if len(rel.parts) > 1 else None)

    def describe(self) -> str:
        return f"folder:{self.path}"


class DigitsSource(Source):
    """The UCI handwritten digits from scikit-learn as 8x8 uint8 frames (0..255), labelled 0-9.

    Needs scikit-learn, which only the ``demo`` extra installs (``pip install 'lepton[demo]'``).

    ``shard=(i, n)`` keeps every n-th image starting at i (``digits:i/n``), so n devices stream
    disjoint slices of the dataset.
    """

    kind = "digits"

    def __init__(self, *, once: bool = False, shard: tuple[int, int] = (0, 1)) -> None:
        super().__init__(once=once)
        index, count = shard
        if not 0 <= index < count:
            raise ConfigError(f"bad digits shard {index}/{count}: write digits:I/N with 0 <= I < N")
        self.shard = shard
        pixels, target = _load_digits()
        self.images = np.clip(np.rint(pixels[index::count] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        self.labels = [int(t) for t in target[index::count]]

    def _one_pass(self) -> Iterator[Item]:
        yield from zip(self.images, self.labels, strict=True)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        return "digits" if self.shard == (0, 1) else f"digits:{self.shard[0]}/{self.shard[1]}"


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 UCI digits as (images 0..16 of shape (n, 8, 8), targets), from scikit-learn's data file.

    ``sklearn.datasets`` imports pandas, which imports pyarrow when it is installed, and the edge must
    not load pyarrow; so the CSV that ``load_digits`` reads is located without importing scikit-learn
    and parsed with numpy (same numbers, same order). ``load_digits`` is the fallback if the file moved.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        # scikit-learn (and scipy under it, ~200 MB) is the demo's, not the edge's: lepton[device] omits it.
        raise ConfigError(
            "the digits source reads scikit-learn's copy of the UCI digits, and scikit-learn is not "
            f"installed: {DEMO_INSTALL} (or use --source folder:PATH / video:PATH / camera:N)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        with gzip.open(path, "rt") as fh:
            data = np.loadtxt(fh, delimiter=",", dtype=np.float64)
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - layout of a future scikit-learn

    bunch = load_digits()
    return bunch.images, bunch.target


class IterableSource(Source):
    """Wrap a Python iterable of ``(frame, label)`` pairs (or bare frames).

    A list or tuple replays; a zero-argument callable returning an iterable is called again for each
    pass (so a generator function replays); a plain iterator or generator is read once.
    """

    kind = "custom"

    def __init__(
        self, items: Iterable[Any] | Callable[[], Iterable[Any]], *, once: bool = False, name: str = "custom"
    ) -> None:
        super().__init__(once=once)
        self._items = items
        self._name = name
        self.replayable = callable(items) or isinstance(items, Sequence)
        self.waits = not isinstance(items, Sequence)  # a generator may wait for each item

    def _one_pass(self) -> Iterator[Item]:
        items = self._items() if callable(self._items) else self._items
        for item in items:
            if isinstance(item, tuple) and len(item) == 2:
                yield item[0], item[1]
            else:
                yield item, None

    def describe(self) -> str:
        return self._name


def open_source(
    spec: str | Source | Iterable[Any] | Callable[[], Iterable[Any]], *, once: bool = False
) -> Source:
    """Open ``camera:N``, ``video:PATH``, ``folder:PATH``, ``digits``, a Source or any iterable."""
    if isinstance(spec, Source):
        if once:
            spec.once = True
        return spec
    if not isinstance(spec, str):
        if callable(spec) or isinstance(spec, Iterable):
            return IterableSource(spec, once=once)
        raise ConfigError(
            f"a source is {SPEC_FORMS} or an iterable of (frame, label); got {type(spec).__name__}"
        )
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        if not arg:
            return DigitsSource(once=once)
        i, slash, n = arg.partition("/")
        if not (slash and i.isdigit() and n.isdigit()):
            raise ConfigError(f"bad source {spec!r}: a slice of the digits is digits:I/N, e.g. digits:0/3")
        return DigitsSource(once=once, shard=(int(i), int(n)))
    if kind == "camera":
        if not arg.isdigit():
            raise ConfigError(f"bad source {spec!r}: a camera is camera:N with N a number, e.g. camera:0")
        return CameraSource(int(arg), once=once)
    if kind == "video" and arg:
        return VideoSource(arg, once=once)
    if kind == "folder" and arg:
        return FolderSource(arg, once=once)
    raise ConfigError(f"bad source {spec!r}: write {SPEC_FORMS}")
