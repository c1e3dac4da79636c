"""The security scenarios (issue 10): S1 and S3 through TLS, and S3 with a 1,000-rule ACL.

| id  | what |
|-----|------|
| S11 | S1 (QoS 0, 1 -> 1, max no-loss rate) over a TLS listener |
| S12 | S3 (QoS 1, 1 -> 1, window 100) over a TLS listener |
| S13 | S3 on plain TCP with a password file and a 1,000-rule ACL, allow_anonymous false |

edge-broker and mosquitto get the same certificate, key, CA, password file and ACL
(`security.py`), made once per run; amqtt is not run. S11/S12 are anonymous, like S1/S3, so
that the ratio S11/S1 (S12/S3) is the cost of TLS alone; S13 is plain TCP, so that S13/S3 is
the cost of authentication and the ACL alone. S13 first checks that the ACL is in force
(`_acl_in_force`): a write to a topic the user may only read is not delivered, and a
CONNECT without the password is refused.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from . import brokers, loadgen, security, wire
from .scenarios import Case, Result, _max_lossless, _qos1_window
from .security import Security


def _secure(case: Case, sec: Security) -> Case:
    return replace(case, sec=sec, settings={})


def _tls_details(rb: Any, res: Result) -> None:
    try:
        res.details["tls"] = security.negotiated(rb.host, rb.port, rb.cafile, rb.password)
    except Exception as exc:   # informative only
        res.details["tls"] = {"error": repr(exc)}


def s11(case: Case) -> Result:
    res = Result()
    sc = _secure(case, Security(tls=True))
    with sc.launch() as rb:
        _tls_details(rb, res)
        _max_lossless(rb, sc, "bench/s11", 1, 1, res, "S11.msgs_per_s")
        res.details["close_at_once"] = _close_at_once(rb, sc)
    case.settings = sc.settings
    return res


def _close_at_once(rb: Any, case: Case) -> dict[str, Any]:
    """Not a figure: one more full-speed QoS 0 run whose TLS publisher closes the connection
    right after its DISCONNECT, as S1's plain publisher does (S11's own runs wait for the
    broker to close first). Records what arrived of what was sent before the DISCONNECT."""
    o = case.opts
    pub = loadgen.PubSpec(topic="bench/s11c", duration_s=o.duration_s, cafile=rb.cafile,
                          close_wait_s=0.0)
    sub = loadgen.SubSpec(topic="bench/s11c", client_ids=["bench-s11c-sub"], idle_s=3.0,
                          drain_s=max(5.0, o.duration_s), cafile=rb.cafile)
    brokers.wait_quiet(rb.pid)
    r = loadgen.run_flow(rb.host, rb.port, pub, sub, hard_timeout_s=o.duration_s * 3 + 40)
    return {k: r[k] for k in ("published", "delivered", "lost", "delivered_rate")}


def s12(case: Case) -> Result:
    res = Result()
    sc = _secure(case, Security(tls=True))
    with sc.launch() as rb:
        _tls_details(rb, res)
        _qos1_window(rb, sc, "bench/s12", "S12.msgs_per_s", res)
    case.settings = sc.settings
    return res


def s13(case: Case) -> Result:
    res = Result()
    sc = _secure(case, Security(acl=True))
    with sc.launch() as rb:
        ok, detail = _acl_in_force(rb.host, rb.port, rb.password)
        res.check("S13 ACL in force", ok, detail)
        res.details["acl_rules"] = security.ACL_RULES
        res.details["acl_head"] = security.acl_text().splitlines()[:4]
        res.details["acl_tail"] = security.acl_text().splitlines()[-1:]
        _qos1_window(rb, sc, "bench/s13", "S13.msgs_per_s", res)
    case.settings = sc.settings
    return res


def _acl_in_force(host: str, port: int, password: str | None,
                  timeout_s: float = 5.0) -> tuple[bool, str]:
    """The broker applies the password file and the ACL: `bench` without its password is
    refused;
    `bench` subscribes to a topic it may read (a device's telemetry) and to one it may
    read and write (its own), publishes QoS 1 to both, and receives only its own (the
    telemetry rule is `read`: the write is refused; 3.1.1 still acknowledges it)."""
    problems = []
    try:
        s, _, _ = wire.open_session(host, port, "bench-acl-anon", timeout_s=timeout_s,
                                    password=None)
        s.close()
        problems.append("a CONNECT as bench without its password was accepted")
    except wire.ProtocolError:
        pass   # CONNACK 4/5: refused, as it should be
    denied = "site/dev0000/telemetry/x"
    allowed = "bench/acl-check"
    sock, buf, _ = wire.open_session(host, port, "bench-acl-check", timeout_s=timeout_s,
                                     password=password, subscribe_to=(allowed, 1))
    deadline = time.monotonic() + timeout_s
    try:
        sock.sendall(wire.subscribe(2, "site/dev0000/telemetry/#", 1))
        while True:
            b0, _body = wire.recv_packet(sock, buf, deadline)
            if b0 >> 4 == wire.SUBACK:
                break
        # The denied write first: if it were delivered, it would come before the allowed one.
        sock.sendall(wire.publish(denied, b"denied", qos=1, packet_id=3)
                     + wire.publish(allowed, b"allowed", qos=1, packet_id=4))
        got: list[str] = []
        while allowed not in got:
            b0, body = wire.recv_packet(sock, buf, deadline)
            if b0 >> 4 == wire.PUBLISH:
                n = (body[0] << 8) | body[1]
                got.append(body[2:2 + n].decode())
                if b0 & 0x06:
                    sock.sendall(wire.puback(int.from_bytes(body[2 + n:4 + n], "big")))
        if denied in got:
            problems.append(f"a write to {denied} (a read-only rule) was delivered")
        sock.sendall(wire.DISCONNECT)
    except (OSError, TimeoutError, wire.ProtocolError) as exc:
        problems.append(f"ACL probe: {exc!r}")
    finally:
        sock.close()
    return (not problems, "; ".join(problems) or
            f"no password refused; {denied} write not delivered, {allowed} delivered "
            f"({security.ACL_RULES} rules)")
