"""`edge-broker certs` (edge_broker.certs): files, permissions, extensions, and real TLS
handshakes on a loopback socket with Python's ssl, the CRL checked on the leaf."""

from __future__ import annotations

import datetime as dt
import os
import queue
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_broker import certs, cli
from edge_broker.auth.identity import common_name

TIMEOUT_S = 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server certificate for localhost/127.0.0.1, devices dev1..dev3 (dev2
    revoked), an expired device, and a device of another CA copied in as `stranger`."""
    folder = tmp_path_factory.mktemp("pki") / "certs"
    assert cli.main(["certs", "init-ca", str(folder)]) == 0
    assert cli.main(["certs", "server", str(folder), "--host", "localhost",
                     "--ip", "127.0.0.1"]) == 0
    for device in ("dev1", "dev2", "dev3"):
        assert cli.main(["certs", "device", str(folder), device]) == 0
    assert cli.main(["certs", "revoke", str(folder), "dev2"]) == 0
    now = dt.datetime.now(dt.UTC)
    certs.issue_device(folder, "old", valid_from=now - dt.timedelta(days=10),
                       valid_until=now - dt.timedelta(days=1))
    other = folder.parent / "other"
    certs.init_ca(other)
    certs.issue_device(other, "stranger")
    return folder


def server_context(folder: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(folder / "server.crt", folder / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(folder / "ca.crt")
    context.load_verify_locations(folder / "ca.crl")
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def client_context(folder: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(folder / "ca.crt")
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              server_hostname: str = "localhost") -> tuple[bool, object]:
    """(True, the client certificate's getpeercert() dict) when the server accepted the
    client, else (False, the server's error)."""
    outcome: queue.Queue[tuple[bool, object]] = queue.Queue()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT_S)
            try:
                with server.wrap_socket(conn, server_side=True) as tls:
                    peer = tls.getpeercert()
                    tls.sendall(b"ok")
                    outcome.put((True, peer))
            except (ssl.SSLError, OSError) as exc:
                outcome.put((False, exc))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        try:
            with client.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.recv(2)  # TLS 1.3: a refused client certificate shows up here
        except (ssl.SSLError, OSError):
            pass
        finally:
            raw.close()
        thread.join(TIMEOUT_S)
    return outcome.get(timeout=TIMEOUT_S)


def device(pki: Path, name: str) -> ssl.SSLContext:
    return client_context(pki, pki / f"{name}.crt", pki / f"{name}.key")


def test_device_certificate_is_accepted_with_its_id_as_cn(pki: Path) -> None:
    accepted, peer = handshake(server_context(pki), device(pki, "dev1"))
    assert accepted, peer
    assert peer["subject"] == ((("commonName", "dev1"),),)  # type: ignore[index]
    assert common_name(peer) == "dev1"  # type: ignore[arg-type]


def test_a_certificate_without_cn_gives_no_identity(pki: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID as Oid

    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(Oid.ORGANIZATION_NAME, "plant")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (tmp_path / "nocn.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "nocn.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    accepted, peer = handshake(server_context(pki),
                               client_context(pki, tmp_path / "nocn.crt", tmp_path / "nocn.key"))
    assert accepted, peer  # TLS accepts it; the broker must then refuse it for lack of a name
    assert common_name(peer) is None  # type: ignore[arg-type]
    assert common_name(None) is None and common_name({}) is None
    two = {"subject": ((("commonName", "a"),), (("commonName", "b"),))}
    assert common_name(two) is None


def test_the_server_name_and_address_are_in_the_certificate(pki: Path) -> None:
    accepted, detail = handshake(server_context(pki), device(pki, "dev3"),
                                 server_hostname="127.0.0.1")
    assert accepted, detail


def test_bundle_works_on_its_own(pki: Path) -> None:
    bundle = pki / "dev1-bundle"
    assert sorted(p.name for p in bundle.iterdir()) == ["ca.crt", "client.crt", "client.key"]
    context = client_context(bundle, bundle / "client.crt", bundle / "client.key")
    assert handshake(server_context(pki), context)[0]


def test_revoked_device_is_refused(pki: Path) -> None:
    accepted, error = handshake(server_context(pki), device(pki, "dev2"))
    assert not accepted
    assert "revoked" in str(error)


def test_device_of_another_ca_is_refused(pki: Path) -> None:
    other = pki.parent / "other"
    context = client_context(pki, other / "stranger.crt", other / "stranger.key")
    accepted, error = handshake(server_context(pki), context)
    assert not accepted
    assert "certificate verify failed" in str(error) or "unknown ca" in str(error).lower()


def test_expired_device_is_refused(pki: Path) -> None:
    accepted, error = handshake(server_context(pki), device(pki, "old"))
    assert not accepted
    assert "expired" in str(error)


def test_no_client_certificate_is_refused(pki: Path) -> None:
    accepted, _ = handshake(server_context(pki), client_context(pki, None, None))
    assert not accepted


def test_crl_refresh_keeps_revocations_and_sets_next_update(pki: Path, tmp_path: Path) -> None:
    # ca.crl has a next-update date (a stale CRL refuses everybody); `certs crl` re-signs it.
    folder = tmp_path / "certs"
    shutil.copytree(pki, folder)
    assert cli.main(["certs", "crl", str(folder), "--crl-days", "1"]) == 0
    crl = x509.load_pem_x509_crl((folder / "ca.crl").read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - dt.datetime.now(dt.UTC) < dt.timedelta(days=1, minutes=1)
    assert [entry.serial_number for entry in crl] == [
        x509.load_pem_x509_certificate((pki / "dev2.crt").read_bytes()).serial_number]
    assert handshake(server_context(folder), device(folder, "dev1"))[0]


def test_keys_are_private_and_certificates_readable(pki: Path) -> None:
    for name in ("ca.key", "server.key", "dev1.key", "dev1-bundle/client.key"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600, name
    for name in ("ca.crt", "server.crt", "dev1.crt", "ca.crl"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700


def test_a_renewed_server_key_stays_readable_by_the_brokers_group(tmp_path: Path) -> None:
    # deploy/README.md gives the certificates to the broker's group (chgrp -R, g+rX). A new
    # server certificate (a renewal: `certs server` again) must not take the key back from it:
    # the broker's next reload would fail to read it. Before, the key came back 0600.
    folder = tmp_path / "certs"
    assert cli.main(["certs", "init-ca", str(folder)]) == 0
    assert cli.main(["certs", "server", str(folder), "--host", "gw"]) == 0
    group = 65534 if os.geteuid() == 0 else os.getgid()  # nogroup, as root (CI)
    for name in ("server.key", "server.crt"):
        os.chown(folder / name, -1, group)
        (folder / name).chmod(0o640)
    assert cli.main(["certs", "server", str(folder), "--host", "gw"]) == 0  # a renewal
    for name, mode in (("server.key", 0o640), ("server.crt", 0o644)):
        after = (folder / name).stat()
        assert (stat.S_IMODE(after.st_mode), after.st_gid) == (mode, group), name


def test_extensions(pki: Path) -> None:
    def load(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((pki / name).read_bytes())

    ca, server, dev = load("ca.crt"), load("server.crt"), load("dev1.crt")
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and ca_usage.crl_sign
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    for leaf, usage in ((server, ExtendedKeyUsageOID.SERVER_AUTH),
                        (dev, ExtendedKeyUsageOID.CLIENT_AUTH)):
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            usage]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski
        leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev1"


def test_days_sets_the_validity(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    assert cli.main(["certs", "init-ca", str(folder)]) == 0
    assert cli.main(["certs", "device", str(folder), "d", "--days", "30"]) == 0
    cert = x509.load_pem_x509_certificate((folder / "d.crt").read_bytes())
    days = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    assert days in (29, 30)


def test_rsa_keys_on_request(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    assert cli.main(["certs", "init-ca", str(folder), "--key-type", "rsa"]) == 0
    assert cli.main(["certs", "server", str(folder), "--host", "localhost",
                     "--key-type", "rsa"]) == 0
    assert cli.main(["certs", "device", str(folder), "r1", "--key-type", "rsa"]) == 0
    cert = x509.load_pem_x509_certificate((folder / "r1.crt").read_bytes())
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    assert handshake(server_context(folder), device(folder, "r1"))[0]


def test_existing_ca_and_device_are_not_overwritten_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "certs"
    assert cli.main(["certs", "init-ca", str(folder)]) == 0
    key = (folder / "ca.key").read_bytes()
    assert cli.main(["certs", "init-ca", str(folder)]) == 1
    assert "a CA exists already" in capsys.readouterr().err
    assert (folder / "ca.key").read_bytes() == key
    assert cli.main(["certs", "device", str(folder), "d1"]) == 0
    assert cli.main(["certs", "device", str(folder), "d1"]) == 1
    assert "exists already" in capsys.readouterr().err
    assert cli.main(["certs", "device", str(folder), "d1", "--force"]) == 0
    assert cli.main(["certs", "init-ca", str(folder), "--force"]) == 0
    assert (folder / "ca.key").read_bytes() != key


@pytest.mark.parametrize("device_id", ["../evil", "a/b", "a\\b", ".hidden", "", "ca", "server",
                                       "x" * 65, "a b", "dev\n1"])
def test_device_ids_that_are_not_plain_file_names_are_refused(
        device_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "certs"
    certs.init_ca(folder)
    assert cli.main(["certs", "device", str(folder), device_id]) == 1
    assert "invalid device id" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crl", "ca.crt", "ca.key"]
    assert not (tmp_path / "evil.crt").exists()


def test_commands_without_a_ca_and_revoking_an_unknown_device(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["certs", "device", str(tmp_path / "none"), "d1"]) == 1
    assert "init-ca" in capsys.readouterr().err
    certs.init_ca(tmp_path / "c")
    assert cli.main(["certs", "revoke", str(tmp_path / "c"), "ghost"]) == 1
    assert "no device 'ghost'" in capsys.readouterr().err
    assert cli.main(["certs", "server", str(tmp_path / "c")]) == 1
    assert "--host" in capsys.readouterr().err
    assert cli.main(["certs", "server", str(tmp_path / "c"), "--ip", "300.1.1.1"]) == 1
    assert "invalid IP address" in capsys.readouterr().err


def test_revoking_twice_keeps_one_entry(pki: Path, tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    shutil.copytree(pki, folder)
    assert not certs.revoke(folder, "dev2")
    assert certs.revoke(folder, "dev1")
    crl = x509.load_pem_x509_crl((folder / "ca.crl").read_bytes())
    assert len(list(crl)) == 2
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
def test_openssl_agrees(pki: Path) -> None:
    def verify(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "verify", "-CAfile", str(pki / "ca.crt"), *args],
                              capture_output=True, text=True, timeout=TIMEOUT_S)

    crl = ["-crl_check", "-CRLfile", str(pki / "ca.crl")]
    assert verify(*crl, "-purpose", "sslclient", str(pki / "dev1.crt")).returncode == 0
    assert verify("-purpose", "sslserver", str(pki / "server.crt")).returncode == 0
    revoked = verify(*crl, str(pki / "dev2.crt"))
    assert revoked.returncode != 0 and "revoked" in revoked.stdout + revoked.stderr
    expired = verify(str(pki / "old.crt"))
    assert expired.returncode != 0 and "expired" in expired.stdout + expired.stderr
    stranger = verify(str(pki.parent / "other" / "stranger.crt"))
    assert stranger.returncode != 0
