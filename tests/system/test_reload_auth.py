"""SIGHUP re-reads the password file and the ACL of the real process while clients stay
connected: a changed password applies to the next CONNECT, a shrunk ACL to the connected
client's next operation, a deleted user is disconnected (DISCONNECT 0x87 on 5.0, 3.14.2.1
(5.0); a close on 3.1.1), and a broken file keeps the previous rules.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.integration.authsetup import write_passwords
from tests.integration.brokerprocess import BrokerProcess, needs_console_script
from tests.integration.rawclient import PUBACK, RawClient, connect
from tests.system.test_signals import wait_for_log

pytestmark = needs_console_script

ACL_BEFORE = """\
user alice
topic readwrite a/#

user bob
topic readwrite b/#

user ops
topic readwrite #
"""
ACL_AFTER = ACL_BEFORE.replace("topic readwrite a/#", "topic readwrite a/#\ntopic deny a/secret/#")


def publish_code(client: RawClient, topic: str) -> int:
    packet_id = client.publish(topic, b"x", qos=1)
    ack = client.expect(PUBACK)
    assert ack.packet_id == packet_id
    return int(ack.reason_code)


def test_sighup_reloads_passwords_and_acl_with_clients_connected(tmp_path: Path) -> None:
    passwd = write_passwords(tmp_path / "passwd",
                             {"alice": "old-pw", "bob": "bob-pw", "ops": "ops-pw"})
    acl = tmp_path / "acl"
    acl.write_text(ACL_BEFORE)
    config = tmp_path / "edge-broker.toml"
    config.write_text(f'[auth]\npassword_file = "{passwd}"\nacl_file = "{acl}"\n')
    broker = BrokerProcess(tmp_path / "data", "--config", str(config)).wait_listening()
    try:
        alice = connect(broker.port, "alice-1", version=5, username="alice", password=b"old-pw")
        assert alice.subscribe("a/#") == (0,)
        ops = connect(broker.port, "ops-1", version=5, username="ops", password=b"ops-pw")
        bob5 = connect(broker.port, "bob-5", version=5, username="bob", password=b"bob-pw")
        bob4 = connect(broker.port, "bob-4", version=4, username="bob", password=b"bob-pw")
        assert publish_code(alice, "a/secret/1") == 0
        assert alice.expect_publish().topic == "a/secret/1"

        write_passwords(passwd, {"alice": "new-pw", "ops": "ops-pw"})  # bob deleted
        acl.write_text(ACL_AFTER)
        broker.process.send_signal(signal.SIGHUP)
        wait_for_log(broker, "reload (SIGHUP): 2 users, 4 ACL rules")

        # The deleted user's connections end: v5 with DISCONNECT 0x87, 3.1.1 with a close.
        disconnect = bob5.expect(14)
        assert disconnect.reason_code == 0x87
        bob5.expect_closed()
        bob4.expect_closed()
        # alice stays connected; her shrunk rights apply to her next operations.
        assert publish_code(alice, "a/secret/2") == 0x87
        assert publish_code(ops, "a/secret/3") == 0  # ops may; alice may not read it
        assert publish_code(ops, "a/open") == 0
        assert alice.expect_publish().topic == "a/open"
        # Her new password applies to the next CONNECT; the old one is refused.
        refused = connect(broker.port, "alice-2", version=5, username="alice",
                          password=b"old-pw", expect_success=False)
        assert refused.connack.reason_code == 0x86
        connect(broker.port, "alice-3", version=5, username="alice", password=b"new-pw").ping()

        # A broken ACL keeps the rules in force, and says why.
        acl.write_text("user alice\nfrobnicate a/#\n")
        broker.process.send_signal(signal.SIGHUP)
        wait_for_log(broker, "keeping the previous passwords and ACL")
        assert "line 2" in broker.stderr
        assert publish_code(alice, "a/secret/4") == 0x87
        assert publish_code(alice, "a/fine") == 0
        assert alice.expect_publish().topic == "a/fine"
        alice.ping()
        assert broker.process.poll() is None
    finally:
        code = broker.stop()
    assert code == 0, broker.stderr
