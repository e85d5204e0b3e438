"""The serve worker's teacher labels: its answers recorded in the dataset, off the inference thread.

With ``--data`` every answer with a label becomes a teacher label (lepton/cloud/_labels.py,
DIR/FLEET/labels/). :class:`TeacherLabelWriter` has its own thread (``serve-labels``) that writes them in
batches, one atomic Parquet file per flush, so inference never waits for the disk.

Threads and the state they own: the inference thread only calls ``put`` (a non-blocking enqueue on a
bounded queue) and owns ``_dropped_full`` (labels the full queue refused); the **writer thread** owns
the batch being gathered, the label store, ``written``, ``files`` and ``_dropped_failed``; ``close``
(from ``ServeWorker.stop``) enqueues the end and joins it. Other threads only read the counters.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from lepton.cloud._serve_config import ServeConfig

log = logging.getLogger(__name__)

__all__ = ["TeacherLabelWriter"]


class TeacherLabelWriter:
    """Answers recorded as teacher labels, off the inference thread: its own thread writes them in
    batches (one atomic Parquet file per flush) so inference never waits for the disk."""

    def __init__(self, config: ServeConfig) -> None:
        from lepton.cloud._labels import LabelStore

        assert config.data is not None  # made only with --data
        self.store = LabelStore(Path(config.data), config.fleet)
        self.flush_s = config.labels_flush_s
        self.writer = config.name
        self._queue: queue.Queue[list | None] = queue.Queue(maxsize=1024)
        self._thread = threading.Thread(target=self._loop, name="serve-labels", daemon=True)
        self.written = self.files = 0
        self._dropped_full = 0  # the inference thread's: labels in batches the full queue refused
        self._dropped_failed = 0  # the writer thread's: rows a failed write lost
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Teacher labels not recorded: the queue was full, or writing them failed."""
        return self._dropped_full + self._dropped_failed

    def put(self, replies: list) -> None:
        if replies:
            try:
                self._queue.put_nowait(replies)
            except queue.Full:  # the disk is behind: a teacher label is an optional extra, inference is not
                self._dropped_full += len(replies)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from lepton.cloud._labels import LabelRow

        pending: list = []
        last = time.monotonic()
        done = False
        while not done:
            try:
                item = self._queue.get(timeout=self.flush_s)
            except queue.Empty:
                item = []
            if item is None:
                done = True
            else:
                pending.extend(item)
            if pending and (done or time.monotonic() - last >= self.flush_s or len(pending) >= 4096):
                now = time.time()
                rows = [LabelRow(device, int(a.seq), str(a.label), "teacher", confidence=a.confidence,
                                 model_version=a.version, ts=now) for device, a in pending]
                try:
                    self.store.append(rows, writer=self.writer)
                    self.written += len(rows)
                    self.files += 1
                except (OSError, ValueError) as exc:
                    self._dropped_failed += len(rows)
                    log.warning("serve: %d teacher labels not recorded: %s", len(rows), exc)
                pending, last = [], time.monotonic()
