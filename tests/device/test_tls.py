"""mqtts:// end to end: a device behind a TLS listener of Mosquitto, verified with the test's own CA."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lepton.cli import _exit
from lepton.testing import MosquittoBroker
from tests.device.test_faults import password_off_argv
from tests.device._acker import Acker


def make_certs(d: Path) -> None:
    """A throw-away CA and a server certificate for 127.0.0.1 (cryptography, no openssl binary)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = dict(
        not_valid_before=now - datetime.timedelta(days=1), not_valid_after=now + datetime.timedelta(days=2)
    )
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lepton-test-ca")])
    ca = (
        x509.CertificateBuilder(
            subject_name=ca_name,
            issuer_name=ca_name,
            public_key=ca_key.public_key(),
            serial_number=1,
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
            issuer_name=ca_name,
            public_key=key.public_key(),
            serial_number=2,
            **valid,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.mosquitto
def test_device_over_mqtts_with_a_private_ca(fleet, tmp_path, require_mosquitto):
    from lepton.broker import free_port

    make_certs(tmp_path)
    port = free_port()
    extra = (
        f"listener {port} 127.0.0.1\ncafile {tmp_path}/ca.pem\ncertfile {tmp_path}/server.pem\n"
        f"keyfile {tmp_path}/server.key\n"
    )
    with MosquittoBroker(extra=extra) as broker:
        plain = broker.url("device", "tls-1", fleet=fleet)
        tls = "mqtts" + plain[len("mqtt") :].rsplit(":", 1)[0] + f":{port}"

        def device(*args: str) -> subprocess.CompletedProcess:
            argv, env = password_off_argv([
                    sys.executable,
                    "-m",
                    "lepton",
                    "device",
                    "--broker",
                    tls,
                    "--fleet",
                    fleet,
                    "--id",
                    "tls-1",
                    "--source",
                    "digits",
                    "--spool",
                    str(tmp_path / "s"),
                    *args,
            ])
            return subprocess.run(
                argv,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        # Without the CA the system store does not trust the server: a clear broker error, exit 3.
        untrusted = device("--limit", "5")
        assert untrusted.returncode == _exit.BROKER and "Traceback" not in untrusted.stderr
        assert (
            len(untrusted.stderr.strip().splitlines()) == 1
            and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        )
        with Acker(broker.url("worker", "acker", fleet=fleet), fleet) as acker:
            time.sleep(0.2)
            ok = device("--limit", "25", "--ca-certs", str(tmp_path / "ca.pem"), "--json", "--quiet")
        assert ok.returncode == _exit.OK, ok.stderr
        assert json.loads(ok.stdout)["acked"] == 25 and acker.seqs("tls-1") == set(range(25))
