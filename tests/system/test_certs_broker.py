"""The security walk-through end to end: certificates made by `edge-broker certs` on a TLS
listener with `use_identity_as_username`, the certificate's CN feeding the ACL's `%u`, and a
revocation that refuses the device at its next handshake."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import socket
import ssl
from pathlib import Path

from edge_broker import cli
from edge_broker.config import ListenerConfig
from tests.conftest import BrokerThread
from tests.integration import wirebytes as wb
from tests.integration.authsetup import auth_config

TIMEOUT = 10.0
ACL = "pattern readwrite devices/%u/#\n"


def certs(*args: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["certs", *args]) == 0, err.getvalue()


def device_context(directory: Path, device: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    context.load_cert_chain(str(directory / f"{device}.crt"), str(directory / f"{device}.key"))
    return context


class Reader:
    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.frames: list[wb.Frame] = []

    def frame(self) -> wb.Frame:
        while not self.frames:
            chunk = self.sock.recv(4096)
            assert chunk, "the broker closed the connection"
            self.buffer += chunk
            self.frames += wb.split_frames(self.buffer)
        return self.frames.pop(0)


def test_edge_broker_certs_on_a_tls_listener_with_the_cn_as_username(tmp_path: Path) -> None:
    pki = tmp_path / "certs"
    certs("init-ca", str(pki))
    certs("server", str(pki), "--host", "localhost", "--ip", "127.0.0.1")
    certs("device", str(pki), "sensor-9")
    certs("device", str(pki), "sensor-10")
    listener = ListenerConfig(
        host="127.0.0.1", port=0, cafile=pki / "ca.crt", certfile=pki / "server.crt",
        keyfile=pki / "server.key", crlfile=pki / "ca.crl", require_certificate=True,
        use_identity_as_username=True)
    config = dataclasses.replace(auth_config(tmp_path, users=None, acl=ACL),
                                 listeners=(listener,))
    broker = BrokerThread(config).start()
    try:
        assert broker.app is not None
        port = broker.app.addresses[0][1]
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
                device_context(pki, "sensor-9").wrap_socket(
                    raw, server_hostname="localhost") as sock:
            reader = Reader(sock)
            sock.sendall(wb.connect(5, "any-client-id"))
            connack = reader.frame()
            assert connack.type == 2 and wb.reason(connack, 5) == 0
            # %u is the certificate's CN: its own branch is writable, another's is not.
            sock.sendall(wb.publish(5, "devices/sensor-9/temp", b"21", qos=1, packet_id=1))
            ack = reader.frame()
            assert ack.type == 4 and wb.reason(ack, 5) == 0x10  # allowed; nobody subscribed
            sock.sendall(wb.publish(5, "devices/sensor-10/temp", b"21", qos=1, packet_id=2))
            ack = reader.frame()
            assert ack.type == 4 and wb.reason(ack, 5) == 0x87
        # Revoked: the next handshake of that device is refused; another device is served.
        certs("revoke", str(pki), "sensor-9")
        assert broker.call(lambda: broker.app.listeners.reload_tls()) is True  # type: ignore
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
                    device_context(pki, "sensor-9").wrap_socket(
                        raw, server_hostname="localhost") as sock:
                sock.sendall(wb.connect(5, "again"))
                refused = not sock.recv(1)
        except (ssl.SSLError, ConnectionError):
            refused = True
        assert refused
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
                device_context(pki, "sensor-10").wrap_socket(
                    raw, server_hostname="localhost") as sock:
            sock.sendall(wb.connect(5, "other"))
            connack = Reader(sock).frame()
            assert connack.type == 2 and wb.reason(connack, 5) == 0
    finally:
        broker.stop()
