"""The embedded broker's I/O-free cores: ACL rules, the client-id binding, the login throttle."""

from __future__ import annotations

import pytest

from lepton.broker._acl import Acl, add_acl_user, matches, read_acl_file, role_grants
from lepton.broker._auth import LoginThrottle, client_id_allowed
from lepton.errors import ConfigError
from lepton.testing import PROJECT_ROOT


def _acl(*users: tuple[str, str, str], extra: str = "") -> Acl:
    text = extra + "".join(f"user {name}\n" + "\n".join(role_grants(role, fleet, name)) + "\n"
                           for role, fleet, name in users)
    return Acl.parse(text)


@pytest.mark.parametrize("filter_, topic, expected", [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("$SYS/#", "$SYS/x", True),
    ("a/b", "a/c", False), ("a/+/c", "a//c", True),
])
def test_topic_filters_match_as_mqtt_defines(filter_, topic, expected):
    assert matches(filter_, topic) is expected


def test_a_device_writes_only_its_own_channels_and_reads_only_its_acks_and_its_fleets_models():
    acl = _acl(("device", "f1", "cam-a"))
    allowed = lambda topic, access: acl.allowed("cam-a", "cam-a", topic, access)  # noqa: E731

    for channel in ("samples", "status", "telemetry", "predictions"):
        assert allowed(f"lepton/f1/devices/cam-a/{channel}", "write")
        assert not allowed(f"lepton/f1/devices/cam-b/{channel}", "write")
        assert not allowed(f"lepton/f2/devices/cam-a/{channel}", "write")   # not in another fleet
        assert not allowed(f"lepton/f1/devices/cam-b/{channel}", "read")
    assert allowed("lepton/f1/devices/cam-a/acks", "read")
    assert not allowed("lepton/f1/devices/cam-a/acks", "write")             # no forged acks, even its own
    assert not allowed("lepton/f1/devices/cam-b/acks", "write")
    assert not allowed("lepton/f1/devices/cam-b/acks", "read")
    assert allowed("lepton/f1/models/digits/v/1/0", "read")
    assert not allowed("lepton/f1/models/digits", "write")
    assert not allowed("lepton/f2/models/digits", "read")
    assert not allowed("$SYS/broker/uptime", "read")


def test_viewers_only_read_and_unknown_users_get_nothing():
    acl = _acl(("viewer", "f1", "grafana"))

    assert acl.allowed("grafana", "grafana", "lepton/f1/devices/cam-a/status", "read")
    assert not acl.allowed("grafana", "grafana", "lepton/f1/devices/cam-a/samples", "read")
    for topic in ("lepton/f1/devices/cam-a/status", "lepton/f1/models/m", "lepton/f1/devices/cam-a/acks"):
        assert not acl.allowed("grafana", "grafana", topic, "write")
    assert not acl.allowed("stranger", "stranger", "lepton/f1/devices/cam-a/status", "read")
    assert not acl.allowed(None, "anon", "lepton/f1/devices/cam-a/status", "read")


@pytest.mark.parametrize("prefix", [None, "acme/site-3/lepton"])
def test_the_python_roles_are_the_grants_add_user_sh_writes(prefix):
    script = (PROJECT_ROOT / "broker" / "add-user.sh").read_text()
    for role in ("device", "worker", "trainer", "viewer"):
        block = script.split(f"  {role}) grants=\"", 1)[1].split('" ;;', 1)[0]
        expected = block.replace("$prefix", prefix or "lepton").replace("$fleet", "F").replace("$name", "N")
        kwargs = {"prefix": prefix} if prefix else {}
        assert role_grants(role, "F", "N", **kwargs) == expected.splitlines(), role


def test_grants_for_a_custom_prefix_match_only_that_prefix():
    p = "acme/site-3/lepton"
    acl = Acl.parse("user cam-a\n" + "\n".join(role_grants("device", "f1", "cam-a", prefix=p))
                    + "\nuser admin\n" + "\n".join(role_grants("admin", "-", "admin", prefix=p)))

    assert acl.allowed("cam-a", "cam-a", "acme/site-3/lepton/f1/devices/cam-a/samples", "write")
    assert acl.allowed("cam-a", "cam-a", "acme/site-3/lepton/f1/models/digits", "read")
    assert not acl.allowed("cam-a", "cam-a", "lepton/f1/devices/cam-a/samples", "write")
    assert not acl.allowed("cam-a", "cam-a", "acme/site-4/lepton/f1/models/digits", "read")
    assert acl.allowed("admin", "admin", "acme/site-3/lepton/f9/deadletter", "write")
    assert not acl.allowed("admin", "admin", "lepton/f9/deadletter", "write")


@pytest.mark.parametrize("prefix", ["", "a b", "$SYS", "/lepton", "lepton/", "a/#"])
def test_a_bad_prefix_is_a_config_error_naming_the_flag(prefix):
    with pytest.raises(ConfigError, match="--prefix"):
        role_grants("device", "f1", "cam-a", prefix=prefix)


def test_anonymous_lines_come_before_any_user_and_patterns_substitute_the_user_and_client():
    acl = Acl.parse("topic read public/#\nuser cam-a\ntopic write x\npattern write own/%u/%c\n")

    assert acl.allowed(None, "anon", "public/a", "read") and not acl.allowed("cam-a", "cam-a", "public/a", "read")
    assert acl.allowed("cam-a", "cam-a/t1", "own/cam-a/cam-a/t1", "write") is False  # '/' in id: no pattern
    assert acl.allowed("cam-a", "cam-a", "own/cam-a/cam-a", "write")
    assert not acl.allowed("cam-b", "cam-b", "own/cam-a/cam-a", "write")


def test_a_broken_acl_line_is_a_config_error_naming_the_line():
    with pytest.raises(ConfigError, match=r"ACL:2: cannot read"):
        Acl.parse("user a\ntopic read a b c\n")


def test_add_acl_user_refuses_an_existing_name_unless_replace_and_writes_0600(tmp_path):
    path = tmp_path / "acl"
    add_acl_user(path, "ingest-1", role_grants("worker", "f1", "ingest-1"))

    with pytest.raises(ConfigError, match="already has grants"):
        add_acl_user(path, "ingest-1", role_grants("device", "f1", "ingest-1"))
    assert read_acl_file(path).allowed("ingest-1", "ingest-1", "lepton/f1/devices/x/samples", "read")

    add_acl_user(path, "ingest-1", role_grants("device", "f1", "ingest-1"), replace=True)
    acl = read_acl_file(path)
    assert not acl.allowed("ingest-1", "ingest-1", "lepton/f1/devices/x/samples", "read")  # the old role is gone
    assert acl.allowed("ingest-1", "ingest-1", "lepton/f1/devices/ingest-1/samples", "write")
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("username, client_id, expected", [
    ("cam-a", "cam-a", True), ("cam-a", "cam-a/tool-1", True), ("cam-a", "", True),
    ("cam-a", "cam-b", False), ("cam", "cam-a", False),            # "-" is part of names: no prefix rule
    ("ingest-1", "lepton-worker-f1-ingest-1", False), ("cam-a", "cam-ab", False),
    (None, "cam-a", False), (None, "cam-a/x", False), (None, "dashboard-1", True),
])
def test_a_client_id_is_the_username_or_under_it(username, client_id, expected):
    assert client_id_allowed(username, client_id, {"cam-a": "h", "cam": "h", "ingest-1": "h"}) is expected


def test_the_throttle_lets_a_few_failures_pass_then_backs_off_exponentially_and_forgets():
    throttle = LoginThrottle(free=3, base=1.0, cap=8.0, forget=100.0)
    key = [("addr", "10.0.0.1")]

    for _ in range(3):
        assert throttle.blocked_for(key, 0.0) == 0
        throttle.failed(key, 0.0)
    assert throttle.blocked_for(key, 0.0) == 0       # the free failures cost nothing
    waits = []
    for i in range(6):
        throttle.failed(key, float(i * 10))
        waits.append(throttle.blocked_for(key, float(i * 10)))
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]   # doubling, capped
    assert throttle.blocked_for([("addr", "10.0.0.2")], 50.0) == 0  # other sources are not affected
    assert throttle.blocked_for(key, 50.0 + 8.0) == 0
    assert throttle.blocked_for(key, 50.0 + 200.0) == 0
    throttle.failed(key, 250.0)
    assert throttle.blocked_for(key, 250.0) == 0      # forgotten: free failures again
    throttle.succeeded(key)


def test_the_throttle_remembers_a_bounded_number_of_keys():
    throttle = LoginThrottle(max_keys=100)
    for i in range(1000):
        throttle.failed([("addr", f"10.0.{i // 256}.{i % 256}")], 0.0)

    assert len(throttle._state) == 100
