"""An `mqtt` bridge with several upstream addresses, through the real broker (a subprocess) to
real mosquitto servers: which one it is connected to (mosquitto's `round_robin`,
bridge/mqtt_servers.py).

- Default (`round_robin = false`): the first address is the main one. Connected to a backup,
  the bridge checks it every `primary_retry` and moves back once it answers: no message lost
  in the move, and the move is not counted as a failure. Before: the bridge stayed on the
  backup until that connection failed.
- `round_robin = true`: after a connection ends, the next attempt starts at the next
  address, not at the first. Before: always at the first.

Waiting is polling with a deadline (tests/bridge/gateway.py `wait_until`) or for messages.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.bridge.gateway import Gateway, wait_until
from tests.bridge.servers import HOST, Mosquitto
from tests.bridge.test_gateway_mqtt_properties import publish
from tests.bridge.test_mqtt_upstream import Remote
from tests.integration.brokerprocess import needs_console_script

pytestmark = needs_console_script


def bridge(ports: list[int], *extra: str) -> str:
    servers = ", ".join(f'"mqtt://{HOST}:{port}"' for port in ports)
    return ('[[bridges]]\nname = "cloud"\nkind = "mqtt"\n'
            f"servers = [{servers}]\ntopics = ['s/# out 1 \"\" site/']\n"
            'backoff_initial = "1s"\nbackoff_max = "1s"\n' + "".join(f"{e}\n" for e in extra))


def payloads(*remotes: Remote) -> set[bytes]:
    return {message.payload for remote in remotes for message in remote.received}


def got_one(remote: Remote, timeout: float) -> bool:
    try:
        remote.wait_for(1, timeout)
    except AssertionError:
        return False
    return True


def test_the_bridge_moves_back_to_the_first_address_once_it_answers(
        tmp_path: Path, mosquitto: Mosquitto, started: list[Any]) -> None:
    first = Mosquitto(tmp_path / "first")  # not started yet: its port refuses connections
    try:
        (tmp_path / "gw").mkdir()
        gateway = Gateway(tmp_path / "gw", bridge([first.port, mosquitto.port],
                                                  'primary_retry = "1s"')).start()
        started.append(gateway)
        backup = Remote(mosquitto.port, "backup")
        started.append(backup)
        backup.subscribe("site/#", 1)
        wait_until(lambda: gateway.status("cloud")["connected"], 20, "connected to the backup")
        device = Remote(gateway.port, "dev1")
        started.append(device)
        publish(device.client, "s/x", b"0", 1)
        backup.wait_for(1)
        failures = gateway.status("cloud")["failures"]

        first.start()
        main = Remote(first.port, "main")
        started.append(main)
        main.subscribe("site/#", 1)
        sent = [b"0"]
        deadline = time.monotonic() + 30
        while not got_one(main, 0.2):  # published while the bridge moves
            assert time.monotonic() < deadline, "the bridge did not move to the first address"
            sent.append(str(len(sent)).encode())
            publish(device.client, "s/x", sent[-1], 1)
        sent.append(b"last")
        publish(device.client, "s/x", b"last", 1)
        wait_until(lambda: b"last" in payloads(main), 20, "the last message on the first")
        assert payloads(main, backup) >= set(sent)  # none lost in the move
        status = gateway.status("cloud")
        assert status["connected"]
        assert status["failures"] == failures  # moving back is not a failure
    finally:
        first.stop()


def test_round_robin_goes_on_to_the_next_address_not_back_to_the_first(
        tmp_path: Path, mosquitto: Mosquitto, started: list[Any]) -> None:
    first = Mosquitto(tmp_path / "first")  # refuses until started
    third = Mosquitto(tmp_path / "third")
    third.start()
    try:
        (tmp_path / "gw").mkdir()
        gateway = Gateway(tmp_path / "gw", bridge([first.port, mosquitto.port, third.port],
                                                  "round_robin = true",
                                                  'primary_retry = "1s"')).start()
        started.append(gateway)
        remotes = {name: Remote(port, name) for name, port in
                   (("second", mosquitto.port), ("third", third.port))}
        started.extend(remotes.values())
        for remote in remotes.values():
            remote.subscribe("site/#", 1)
        wait_until(lambda: gateway.status("cloud")["connected"], 20, "connected")
        device = Remote(gateway.port, "dev1")
        started.append(device)
        publish(device.client, "s/x", b"on the second", 1)
        remotes["second"].wait_for(1)

        first.start()  # the first answers again: round robin stays where it is
        main = Remote(first.port, "main")
        started.append(main)
        main.subscribe("site/#", 1)
        publish(device.client, "s/x", b"still the second", 1)
        remotes["second"].wait_for(2)
        mosquitto.stop()  # the connection ends: the next attempt starts at the third
        publish(device.client, "s/x", b"after", 1)
        wait_until(lambda: b"after" in payloads(remotes["third"]), 30, "sent to the third")
        assert not main.received
    finally:
        first.stop()
        third.stop()
