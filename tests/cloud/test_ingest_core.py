"""The ingest batch transaction's rules, without a broker, a disk or a clock (lepton.cloud._ingest_core)."""

from __future__ import annotations

import msgpack
import numpy as np

from lepton.cloud._ingest_core import BatchDecoder, Inbound, plan_write
from lepton.protocol import Sample, Topics, encode_samples
from tests.cloud.test_ingest_poison import poison_payloads

TOPICS = Topics(fleet="f1")


def _msg(device: str, seqs, *, retain: bool = False, unstorable: str | None = None) -> Inbound:
    samples = [Sample(seq=s, ts=1.0 + s, x=np.full(4, s, np.float32), y=s % 3) for s in seqs]
    return Inbound(TOPICS.samples(device), encode_samples(device, samples, pipeline="p"), 5.0,
                   retain=retain, unstorable=unstorable)


def _decoder() -> BatchDecoder:
    return BatchDecoder(TOPICS, max_tensor_bytes=1 << 20, max_payload_bytes=1 << 22)


def test_good_messages_become_one_table_and_are_all_new():
    batch = _decoder().decode([_msg("cam-1", [0, 1, 2]), _msg("cam-2", [7])])
    assert not batch.dead and batch.table.num_rows == 4
    assert batch.seqs() == {"cam-1": {0, 1, 2}, "cam-2": {7}}
    plan = plan_write(batch, {})
    assert plan.keep is None and plan.n_new == 4 and plan.n_duplicates == 0
    assert plan.acks == {"cam-1": [[0, 2]], "cam-2": [[7, 7]]}
    assert plan.new_seqs == {"cam-1": {0, 1, 2}, "cam-2": {7}}


def test_known_and_repeated_seqs_are_acked_not_kept():
    batch = _decoder().decode([_msg("cam-1", [0, 1, 2]), _msg("cam-1", [2, 3])])
    plan = plan_write(batch, {"cam-1": {1}})
    rows = batch.rows
    assert [rows[i][1] for i in plan.keep] == [0, 2, 3]  # 1 known, the second 2 a repeat
    assert plan.n_new == 3 and plan.n_duplicates == 2
    assert plan.acks == {"cam-1": [[0, 3]]} and plan.new_seqs == {"cam-1": {0, 2, 3}}


def test_each_poison_is_its_own_dead_letter_and_costs_nobody_else():
    poisons = list(poison_payloads("evil").values())
    msgs = [_msg("cam-1", [0])] + [Inbound(TOPICS.samples("evil"), p, 1.0) for p in poisons] + [
        _msg("cam-2", [0])
    ]
    batch = _decoder().decode(msgs)
    assert sorted(d.index for d in batch.dead) == list(range(1, 1 + len(poisons)))
    assert all(d.device == "evil" and d.problems[0][0] == 0 for d in batch.dead)
    assert batch.rejected == {"evil": {7}}  # the poison samples' seq is readable: acked, not stored
    plan = plan_write(batch, {})
    assert plan.n_new == 2 and plan.acks["evil"] == [[7, 7]]


def test_retained_unstorable_and_foreign_topics_are_whole_message_dead_letters():
    batch = _decoder().decode([
        _msg("cam-1", [0], retain=True),
        _msg("cam-1", [1], unstorable="TypeError: boom"),
        Inbound("lepton/f1/devices/cam-1/status", b"{}", 1.0),
        Inbound(TOPICS.samples("cam-1"), msgpack.packb({"v": 1, "device": "cam-9", "samples": []}), 1.0),
    ])
    fields = [(d.index, d.problems[0][2], d.problems[0][0]) for d in batch.dead]
    assert fields == [(0, "retain", None), (1, "payload", None), (2, "topic", None), (3, "device", None)]
    assert not batch.parts and batch.table.num_rows == 0 and not batch.rejected


def test_a_bad_sample_keeps_its_neighbours():
    good = {"seq": 1, "ts": 1.0, "x": {"dtype": "uint8", "shape": [1], "data": b"\x01"}, "y": None}
    bad = {"seq": 2, "ts": 1.0, "x": {"dtype": "uint8", "shape": [2], "data": b"\x01"}, "y": None}
    payload = msgpack.packb({"v": 1, "device": "cam-1", "samples": [good, bad]}, use_bin_type=True)
    batch = _decoder().decode([Inbound(TOPICS.samples("cam-1"), payload, 1.0)])
    (dead,) = batch.dead
    assert dead.problems[0][:1] == (1,) and dead.problems[0][2] == "samples[1].x.data"
    assert batch.table.num_rows == 1 and plan_write(batch, {}).acks == {"cam-1": [[1, 2]]}
