"""The PostgreSQL index (``--index URL``) on a real server: per-device transactions that never
deadlock, recovery that waits for a batch in flight (both backends), the folder's index marker, bad
URLs, SQLite refused on network filesystems, and 3 worker processes on Mosquitto and PostgreSQL with
one of them killed -9 and restarted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from lepton.cloud._index import network_filesystem, open_index, recover
from tests.cloud._ingest_support import REPO, ResendPublisher, start_worker_process, stop_process, wait_status


def test_device_transactions_in_any_order_never_deadlock(tmp_path, fleet, index_url, request):
    """4 writers, each with its own connection, lock random sets of devices named in random order,
    look their seqs up and add new ones: nothing deadlocks and every seq is stored once."""
    devices = [f"cam-{i}" for i in range(6)]
    errors: list[BaseException] = []
    index = open_index(tmp_path / fleet, index_url)  # creates the schema before the writers race
    index.close()

    def writer(t: int) -> None:
        rng = random.Random(t)
        idx = open_index(tmp_path / fleet, index_url)
        try:
            for i in range(25):
                chosen = rng.sample(devices, 3)  # in random order: the index must impose its own
                block = list(range(t * 10_000 + i * 10, t * 10_000 + i * 10 + 10))
                with idx.transaction(devices=chosen):
                    for d in chosen:
                        assert idx.known(d, block + [block[0] - 1]) <= {block[0] - 1}
                        idx.add(d, block)
                    time.sleep(0.002)  # hold the locks a little, so the writers overlap
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            idx.close()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert not errors and not any(t.is_alive() for t in threads)
    index = open_index(tmp_path / fleet, index_url)
    with index.transaction():
        assert index.count() == 4 * 25 * 3 * 10
    index.close()
    if index_url is not None:
        assert "deadlock detected" not in request.getfixturevalue("postgres_server").log()


def test_recovery_waits_for_a_batch_in_flight(tmp_path, fleet, index_url):
    """Start-up recovery of a second worker must not take the `.tmp` of a batch that is written but
    not yet committed for an orphan: it waits for the commit, then finishes that file's rename."""
    ddir = tmp_path / fleet
    data = ddir / "data"
    data.mkdir(parents=True)
    writer = open_index(ddir, index_url)
    other = open_index(ddir, index_url)
    result: dict = {}
    recovering = threading.Thread(target=lambda: result.update(recover(other, ddir)))
    with writer.transaction(devices=["cam-1"]):
        (data / ".part-1-w1-x.parquet.tmp").write_bytes(b"a committed batch")
        writer.add("cam-1", range(100))
        writer.add_file("part-1-w1-x.parquet", rows=100, size=17)
        recovering.start()
        time.sleep(0.5)
        assert recovering.is_alive()  # blocked by the batch's transaction
    recovering.join(30)  # the writer "crashed" after its commit: no rename of its own

    assert result["finished"] == 1 and result["orphans_removed"] == 0
    assert (data / "part-1-w1-x.parquet").read_bytes() == b"a committed batch"
    with other.transaction():
        assert other.count() == 100 and other.invisible_files() == []
    writer.close()
    other.close()


@pytest.mark.postgres
def test_folder_records_its_postgres_index_without_the_password(tmp_path, fleet, postgres_server,
                                                               monkeypatch):
    ddir = tmp_path / fleet
    index = open_index(ddir, postgres_server.url())
    with index.transaction(devices=["cam-1"]):
        index.add("cam-1", range(10))
    index.close()

    marker = (ddir / "index.json").read_text()
    assert postgres_server.password not in marker
    assert json.loads(marker)["url"] == postgres_server.url(password=False)
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)  # libpq's, as an operator would set
    again = open_index(ddir)  # no URL: the folder says where its index is, never a new SQLite one
    with again.transaction():
        assert type(again).__name__ == "PostgresIndex" and again.count() == 10
    again.close()
    assert not (ddir / "index.sqlite").exists()


@pytest.mark.postgres
def test_a_lost_connection_is_transient_and_the_next_transaction_reconnects(tmp_path, fleet, postgres_server):
    import psycopg

    index = open_index(tmp_path / fleet, postgres_server.url())
    with index.transaction(devices=["cam-1"]):
        index.add("cam-1", range(5))
    with psycopg.connect(postgres_server.url(), autocommit=True) as admin:  # what a server restart does
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = 'lepton-index' AND pid <> pg_backend_pid()")
    with pytest.raises(index.transient_errors), index.transaction(devices=["cam-1"]):
        index.add("cam-1", range(5, 10))
    with index.transaction(devices=["cam-1"]):  # a fresh session; the failed batch left nothing
        assert index.known("cam-1", range(10)) == set(range(5))
        index.add("cam-1", range(5, 10))
    with index.transaction():
        assert index.count() == 10
    index.close()


def _worker_cli(tmp_path, *index_args: str) -> subprocess.CompletedProcess:  # noqa: ANN001
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LEPTON_"))}
    env["LEPTON_BROKER"] = "mqtt://w1:pw@127.0.0.1:1"  # never reached: the index is opened first
    return subprocess.run(
        [sys.executable, "-m", "lepton", "worker", "--fleet", "f1", "--data", str(tmp_path), "--quiet",
         *index_args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )


@pytest.mark.postgres
def test_bad_index_urls_exit_2_in_one_line_without_the_password(tmp_path, postgres_server):
    host_port = f"{postgres_server.host}:{postgres_server.port}"
    cases = {
        "mysql://lepton@db/lepton": "postgresql://",
        f"postgresql://lepton:WrongSecret99@{host_port}/lepton": "password authentication failed",
        f"postgresql://lepton:{postgres_server.password}@{host_port}/nosuchdb": 'database "nosuchdb"',
        "postgresql://lepton:Unreached42@127.0.0.1:1/lepton": "check --index",
    }
    for url, expected in cases.items():
        done = _worker_cli(tmp_path, "--index", url)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], (url, done.stderr)
        password = url.split("@")[0].split(":")[-1]
        assert password not in done.stderr + done.stdout
    assert not list(tmp_path.glob("*/index.sqlite"))


def test_sqlite_index_on_a_network_filesystem_is_recognised():
    mounts = (
        "/dev/sda1 / ext4 rw 0 0\n"
        "server:/export /mnt/share nfs4 rw,relatime 0 0\n"
        "//nas/data /mnt/my\\040nas cifs rw 0 0\n"
        "user@host:/srv /home/u/remote fuse.sshfs rw 0 0\n"
        "fuse-overlayfs /var/lib/overlay fuse.fuse-overlayfs rw 0 0\n"
    )
    assert network_filesystem("/mnt/share/data/f1", mounts) == "nfs4"
    assert network_filesystem("/mnt/my nas/f1", mounts) == "cifs"
    assert network_filesystem("/home/u/remote/f1", mounts) == "fuse.sshfs"
    assert network_filesystem("/mnt/shared/f1", mounts) is None  # a sibling name, on the root disk
    assert network_filesystem("/var/lib/overlay/f1", mounts) is None  # a local FUSE filesystem
    assert network_filesystem("/srv/data", mounts) is None


@pytest.mark.mosquitto
@pytest.mark.postgres
@pytest.mark.slow
def test_three_worker_processes_on_postgres_one_killed_9_and_restarted(mosquitto_broker, fleet, tmp_path,
                                                                       postgres_server):
    """3 worker processes in a $share group on Mosquitto, the index in PostgreSQL; one is killed -9
    mid-stream and restarted while 4 devices keep sending: every sample is stored exactly once."""
    index = postgres_server.url()
    viewer = mosquitto_broker.url("viewer", "v1", fleet=fleet)
    names = ("wa", "wb", "wc")
    urls = {n: mosquitto_broker.url("worker", n, fleet=fleet) for n in names}
    procs = {n: start_worker_process(urls[n], fleet, tmp_path, name=n, group="ingest", index=index)
             for n in names}
    for n in names:
        wait_status(viewer, fleet, n, lambda s: s.get("online") is True)
    devices = ("cam-1", "cam-2", "cam-3", "cam-4")
    pubs = [ResendPublisher(mosquitto_broker.url("device", d, fleet=fleet), fleet, d, total=2_000,
                            per_message=20, resend_after=1.0) for d in devices]
    for p in pubs:
        p.start()
    state = {}

    def on_progress(i: int) -> None:
        if i == 30:
            procs["wb"].send_signal(signal.SIGKILL)
            state["killed_rc"] = procs["wb"].wait(10)
        if i == 60:
            state["restarted"] = start_worker_process(urls["wb"], fleet, tmp_path, name="wb", group="ingest",
                                                      index=index)

    threads = [threading.Thread(target=p.run, kwargs={"pace": 0.01, "timeout": 120,
                                                       **({"on_progress": on_progress} if k == 0 else {})})
               for k, p in enumerate(pubs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in pubs:
        p.stop()
    codes = [stop_process(procs[n]) for n in ("wa", "wc")] + [stop_process(state["restarted"])]

    from lepton.cloud import Dataset

    assert state["killed_rc"] == -signal.SIGKILL and codes == [0, 0, 0]
    assert all(not p.unacked() for p in pubs)
    t = Dataset(tmp_path, fleet).read_table(columns=["device", "seq"])
    pairs = list(zip(t.column("device").to_pylist(), t.column("seq").to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == 8_000
    assert set(pairs) == {(d, s) for d in devices for s in range(2_000)}
    writers = Counter(f.name.split("-")[2] for f in Dataset(tmp_path, fleet).files())
    assert set(writers) == set(names)  # each of the three wrote a share
    assert not (tmp_path / fleet / "index.sqlite").exists()
    check = open_index(tmp_path / fleet, index)
    with check.transaction():
        assert check.count() == 8_000
    check.close()
    assert "deadlock detected" not in postgres_server.log()
