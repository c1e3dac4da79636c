"""`[broker] gateway_id` and `[[bridges]]` read from the broker's configuration file."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edge_broker.config import Config, load_config
from edge_broker.errors import ConfigError

JS = '''
[[bridges]]
name = "central"
kind = "jetstream"
servers = ["nats://127.0.0.1:4222"]
uplink = ["sensors/#"]
subject_prefix = "site1.gw7"
jetstream_stream = "EDGE"
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge-broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_gateway_id_defaults_to_the_host_name() -> None:
    assert Config().broker.gateway_id == socket.gethostname().split(".")[0]


def test_bridges_are_read_with_the_gateway_id(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[broker]\ngateway_id = "gw-7"\n' + JS))
    assert config.broker.gateway_id == "gw-7"
    (bridge,) = config.bridges
    assert (bridge.name, bridge.kind, bridge.uplink) == ("central", "jetstream", ("sensors/#",))
    assert bridge.jetstream is not None and bridge.jetstream.downlink_durable == "gw-7-central"


def test_no_bridges_by_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[broker]\n")).bridges == ()


@pytest.mark.parametrize(("text", "where"), [
    ('[broker]\ngateway_id = "gw 7"\n', "[broker] gateway_id: expected 1 to 64 letters"),
    ('[broker]\ngateway_id = ""\n', "[broker] gateway_id: expected"),
    (JS.replace('"site1.gw7"', '"site1.*"'), '[[bridges]] #1 "central" subject_prefix:'),
    (JS.replace('kind = "jetstream"', 'kind = "amqp"'), '[[bridges]] #1 "central" kind:'),
    ("[bridges]\nname = 'x'\n", "[bridges]: expected an array of tables"),
])
def test_errors_name_file_table_and_key(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {where}"), str(info.value)
