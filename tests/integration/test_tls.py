"""TLS listeners as devices see them: real handshakes on loopback with paho-mqtt,
mosquitto_pub/mosquitto_sub and Python's ssl module, against certificates made by a test CA.

What an operator relies on (docs/configuration.md, "[[listeners]]" and "TLS"): a device
certificate from the configured CA is accepted and its CN is the client's identity; a
certificate from another CA, an expired one, a revoked one (CRL) and no certificate at all
are refused; TLS below 1.2 is refused; garbage and half-finished handshakes close only that
connection, without a traceback, while other clients are served; new certificates and CRLs
are picked up by `reload_tls()` for new connections while open ones stay.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_broker.config import ListenerConfig, load_config
from edge_broker.errors import ConfigError
from edge_broker.server import listeners as listeners_module
from edge_broker.server.listeners import identity_of
from edge_broker.server.tls import build_context
from tests.conftest import BrokerThread
from tests.integration import wirebytes as wb
from tests.integration.brokerprocess import BrokerProcess, needs_console_script
from tests.integration.secure import (
    TIMEOUT,
    Authority,
    PahoClient,
    Pki,
    UvloopBrokerThread,
    client_context,
    config_with,
    make_pki,
    port_of,
    tls_listener,
    wait_for,
)

HAVE_MOSQUITTO = shutil.which("mosquitto_pub") is not None and \
    shutil.which("mosquitto_sub") is not None
needs_mosquitto = pytest.mark.skipif(
    not HAVE_MOSQUITTO,
    reason="mosquitto_pub/mosquitto_sub not found: sudo apt-get install mosquitto-clients")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., BrokerThread]]:
    started: list[BrokerThread] = []

    def make(*listeners: ListenerConfig, uvloop: bool = False) -> BrokerThread:
        kind = UvloopBrokerThread if uvloop else BrokerThread
        broker = kind(config_with(tmp_path, *listeners)).start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


def mqtt_over_tls(port: int, context: ssl.SSLContext, client_id: str = "probe", *,
                  sni: bool = True) -> bool:
    """Connect with TLS and MQTT 3.1.1: True when a CONNACK 0 comes back, False when the
    server refuses (handshake error, alert, or a close before the CONNACK). Without `sni`,
    no server name is sent (as clients connecting to an IP address do)."""
    if not sni:
        context.check_hostname = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
                context.wrap_socket(raw, server_hostname="localhost" if sni else None) as sock:
            sock.sendall(wb.connect(4, client_id))
            reply = sock.recv(4)
            return reply[:1] == b"\x20" and reply[3:4] == b"\x00"
    except (ssl.SSLError, ConnectionError):
        return False


def ping_over_tls(port: int, pki: Pki) -> None:
    """A control client: connect with device-1's certificate, PINGREQ, PINGRESP."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            client_context(pki).wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(wb.connect(4, "control"))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(b"\xc0\x00")
        assert sock.recv(2) == b"\xd0\x00"


def assert_clean_log(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
def test_paho_with_a_device_certificate_round_trips_and_is_identified(
        start: Callable[..., BrokerThread], pki: Pki, protocol: int) -> None:
    broker = start(tls_listener(pki))
    port = port_of(broker, 0)
    sub = PahoClient("sub", protocol=protocol).tls(pki, "device-1")
    sub.connect(port)
    pub = PahoClient("pub", protocol=protocol).tls(pki, "device-2")
    pub.connect(port)
    try:
        sub.subscribe("plant/+/temp")
        pub.publish("plant/a/temp", b"21.5")
        message = sub.receive()
        assert (message.topic, message.payload) == ("plant/a/temp", b"21.5")

        def identities() -> dict[str, tuple[str | None, ListenerConfig | None]]:
            app = broker.app
            assert app is not None
            return {client_id: (identity_of(handler.transport),
                                app.listeners.listener_of(handler.transport))
                    for client_id, handler in app.clients.items()}

        seen = broker.call(identities)
        listener = broker.config.listeners[0]
        assert seen == {"sub": ("device-1", listener), "pub": ("device-2", listener)}
    finally:
        sub.stop()
        pub.stop()


@needs_mosquitto
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_with_a_device_certificate(start: Callable[..., BrokerThread],
                                                     pki: Pki, version: str) -> None:
    broker = start(tls_listener(pki))
    port = port_of(broker, 0)
    cert, key = pki.devices["device-1"]
    tls = ["-h", "127.0.0.1", "-p", str(port), "-V", version, "--cafile",
           str(pki.ca.ca_path), "--cert", str(cert), "--key", str(key)]
    sub = subprocess.Popen(["mosquitto_sub", *tls, "-i", "msub", "-t", "t/#", "-q", "1",
                            "-C", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        def subscribed() -> bool:
            assert broker.app is not None
            session = broker.app.core.sessions.get("msub")
            return session is not None and session.online and "t/#" in session.subscriptions

        wait_for(lambda: broker.call(subscribed), "mosquitto_sub's subscription")
        result = subprocess.run(["mosquitto_pub", *tls, "-i", "mpub", "-t", "t/1", "-m",
                                 "over tls", "-q", "1"], capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr
        stdout, stderr = sub.communicate(timeout=TIMEOUT)
        assert sub.returncode == 0, stderr
        assert stdout == "over tls\n"
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()


# --------------------------------------------------------------------------- refused

REFUSED = ["foreign", "expired", "revoked", None]
REFUSED_IDS = ["another-CA", "expired", "revoked", "no-certificate"]


@pytest.mark.parametrize("device", REFUSED, ids=REFUSED_IDS)
def test_bad_client_certificates_are_refused(start: Callable[..., BrokerThread], pki: Pki,
                                             device: str | None,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    broker = start(tls_listener(pki))
    port = port_of(broker, 0)
    assert mqtt_over_tls(port, client_context(pki, "device-1"))  # the control case
    assert not mqtt_over_tls(port, client_context(pki, device))
    assert broker.call(lambda: sorted(broker.app.clients)) == []  # type: ignore[union-attr]
    ping_over_tls(port, pki)
    assert_clean_log(caplog)


@needs_mosquitto
@pytest.mark.parametrize("device", REFUSED, ids=REFUSED_IDS)
def test_mosquitto_pub_with_a_bad_certificate_is_refused(start: Callable[..., BrokerThread],
                                                         pki: Pki, device: str | None) -> None:
    broker = start(tls_listener(pki))
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port_of(broker, 0)), "--cafile",
            str(pki.ca.ca_path), "-i", "bad", "-t", "t", "-m", "x", "-q", "1"]
    if device is not None:
        cert, key = pki.devices[device]
        args += ["--cert", str(cert), "--key", str(key)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    assert broker.call(lambda: "bad" in broker.app.core.sessions) is False  # type: ignore


def test_paho_without_a_client_certificate_is_refused(start: Callable[..., BrokerThread],
                                                      pki: Pki) -> None:
    broker = start(tls_listener(pki))
    client = PahoClient("nocert").tls(pki, None)
    try:
        # TLS 1.2 refuses during connect(); TLS 1.3 after it, when the broker has read the
        # client's (empty) certificate message: paho then sees the connection drop.
        client.client.connect("127.0.0.1", port_of(broker, 0), keepalive=30)
    except (ssl.SSLError, ConnectionError):
        pass
    else:
        client.client.loop_start()
        client.disconnects.get(timeout=TIMEOUT)
    finally:
        client.client.disconnect()
        client.client.loop_stop()
    assert client.connacks.empty()
    assert broker.call(lambda: "nocert" in broker.app.core.sessions) is False  # type: ignore


def test_tls_1_1_is_refused(start: Callable[..., BrokerThread], pki: Pki) -> None:
    broker = start(tls_listener(pki))
    port = port_of(broker, 0)
    context = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_1)
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        _client_hello(context)
    except ssl.SSLError as error:
        pytest.skip(f"the local OpenSSL cannot offer TLS 1.1: {error}")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname="localhost").close()
    assert mqtt_over_tls(port, client_context(pki))


def test_tls_version_raises_the_minimum_to_1_3(start: Callable[..., BrokerThread],
                                               pki: Pki) -> None:
    listener = dataclasses.replace(tls_listener(pki), tls_version="tlsv1.3")
    port = port_of(start(listener), 0)
    assert not mqtt_over_tls(port, client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2))
    assert mqtt_over_tls(port, client_context(pki))


@pytest.mark.parametrize("ciphers", [None, "DEFAULT:ECDHE-ECDSA-AES128-SHA"])
def test_ciphers_admit_the_cbc_suite_an_older_device_offers(
        start: Callable[..., BrokerThread], pki: Pki, ciphers: str | None) -> None:
    # A TLS 1.2 client that offers only ECDHE-ECDSA-AES128-SHA (CBC, SHA-1 MAC: older
    # embedded stacks): refused with the default list, accepted once `ciphers` names it.
    old_device = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    old_device.minimum_version = ssl.TLSVersion.TLSv1_2
    old_device.set_ciphers("ECDHE-ECDSA-AES128-SHA")
    listener = dataclasses.replace(tls_listener(pki), ciphers=ciphers)
    assert mqtt_over_tls(port_of(start(listener), 0), old_device) == (ciphers is not None)


def test_a_cipher_list_openssl_selects_nothing_from_stops_the_start(pki: Pki) -> None:
    listener = dataclasses.replace(tls_listener(pki), ciphers="NO-SUCH-CIPHER")
    with pytest.raises(ConfigError, match="ciphers: OpenSSL takes no cipher from"):
        build_context(listener, label="[[listeners]] #1", file=None)


LOOPS = pytest.mark.parametrize("uvloop", [False, True], ids=["asyncio", "uvloop"])


@LOOPS
def test_a_certificate_without_cn_is_refused_with_a_connack_and_logged(
        start: Callable[..., BrokerThread], pki: Pki, uvloop: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    broker = start(tls_listener(pki), uvloop=uvloop)
    port = port_of(broker, 0)
    # use_identity_as_username with no CN to use: CONNACK 5 (Not authorized), then a close.
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            client_context(pki, "no-cn").wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(wb.connect(4, "no-cn"))
        assert sock.recv(4) == b"\x20\x02\x00\x05"
        assert sock.recv(1) == b""
    assert any("no usable certificate common name" in r.getMessage() for r in caplog.records)
    ping_over_tls(port, pki)
    assert_clean_log(caplog)


def test_without_use_identity_a_certificate_without_cn_is_accepted(
        start: Callable[..., BrokerThread], pki: Pki) -> None:
    broker = start(tls_listener(pki, use_identity_as_username=False))
    assert mqtt_over_tls(port_of(broker, 0), client_context(pki, "no-cn"))


# --------------------------------------------------------------------------- bad input


@LOOPS
def test_garbage_and_half_handshakes_do_not_disturb_others(
        start: Callable[..., BrokerThread], pki: Pki, uvloop: bool,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(listeners_module, "HANDSHAKE_TIMEOUT_S", 0.5)
    broker = start(tls_listener(pki), uvloop=uvloop)
    port = port_of(broker, 0)
    hello = _client_hello(client_context(pki))
    bad_inputs = [
        b"\x00" * 64,
        b"GET / HTTP/1.1\r\n\r\n",
        wb.connect(4, "plaintext"),  # MQTT without TLS
        b"\x16\x03\x01\xff\xff" + b"\x01" * 100,  # a TLS record header announcing 64 KB
        hello[: len(hello) // 2],  # half a ClientHello, then silence
        hello,  # a whole ClientHello, then silence
        b"",  # connect and say nothing
    ]
    sockets = []
    for data in bad_inputs:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        sock.sendall(data)
        sockets.append(sock)
    ping_over_tls(port, pki)
    for sock in sockets:  # every one is closed by the server (the silent ones on timeout)
        deadline = time.monotonic() + TIMEOUT
        with sock:
            while True:
                assert time.monotonic() < deadline
                try:
                    if not sock.recv(65536):
                        break
                except ConnectionResetError:
                    break
    ping_over_tls(port, pki)
    wait_for(lambda: broker.call(lambda: not broker.app.connections),  # type: ignore
             "every connection closed")
    assert_clean_log(caplog)


def _client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes of a real ClientHello, produced by Python's ssl with memory BIOs."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --------------------------------------------------------------------------- reload


@LOOPS
def test_reload_revokes_for_new_connections_and_keeps_open_ones(
        start: Callable[..., BrokerThread], pki: Pki, tmp_path: Path, uvloop: bool) -> None:
    crl = tmp_path / "ca.crl"
    shutil.copy(pki.ca.crl_path, crl)
    broker = start(tls_listener(pki, crlfile=crl), uvloop=uvloop)
    port = port_of(broker, 0)
    open_client = PahoClient("stays", protocol=mqtt.MQTTv5).tls(pki, "device-2")
    open_client.connect(port)
    try:
        assert mqtt_over_tls(port, client_context(pki, "device-2"), "before")
        assert mqtt_over_tls(port, client_context(pki, "device-2"), "before", sni=False)
        # The CA revokes device-2 and the broker reloads its TLS files.
        authority = pki.ca
        saved = list(authority.revoked)
        authority.revoked.append(pki.serials["device-2"])
        authority.write_crl()
        shutil.copy(authority.crl_path, crl)
        authority.revoked[:] = saved
        authority.write_crl()

        assert broker.call(lambda: broker.app.listeners.reload_tls()) is True  # type: ignore
        assert not mqtt_over_tls(port, client_context(pki, "device-2"), "after")
        assert not mqtt_over_tls(port, client_context(pki, "device-2"), "after", sni=False)
        assert mqtt_over_tls(port, client_context(pki, "device-1"), "other")

        def revoked_flags() -> dict[str, bool]:
            app = broker.app
            assert app is not None
            return {cid: app.listeners.tls_of(h.transport).is_revoked(h.transport)  # type: ignore
                    for cid, h in app.clients.items()
                    if h.transport is not None and not h.transport.is_closing()}

        # The open connection stays (and the auth code can ask whether it was revoked).
        flags = broker.call(revoked_flags)
        assert flags.pop("stays") is True
        assert not any(flags.values())  # "other" (device-1), if it is still closing
        open_client.subscribe("still/here")
    finally:
        open_client.stop()


def test_reload_with_a_broken_file_keeps_the_old_context(
        start: Callable[..., BrokerThread], pki: Pki, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    crl = tmp_path / "ca.crl"
    shutil.copy(pki.ca.crl_path, crl)
    broker = start(tls_listener(pki, crlfile=crl))
    crl.write_text("not a CRL\n")
    assert broker.call(lambda: broker.app.listeners.reload_tls()) is False  # type: ignore
    assert any("keeps its previous certificates" in r.getMessage() for r in caplog.records)
    assert mqtt_over_tls(port_of(broker, 0), client_context(pki, "device-1"))
    assert not mqtt_over_tls(port_of(broker, 0), client_context(pki, "revoked"))


# --------------------------------------------------------------------------- several listeners


def test_several_listeners_each_with_its_own_settings(start: Callable[..., BrokerThread],
                                                      pki: Pki) -> None:
    plain = ListenerConfig(host="127.0.0.1", port=0)
    server_only = tls_listener(pki, require_certificate=False, use_identity_as_username=False,
                               crl=False)
    mutual = tls_listener(pki)
    broker = start(plain, server_only, mutual)
    raw = wb.RawClient(port_of(broker, 0), 4)
    try:
        assert raw.handshake("plain").type == wb.CONNACK
    finally:
        raw.close()
    assert mqtt_over_tls(port_of(broker, 1), client_context(pki, None), "server-only")
    assert not mqtt_over_tls(port_of(broker, 2), client_context(pki, None), "no-cert")
    assert mqtt_over_tls(port_of(broker, 2), client_context(pki, "device-1"), "mutual")

    def listener_by_port() -> dict[int, ListenerConfig | None]:
        app = broker.app
        assert app is not None
        return {h.transport.get_extra_info("sockname")[1]:  # type: ignore[union-attr]
                app.listeners.listener_of(h.transport) for h in app.connections}

    client = PahoClient("on-2").tls(pki, "device-1")
    client.connect(port_of(broker, 2))
    try:
        assert broker.call(listener_by_port) == {port_of(broker, 2): mutual}
    finally:
        client.stop()


# --------------------------------------------------------------------------- configuration


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge-broker.toml"
    path.write_text(text)
    return path


def _listener_toml(pki: Pki, **keys: object) -> str:
    values = {"host": "127.0.0.1", "port": 0, "certfile": str(pki.server[0]),
              "keyfile": str(pki.server[1]), "cafile": str(pki.ca.ca_path), **keys}
    lines = ["[[listeners]]"]
    for key, value in values.items():
        if value is None:
            continue
        shown = ("true" if value else "false") if isinstance(value, bool) else (
            str(value) if isinstance(value, int) else f'"{value}"')
        lines.append(f"{key} = {shown}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("keys", "key", "text"), [
    ({"keyfile": None}, "certfile", "needs keyfile"),
    ({"certfile": None}, "keyfile", "needs certfile"),
    ({"certfile": None, "keyfile": None}, "cafile", "is a TLS setting"),
    ({"cafile": None, "require_certificate": True}, "require_certificate", "needs cafile"),
    ({"use_identity_as_username": True}, "use_identity_as_username",
     "needs require_certificate"),
    ({"cafile": "/nonexistent/ca.crt"}, "cafile", "cannot read"),
    ({"crlfile": "/"}, "crlfile", "is a directory"),
])
def test_tls_settings_are_checked_at_load(tmp_path: Path, pki: Pki, keys: dict[str, object],
                                          key: str, text: str) -> None:
    path = _write(tmp_path, _listener_toml(pki, **keys))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.table, info.value.key) == ("[[listeners]] #1", key)
    assert str(info.value).startswith(f"{path}: [[listeners]] #1 {key}: ")
    assert text in str(info.value)


def test_a_file_that_is_not_a_certificate_is_refused_at_start(
        start: Callable[..., BrokerThread], pki: Pki, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("hello\n")
    with pytest.raises(ConfigError) as info:
        start(ListenerConfig(host="127.0.0.1", port=0, certfile=pki.server[0],
                             keyfile=pki.server[1], cafile=bogus))
    assert (info.value.table, info.value.key) == ("[[listeners]] #1", "cafile")


def test_certificate_authentication_lets_a_listener_face_the_network(tmp_path: Path,
                                                                     pki: Pki) -> None:
    text = _listener_toml(pki, host="0.0.0.0", require_certificate=True,
                          use_identity_as_username=True)
    config = load_config(_write(tmp_path, text))
    listener = config.listeners[0]
    assert listener.certificate_authentication
    assert listener.anonymous_allowed(config.auth) is False  # the default there
    # The same listener with TLS but no certificate authentication still needs the
    # explicit allow_anonymous = true to face the network.
    text = _listener_toml(pki, host="0.0.0.0", require_certificate=True)
    with pytest.raises(ConfigError, match="allow_anonymous = true"):
        load_config(_write(tmp_path, text))


# --------------------------------------------------------------------------- SIGHUP


@needs_console_script
def test_sighup_rereads_the_crl_and_disconnects_the_revoked(pki: Pki, tmp_path: Path) -> None:
    crl = tmp_path / "ca.crl"
    shutil.copy(pki.ca.crl_path, crl)
    config = tmp_path / "edge-broker.toml"
    config.write_text(_listener_toml(pki, require_certificate=True,
                                     use_identity_as_username=True, crlfile=str(crl)))
    broker = BrokerProcess(tmp_path / "data", "--config", str(config)).wait_listening()
    try:
        stays = PahoClient("revoked", protocol=mqtt.MQTTv5).tls(pki, "device-2")
        stays.client.reconnect_delay_set(60, 60)  # no quick reconnect to hide the close
        stays.connect(broker.port)
        assert mqtt_over_tls(broker.port, client_context(pki, "device-2"), "before")
        authority = pki.ca
        saved = list(authority.revoked)
        authority.revoked.append(pki.serials["device-2"])
        authority.write_crl()
        shutil.copy(authority.crl_path, crl)
        authority.revoked[:] = saved
        authority.write_crl()
        broker.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "[[listeners]] #1: certificates and CRL read again" in broker.stderr,
                 "the TLS reload")
        assert not mqtt_over_tls(broker.port, client_context(pki, "device-2"), "after")
        assert mqtt_over_tls(broker.port, client_context(pki, "device-1"), "other")
        # The open connection of the revoked device is ended too: DISCONNECT 0x87.
        reason = stays.disconnects.get(timeout=TIMEOUT)
        assert reason == 0x87, reason
        stays.client.loop_stop()
    finally:
        code = broker.stop()
    assert code == 0, broker.stderr
    assert "Traceback" not in broker.stderr


def test_the_tls_example_config_is_valid(pki: Pki, tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "deploy" / "edge-broker-tls.toml").read_text()
    files = {"server.crt": pki.server[0], "server.key": pki.server[1],
             "ca.crt": pki.ca.ca_path, "ca.crl": pki.ca.crl_path}
    for name, path in files.items():
        text = text.replace(f"/etc/edge-broker/certs/{name}", str(path))
    for name in ("passwd", "acl"):  # as `edge-broker passwd` and the ACL example make them
        (tmp_path / name).write_text("")
        text = text.replace(f'"/etc/edge-broker/{name}"', f'"{tmp_path / name}"')
    config = load_config(_write(tmp_path, text))
    tls = [listener for listener in config.listeners if listener.tls]
    # Passwords (the firmware examples), device certificates, secure WebSocket.
    assert [(x.port, x.protocol) for x in tls] == [(8883, "mqtt"), (8884, "mqtt"),
                                                   (8081, "websockets")]
    assert [x.certificate_authentication for x in tls] == [False, True, False]
    # Reachable from other hosts without allow_anonymous: passwords or certificates.
    assert not any(x.is_loopback or x.anonymous_allowed(config.auth) for x in tls)
    assert config.auth.password_file and config.auth.acl_file


def test_sighup_disconnects_a_client_whose_certificate_was_revoked(
        start: Callable[..., BrokerThread], pki: Pki, tmp_path: Path) -> None:
    from edge_broker.server.reload import reload

    crl = tmp_path / "ca.crl"
    shutil.copy(pki.ca.crl_path, crl)
    broker = start(tls_listener(pki, crlfile=crl))
    port = port_of(broker, 0)
    context = client_context(pki, "device-2")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(wb.connect(5, "soon-revoked"))
        assert sock.recv(1) == b"\x20"  # CONNACK
        sock.recv(64)
        authority = pki.ca
        saved = list(authority.revoked)
        authority.revoked.append(pki.serials["device-2"])
        authority.write_crl()
        shutil.copy(authority.crl_path, crl)
        authority.revoked[:] = saved
        authority.write_crl()
        app = broker.app
        assert app is not None
        assert broker.call(lambda: reload(app, lambda: app.config)) is True
        # [MQTT-3.14.1] (5.0): DISCONNECT 0x87 Not authorized, then the close.
        data = b""
        while True:
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
        assert data[:1] == b"\xe0" and data[2:3] == b"\x87", data
    # Others are served: device-1 still connects.
    assert mqtt_over_tls(port, client_context(pki, "device-1"), "other")


# --------------------------------------------------------------------------- several CAs


def _crl_pem(authority: Authority, serials: list[int]) -> bytes:
    """A CRL of `authority` listing `serials` (the session's CA objects are left as they are)."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(authority.certificate.subject)
               .last_update(now - datetime.timedelta(minutes=5))
               .next_update(now + datetime.timedelta(days=7)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now - datetime.timedelta(minutes=1)).build())
    crl = builder.sign(authority.key, hashes.SHA256())
    pem: bytes = crl.public_bytes(serialization.Encoding.PEM)
    return pem


def _device_context(pki: Pki, authority: Authority, directory: Path, stem: str,
                    serial: int) -> ssl.SSLContext:
    """A client context with a device certificate that `authority` signs with `serial`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, stem)]))
        .issuer_name(authority.certificate.subject).public_key(key.public_key())
        .serial_number(serial).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(authority.key, hashes.SHA256()))
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(cafile=str(pki.ca.ca_path))
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


def _two_ca_listener(pki: Pki, tmp_path: Path) -> tuple[ListenerConfig, Path]:
    """A listener trusting both test CAs (one cafile) with both CRLs (one crlfile, the
    first CA's CRL first), and that crlfile."""
    cafile, crlfile = tmp_path / "cas.pem", tmp_path / "crls.pem"
    cafile.write_bytes(pki.ca.ca_path.read_bytes() + pki.other_ca.ca_path.read_bytes())
    crlfile.write_bytes(_crl_pem(pki.ca, []) + _crl_pem(pki.other_ca, []))
    listener = dataclasses.replace(tls_listener(pki, crlfile=crlfile), cafile=cafile)
    return listener, crlfile


def _v5_over_tls(port: int, context: ssl.SSLContext, client_id: str) -> wb.RawClient:
    """An MQTT 5 client over TLS, connected (CONNACK 0 read)."""
    client = wb.RawClient(port, 5)
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    client.handshake(client_id)
    return client


def _assert_disconnected_0x87(client: wb.RawClient) -> None:
    frames = client.read_until_closed()
    assert [(f.type, wb.reason(f, 5)) for f in frames] == [(wb.DISCONNECT, 0x87)], frames


def _assert_still_connected(client: wb.RawClient) -> None:
    client.send(b"\xc0\x00")  # PINGREQ
    frame = client.read()
    assert frame is not None and frame.type == wb.PINGRESP, frame


def test_sighup_reads_every_crl_in_the_crlfile_and_disconnects_the_revoked_of_each_ca(
        start: Callable[..., BrokerThread], pki: Pki, tmp_path: Path) -> None:
    # Two CAs in cafile, their two CRLs in crlfile: a revocation in the second CRL ends the
    # open connection of that CA's device, as OpenSSL refuses its new handshakes.
    from edge_broker.server.reload import reload

    listener, crlfile = _two_ca_listener(pki, tmp_path)
    broker = start(listener)
    port = port_of(broker, 0)
    first_ca = _v5_over_tls(port, client_context(pki, "device-1"), "first-ca")
    second_ca = _v5_over_tls(port, client_context(pki, "foreign"), "second-ca")
    try:
        crlfile.write_bytes(_crl_pem(pki.ca, []) +
                            _crl_pem(pki.other_ca, [pki.serials["foreign"]]))
        app = broker.app
        assert app is not None
        assert broker.call(lambda: reload(app, lambda: app.config)) is True
        _assert_disconnected_0x87(second_ca)
        _assert_still_connected(first_ca)
        assert not mqtt_over_tls(port, client_context(pki, "foreign"), "second-ca-again")
        assert mqtt_over_tls(port, client_context(pki, "device-2"), "first-ca-new")
    finally:
        first_ca.close()
        second_ca.close()


def test_sighup_matches_a_revoked_serial_with_the_issuer_of_its_crl(
        start: Callable[..., BrokerThread], pki: Pki, tmp_path: Path) -> None:
    # Serial numbers are unique per CA only: the first CA revoking serial S ends its own
    # device with serial S, not the second CA's device with the same serial.
    from edge_broker.server.reload import reload

    serial = x509.random_serial_number()
    revoked_context = _device_context(pki, pki.ca, tmp_path, "first-ca-s", serial)
    same_serial_context = _device_context(pki, pki.other_ca, tmp_path, "second-ca-s", serial)
    listener, crlfile = _two_ca_listener(pki, tmp_path)
    broker = start(listener)
    port = port_of(broker, 0)
    revoked = _v5_over_tls(port, revoked_context, "first-ca-s")
    same_serial = _v5_over_tls(port, same_serial_context, "second-ca-s")
    try:
        crlfile.write_bytes(_crl_pem(pki.ca, [serial]) + _crl_pem(pki.other_ca, []))
        app = broker.app
        assert app is not None
        assert broker.call(lambda: reload(app, lambda: app.config)) is True
        _assert_disconnected_0x87(revoked)
        _assert_still_connected(same_serial)
        # OpenSSL agrees for new handshakes.
        assert not mqtt_over_tls(port, revoked_context, "first-ca-s-again")
        assert mqtt_over_tls(port, same_serial_context, "second-ca-s-again")
    finally:
        revoked.close()
        same_serial.close()


def test_a_crlfile_with_a_broken_second_crl_is_refused_at_start_and_on_reload(
        start: Callable[..., BrokerThread], pki: Pki, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    listener, crlfile = _two_ca_listener(pki, tmp_path)
    good = crlfile.read_bytes()
    second = good.rindex(b"-----BEGIN X509 CRL-----\n") + len(b"-----BEGIN X509 CRL-----\n")
    broken = good[:second] + b"AAAA" + good[second + 4:]
    crlfile.write_bytes(broken)
    with pytest.raises(ConfigError) as info:
        start(listener)
    assert (info.value.table, info.value.key) == ("[[listeners]] #1", "crlfile")
    assert f"CRL 2 of 2 in {str(crlfile)!r}" in str(info.value)
    crlfile.write_bytes(good)
    broker = start(listener)
    crlfile.write_bytes(broken)
    assert broker.call(lambda: broker.app.listeners.reload_tls()) is False  # type: ignore
    assert any(f"CRL 2 of 2 in {str(crlfile)!r}" in r.getMessage() and
               "keeps its previous certificates" in r.getMessage() for r in caplog.records)
    assert mqtt_over_tls(port_of(broker, 0), client_context(pki, "foreign"))
