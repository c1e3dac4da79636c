"""Helpers for the TLS and WebSocket listener tests: a test PKI made with `cryptography`,
broker configurations with TLS/WebSocket listeners, a paho client that waits on queues, and
a broker thread running uvloop (the loop `edge-broker` uses in production).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import queue
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_broker.config import Config, ListenerConfig
from tests.conftest import BrokerThread

TIMEOUT = 10.0
UTC = datetime.UTC


# --------------------------------------------------------------------------- a test PKI


def _name(cn: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-broker tests")]
    if cn is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attributes)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


@dataclass
class Authority:
    """A CA that signs server and device certificates and keeps a CRL."""

    directory: Path
    name: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    revoked: list[int] = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, directory: Path, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(UTC)
        subject = _name(f"{name} CA")
        certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
        authority = cls(directory, name, key, certificate)
        authority.ca_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        authority.write_crl()
        return authority

    @property
    def ca_path(self) -> Path:
        return self.directory / f"{self.name}-ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.directory / f"{self.name}-ca.crl"

    def issue(self, stem: str, cn: str | None, *, server: bool = False,
              expired: bool = False) -> tuple[Path, Path, int]:
        """Sign a certificate; returns (certificate file, key file, serial number)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(UTC)
        if expired:
            start, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
        else:
            start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
        serial = x509.random_serial_number()
        usage = x509.ExtendedKeyUsageOID.SERVER_AUTH if server else \
            x509.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(serial).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        cert_path = self.directory / f"{stem}.crt"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path, serial

    def write_crl(self) -> None:
        now = datetime.datetime.now(UTC)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.certificate.subject)
                   .last_update(now - datetime.timedelta(minutes=5))
                   .next_update(now + datetime.timedelta(days=7)))
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - datetime.timedelta(minutes=1)).build())
        crl = builder.sign(self.key, hashes.SHA256())
        self.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    def revoke(self, serial: int) -> None:
        self.revoked.append(serial)
        self.write_crl()


@dataclass
class Pki:
    """Everything the tests need, made once per session."""

    ca: Authority
    other_ca: Authority
    server: tuple[Path, Path]
    devices: dict[str, tuple[Path, Path]]  # name -> (certificate, key)
    serials: dict[str, int]


def make_pki(directory: Path) -> Pki:
    ca = Authority.create(directory, "main")
    other = Authority.create(directory, "other")
    server_cert, server_key, _ = ca.issue("server", "localhost", server=True)
    devices: dict[str, tuple[Path, Path]] = {}
    serials: dict[str, int] = {}
    for name, authority, cn, expired in (
            ("device-1", ca, "device-1", False),
            ("device-2", ca, "device-2", False),
            ("revoked", ca, "revoked-device", False),
            ("expired", ca, "expired-device", True),
            ("foreign", other, "device-1", False),
            ("no-cn", ca, None, False)):
        cert, key, serial = authority.issue(name, cn, expired=expired)
        devices[name] = (cert, key)
        serials[name] = serial
    ca.revoke(serials["revoked"])
    return Pki(ca, other, (server_cert, server_key), devices, serials)


# --------------------------------------------------------------------------- configurations


def tls_listener(pki: Pki, *, protocol: str = "mqtt", require_certificate: bool = True,
                 use_identity_as_username: bool = True, crl: bool = True,
                 crlfile: Path | None = None) -> ListenerConfig:
    return ListenerConfig(
        host="127.0.0.1", port=0, protocol=protocol,  # type: ignore[arg-type]
        certfile=pki.server[0], keyfile=pki.server[1], cafile=pki.ca.ca_path,
        require_certificate=require_certificate,
        use_identity_as_username=use_identity_as_username,
        crlfile=(crlfile or pki.ca.crl_path) if crl else None)


def config_with(tmp_path: Path, *listeners: ListenerConfig) -> Config:
    base = Config()
    return dataclasses.replace(
        base, listeners=tuple(listeners),
        broker=dataclasses.replace(base.broker, data_dir=tmp_path / "data", sys_interval_s=0),
        storage=dataclasses.replace(base.storage, persistence="memory"))


def port_of(broker: BrokerThread, index: int) -> int:
    assert broker.app is not None
    return broker.app.addresses[index][1]


class UvloopBrokerThread(BrokerThread):
    """A BrokerThread on uvloop, as `edge-broker` runs in production."""

    def _run(self) -> None:
        import uvloop

        loop = uvloop.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:
            self._error = error
            self._started.set()
        finally:
            loop.close()


def client_context(pki: Pki, device: str | None = "device-1", *,
                   maximum_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.ca_path))
    if device is not None:
        cert, key = pki.devices[device]
        context.load_cert_chain(str(cert), str(key))
    if maximum_version is not None:
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = maximum_version
    return context


# --------------------------------------------------------------------------- paho


class PahoClient:
    """paho-mqtt with callbacks feeding queues; every wait has a deadline."""

    def __init__(self, client_id: str, *, protocol: int = mqtt.MQTTv311,
                 transport: str = "tcp") -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, transport=transport)
        self.protocol = protocol
        self.connacks: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.published: queue.Queue[int] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        self.client.on_connect = lambda c, u, flags, rc, props: self.connacks.put(rc)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put(codes)
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        self.client.on_publish = lambda c, u, mid, rc, props: self.published.put(mid)

    def tls(self, pki: Pki, device: str | None = "device-1") -> PahoClient:
        cert, key = pki.devices[device] if device is not None else (None, None)
        self.client.tls_set(ca_certs=str(pki.ca.ca_path),
                            certfile=None if cert is None else str(cert),
                            keyfile=None if key is None else str(key))
        return self

    def connect(self, port: int) -> Any:
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        code = self.connacks.get(timeout=TIMEOUT)
        assert not code.is_failure, code
        return code

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos)
        codes = self.subacks.get(timeout=TIMEOUT)
        assert all(not code.is_failure for code in codes), codes

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def receive(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Poll `predicate` until true, with a deadline (no fixed sleep to synchronise)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def run_on(broker: BrokerThread, coroutine: Any) -> Any:
    assert broker.loop is not None
    return asyncio.run_coroutine_threadsafe(coroutine, broker.loop).result(TIMEOUT)
