"""Simulated devices for the fleet simulator: many paho-mqtt clients in one process, driven by one
selector loop (no thread per client).

Each device behaves like the firmware examples: persistent session (clean session 0), QoS 1
readings on devices/<id>/telemetry with a per-device sequence number, a retained "online" birth and
an "offline" will on devices/<id>/status, reconnect with exponential backoff and jitter, and a
bounded buffer of readings while offline (oldest dropped, counted). At random it goes offline
(half the time abruptly, so the broker publishes the will) or reboots (its RAM - buffer and
unacknowledged messages - is lost; its sequence number survives, as if kept in flash).

A reading counts as acknowledged when paho reports its PUBACK; the central subscriber must then
receive it. Readings lost to the buffer bound or to a reboot were never acknowledged.

edge-broker-manifest: client_id={id} username={id} clean_session=false keepalive=60 qos=1
edge-broker-manifest: publish=devices/{id}/telemetry
edge-broker-manifest: will=devices/{id}/status retain=true birth=online will_payload=offline
"""

from __future__ import annotations

import contextlib
import json
import random
import selectors
import socket
import time
import traceback
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt


class Device:
    def __init__(self, fleet: Fleet, device_id: str, rng: random.Random) -> None:
        self.fleet = fleet
        self.id = device_id
        self.rng = rng
        self.seq = 0
        self.boot = 0
        self.buffer: deque[str] = deque()
        self.dropped = 0
        self.lost_on_reboot = 0
        self.acked: list[int] = []
        self.mid_seq: dict[int, int] = {}
        self.client: mqtt.Client | None = None
        self.online = False            # CONNACK received and socket open
        self.offline_until = 0.0       # a random offline period: no connection attempts
        self.next_attempt = 0.0
        self.attempt = 0
        self.next_reading = time.monotonic() + rng.uniform(0, fleet.interval)
        self.offline_events = 0
        self.reboots = 0

    def new_client(self) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id,
                             clean_session=False, userdata=self)
        client.will_set(f"devices/{self.id}/status", "offline", qos=1, retain=True)
        client.username_pw_set(self.id)
        client.max_inflight_messages_set(self.fleet.max_inflight)
        client.on_connect = _on_connect
        client.on_publish = _on_publish
        client.on_disconnect = _on_disconnect
        self.client = client
        self.mid_seq = {}

    def connect(self, now: float) -> None:
        fresh = self.client is None
        if fresh:
            self.new_client()
        assert self.client is not None
        try:
            if fresh:
                self.client.connect(self.fleet.host, self.fleet.port, keepalive=60)
            else:
                self.client.reconnect()
        except OSError:
            self.backoff(now)
            return
        sock = self.client.socket()
        if sock is not None:
            self.fleet.register(self, sock)

    def backoff(self, now: float) -> None:
        delay = min(self.fleet.backoff_max, self.fleet.backoff_min * 2 ** self.attempt)
        self.attempt = min(self.attempt + 1, 16)
        self.next_attempt = max(self.offline_until,
                                now + delay / 2 + self.rng.uniform(0, delay / 2))

    def read(self, now: float) -> None:
        self.next_reading = now + self.fleet.interval * self.rng.uniform(0.8, 1.2)
        payload = json.dumps({"seq": self.seq, "boot": self.boot, "t": round(time.time(), 3)})
        self.seq += 1
        if len(self.buffer) >= self.fleet.buffer_size:
            self.buffer.popleft()
            self.dropped += 1
        self.buffer.append(payload)

    def flush(self) -> None:
        """Hand buffered readings to paho, which keeps each until PUBACK (resent on reconnect)."""
        assert self.client is not None
        while self.buffer and len(self.mid_seq) < self.fleet.max_inflight:
            payload = self.buffer.popleft()
            info = self.client.publish(f"devices/{self.id}/telemetry", payload, qos=1)
            self.mid_seq[info.mid] = json.loads(payload)["seq"]

    def go_offline(self, now: float, reboot: bool) -> None:
        self.offline_events += 1
        if self.client is not None and self.client.socket() is not None:
            self.fleet.forget(self)
            if not reboot and self.rng.random() < 0.5:
                self.client.disconnect()    # clean: no will
                self.client.loop_write()
            else:
                # abrupt (power loss): no DISCONNECT, so the broker publishes the will
                with contextlib.suppress(OSError):  # the peer may have closed it already
                    self.client.socket().shutdown(socket.SHUT_RDWR)
                self.client.loop_read()     # paho sees the closed connection and cleans up
        self.fleet.forget(self)
        self.online = False
        if reboot:
            self.reboots += 1
            self.boot += 1
            self.lost_on_reboot += len(self.buffer) + len(self.mid_seq)
            self.buffer.clear()
            self.client = None
        self.offline_until = now + self.rng.uniform(0.1, self.fleet.offline_max)
        self.next_attempt = self.offline_until
        self.attempt = 0


def _on_connect(client: mqtt.Client, device: Device, _flags: Any, reason: Any,
                _props: Any = None) -> None:
    if reason.is_failure:
        return
    device.online = True
    device.attempt = 0
    client.publish(f"devices/{device.id}/status", "online", qos=1, retain=True)


def _on_publish(_client: mqtt.Client, device: Device, mid: int, _reason: Any,
                _props: Any = None) -> None:
    seq = device.mid_seq.pop(mid, None)
    if seq is not None:
        device.acked.append(seq)


def _on_disconnect(_client: mqtt.Client, device: Device, _flags: Any, _reason: Any,
                   _props: Any = None) -> None:
    device.online = False
    device.fleet.forget(device)


class Fleet:
    """The devices of one worker process and their selector loop."""

    def __init__(self, ids: list[str], opts: dict[str, Any]) -> None:
        self.host = opts["host"]
        self.port = opts["port"]
        self.interval = opts["interval"]
        self.buffer_size = opts["buffer"]
        self.max_inflight = opts["max_inflight"]
        self.offline_rate = opts["offline_rate"]
        self.offline_max = opts["offline_max"]
        self.reboot_fraction = opts["reboot_fraction"]
        self.backoff_min = opts["backoff_min"]
        self.backoff_max = opts["backoff_max"]
        self.selector = selectors.DefaultSelector()
        self.devices = [Device(self, device_id, random.Random(f"{opts['seed']}:{device_id}"))
                        for device_id in ids]

    def register(self, device: Device, sock: Any) -> None:
        self.forget(device)
        # paho may have closed a socket without telling us; its number can come back now
        stale = self.selector.get_map().get(sock.fileno())
        if stale is not None:
            self.selector.unregister(stale.fd)
        self.selector.register(sock, selectors.EVENT_READ, device)

    def forget(self, device: Device) -> None:
        for key in list(self.selector.get_map().values()):
            if key.data is device:
                self.selector.unregister(key.fileobj)

    def turn(self, now: float, producing: bool, tick: float) -> None:
        for key, _events in self.selector.select(timeout=tick):
            device = key.data
            if device.client is not None:
                device.client.loop_read()
        for device in self.devices:
            client = device.client
            if producing and now >= device.next_reading:
                device.read(now)
            if producing and self.offline_rate and device.rng.random() < self.offline_rate * tick:
                device.go_offline(now, device.rng.random() < self.reboot_fraction)
                continue
            connected = client is not None and client.socket() is not None
            if not connected:
                if now >= device.next_attempt:
                    device.connect(now)
                continue
            assert client is not None
            if device.online:
                device.flush()
            if client.want_write():
                client.loop_write()
            client.loop_misc()
            if client.socket() is None:  # lost while writing
                device.online = False
                self.forget(device)
                device.backoff(now)

    def idle(self) -> bool:
        return all(not d.buffer and not d.mid_seq for d in self.devices)

    def close(self) -> None:
        for device in self.devices:
            if device.client is not None and device.client.socket() is not None:
                device.client.publish(f"devices/{device.id}/status", "offline", qos=1,
                                      retain=True)
                device.client.loop_write()
                device.client.disconnect()
                device.client.loop_write()


def run_worker(ids: list[str], opts: dict[str, Any], results: Any) -> None:
    """One process: run the devices for `duration`, then drain, then report on `results`
    (a list of per-device dicts, or {"error": traceback})."""
    try:
        _run_worker(ids, opts, results)
    except BaseException:
        results.put({"error": traceback.format_exc()})
        raise


def _run_worker(ids: list[str], opts: dict[str, Any], results: Any) -> None:
    socket.setdefaulttimeout(10)
    fleet = Fleet(ids, opts)
    tick = 0.05
    end = time.monotonic() + opts["duration"]
    while (now := time.monotonic()) < end:
        fleet.turn(now, True, tick)
    drain_end = time.monotonic() + opts["drain"]
    while not fleet.idle() and (now := time.monotonic()) < drain_end:
        fleet.turn(now, False, tick)
    fleet.close()
    results.put([{"id": d.id, "produced": d.seq, "acked": d.acked, "dropped": d.dropped,
                  "lost_on_reboot": d.lost_on_reboot, "unacked": len(d.buffer) + len(d.mid_seq),
                  "offline_events": d.offline_events, "reboots": d.reboots}
                 for d in fleet.devices])
