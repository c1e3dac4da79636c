"""Credentials and TLS of bridges against real servers: the options reach the wire."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_broker.bridge.base import BridgeMessage
from edge_broker.bridge.config import parse_bridges
from edge_broker.bridge.mqtt_upstream import MqttUpstream
from edge_broker.errors import BridgeError
from tests.bridge.certs import make_certs
from tests.bridge.servers import Mosquitto, NatsServer

MESSAGE = [BridgeMessage(offset=1, topic="sensors/t", payload=b"x", qos=1)]


def js_table(server: str, **extra: object) -> dict[str, object]:
    return {"name": "central", "kind": "jetstream", "servers": [server],
            "subject_prefix": "site1.gw7", "jetstream_stream": "EDGE", **extra}


async def test_jetstream_user_password_and_tls(tmp_path: Path) -> None:
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    from edge_broker.bridge.jetstream import JetStreamSink

    certs = make_certs(tmp_path / "certs")
    server = NatsServer(tmp_path / "nats", extra_args=(
        "--user", "gw7", "--pass", "s3cret", "--tls", "--tlscert", str(certs.cert),
        "--tlskey", str(certs.key)))
    server.start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        (good,) = parse_bridges([js_table(url, username="gw7", password="s3cret",
                                          tls_ca_file=str(certs.ca))],
                                file="t.toml", gateway_id="gw7")
        sink = JetStreamSink(good, gateway_id="gw7", store_id="5eed")
        await sink.start()
        assert await sink.send(MESSAGE) == 1
        await sink.close()

        (wrong,) = parse_bridges([js_table(url, username="gw7", password="nope",
                                           tls_ca_file=str(certs.ca))],
                                 file="t.toml", gateway_id="gw7")
        sink = JetStreamSink(wrong, gateway_id="gw7", store_id="5eed", ack_timeout=2.0)
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await sink.start()
        await sink.close()
    finally:
        server.stop()


async def test_jetstream_nkey_seed_file(tmp_path: Path) -> None:
    # The documented nkey_seed_file against a server that knows only the public key.
    pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")
    nkeys = pytest.importorskip("nkeys", reason="pip install 'nats-py[nkeys]'")
    from edge_broker.bridge.jetstream import JetStreamSink

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "gw7.nk"
    seed_file.write_bytes(seed + b"\n")
    conf = tmp_path / "nats.conf"
    conf.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    server = NatsServer(tmp_path / "nats", extra_args=("-c", str(conf)))
    server.start()
    try:
        (bridge,) = parse_bridges([js_table(server.url, nkey_seed_file=str(seed_file))],
                                  file="t.toml", gateway_id="gw7")
        sink = JetStreamSink(bridge, gateway_id="gw7", store_id="5eed")
        await sink.start()
        assert await sink.send(MESSAGE) == 1
        await sink.close()
        (anonymous,) = parse_bridges([js_table(server.url)], file="t.toml", gateway_id="gw7")
        sink = JetStreamSink(anonymous, gateway_id="gw7", store_id="5eed", ack_timeout=2.0)
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await sink.start()
        await sink.close()
    finally:
        server.stop()


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory other users can read: mosquitto started as root drops its privileges
    before it reads its certificate (pytest's tmp_path is private to the user)."""
    directory = Path(tempfile.mkdtemp(prefix="edge-bridge-certs-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_mqtt_upstream_over_tls_checks_the_server_certificate(
        tmp_path: Path, readable_dir: Path) -> None:
    certs = make_certs(readable_dir / "certs")
    untrusted = make_certs(tmp_path / "other")
    server = Mosquitto(tmp_path / "mosquitto")
    server.extra_config = f"certfile {certs.cert}\nkeyfile {certs.key}\n"
    server.start()
    try:
        def config(ca: Path) -> object:
            (bridge,) = parse_bridges([{
                "name": "up", "kind": "mqtt", "servers": [f"mqtts://127.0.0.1:{server.port}"],
                "topics": ['sensors/# out 1 "" site1/'], "tls_ca_file": str(ca)}],
                file="t.toml", gateway_id="gw7")
            return bridge

        upstream = MqttUpstream(config(certs.ca))  # type: ignore[arg-type]
        await upstream.start()
        assert await upstream.send(MESSAGE) == 1
        await upstream.close()
        with pytest.raises(BridgeError, match=r"(?i)certificate verify failed"):
            await MqttUpstream(config(untrusted.ca)).start()  # type: ignore[arg-type]
    finally:
        server.stop()
