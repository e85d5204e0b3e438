"""Issue 11 item 3 on both brokers: grants made for a custom topic prefix (``role_grants(prefix=)`` on the
embedded broker, ``broker/add-user.sh --prefix`` on Mosquitto) let a device use its own topics under
that prefix and nothing under another prefix, even with the same fleet and device id."""

from __future__ import annotations

from lepton.protocol import Topics
from tests.broker._mqtt import Inbox

PREFIX = "acme/site-3/lepton"


def test_a_device_on_a_custom_prefix_uses_its_topics_there_and_none_under_another_prefix(broker, fleet):
    mine = Topics(fleet=fleet, prefix=PREFIX)
    others = [Topics(fleet=fleet), Topics(fleet=fleet, prefix="acme/site-4/lepton")]
    worker_url = broker.url("worker", "w-mine", fleet=fleet, prefix=PREFIX)
    other_workers = [broker.url("worker", f"w-other{i}", fleet=fleet, prefix=o.prefix)
                     for i, o in enumerate(others)]
    controls = [(f"cam-o{i}", broker.url("device", f"cam-o{i}", fleet=fleet, prefix=o.prefix))
                for i, o in enumerate(others)]
    device_url = broker.url("device", "cam-p", fleet=fleet, prefix=PREFIX)

    # writing: its own channels reach its prefix's worker; the same topics under other prefixes go nowhere
    with Inbox(worker_url) as worker, Inbox(device_url, client_id="cam-p") as device, \
            Inbox(other_workers[0]) as other0, Inbox(other_workers[1]) as other1:
        for inbox, topics in ((worker, mine), (other0, others[0]), (other1, others[1])):
            for channel in ("samples", "status"):
                assert inbox.subscribe(topics.all_devices(channel))
            assert inbox.subscribe(topics.all_models())
        for o in others:
            device.publish(o.samples("cam-p"), b"forged")
            device.publish(o.status("cam-p"), b"forged", retain=True)
            device.publish(o.model("digits"), b"forged", retain=True)
        device.publish(mine.status("cam-p"), b"online", retain=True)
        device.publish(mine.samples("cam-p"), b"mine")
        mine_seen = worker.until(mine.samples("cam-p"))
        other_seen = []
        for o, inbox, (name, url) in zip(others, (other0, other1), controls, strict=True):
            with Inbox(url, client_id=name) as control:  # a device of that prefix, after the forgeries
                control.publish(o.samples(name), b"control")
            other_seen.append(inbox.until(o.samples(name)))

    assert [(m.topic, m.payload) for m in mine_seen] == [(mine.status("cam-p"), b"online"),
                                                         (mine.samples("cam-p"), b"mine")]
    for o, (name, _), seen in zip(others, controls, other_seen, strict=True):
        assert [(m.topic, m.payload) for m in seen] == [(o.samples(name), b"control")]

    # reading: its acks and models under its prefix arrive; other prefixes' acks and models never do
    with Inbox(device_url, client_id="cam-p") as device:
        for o in others:
            device.subscribe(o.acks("cam-p"))  # accepted or refused: either way nothing may arrive
            device.subscribe(o.model_filter("digits"))
        assert device.subscribe(mine.model_filter("digits"))
        assert device.subscribe(mine.acks("cam-p"))
        for o, url in zip(others, other_workers, strict=True):
            with Inbox(url) as other_worker:
                other_worker.publish(o.acks("cam-p"), b"not yours")
                other_worker.publish(o.model("digits"), b"other prefix's manifest", retain=True)
        with Inbox(worker_url) as worker:
            worker.publish(mine.model("digits"), b"manifest", retain=True)
            worker.publish(mine.acks("cam-p"), b"yours")
        seen = device.until(mine.acks("cam-p"))

    assert [(m.topic, m.payload) for m in seen] == [(mine.model("digits"), b"manifest"),
                                                    (mine.acks("cam-p"), b"yours")]
