"""A will that goes out after a broker restart is authorised as the user its session logged in
as, not as an anonymous client: the username is stored with the session (schema version 5).

The ACL lets alice write `alarms/#` and anonymous clients nothing. alice connects with a v5
will on `alarms/alice` with a Will Delay Interval and a Session Expiry Interval, so the will
is kept with the session across a graceful restart and goes out from the restarted broker
[MQTT-3.1.2-8] (5.0), 3.1.3.2.2 (5.0). The will topic must be writable by its client, checked
when it is published, as for a PUBLISH (docs/security.md).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import BrokerThread
from tests.integration.authsetup import auth_config
from tests.integration.rawclient import PUBACK, RawClient, RawWill, connect, props, unique_id

ACL = """\
user alice
topic write alarms/#

user ops
topic readwrite #
"""
PASSWORDS = {"alice": b"alice-pw", "ops": b"ops pw \xc3\xbc"}
DELAY = 1


def _ops(port: int, client_id: str) -> RawClient:
    """ops, with a persistent session subscribed to `alarms/#`: sees what the broker lets out."""
    return connect(port, client_id, version=5, clean=False, username="ops",
                   password=PASSWORDS["ops"], properties=props(session_expiry_interval=600))


def _denied_wills(broker: BrokerThread) -> int:
    """Wills the broker refused for the ACL (metrics)."""
    app = broker.app
    assert app is not None
    return int(broker.call(lambda: app.metrics.acl_denied["will"]))


@pytest.mark.parametrize("when", ["before_stop", "at_stop"])
def test_a_will_published_after_a_restart_has_its_users_rights(
        make_broker: Callable[..., BrokerThread], tmp_path: Path, when: str) -> None:
    config = auth_config(tmp_path, acl=ACL, allow_anonymous=True)
    broker = make_broker(config=config)
    watcher_id, alice_id = unique_id("ops"), unique_id("alice")
    watcher = _ops(broker.port, watcher_id)
    assert watcher.subscribe(("alarms/#", 1)) == (1,)
    alice = connect(broker.port, alice_id, version=5, clean=False, username="alice",
                    password=PASSWORDS["alice"],
                    properties=props(session_expiry_interval=600),
                    will=RawWill("alarms/alice", b"alice lost", 1,
                                 properties=props(will_delay_interval=DELAY)))
    alice.ping()
    if when == "before_stop":
        alice.close()  # no DISCONNECT: the will is due DELAY s later, after the restart
        core = broker.app.core if broker.app else None
        assert core is not None
        deadline = time.monotonic() + 5
        while broker.call(lambda: core.sessions[alice_id].online):
            assert time.monotonic() < deadline, "the broker did not see alice's close"
            time.sleep(0.02)  # polling interval, bounded by the deadline
    broker.stop()  # graceful: alice's session and its will are in the store
    watcher.close()
    alice.close()

    broker = make_broker(config=config)
    watcher = _ops(broker.port, watcher_id)
    assert watcher.connack is not None and watcher.connack.session_present
    packet = watcher.expect_publish(timeout=DELAY + 5)
    assert (packet.topic, packet.payload) == ("alarms/alice", b"alice lost")
    if packet.packet_id is not None:
        watcher.ack(PUBACK, packet.packet_id)
    assert _denied_wills(broker) == 0
    # Where it came from: the session row keeps the username (schema version 5).
    db = Path(config.broker.data_dir) / "edge-broker.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT username FROM sessions WHERE client_id = ?",
                            (alice_id,)).fetchall() == [("alice",)]


def test_an_anonymous_sessions_will_is_still_refused_after_a_restart(
        make_broker: Callable[..., BrokerThread], tmp_path: Path) -> None:
    """The other side: NULL in the stored username is anonymous, which may write nothing."""
    config = auth_config(tmp_path, acl=ACL, allow_anonymous=True)
    broker = make_broker(config=config)
    anon_id = unique_id("anon")
    anon = connect(broker.port, anon_id, version=5, clean=False,
                   properties=props(session_expiry_interval=600),
                   will=RawWill("alarms/anon", b"anon lost", 1,
                                properties=props(will_delay_interval=DELAY)))
    anon.ping()
    broker.stop()
    anon.close()
    broker = make_broker(config=config)
    deadline = time.monotonic() + DELAY + 5
    while _denied_wills(broker) == 0:
        assert time.monotonic() < deadline, "the anonymous will was not refused"
        time.sleep(0.02)  # polling interval, bounded by the deadline
    assert _denied_wills(broker) == 1
