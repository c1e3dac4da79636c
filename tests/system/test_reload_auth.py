"""SIGHUP re-reads the password file and the ACL of the real process while clients stay
connected: a shrunk ACL applies to the connected client's next operation; a deleted user, or
one whose password changed, is disconnected, as mosquitto does (DISCONNECT 0x87 on 5.0,
3.14.2.1 (5.0); a close on 3.1.1); a broken file keeps the previous rules.
"""

from __future__ import annotations

import signal
from pathlib import Path

from edge_broker.auth.passwd import PasswordFile
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

user carol
topic readwrite c/#

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
    passwd = write_passwords(tmp_path / "passwd", {"alice": "alice-pw", "bob": "bob-pw",
                                                   "carol": "old-pw", "ops": "ops-pw"})
    acl = tmp_path / "acl"
    acl.write_text(ACL_BEFORE)
    config = tmp_path / "edge-broker.toml"
    config.write_text(f'[auth]\npassword_file = "{passwd}"\nacl_file = "{acl}"\n')
    broker = BrokerProcess(tmp_path / "data", "--config", str(config)).wait_listening()
    try:
        alice = connect(broker.port, "alice-1", version=5, username="alice",
                        password=b"alice-pw")
        assert alice.subscribe("a/#") == (0,)
        ops = connect(broker.port, "ops-1", version=5, username="ops", password=b"ops-pw")
        bob5 = connect(broker.port, "bob-5", version=5, username="bob", password=b"bob-pw")
        bob4 = connect(broker.port, "bob-4", version=4, username="bob", password=b"bob-pw")
        carol5 = connect(broker.port, "carol-5", version=5, username="carol",
                         password=b"old-pw")
        carol4 = connect(broker.port, "carol-4", version=4, username="carol",
                         password=b"old-pw")
        assert publish_code(alice, "a/secret/1") == 0
        assert alice.expect_publish().topic == "a/secret/1"

        passwords = PasswordFile.load(passwd)  # alice's and ops's lines stay as they are
        passwords.delete("bob")
        passwords.set("carol", "new-pw")
        passwords.save(passwd)
        acl.write_text(ACL_AFTER)
        broker.process.send_signal(signal.SIGHUP)
        wait_for_log(broker, "reload (SIGHUP): 3 users, 5 ACL rules")

        # The connections of the deleted user and of the one whose password changed end:
        # v5 with DISCONNECT 0x87, 3.1.1 with a close.
        for v5, v4 in ((bob5, bob4), (carol5, carol4)):
            disconnect = v5.expect(14)
            assert disconnect.reason_code == 0x87
            v5.expect_closed()
            v4.expect_closed()
        # alice stays connected; her shrunk rights apply to her next operations.
        assert publish_code(alice, "a/secret/2") == 0x87
        assert publish_code(ops, "a/secret/3") == 0  # ops may; alice may not read it
        assert publish_code(ops, "a/open") == 0
        assert alice.expect_publish().topic == "a/open"
        # carol's new password lets her in again; the old one is refused.
        refused = connect(broker.port, "carol-2", version=5, username="carol",
                          password=b"old-pw", expect_success=False)
        assert refused.connack.reason_code == 0x86
        connect(broker.port, "carol-3", version=5, username="carol", password=b"new-pw").ping()

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


def test_sighup_applies_allow_anonymous_to_connected_and_new_clients(tmp_path: Path) -> None:
    passwd = write_passwords(tmp_path / "passwd", {"ops": "ops-pw"})
    config = tmp_path / "edge-broker.toml"
    config.write_text(f'[auth]\npassword_file = "{passwd}"\nallow_anonymous = true\n')
    broker = BrokerProcess(tmp_path / "data", "--config", str(config)).wait_listening()
    try:
        anonymous5 = connect(broker.port, "anon-5", version=5)
        anonymous4 = connect(broker.port, "anon-4", version=4)
        ops = connect(broker.port, "ops-1", version=5, username="ops", password=b"ops-pw")

        config.write_text(f'[auth]\npassword_file = "{passwd}"\nallow_anonymous = false\n')
        broker.process.send_signal(signal.SIGHUP)
        wait_for_log(broker, "applied auth.allow_anonymous")
        # As mosquitto: the anonymous clients are disconnected, v5 with DISCONNECT 0x87.
        assert anonymous5.expect(14).reason_code == 0x87
        anonymous5.expect_closed()
        anonymous4.expect_closed()
        refused = connect(broker.port, "anon-new", version=5, expect_success=False)
        assert refused.connack.reason_code == 0x87
        ops.ping()

        config.write_text(f'[auth]\npassword_file = "{passwd}"\nallow_anonymous = true\n')
        broker.process.send_signal(signal.SIGHUP)
        wait_for_log(broker, "applied auth.allow_anonymous", count=2)
        connect(broker.port, "anon-again", version=5).ping()
        ops.ping()
    finally:
        code = broker.stop()
    assert code == 0, broker.stderr
