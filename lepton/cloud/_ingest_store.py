"""The disk side of the ingest batch transaction: quarantine, Parquet file, index commit, rename.

The decisions come from the I/O-free core (:mod:`lepton.cloud._ingest_core`); the worker's shell
(:mod:`lepton.cloud._ingest`) calls :meth:`BatchStore.write` and then tells MQTT (acks, dead-letter
reports, PUBACKs). Order, and why it is durable: a bad payload is fsynced in quarantine before its
message can be acked; new samples go to a hidden, fsynced ``.NAME.tmp`` file recorded in the index
(invisible) inside one exclusive transaction that also drops duplicates; only then is it renamed,
and the next transaction marks it visible. A file another writer committed but never renamed (it
died) is finished by whoever sees it first.

A :class:`BatchStore` is owned by the worker's writer thread: it alone touches the index, the
quarantine folder and the list of its own files not yet marked visible (``_my_unmarked``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton.cloud._ingest_config import WorkerConfig
from lepton.cloud._ingest_core import BatchDecoder, BatchProgress, DeadLetter, InboundLike, plan_write
from lepton.protocol import encode_json

if TYPE_CHECKING:
    from lepton.cloud._index import SampleIndex
    from lepton.cloud._quarantine import Quarantine

log = logging.getLogger(__name__)

__all__ = ["BatchStore", "warm_up"]


class BatchStore:
    """Writes batches of one worker (``config.name``) into ``data_dir``, ``index`` and ``quarantine``."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        data_dir: Path,
        index: SampleIndex,
        quarantine: Quarantine,
        decoder: BatchDecoder,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.index = index
        self.quarantine = quarantine
        self._decoder = decoder
        self._my_unmarked: list[str] = []

    def write(self, batch: Sequence[InboundLike], done: BatchProgress) -> None:
        """Make one batch durable: its dead letters quarantined, its new samples in a renamed,
        fsynced Parquet file committed to the index. ``done.plan`` then says what to ack.

        ``done`` records the steps already carried out by an earlier attempt at the same batch
        (after a transient error), which are not done again."""
        from lepton.cloud._dataset import fsync_dir, new_file_name, write_parquet_synced
        from lepton.cloud._index import finish_file

        cfg = self.config
        if done.decoded is None:  # decoded, and its dead letters admitted to quarantine, once
            done.decoded = self._decoder.decode(batch)
            done.reports, done.quarantine, done.n_dead = self.dead_letters(batch, done.decoded.dead)
        decoded = done.decoded
        valid = decoded.seqs()

        # Quarantine first: a bad payload is on disk before its message can be acked.
        if done.quarantine and not done.quarantined:
            for qname, payload, report in done.quarantine:
                if self.quarantine.unwritten(qname):
                    self.quarantine.write(qname, payload, encode_json(report))
            self.quarantine.sync()
        done.quarantined = True

        if not done.committed and (decoded.parts or self._my_unmarked):
            plan = None
            name = None
            size = 0
            labelled = 0
            with self.index.transaction(devices=valid):  # locks these devices only (PostgreSQL)
                marked = list(self._my_unmarked)
                if marked:
                    self.index.mark_visible(marked)
                others = self.index.invisible_files()
                if others:  # another writer died between commit and rename: finish its file
                    for other in others:
                        finish_file(self.data_dir, other)
                    self.index.mark_visible(others)
                plan = plan_write(decoded, {dev: self.index.known(dev, seqs) for dev, seqs in valid.items()})
                if plan.n_new:
                    table = decoded.table if plan.keep is None else decoded.table.take(plan.keep)
                    labelled = plan.n_new - table.column("label").null_count
                    name = new_file_name(cfg.name)
                    size = write_parquet_synced(self.data_dir / f".{name}.tmp", table)
                    for dev, seqs in plan.new_seqs.items():
                        self.index.add(dev, seqs)
                    self.index.add_file(name, rows=plan.n_new, size=size, visible=False)
            # Committed: from here on a retry must not look the seqs up again (they would count as
            # duplicates) nor write another file.
            self._my_unmarked = [n for n in self._my_unmarked if n not in marked]
            done.committed = True
            done.plan, done.name, done.size, done.labelled = plan, name, size, labelled
        plan, name = done.plan, done.name
        if name is not None and not done.renamed:
            try:
                os.replace(self.data_dir / f".{name}.tmp", self.data_dir / name)
            except FileNotFoundError:
                # Another writer finished it for us meanwhile (and a compaction may already have
                # merged it), or an earlier attempt renamed it: the index is what made it durable.
                log.debug("worker %s: %s was finished by another writer", cfg.name, name)
            fsync_dir(self.data_dir)
            self._my_unmarked.append(name)
            done.renamed = True

        if plan is None:  # no good samples: nothing known to look up, only rejected seqs to ack
            done.plan = plan_write(decoded, {})

    def dead_letters(
        self, batch: Sequence[InboundLike], dead: list[DeadLetter]
    ) -> tuple[list[dict[str, Any]], list[tuple[str, bytes, dict[str, Any]]], int]:
        """Reports to publish and payloads to quarantine for the batch's dead letters:
        ``(reports, [(name, payload, report)], problems counted)``."""
        cfg = self.config
        reports: list[dict[str, Any]] = []
        quarantine: list[tuple[str, bytes, dict[str, Any]]] = []
        n = 0
        for d in dead:
            msg = batch[d.index]
            problems = d.problems
            n += len(problems)
            full = {"problems": [{"sample": i, "reason": r, "field": f} for i, r, f in problems]}
            qname, verdict = self.quarantine.admit(d.device, msg.payload,
                                                   report_size=len(encode_json(full)) + 400)
            base = {
                "topic": msg.topic,
                "device": d.device,
                "size": len(msg.payload),
                "time": msg.received_at,
                "worker": cfg.name,
                "quarantine": qname if verdict in ("new", "duplicate") else None,
            }
            if base["quarantine"] is None:
                base["quarantine_refused"] = verdict  # over its bounds: reported, acked, not kept
            shown = problems[: cfg.max_reports_per_message]
            for index, reason, fld in shown:
                reports.append({**base, "reason": reason, "field": fld, "sample": index})
            if len(problems) > len(shown):
                reports.append(
                    {
                        **base,
                        "reason": f"{len(problems) - len(shown)} more bad samples in this message",
                        "field": None,
                        "sample": None,
                    }
                )
            if verdict == "new":
                quarantine.append((qname, bytes(msg.payload), {**base, **full}))
            log.warning(
                "worker %s: dead-lettered %d problem(s) from %s (%d bytes): %s",
                cfg.name, len(problems), msg.topic, len(msg.payload), problems[0][1],
            )
        return reports, quarantine, n


def warm_up() -> None:
    """Import what the first Parquet write pulls in lazily (pandas shims: ~0.2 s) before any message
    waits on it."""
    import io

    import pyarrow.parquet as pq

    from lepton.cloud._dataset import SCHEMA

    pq.write_table(SCHEMA.empty_table(), io.BytesIO())
