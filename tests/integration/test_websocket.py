"""MQTT over WebSocket listeners (`protocol = "websockets"`), plain and TLS, as clients see
them: paho-mqtt's websocket transport (path /mqtt, MQTT 3.1.1 and 5.0), and the `websockets`
library's client for what paho does not do (packets split across frames, several packets in
one frame, text frames, other subprotocols), plus raw garbage after the upgrade.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

pytest.importorskip("websockets", reason="pip install 'edge-broker[websocket]'")

from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from edge_broker.config import ListenerConfig
from edge_broker.server import websocket as websocket_module
from edge_broker.server.listeners import identity_of
from tests.conftest import BrokerThread
from tests.integration import wirebytes as wb
from tests.integration.secure import (
    TIMEOUT,
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

LOOPS = pytest.mark.parametrize("uvloop", [False, True], ids=["asyncio", "uvloop"])
VERSIONS = pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5],
                                   ids=["v311", "v5"])


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


def ws_listener() -> ListenerConfig:
    return ListenerConfig(host="127.0.0.1", port=0, protocol="websockets")


def paho_ws(client_id: str, protocol: int) -> PahoClient:
    client = PahoClient(client_id, protocol=protocol, transport="websockets")
    client.client.ws_set_options(path="/mqtt")
    return client


def round_trip(port: int, protocol: int, payload: bytes, *, pki: Pki | None = None) -> None:
    sub, pub = paho_ws("ws-sub", protocol), paho_ws("ws-pub", protocol)
    if pki is not None:
        sub.tls(pki, "device-1")
        pub.tls(pki, "device-2")
    sub.connect(port)
    pub.connect(port)
    try:
        sub.subscribe("ws/#")
        pub.publish("ws/data", payload)
        message = sub.receive()
        assert (message.topic, message.payload) == ("ws/data", payload)
    finally:
        sub.stop()
        pub.stop()


def assert_clean_log(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# --------------------------------------------------------------------------- paho


@LOOPS
@VERSIONS
def test_paho_over_websocket_round_trip(start: Callable[..., BrokerThread], protocol: int,
                                        uvloop: bool) -> None:
    broker = start(ws_listener(), uvloop=uvloop)
    round_trip(port_of(broker, 0), protocol, b"hello over ws")


@VERSIONS
def test_large_messages_span_frames(start: Callable[..., BrokerThread], protocol: int) -> None:
    # 600 KB: several TCP reads and WebSocket frames of the library's reader on each side.
    broker = start(ws_listener())
    round_trip(port_of(broker, 0), protocol, os.urandom(600_000))


@VERSIONS
def test_paho_over_secure_websocket_with_a_device_certificate(
        start: Callable[..., BrokerThread], pki: Pki, protocol: int) -> None:
    broker = start(tls_listener(pki, protocol="websockets"))
    port = port_of(broker, 0)
    round_trip(port, protocol, b"hello over wss", pki=pki)
    client = paho_ws("wss-id", protocol).tls(pki, "device-1")
    client.connect(port)
    try:
        def seen() -> tuple[str | None, ListenerConfig | None, str | None]:
            app = broker.app
            assert app is not None
            transport = app.clients["wss-id"].transport
            return (identity_of(transport), app.listeners.listener_of(transport),
                    transport.get_extra_info("subprotocol"))  # type: ignore[union-attr]

        assert broker.call(seen) == ("device-1", broker.config.listeners[0], "mqtt")
    finally:
        client.stop()


def test_secure_websocket_refuses_a_certificate_from_another_ca(
        start: Callable[..., BrokerThread], pki: Pki) -> None:
    broker = start(tls_listener(pki, protocol="websockets"))
    context = client_context(pki, "foreign")
    url = f"wss://localhost:{port_of(broker, 0)}/mqtt"
    # Refused in the TLS handshake; the client sees it as it happens to be reading or
    # writing then (TLS 1.3 finishes the client's side before the server's verdict).
    with pytest.raises((ssl.SSLError, ConnectionError, ConnectionClosed, InvalidMessage)), \
            connect(url, ssl=context, subprotocols=["mqtt"],  # type: ignore[list-item]
                    open_timeout=TIMEOUT) as ws:
        ws.recv(TIMEOUT)


# --------------------------------------------------------------------------- framing


def ws_client(broker: BrokerThread, **kwargs: object) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{port_of(broker, 0)}/any/path", open_timeout=TIMEOUT,
                   **kwargs)  # type: ignore[arg-type]


class Reader:
    """MQTT packets out of WebSocket messages, wherever the message boundaries fall."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer = bytearray()
        self.frames: list[wb.Frame] = []

    def next(self) -> wb.Frame:
        while not self.frames:
            data = self.ws.recv(TIMEOUT)
            assert isinstance(data, bytes)
            self.buffer += data
            self.frames += wb.split_frames(self.buffer)
        return self.frames.pop(0)


def test_one_packet_across_frames_and_several_packets_in_one(
        start: Callable[..., BrokerThread]) -> None:
    broker = start(ws_listener())
    with ws_client(broker, subprotocols=["mqtt"]) as ws:
        assert ws.subprotocol == "mqtt"
        reader = Reader(ws)
        connect_packet = wb.connect(4, "split")
        # CONNECT in three WebSocket messages.
        ws.send(connect_packet[:3])
        ws.send(connect_packet[3:7])
        ws.send(connect_packet[7:])
        assert reader.next().type == wb.CONNACK
        # SUBSCRIBE + PUBLISH + PINGREQ in one message, split into fragments mid-packet.
        batch = (wb.subscribe(4, 1, "f/#", 1) + wb.publish(4, "f/x", b"p" * 300, qos=1,
                                                           packet_id=2) + b"\xc0\x00")
        ws.send([batch[:5], batch[5:200], batch[200:]])
        types = [reader.next().type for _ in range(4)]
        assert sorted(types) == sorted([wb.SUBACK, wb.PUBACK, wb.PUBLISH, wb.PINGRESP])


def test_mqttv31_subprotocol_and_none_are_accepted(start: Callable[..., BrokerThread]) -> None:
    broker = start(ws_listener())
    with ws_client(broker, subprotocols=["mqttv3.1"]) as ws:
        assert ws.subprotocol == "mqttv3.1"
        ws.send(wb.connect(4, "old"))
        assert Reader(ws).next().type == wb.CONNACK
    with ws_client(broker) as ws:
        ws.send(wb.connect(4, "none"))
        assert Reader(ws).next().type == wb.CONNACK


def test_another_subprotocol_is_refused(start: Callable[..., BrokerThread]) -> None:
    broker = start(ws_listener())
    with pytest.raises(InvalidStatus) as info:
        ws_client(broker, subprotocols=["chat"])
    assert info.value.response.status_code == 400


# --------------------------------------------------------------------------- bad input


def control_round_trip(broker: BrokerThread) -> None:
    with ws_client(broker, subprotocols=["mqtt"]) as ws:
        ws.send(wb.connect(4, "control"))
        reader = Reader(ws)
        assert reader.next().type == wb.CONNACK
        ws.send(b"\xc0\x00")
        assert reader.next().type == wb.PINGRESP


def test_a_text_frame_closes_the_connection(start: Callable[..., BrokerThread],
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    broker = start(ws_listener())
    with ws_client(broker, subprotocols=["mqtt"]) as ws:
        ws.send(wb.connect(4, "texter"))
        assert Reader(ws).next().type == wb.CONNACK
        ws.send("this is text")  # [MQTT-6.0.0-1] (5.0)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1003
    control_round_trip(broker)
    assert_clean_log(caplog)


def _upgraded_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, response
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@LOOPS
@pytest.mark.parametrize("garbage", [
    b"\xff" * 32,  # reserved opcode, RSV bits set
    b"\x82\x05hello",  # an unmasked client frame
    b"\x82\xff" + b"\x7f" * 8 + b"\x00" * 4,  # a frame announcing 2**63 bytes
    b"\x89\xfe\x01\x00" + b"\x00" * 4 + b"x" * 256,  # a 256-byte ping (control frames <= 125)
    b"\x82\x84\x00\x00\x00\x00\xde\xad\xbe\xef",  # a masked binary frame of MQTT garbage
], ids=["reserved-opcode", "unmasked", "huge-length", "long-ping", "mqtt-garbage"])
def test_garbage_frames_close_only_that_connection(start: Callable[..., BrokerThread],
                                                   garbage: bytes, uvloop: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    broker = start(ws_listener(), uvloop=uvloop)
    with _upgraded_socket(port_of(broker, 0)) as sock:
        sock.sendall(garbage)
        assert _closed_by_server(sock)
    control_round_trip(broker)
    wait_for(lambda: broker.call(lambda: not broker.app.connections),  # type: ignore
             "every connection closed")
    assert_clean_log(caplog)


def test_garbage_instead_of_an_upgrade_is_answered_and_closed(
        start: Callable[..., BrokerThread], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(websocket_module, "HANDSHAKE_TIMEOUT_S", 0.5)
    broker = start(ws_listener())
    for garbage in (
            b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x00\x00\x00",  # MQTT, no upgrade: timeout
            b"GET / HTTP/1.1\r\n\r\n",  # HTTP without the upgrade: 426
            b"\x00" * 100 + b"\r\n\r\n",  # not HTTP
            b""):  # nothing at all: timeout
        with socket.create_connection(("127.0.0.1", port_of(broker, 0)),
                                      timeout=TIMEOUT) as sock:
            sock.sendall(garbage)
            assert _closed_by_server(sock)
    control_round_trip(broker)
    assert_clean_log(caplog)


def test_plain_mqtt_on_a_websocket_port_gets_http_400_at_once(
        start: Callable[..., BrokerThread], caplog: pytest.LogCaptureFixture) -> None:
    # A device pointed at the WebSocket port with plain MQTT (or TLS) learns so at once, as
    # mosquitto answers it, not after the upgrade timeout: the reads below give up sooner.
    caplog.set_level(logging.INFO)
    broker = start(ws_listener())
    patience = websocket_module.HANDSHAKE_TIMEOUT_S / 3
    for first in (b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x00\x00\x00", b"\x16\x03\x01\x02\x00"):
        with socket.create_connection(("127.0.0.1", port_of(broker, 0)),
                                      timeout=patience) as sock:
            sock.sendall(first)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert any("plain MQTT? use an mqtt listener" in r.getMessage() for r in caplog.records)
    control_round_trip(broker)
