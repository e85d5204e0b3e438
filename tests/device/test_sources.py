"""Sources: digits (and shards), image folders with labels and corrupt files, video replay, iterables."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from lepton.device import open_source
from lepton.errors import ConfigError


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            cv2.imwrite(str(tmp_path / label / f"{i}.png"), rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "unlabelled.jpg"), np.zeros((10, 10), np.uint8))
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    return tmp_path


def test_folder_labels_from_subfolders_and_corrupt_file_skipped_once(folder):
    src = open_source(f"folder:{folder}")
    items = list(itertools.islice(iter(src), 21))  # 7 good images per pass, 3 passes (replay)
    labels = [label for _, label in items[:7]]
    assert sorted(labels, key=str) == sorted(["cat"] * 3 + ["dog"] * 3 + [None], key=str)
    assert all(f.ndim in (2, 3) for f, _ in items)
    assert src.skipped == 1 and src.skipped_items == ["dog/broken.png"]  # counted once, not once per pass
    assert src.passes == 2


def test_once_reads_a_finite_source_once(folder):
    assert len(list(open_source(f"folder:{folder}", once=True))) == 7


def test_digits_and_disjoint_shards():
    full = open_source("digits", once=True)
    assert len(full) == 1797
    frame, label = next(iter(full))
    assert frame.shape == (8, 8) and frame.dtype == np.uint8 and frame.max() <= 255 and label == 0
    shards = [open_source(f"digits:{i}/3", once=True) for i in range(3)]
    assert sum(len(s) for s in shards) == 1797
    np.testing.assert_array_equal(next(iter(shards[1]))[0], full.images[1])


def test_video_replays_unless_once(tmp_path):
    path = tmp_path / "v.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 24))
    for i in range(4):
        w.write(np.full((24, 32, 3), 40 * i, np.uint8))
    w.release()
    assert len(list(open_source(f"video:{path}", once=True))) == 4
    replay = list(itertools.islice(iter(open_source(f"video:{path}")), 10))
    assert len(replay) == 10 and all(label is None for _, label in replay)
    assert abs(float(replay[4][0].mean()) - float(replay[0][0].mean())) < 3  # frame 4 is frame 0 again


def test_custom_iterables():
    frames = [(np.zeros((4, 4), np.uint8), "a"), (np.ones((4, 4), np.uint8), "b")]
    assert len(list(itertools.islice(iter(open_source(frames)), 5))) == 5  # a list replays
    gen = (f for f, _ in frames)
    assert [label for _, label in open_source(gen)] == [None, None]  # a generator is read once
    factory = lambda: iter(frames)  # noqa: E731 - a callable makes a generator replayable
    assert [label for _, label in itertools.islice(iter(open_source(factory)), 4)] == ["a", "b", "a", "b"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("video:/no/such.mp4", "video file '/no/such.mp4' not found"),
        ("folder:/no/such", "image folder '/no/such' not found"),
        ("camera:9", "camera 9 not found"),
        ("camera:x", "camera:N"),
        ("digits:3/3", "digits:I/N"),
        ("webcam", "write camera:N, video:PATH"),
    ],
)
def test_bad_sources_fail_in_one_clear_line(spec, words):
    with pytest.raises(ConfigError) as err:
        open_source(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_empty_or_undecodable_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no image"):
        open_source(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "v.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ConfigError, match="cannot be decoded"):
        open_source(f"video:{tmp_path / 'v.mp4'}")
