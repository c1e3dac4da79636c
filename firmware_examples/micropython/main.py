# ruff: noqa: UP031  (MicroPython: no contextlib; %-formatting is the idiom there)
# Sensor device for ESP32 / Pico W: readings to devices/<id>/telemetry (QoS 1, persistent session),
# a retained "online"/"offline" status with a will, commands from devices/<id>/cmd, reconnect with
# exponential backoff and jitter, readings buffered in a bounded ring while the broker is away.
#
# edge-broker-manifest: client_id={id} username={id} clean_session=false keepalive=60 qos=1
# edge-broker-manifest: publish=devices/{id}/telemetry publish=devices/{id}/event
# edge-broker-manifest: will=devices/{id}/status retain=true birth=online will_payload=offline
# edge-broker-manifest: subscribe=devices/{id}/cmd

import json
import random
import time

import board
from mqtt_client import MQTTClient, MQTTException
from ringbuf import RingBuffer

TELEMETRY = "devices/%s/telemetry"
EVENT = "devices/%s/event"
STATUS = "devices/%s/status"
CMD = "devices/%s/cmd"
MIN_INTERVAL_MS = 10
MAX_INTERVAL_MS = 86400000  # a day: also within time.ticks_add's range on every port

DEFAULTS = {
    "host": "192.168.1.10",   # the gateway
    "port": 8883,
    "device_id": None,        # None: derived from the MAC (board.device_id)
    "password": None,
    "ca_file": None,          # the gateway's CA (PEM) on the device's filesystem: enables TLS
    "keepalive": 60,
    "interval_ms": 10000,     # reporting interval; the "interval" command changes it
    "buffer_size": 500,       # readings kept while offline; the oldest are dropped (counted)
    "max_inflight": 4,        # QoS 1 PUBLISHes awaiting PUBACK
    "backoff_min_ms": 1000,
    "backoff_max_ms": 60000,
    "max_readings": 0,        # >0: stop after this many readings, once all are acknowledged
}


def load_config(path="config.json"):
    config = dict(DEFAULTS)
    try:
        with open(path) as f:
            config.update(json.load(f))
    except OSError:
        pass
    return config


def log(*words):
    print(*words)


def printable(payload, limit=64):
    """A command's payload for an error answer: its first bytes, escaped if not UTF-8."""
    try:
        return payload[:limit].decode()
    except UnicodeError:
        return repr(payload[:limit])


def tls_context(ca_file):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    with open(ca_file, "rb") as f:
        ctx.load_verify_locations(cadata=f.read())
    return ctx


class Device:
    def __init__(self, config):
        self.config = config
        self.id = board.device_id(config)
        self.interval_ms = config["interval_ms"]
        self.buffer = RingBuffer(config["buffer_size"])
        self.pending = {}     # packet id -> reading payload, sent and not yet acknowledged
        self.seq = 0
        self.acked = 0
        self.stopping = False
        self.reboot_requested = False
        self.attempt = 0
        self.next_attempt = time.ticks_ms()
        self.next_reading = time.ticks_ms()
        ctx = tls_context(config["ca_file"]) if config["ca_file"] else None
        host, port = board.broker_address(config)
        self.client = MQTTClient(self.id, host, port, user=self.id, password=config["password"],
                                 keepalive=config["keepalive"], clean_session=False,
                                 ssl_context=ctx)
        self.client.set_will(STATUS % self.id, b"offline", retain=True, qos=1)
        self.client.on_message = self.on_command
        self.client.on_puback = self.on_puback

    # --- the broker connection --------------------------------------------------------------

    def try_connect(self):
        host, self.client.port = board.broker_address(self.config)
        self.client.host = self.client.server_hostname = host  # TLS checks the name asked for
        try:
            present = self.client.connect()
            for pid in self.client.inflight_order:
                if pid in self.pending:
                    log("RESEND", self.pending[pid])
            self.client.subscribe(CMD % self.id, 1)
            self.client.publish(STATUS % self.id, b"online", qos=1, retain=True)
        except Exception as e:
            # back off and try again whatever failed: the network, the broker, or TLS (on
            # MicroPython a certificate that does not verify - wrong name, not yet valid on a
            # board whose clock is not set - raises ValueError); giving up would need a reset
            self.client.close()
            self.backoff("connect failed: %r" % (e,))
            return
        self.attempt = 0
        log("CONNECTED session_present=%d" % present)

    def backoff(self, why):
        # exponential backoff with "equal jitter": half fixed, half random, so a fleet that lost
        # the gateway at the same moment does not come back at the same moment
        delay = min(self.config["backoff_max_ms"], self.config["backoff_min_ms"] << self.attempt)
        delay = delay // 2 + random.randint(0, delay // 2)
        self.attempt = min(self.attempt + 1, 16)
        self.next_attempt = time.ticks_add(time.ticks_ms(), delay)
        log("OFFLINE buffered=%d dropped=%d retry_ms=%d (%s)"
            % (len(self.buffer), self.buffer.dropped, delay, why))

    def on_puback(self, pid):
        if self.pending.pop(pid, None) is not None:
            self.acked += 1

    def on_command(self, topic, payload, retained):
        # Answer whatever arrives and return: an exception here would escape before the PUBACK,
        # and the persistent session would deliver the same command again after every boot.
        try:
            cmd = json.loads(payload)
            name = cmd["cmd"]
        except (ValueError, KeyError, TypeError):  # UnicodeError is a ValueError
            log("CMD ERROR bad command")
            self.reply({"error": "bad command", "payload": printable(payload)})
            return
        log("CMD", name)
        if name == "interval":
            ms = cmd.get("ms")
            if type(ms) not in (int, float) or ms != ms:  # not a number (bool, str, NaN...)
                log("CMD ERROR bad interval")
                self.reply({"error": "interval: ms must be a number", "ms": self.interval_ms})
                return
            self.interval_ms = int(min(MAX_INTERVAL_MS, max(MIN_INTERVAL_MS, ms)))
            self.reply({"ack": "interval", "ms": self.interval_ms})
        elif name == "stop":
            self.stopping = True
            self.reply({"ack": "stop"})
        elif name == "reboot":
            # not from inside this callback: the command's PUBACK goes out when it returns, and
            # a reboot before that would have the broker deliver "reboot" again after the boot
            self.reboot_requested = True
            self.reply({"ack": "reboot"})
        else:
            log("CMD ERROR unknown command")
            self.reply({"error": "unknown command", "cmd": name})

    def reply(self, obj):
        self.client.publish(EVENT % self.id, json.dumps(obj), qos=1)

    # --- the loop ---------------------------------------------------------------------------

    def take_reading(self):
        now = time.ticks_ms()
        if time.ticks_diff(now, self.next_reading) < 0:
            return
        self.next_reading = time.ticks_add(self.next_reading, self.interval_ms)
        if time.ticks_diff(now, self.next_reading) > 0:  # fell behind: do not burst
            self.next_reading = time.ticks_add(now, self.interval_ms)
        payload = json.dumps({"seq": self.seq, "value": board.read_sensor(),
                              "dropped": self.buffer.dropped})
        self.seq += 1
        self.buffer.push(payload)
        log("READING", payload)

    def send_buffered(self):
        while len(self.buffer) and len(self.client.inflight) < self.config["max_inflight"]:
            payload = self.buffer.pop()
            # a QoS 1 publish is kept by the client until PUBACKed, also if the send fails
            self.pending[self.client.publish(TELEMETRY % self.id, payload, qos=1)] = payload

    def done(self):
        limit = self.config["max_readings"]
        producing = not self.stopping and not (limit and self.seq >= limit)
        return not producing and not len(self.buffer) and not self.pending

    def step(self):
        if not self.stopping and not (self.config["max_readings"]
                                      and self.seq >= self.config["max_readings"]):
            self.take_reading()
        if not self.client.connected():
            if time.ticks_diff(time.ticks_ms(), self.next_attempt) >= 0:
                self.try_connect()
            else:
                time.sleep_ms(min(20, max(0, time.ticks_diff(self.next_attempt,
                                                              time.ticks_ms()))))
            return
        try:
            self.send_buffered()
            wait = max(0, time.ticks_diff(self.next_reading, time.ticks_ms()))
            self.client.poll(min(wait, 100))
        except (OSError, MQTTException) as e:
            self.client.close()
            self.backoff("connection lost: %r" % (e,))
            return
        if self.reboot_requested:
            self.finish()
            board.reboot()

    def finish(self):
        """Clean stop: retained "offline" (a clean DISCONNECT does not fire the will)."""
        try:
            pid = self.client.publish(STATUS % self.id, b"offline", qos=1, retain=True)
            deadline = time.ticks_add(time.ticks_ms(), 5000)
            while pid in self.client.inflight and time.ticks_diff(deadline, time.ticks_ms()) > 0:
                self.client.poll(100)
        except (OSError, MQTTException):
            pass
        self.client.disconnect()

    def run(self):
        board.connect_wifi(self.config)
        while not self.done():
            self.step()
        self.finish()
        log("STOPPED readings=%d acked=%d dropped=%d resent=%d"
            % (self.seq, self.acked, self.buffer.dropped, self.client.resent))


def main():
    Device(load_config()).run()


if __name__ == "__main__":
    main()
