"""Hypothesis drives the CONNECT/authentication path of a real broker (password file and ACL
loaded, anonymous refused): 300 examples per run (`max_examples=300`, with Hypothesis'
shrinking on failure), each a fresh TCP connection sending a generated CONNECT (any protocol
level byte, flags, client id, username and password bytes - valid or not, right or wrong -,
optional will) possibly followed by more packets or garbage.

What must hold for every example: the broker answers with a CONNACK or closes; a CONNACK
accepting the client is only ever given to the right username and password; no internal error
is logged (an exception in the handler would be logged by `log.exception`); and a control
client connected beforehand is still served at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_broker.auth.passwd import PasswordFile
from edge_broker.config import AuthConfig
from edge_broker.server import gate
from tests.conftest import BrokerThread, broker_config
from tests.integration.rawclient import binary, connect, frame, u16, utf8

USERS = {"alice": b"alice-pw", "bob": b"bob-pw"}
ACL = "user alice\ntopic readwrite alice/#\npattern read devices/%c/#\n"


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzzed_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    tmp_path: Path = tmp_path_factory.mktemp("auth-fuzz")
    passwords = PasswordFile()
    for name, password in USERS.items():
        passwords.set(name, password)
    passwords.save(tmp_path / "passwd")
    (tmp_path / "acl").write_text(ACL)
    config = broker_config(tmp_path)
    config = dataclasses.replace(config, auth=AuthConfig(
        allow_anonymous=False, allow_anonymous_explicit=True,
        password_file=tmp_path / "passwd", acl_file=tmp_path / "acl"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gate, "BACKOFF_BASE_S", 0.0)  # wrong passwords are refused at once
        broker = BrokerThread(config).start()
        try:
            yield broker
        finally:
            broker.stop()


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorRecords]:
    handler = ErrorRecords()
    logger = logging.getLogger("edge_broker")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


names = st.one_of(st.sampled_from([b"alice", b"bob", b"", b"mallory", b"alice\x00"]),
                  st.binary(max_size=40),
                  st.text(max_size=20).map(lambda text: text.encode("utf-8", "surrogatepass")))
secrets = st.one_of(st.sampled_from([b"alice-pw", b"bob-pw", b"", b"alice-pw\x00"]),
                    st.binary(max_size=40))


@st.composite
def connects(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(bytes to send, whether they carry a right username and password)."""
    level = draw(st.sampled_from([3, 4, 5, 5, 4, 0, 6, 255]))
    name = utf8("MQIsdp") if level == 3 else utf8(draw(st.sampled_from(["MQTT", "MQTT", "MQTX"])))
    username = draw(st.none() | names)
    password = draw(st.none() | secrets)
    will = draw(st.booleans())
    flags = 0x02 | (0x04 if will else 0) | (0x40 if password is not None else 0) | (
        0x80 if username is not None else 0)
    if draw(st.integers(0, 9)) == 0:
        flags = draw(st.integers(0, 255))  # anything, reserved bit included
    body = name + bytes((level,)) + bytes((flags,)) + u16(draw(st.integers(0, 65535)))
    if level == 5:
        body += draw(st.sampled_from([b"\x00", b"\x03\x21\x00\x0a", b"\x05\x15\x00\x02ab",
                                      b"\x02\xff\xff"]))
    body += binary(draw(st.binary(max_size=30)))
    if flags & 0x04:
        if level == 5:
            body += b"\x00"
        body += utf8(draw(st.sampled_from(["alice/will", "bob/will", "$SYS/x", "a/+"])))
        body += binary(b"bye")
    if flags & 0x80 and username is not None:
        body += binary(username)
    if flags & 0x40 and password is not None:
        body += binary(password)
    data = frame(0x10, body)
    data += draw(st.sampled_from([b"", b"\xc0\x00", frame(0x82, u16(1) + utf8("#") + b"\x00"),
                                  b"\x30\x05\x00\x01x", b"\xff\xff\xff\xff", b"\x10\x00"]))
    right = (username is not None and password is not None and flags & 0xC0 == 0xC0
             and USERS.get(username.decode("utf-8", "replace")) == password)
    return data, right


def answer(port: int, data: bytes) -> bytes | None:
    """The first packet's first 4 bytes, or None when the broker closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return None  # closed while we were still writing: a close is an answer
        received = b""
        while len(received) < 4:
            try:
                chunk = sock.recv(4 - len(received))
            except ConnectionResetError:
                return None
            if not chunk:
                return received or None
            received += chunk
        return received


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=connects())
def test_connect_auth_path_answers_every_input_cleanly(fuzzed_broker: BrokerThread,
                                                       errors: ErrorRecords,
                                                       case: tuple[bytes, bool]) -> None:
    data, right = case
    reply = answer(fuzzed_broker.port, data)
    if reply is not None and len(reply) == 4 and reply[0] == 0x20:
        code = reply[3]
        if code == 0:
            assert right, f"accepted without the right password: {data!r}"
    assert not errors.records, [record.getMessage() for record in errors.records]


def test_the_broker_still_serves_after_the_fuzzing(fuzzed_broker: BrokerThread,
                                                   errors: ErrorRecords) -> None:
    client = connect(fuzzed_broker.port, "control", username="alice", password=b"alice-pw")
    assert client.subscribe("alice/#") == (0,)
    client.publish("alice/x", b"ok")
    assert client.expect_publish().payload == b"ok"
    assert not errors.records
