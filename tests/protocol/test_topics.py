"""Topics are built and parsed in one place: every build parses back; bad ids and prefixes never get out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton.errors import ProtocolError
from lepton.protocol import DEVICE_CHANNELS, ParsedTopic, Topics, validate_id

ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
prefixes = st.lists(st.from_regex(r"[a-z0-9_.-]{1,10}", fullmatch=True), min_size=1, max_size=3).map("/".join)

BAD_IDS = ["", "a/b", "a+b", "#", "a b", " a", "a.b", "d" * 65, "caméra", "a\0b", "$SYS",
           None, 5, b"cam", ["a"]]


@settings(deadline=None, max_examples=150)
@given(fleet=ids, device=ids, prefix=prefixes, channel=st.sampled_from(DEVICE_CHANNELS))
def test_device_topics_round_trip(fleet, device, prefix, channel):
    topics = Topics(fleet=fleet, prefix=prefix)

    topic = topics.device(device, channel)

    assert topic == f"{prefix}/{fleet}/devices/{device}/{channel}"
    assert topics.parse(topic) == ParsedTopic(fleet=fleet, channel=channel, device=device)


@settings(deadline=None, max_examples=100)
@given(fleet=ids, model=ids, version=st.integers(1, 10**9), index=st.integers(0, 10**6), worker=ids)
def test_model_worker_and_deadletter_topics_round_trip(fleet, model, version, index, worker):
    topics = Topics(fleet=fleet)

    assert topics.parse(topics.model(model)) == ParsedTopic(fleet, "model", model=model)
    assert topics.parse(topics.model_chunk(model, version, index)) == ParsedTopic(
        fleet, "model_chunk", model=model, version=version, chunk=index)
    assert topics.parse(topics.worker_status(worker)) == ParsedTopic(fleet, "worker_status", worker=worker)
    assert topics.parse(topics.worker_telemetry(worker)) == ParsedTopic(fleet, "worker_telemetry",
                                                                        worker=worker)
    assert topics.parse(topics.deadletter()) == ParsedTopic(fleet, "deadletter")


def test_the_documented_topic_strings():
    t = Topics(fleet="demo")

    assert t.samples("cam-1") == "lepton/demo/devices/cam-1/samples"
    assert t.acks("cam-1") == "lepton/demo/devices/cam-1/acks"
    assert t.status("cam-1") == "lepton/demo/devices/cam-1/status"
    assert t.telemetry("cam-1") == "lepton/demo/devices/cam-1/telemetry"
    assert t.predictions("cam-1") == "lepton/demo/devices/cam-1/predictions"
    assert t.model("digits") == "lepton/demo/models/digits"
    assert t.model_chunk("digits", 3, 0) == "lepton/demo/models/digits/v/3/chunks/0"
    assert t.deadletter() == "lepton/demo/deadletter"
    assert t.worker_status("ingest-1") == "lepton/demo/workers/ingest-1/status"
    assert t.worker_telemetry("ingest-1") == "lepton/demo/workers/ingest-1/telemetry"
    assert t.all_devices("samples") == "lepton/demo/devices/+/samples"
    assert t.model_filter("digits") == "lepton/demo/models/digits/#"
    assert t.all_models() == "lepton/demo/models/#"
    assert t.all_status() == "lepton/demo/+/+/status"
    assert t.shared("ingest", t.all_devices("samples")) == "$share/ingest/lepton/demo/devices/+/samples"


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_refused_before_a_topic_exists(bad):
    t = Topics(fleet="demo")
    builders = [lambda: Topics(fleet=bad), lambda: t.samples(bad), lambda: t.acks(bad), lambda: t.model(bad),
                lambda: t.model_chunk(bad, 1, 0), lambda: t.worker_status(bad), lambda: t.worker_telemetry(bad),
                lambda: t.shared(bad, "x"),
                lambda: validate_id(bad)]

    for build in builders:
        with pytest.raises(ProtocolError):
            build()


def test_id_errors_name_the_kind_and_the_fix():
    with pytest.raises(ProtocolError) as info:
        Topics(fleet="demo").samples("cam/1")

    assert info.value.field == "device"
    assert "A-Z a-z 0-9 _ -" in str(info.value)


@pytest.mark.parametrize("prefix", ["", "$SYS", "$lepton", "a/+", "a/#", "+", "/lepton", "lepton/", "a\0b",
                                    "acme site", "a\tb", "a\nb"])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(ProtocolError) as info:
        Topics(fleet="demo", prefix=prefix)
    assert info.value.field == "prefix"


def test_a_nested_prefix_is_allowed():
    t = Topics(fleet="demo", prefix="acme/site-3/lepton")

    assert t.samples("d1") == "acme/site-3/lepton/demo/devices/d1/samples"
    assert t.parse(t.samples("d1")).device == "d1"


@pytest.mark.parametrize("channel", ["sample", "SAMPLES", "models", "", "acks/x"])
def test_unknown_device_channels_are_refused(channel):
    t = Topics(fleet="demo")
    with pytest.raises(ProtocolError):
        t.device("d1", channel)
    with pytest.raises(ProtocolError):
        t.all_devices(channel)


@pytest.mark.parametrize("version, index",
                         [(0, 0), (-1, 0), (1, -1), ("1", 0), (1, "0"), (1.0, 0), (None, 0)])
def test_bad_model_versions_and_chunk_indices_are_refused(version, index):
    with pytest.raises(ProtocolError):
        Topics(fleet="demo").model_chunk("m", version, index)


@pytest.mark.parametrize("topic", [
    "lepton/other/devices/d1/samples",          # another fleet
    "acme/demo/devices/d1/samples",             # another prefix
    "lepton/demo",                              # the root itself
    "lepton/demo/",
    "lepton/demox/devices/d1/samples",
    "lepton/demo/devices/d1",                   # no channel
    "lepton/demo/devices/d1/samples/extra",     # too deep
    "lepton/demo/devices/d1/images",            # unknown channel
    "lepton/demo/devices/d/1/samples",
    "lepton/demo/devices/+/samples",            # a filter is not a topic
    "lepton/demo/devices/d.1/samples",          # bad device id
    "lepton/demo/models",
    "lepton/demo/models/m/v/1",
    "lepton/demo/models/m/v/01/chunks/0",       # leading zero: not the canonical form
    "lepton/demo/models/m/v/1/chunks/-1",
    "lepton/demo/models/m/v/x/chunks/0",
    "lepton/demo/models/m/v/1/chunk/0",
    "lepton/demo/models/m/w/1/chunks/0",
    "lepton/demo/models/m/v/1/chunks/١",         # a non-ASCII digit
    "lepton/demo/models/m/v/1/chunks/²",         # isdigit() but not int()-able
    "lepton/demo/models/m/v/0/chunks/0",        # versions start at 1
    "lepton/demo/workers/w1",
    "lepton/demo/workers/w1/samples",
    "lepton/demo/deadletter/x",
    "lepton/demo/unknown",
    "",
    None,
])
def test_parse_refuses_what_the_builder_never_makes(topic):
    with pytest.raises(ProtocolError) as info:
        Topics(fleet="demo").parse(topic)
    assert info.value.field in {"topic", "device", "model", "worker", "version", "chunk"}
