"""The publish window's rules, without a broker, a thread, a clock or a spool: events in, decisions out."""

from __future__ import annotations

import time
from bisect import bisect_right

import numpy as np
import pytest

from lepton.device import SpooledSample
from lepton.device._window import (
    ENVELOPE_OVERHEAD,
    SAMPLE_OVERHEAD,
    GoBack,
    PublishWindow,
    Read,
    Send,
    Wait,
    merge_ranges,
    split_envelopes,
)
from lepton.protocol import decode_samples, encode_sample_body, encode_samples

DEVICE = "dev-1"
T0 = 1_700_000_000.0  # the samples' capture clock (wall); `now` below is the monotonic one


def body(size: int = 0, label: int = 1) -> bytes:
    """A real spooled sample body of about ``size`` bytes (a uint8 tensor)."""
    return encode_sample_body(np.zeros(max(size, 1), np.uint8), label)


def rows(seqs, *, ts: float = T0, pipeline: str | None = "p1", size: int = 0) -> list[SpooledSample]:
    return [SpooledSample(s, ts, pipeline, body(size, s % 10)) for s in seqs]


class Spool:
    """A dict standing in for the spool: what the agent's shell does around the window, minus I/O."""

    def __init__(self, seqs=(), **kwargs) -> None:
        self.rows: dict[int, SpooledSample] = {}
        self.add(seqs, **kwargs)

    def add(self, seqs, **kwargs) -> None:
        self.rows.update({r.seq: r for r in rows(seqs, **kwargs)})

    def read_after(self, after: int, limit: int) -> list[SpooledSample]:
        order = sorted(self.rows)
        out = []
        for s in order[bisect_right(order, after) :]:
            out.append(self.rows[s])
            if len(out) == limit:
                break
        return out

    def ack(self, ranges) -> int:
        removed = 0
        for a, b in ranges:
            for s in [s for s in self.rows if a <= s <= b] if b - a > len(self.rows) else range(a, b + 1):
                removed += self.rows.pop(s, None) is not None
        return removed


def make(**kwargs) -> PublishWindow:
    settings = dict(batch_size=4, batch_ms=50, window=8, ack_timeout=10.0, max_message_bytes=1_000_000)
    settings.update(kwargs)
    return PublishWindow(DEVICE, **settings)


def step(w: PublishWindow, spool: Spool, now: float = 0.0, *, wall: float = T0 + 1, flush: bool = False):
    """One turn of the shell: answer a Read from the spool, return the next non-Read decision."""
    decision = w.poll(now, wall=wall, flush=flush)
    if isinstance(decision, Read):
        w.offer(spool.read_after(decision.after, decision.limit))
        decision = w.poll(now, wall=wall, flush=flush)
    return decision


def send(w: PublishWindow, spool: Spool, now: float = 0.0, **kwargs) -> Send:
    decision = step(w, spool, now, **kwargs)
    assert isinstance(decision, Send), decision
    assert w.sent(decision)
    return decision


def ack(w: PublishWindow, spool: Spool, ranges, now: float = 0.0) -> int:
    removed = spool.ack(w.receive_acks(ranges))
    w.spool_deleted(removed, now)
    return removed


def sent_seqs(decision: Send) -> list[int]:
    out = []
    for env in decision.envelopes:
        out += [s.seq for s in decode_samples(env.payload, expected_device=DEVICE).samples]
    return out


# -- sending in order, batching ---------------------------------------------------------------------
def test_nothing_is_sent_before_connected_or_while_disconnected():
    w, spool = make(), Spool(range(10))
    assert w.poll(0.0, wall=T0) == Wait("offline")
    w.connected(0.0)
    assert isinstance(send(w, spool), Send)
    w.disconnected()
    assert w.poll(1.0, wall=T0) == Wait("offline")


def test_full_batches_go_out_in_seq_order_after_the_cursor():
    w, spool = make(), Spool(range(8))
    w.connected(0.0)
    assert w.poll(0.0, wall=T0) == Read(after=-1, limit=4)
    first = send(w, spool)
    assert first.seqs == (0, 1, 2, 3) and sent_seqs(first) == [0, 1, 2, 3] and first.resent == 0
    assert w.cursor == 3 and w.in_flight == 4
    assert w.poll(0.0, wall=T0) == Read(after=3, limit=4)
    assert send(w, spool).seqs == (4, 5, 6, 7)
    assert step(w, spool) == Wait("window")  # 8 in flight: the window is full


def test_a_partial_batch_waits_until_its_oldest_sample_is_batch_ms_old():
    w, spool = make(batch_ms=50), Spool(range(2), ts=T0)
    w.connected(0.0)
    decision = step(w, spool, wall=T0 + 0.020)
    assert isinstance(decision, Wait) and decision.reason == "batch"
    assert decision.timeout == pytest.approx(0.030) and decision.until_seq == 0 + 4 - 1
    assert send(w, spool, wall=T0 + 0.051).seqs == (0, 1)  # old enough: sent as it is


def test_a_partial_batch_is_sent_at_once_when_flushing_or_already_old():
    w, spool = make(batch_ms=50), Spool(range(2), ts=T0)
    w.connected(0.0)
    assert send(w, spool, wall=T0, flush=True).seqs == (0, 1)  # capture stopped: drain now
    spool.add([2], ts=T0 - 3600)  # spooled by a previous run an hour ago
    assert send(w, spool, wall=T0).seqs == (2,)


def test_an_empty_spool_means_wait_for_a_sample_then_read_again():
    w, spool = make(), Spool()
    w.connected(0.0)
    assert step(w, spool) == Wait("empty")
    spool.add(range(4))
    assert send(w, spool).seqs == (0, 1, 2, 3)


# -- the window cap ---------------------------------------------------------------------------------
def test_window_caps_samples_in_flight_and_reads_only_the_room_left():
    w, spool = make(batch_size=4, window=6), Spool(range(20))
    w.connected(0.0)
    send(w, spool)
    assert w.poll(0.0, wall=T0) == Read(after=3, limit=2)  # 6 - 4 in flight
    assert send(w, spool).seqs == (4, 5)  # a partial batch (room for 2), old enough
    assert w.in_flight == 6 and step(w, spool) == Wait("window")
    ack(w, spool, [(0, 2)])
    assert w.in_flight == 3 and w.poll(0.0, wall=T0) == Read(after=5, limit=3)


# -- acks -------------------------------------------------------------------------------------------
def test_merge_ranges_sorts_joins_adjacent_and_overlapping():
    assert merge_ranges([]) == []
    assert merge_ranges([(7, 9), (0, 2), (3, 3), (2, 5), (11, 12), (12, 12)]) == [(0, 5), (7, 9), (11, 12)]
    assert merge_ranges([(0, 5), (6, 9)]) == [(0, 9)]  # adjacent
    assert merge_ranges([(0, 100), (3, 4)]) == [(0, 100)]  # contained


def test_acks_out_of_order_and_duplicate_are_harmless():
    w, spool = make(batch_size=2, window=8), Spool(range(8))
    w.connected(0.0)
    for _ in range(4):
        send(w, spool)
    assert w.in_flight == 8
    assert ack(w, spool, [(6, 7), (2, 3)]) == 4 and w.in_flight == 4
    assert ack(w, spool, [(2, 3), (6, 7), (6, 6)]) == 0 and w.in_flight == 4  # duplicates: nothing
    assert ack(w, spool, [(0, 1), (4, 5)]) == 4 and w.in_flight == 0 and spool.rows == {}


def test_acks_for_unknown_seqs_go_to_the_spool_and_leave_the_window_alone():
    # A previous run sent 0..9; this run's window has not sent them yet (they are still spooled).
    w, spool = make(), Spool(range(12))
    w.connected(0.0)
    first = send(w, spool)
    assert first.seqs == (0, 1, 2, 3)
    ranges = w.receive_acks([(100, 200), (5, 9)])  # never spooled, and spooled but not sent yet
    assert ranges == [(5, 9), (100, 200)] and w.in_flight == 4
    assert spool.ack(ranges) == 5  # the spool deletes what it holds, ignores the rest
    assert send(w, spool).seqs == (4, 10, 11)  # a gap where the acked samples were


def test_acks_covering_offered_rows_take_them_out_before_they_are_sent():
    w, spool = make(), Spool(range(8))
    w.connected(0.0)
    read = w.poll(0.0, wall=T0)
    w.offer(spool.read_after(read.after, read.limit))  # 0..3 read, not sent yet
    ack(w, spool, [(1, 2)])
    assert send(w, spool).seqs == (0, 3)
    read = w.poll(0.0, wall=T0)
    w.offer(spool.read_after(read.after, read.limit))  # 4..7
    ack(w, spool, [(4, 7)])  # everything offered left the spool: read again at once, no wait
    assert w.poll(0.0, wall=T0) == Read(after=3, limit=4)


def test_seq_gaps_are_sent_acked_and_counted_like_any_seq():
    w, spool = make(batch_size=4), Spool([0, 1, 5, 9, 40, 41])
    w.connected(0.0)
    first = send(w, spool)
    assert first.seqs == (0, 1, 5, 9) and sent_seqs(first) == [0, 1, 5, 9] and w.cursor == 9
    assert ack(w, spool, [(0, 9)]) == 4 and w.in_flight == 0
    assert send(w, spool).seqs == (40, 41)


# -- go-back-N ---------------------------------------------------------------------------------------
def test_no_ack_progress_for_ack_timeout_goes_back_and_resends_everything():
    w, spool = make(batch_size=4, window=16, ack_timeout=10.0), Spool(range(8))
    w.connected(0.0)
    send(w, spool, now=1.0)  # the ack clock starts with the first sample in flight
    send(w, spool, now=2.0)
    assert not isinstance(w.poll(11.0, wall=T0), GoBack)  # 10 s after the first send: not yet over
    assert w.poll(11.5, wall=T0) == GoBack(in_flight=8)
    assert w.cursor == -1 and w.in_flight == 0
    again = send(w, spool, now=11.5)
    assert again.seqs == (0, 1, 2, 3) and again.resent == 4
    spool.add([8, 9, 10, 11])
    assert send(w, spool, now=11.5).resent == 4  # 4..7 again
    assert send(w, spool, now=11.5).resent == 0  # 8..11 are new


def test_ack_progress_restarts_the_ack_clock_and_an_ack_that_deletes_nothing_does_not():
    w, spool = make(ack_timeout=10.0), Spool(range(8))
    w.connected(0.0)
    send(w, spool, now=0.0)
    send(w, spool, now=0.0)
    assert ack(w, spool, [(0, 0)], now=8.0) == 1
    assert not isinstance(w.poll(17.0, wall=T0), GoBack)  # 9 s since the progress: no timeout
    assert ack(w, spool, [(0, 0), (500, 600)], now=17.0) == 0  # a duplicate: not progress
    assert isinstance(w.poll(18.5, wall=T0), GoBack)


def test_no_timeout_with_nothing_in_flight():
    w, spool = make(ack_timeout=1.0), Spool()
    w.connected(0.0)
    assert step(w, spool, now=1000.0) == Wait("empty")
    spool.add(range(4))
    send(w, spool, now=2000.0)  # in flight from now on: the clock starts here, not at connect
    assert not isinstance(w.poll(2000.5, wall=T0), GoBack)
    ack(w, spool, [(0, 3)], now=2000.6)
    assert w.in_flight == 0 and step(w, spool, now=9999.0) == Wait("empty")


def test_reconnect_goes_back_to_the_oldest_unacknowledged_sample():
    w, spool = make(batch_size=4, window=16), Spool(range(12))
    w.connected(0.0)
    send(w, spool)
    send(w, spool)
    ack(w, spool, [(0, 1)])
    w.disconnected()
    assert w.poll(1.0, wall=T0) == Wait("offline")
    w.connected(2.0)
    assert w.cursor == -1 and w.in_flight == 0
    assert w.poll(2.0, wall=T0) == Read(after=-1, limit=4)
    again = send(w, spool, now=2.0)
    assert again.seqs == (2, 3, 4, 5) and again.resent == 4


def test_a_go_back_discards_a_pending_read_and_an_unconfirmed_send():
    w, spool = make(), Spool(range(8))
    w.connected(0.0)
    read = w.poll(0.0, wall=T0)
    w.connected(1.0)  # a reconnect between the read and its answer
    w.offer(spool.read_after(read.after, read.limit))  # stale: ignored
    assert w.poll(1.0, wall=T0) == Read(after=-1, limit=4)
    w.offer(spool.read_after(-1, 4))
    pending = w.poll(1.0, wall=T0)
    w.connected(2.0)
    assert isinstance(pending, Send) and not w.sent(pending) and w.in_flight == 0


def test_a_send_not_confirmed_is_read_and_sent_again():
    w, spool = make(), Spool(range(8))
    w.connected(0.0)
    failed = step(w, spool)  # the client refused to publish it: the shell does not call sent()
    assert isinstance(failed, Send) and w.cursor == -1 and w.in_flight == 0
    again = step(w, spool)
    assert again.seqs == failed.seqs and again.resent == 0
    assert not w.sent(failed) and w.sent(again) and w.cursor == 3


def test_dropped_samples_leave_the_window():
    w, spool = make(batch_size=4, window=8), Spool(range(12))
    w.connected(0.0)
    send(w, spool)
    send(w, spool)
    assert step(w, spool) == Wait("window")
    for s in range(6):
        del spool.rows[s]  # the spool's drop-oldest deleted 0..5
    w.spool_dropped_through(5)
    w.spool_dropped_through(3)  # an older report changes nothing
    assert w.in_flight == 2 and w.poll(0.0, wall=T0) == Read(after=7, limit=4)


# -- envelopes --------------------------------------------------------------------------------------
def test_envelopes_are_byte_for_byte_the_protocols_encoding():
    batch = rows(range(3), pipeline="abc")
    (env,) = split_envelopes(DEVICE, batch, 1_000_000)
    samples = [r.to_sample() for r in batch]
    assert env.payload == encode_samples(DEVICE, samples, pipeline="abc")
    assert (env.first, env.last, env.count, env.oversize, env.error) == (0, 2, 3, False, None)


def test_a_batch_is_split_before_an_envelope_would_outgrow_the_limit():
    size = len(body(4000))
    limit = 20_000
    per = (limit - ENVELOPE_OVERHEAD) // (size + SAMPLE_OVERHEAD)  # how many fit by the estimate
    batch = rows(range(32), size=4000)
    envelopes = split_envelopes(DEVICE, batch, limit)
    assert [e.count for e in envelopes[:-1]] == [per] * (len(envelopes) - 1)
    assert sum(e.count for e in envelopes) == 32 and envelopes[-1].count <= per
    assert all(len(e.payload) <= limit and not e.oversize for e in envelopes)
    seqs = [s.seq for e in envelopes for s in decode_samples(e.payload).samples]
    assert seqs == list(range(32))


def test_a_batch_is_split_where_the_pipeline_changes():
    batch = rows([0, 1], pipeline="old") + rows([2], pipeline=None) + rows([3, 4], pipeline="new")
    envelopes = split_envelopes(DEVICE, batch, 1_000_000)
    assert [(e.first, e.last) for e in envelopes] == [(0, 1), (2, 2), (3, 4)]
    assert [decode_samples(e.payload).pipeline for e in envelopes] == ["old", None, "new"]


def test_a_sample_over_the_limit_on_its_own_is_still_sent_alone_and_flagged():
    limit = 10_000
    batch = rows([0], size=100) + rows([1], size=15_000) + rows([2, 3], size=100)
    envelopes = split_envelopes(DEVICE, batch, limit)
    assert [(e.first, e.last) for e in envelopes] == [(0, 0), (1, 1), (2, 3)]
    assert [e.oversize for e in envelopes] == [False, True, False]
    assert len(envelopes[1].payload) > limit  # sent anyway (docs/protocol.md: "still sent alone")
    # through the window it counts as sent like any sample
    w, spool = make(max_message_bytes=limit), Spool()
    spool.rows = {r.seq: r for r in batch}
    w.connected(0.0)
    assert send(w, spool).seqs == (0, 1, 2, 3) and w.in_flight == 4


def test_two_samples_that_fit_alone_but_not_together_are_not_flagged_oversize():
    batch = rows([0], size=6_000) + rows([1], size=6_000)
    envelopes = split_envelopes(DEVICE, batch, 10_000)
    assert [e.count for e in envelopes] == [1, 1] and not any(e.oversize for e in envelopes)


def test_a_sample_that_cannot_be_encoded_is_reported_and_never_looped_on():
    good = rows([0])[0]
    bad = SpooledSample(1, T0, "p1", b"\x01not a body")
    w, spool = make(batch_size=2), Spool()
    spool.rows = {0: good, 1: bad}
    w.connected(0.0)
    decision = send(w, spool)
    (env,) = decision.envelopes  # one envelope for both: the encoding fails as a whole
    assert env.payload is None and "encode_sample_body" in env.error
    assert w.cursor == 1 and w.poll(0.0, wall=T0) == Read(after=1, limit=2)


def test_construction_checks_its_settings():
    with pytest.raises(ValueError):
        PublishWindow(DEVICE, batch_size=8, window=4)
    with pytest.raises(ValueError):
        PublishWindow(DEVICE, ack_timeout=0)


def test_a_thousand_batches_of_32_through_the_window_and_the_encoder_take_well_under_a_second():
    w = make(batch_size=32, window=4096)
    one = body()
    spooled = [SpooledSample(s, T0, "p1", one) for s in range(32_000)]  # row i has seq i
    w.connected(0.0)
    started = time.perf_counter()
    for i in range(1000):
        read = w.poll(float(i), wall=T0 + 1)
        assert isinstance(read, Read)
        w.offer(spooled[read.after + 1 : read.after + 1 + read.limit])
        decision = w.poll(float(i), wall=T0 + 1)
        assert isinstance(decision, Send) and w.sent(decision)
        w.spool_deleted(len(w.receive_acks([(decision.seqs[0], decision.seqs[-1])])) * 32, float(i))
    assert w.in_flight == 0 and w.cursor == 31_999
    assert time.perf_counter() - started < 2.0  # generous for a slow CI machine


# -- several batches per read (rule 2): one spool query feeds many envelopes -------------------------
def test_one_read_of_several_batches_sends_one_envelope_per_full_batch():
    w, spool = make(batch_size=1, window=64, batches_per_read=16), Spool(range(40))
    w.connected(0.0)
    assert w.poll(0.0, wall=T0 + 1) == Read(after=-1, limit=1)  # no rows seen yet: one batch
    first = send(w, spool)
    assert first.seqs == (0,)
    # The mean body size is known now: 16 batches per read fit in read_bytes.
    second = send(w, spool)
    assert second.seqs == tuple(range(1, 17)) and len(second.envelopes) == 16
    assert [sent_seqs(Send((e,), (), 0)) for e in second.envelopes] == [[s] for s in range(1, 17)]
    assert w.in_flight == 17 and w.cursor == 16


def test_the_batches_per_read_shrink_to_the_read_bytes_budget():
    size = 1000
    w, spool = make(batch_size=4, window=4096, batches_per_read=64, read_bytes=10 * size), Spool(
        range(200), size=size
    )
    w.connected(0.0)
    send(w, spool)
    read = w.poll(0.0, wall=T0 + 1)
    assert isinstance(read, Read) and read.limit == 8  # 10 bodies of ~1 kB fit: 2 batches of 4


def test_a_partial_last_batch_of_a_read_waits_and_the_full_ones_go():
    w, spool = make(batch_size=4, window=64, batches_per_read=4), Spool(range(4))
    w.connected(0.0)
    send(w, spool)  # seqs 0-3; now 4 batches per read
    spool.add(range(4, 14), ts=T0 + 1)  # two full batches and a partial one of 2, all fresh
    decision = step(w, spool, wall=T0 + 1)
    assert isinstance(decision, Send) and decision.seqs == tuple(range(4, 12))
    assert [e.count for e in decision.envelopes] == [4, 4]
    assert w.sent(decision)
    # The partial batch is read again and waits for batch_ms (rule 3), then goes as it is.
    assert step(w, spool, wall=T0 + 1) == Wait("batch", pytest.approx(0.05), 15)
    late = step(w, spool, wall=T0 + 1.1)
    assert isinstance(late, Send) and late.seqs == (12, 13)
    # flush sends a partial batch with the full ones at once
    w2, spool2 = make(batch_size=4, window=64, batches_per_read=4), Spool(range(4))
    w2.connected(0.0)
    send(w2, spool2)
    spool2.add(range(4, 10), ts=T0 + 1)
    assert send(w2, spool2, wall=T0 + 1, flush=True).seqs == tuple(range(4, 10))


def test_several_batches_per_read_still_respect_the_window():
    w, spool = make(batch_size=2, window=6, batches_per_read=8), Spool(range(20))
    w.connected(0.0)
    send(w, spool)  # 0-1
    assert w.poll(0.0, wall=T0 + 1) == Read(after=1, limit=4)  # 6 - 2 in flight
