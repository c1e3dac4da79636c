"""A jetstream bridge whose `stream_subjects` do not capture `<subject_prefix>.>` is refused
before anything starts: `check-config` fails and `run` exits 2, each with one line naming the
bridge and the key, and no stream is made on the server (a stream made with those subjects
would answer "no responders" to every message the bridge sends, forever). Subjects that do
capture it (a shared stream's `site1.>`) are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path

import pytest

from edge_broker import cli
from tests.bridge.gateway import jetstream_bridge, wait_until
from tests.bridge.servers import NatsServer
from tests.integration.brokerprocess import BrokerProcess, needs_console_script

pytest.importorskip("nats", reason="pip install 'edge-broker[nats]'")

WHERE = '[[bridges]] #1 "central" stream_subjects: none captures "site1.gw7.>"'


def write_config(tmp_path: Path, url: str, subjects: str) -> Path:
    config = tmp_path / "edge-broker.toml"
    config.write_text(f'[broker]\ndata_dir = "{tmp_path / "data"}"\ngateway_id = "gw7"\n\n'
                      + jetstream_bridge([url], stream_subjects=subjects))
    return config


def check_config(config: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["check-config", str(config)])
    return code, out.getvalue(), err.getvalue()


def test_check_config_refuses_stream_subjects_that_miss_the_prefix(tmp_path: Path) -> None:
    config = write_config(tmp_path, "nats://127.0.0.1:9", '["other.>"]')
    code, out, err = check_config(config)
    assert code == 1, out
    assert err.strip() == f"{config}: {WHERE}, what the bridge sends"
    for covering in ('["site1.>"]', '["other.>", "site1.*.>"]', '["site1.gw7.>"]'):
        config = write_config(tmp_path, "nats://127.0.0.1:9", covering)
        assert check_config(config)[0] == 0, covering


async def _streams(url: str) -> list[str]:
    import nats

    nc = await nats.connect(url)
    try:
        return [info.config.name for info in await nc.jetstream().streams_info()]
    finally:
        await nc.close()


@needs_console_script
def test_run_refuses_stream_subjects_that_miss_the_prefix(tmp_path: Path,
                                                          nats_server: NatsServer) -> None:
    config = write_config(tmp_path, nats_server.url, '["other.>"]')
    broker = BrokerProcess(tmp_path / "data", "--config", str(config))
    # It exits, or says it listens (it accepted the configuration): whichever comes first.
    wait_until(lambda: broker.process.poll() is not None or "listening on" in broker.stderr,
               20, "the broker exiting or listening")
    try:
        assert broker.wait_exit() == 2, broker.stderr
    finally:
        broker.kill()
    errors = [line for line in broker.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, broker.stderr
    assert f"{config}: {WHERE}" in errors[0]
    assert asyncio.run(_streams(nats_server.url)) == []  # nothing made with those subjects
