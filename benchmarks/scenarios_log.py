"""S9: the append-only log (issue 8). Two parts, each on a fresh broker:

(a) Replay. edge-broker runs with a `[[streams]]` stream `s9` (filter `bench/s9/#`, bounds
    large enough to keep everything). The load generator fills it with `s9_messages`
    (1,000,000; --quick: 10,000) QoS 0 PUBLISHes of 100 bytes at full speed (what a gateway's
    sensors do; no subscriber, so the stream is the only taker), and the runner waits until
    `edge-broker streams list` counts them all. Then one MQTT 5 subscriber (its own process,
    hand-encoded v5 packets) subscribes to `$stream/s9` at QoS 0 with the user property
    `stream-offset = earliest` and reads the whole history. Figure = messages / (last one
    received - SUBSCRIBE sent), in msgs/s; the target compares it with the same run's S1
    (live QoS 0, 1 -> 1). Checks: every message replayed, the first and last carry the
    stream's first and last `stream-offset`, each once. Also reported: bytes on disk per
    stored 100-byte message = the store's pages in use (`edge-broker store stats`,
    `used_bytes`) / messages in the stream; file size (database + WAL) in the details.
    mosquitto and amqtt have no streams: not run.

(b) Ingest into a stream and 10 offline sessions at once. Ten clean-session-0 clients
    subscribe to `sensors/#` at QoS 1 and disconnect (as in S4); edge-broker also has a
    `sensors/#` stream, with `durability = "fsync"`. One QoS 1 publisher (window 100)
    publishes to `sensors/s9` for the duration, capped at `s4_max_messages`. Figure = PUBACKed
    / (last PUBACK - first send). mosquitto and amqtt run the same ingest into their 10
    offline sessions (in memory, as in S4), so the ratio compares durable ingest into the log
    with an in-memory one. Check: every message acknowledged. The bytes on disk per message
    after this ingest are in the details (not judged: they include the sessions' share).

The edge-broker config is brokers.edge_config's (the same [mqtt] limits as mosquitto's) plus
the `[[streams]]` table; everything else (ports, workdir, death signal, readiness by CONNECT)
is brokers.py's machinery.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import brokers, loadgen, wire
from .scenarios import Case, Result, _hard, _store_sample

REPLAY_STREAM = "s9"
REPLAY_TOPIC = "bench/s9/replay"
INGEST_TOPIC = "sensors/s9"
FILL_TIMEOUT_S = 600.0  # 1,000,000 QoS 0 messages into the log, on a loaded 2-core machine


# --------------------------------------------------------------------------- edge with streams


def edge_streams_config(port: int, data_dir: Path, durability: str | None,
                        streams: list[dict[str, Any]],
                        persistence: str | None = None) -> str:
    """brokers.edge_config plus one `[[streams]]` table per entry of `streams`."""
    lines = [brokers.edge_config(port, data_dir, durability, persistence)]
    for stream in streams:
        lines.append("[[streams]]")
        for key, value in stream.items():
            text = (("true" if value else "false") if isinstance(value, bool)
                    else str(value) if isinstance(value, int)
                    else brokers._toml_str(str(value)))
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


@contextlib.contextmanager
def launch_edge(case: Case, streams: list[dict[str, Any]],
                durability: str | None = None) -> Iterator[brokers.RunningBroker]:
    """edge-broker with `[[streams]]`, started and stopped as brokers.start does. Needs the
    config form of the command (`--edge-cmd` with `{config}`): flags cannot name streams."""
    template = case.opts.edge_cmd or brokers.EDGE_DEFAULT_CMD
    if "{config}" not in template:
        raise brokers.BrokerStartError(
            f"S9 needs [[streams]] in a config file; --edge-cmd {template!r} has no {{config}}")
    why = brokers.available("edge", case.opts.edge_cmd)
    if why:
        raise brokers.BrokerUnavailable(why)
    workdir = Path(tempfile.mkdtemp(prefix="bench-edge-s9-"))
    data_dir = workdir / "data"
    data_dir.mkdir()
    port = brokers.free_port()
    durability = durability or case.opts.edge_durability
    config_path = workdir / "edge-broker.toml"
    config_path.write_text(edge_streams_config(port, data_dir, durability, streams,
                                               case.opts.edge_persistence))
    cmd = brokers.edge_command(template, port=port, config=config_path, data_dir=data_dir)
    if case.pin_cpu is not None:
        cmd = ["taskset", "-c", str(case.pin_cpu), *cmd]
    settings = {"persistence": case.opts.edge_persistence or "(edge-broker default)",
                "durability": durability or "(edge-broker default)",
                **{k: brokers.MOSQUITTO_SETTINGS[k] for k in (
                    "max_inflight_messages", "max_queued_messages", "max_queued_bytes")},
                "S9 streams": "; ".join(json.dumps(s, sort_keys=True) for s in streams),
                "command": " ".join(cmd)}
    log = open(workdir / "broker.log", "wb")  # noqa: SIM115 - lives as long as the broker
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=workdir, env=brokers._edge_env(), start_new_session=True,
                            preexec_fn=brokers.die_with_parent)  # the runner has no threads
    log.close()
    rb = brokers.RunningBroker("edge", proc, port, workdir, cmd, config_path, settings,
                               data_dir=data_dir)
    try:
        brokers._wait_ready(rb, 20.0)
    except BaseException:
        rb.stop()
        raise
    for key, value in settings.items():
        case.settings.setdefault(key, value)
    try:
        yield rb
    finally:
        alive = rb.proc.poll() is None
        tail = rb.log_tail() if not alive else ""
        rb.stop()
        if not alive:
            raise RuntimeError(f"edge died during S9 (exit {rb.proc.returncode}):\n{tail}")


def _edge_cli(rb: brokers.RunningBroker, *args: str, timeout_s: float = 60.0) -> dict:
    """`edge-broker ARGS --data-dir DIR --json ...` against the running broker, as JSON."""
    assert rb.data_dir is not None
    cmd = [sys.executable, "-m", "edge_broker", args[0], "--data-dir", str(rb.data_dir),
           "--json", *args[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                       cwd=rb.workdir, env=brokers._edge_env(), stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` exited with {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")
    reply: dict = json.loads(r.stdout)
    return reply


def stream_stats(rb: brokers.RunningBroker, name: str) -> dict:
    """{"first_offset", "last_offset", "messages", "bytes", ...} of one stream."""
    reply = _edge_cli(rb, "streams", "list")
    for stream in reply.get("streams", []):
        if stream.get("name") == name:
            return dict(stream)
    raise RuntimeError(f"no stream {name!r} in `edge-broker streams list`: {reply}")


def disk_bytes(rb: brokers.RunningBroker, errors: list[str]) -> dict[str, int | None]:
    """Pages in use (the store's `used_bytes`) and the files' size (database + WAL)."""
    assert rb.data_dir is not None
    files = sum(p.stat().st_size for p in rb.data_dir.iterdir()
                if p.name.startswith("edge-broker.db") and p.is_file())
    stats = _store_sample(rb, errors) or {}
    store = stats.get("store", {})
    return {"used_bytes": store.get("used_bytes"), "file_bytes": files}


# --------------------------------------------------------------------------- the v5 replayer


def _v5_utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def _v5_connect(client_id: str, keepalive_s: int = 600) -> bytes:
    """CONNECT 3.1 (5.0): clean start, no properties, username `bench` (as the load
    generator's clients)."""
    body = (_v5_utf8("MQTT") + bytes((5, 0x82)) + struct.pack(">H", keepalive_s) + b"\x00"
            + _v5_utf8(client_id) + _v5_utf8(wire.USERNAME))
    return b"\x10" + wire.varint(len(body)) + body


def _v5_subscribe(topic_filter: str, position: str) -> bytes:
    """SUBSCRIBE 3.8 (5.0) at QoS 0 with the user property (0x26) stream-offset."""
    prop = b"\x26" + _v5_utf8("stream-offset") + _v5_utf8(position)
    body = struct.pack(">H", 1) + wire.varint(len(prop)) + prop + _v5_utf8(topic_filter) + b"\x00"
    return b"\x82" + wire.varint(len(body)) + body


def _decode_v5_publish(body: bytes) -> tuple[str, int | None, int]:
    """(topic, stream-offset, payload length) of a QoS 0 PUBLISH body 3.3 (5.0)."""
    (tlen,) = struct.unpack_from(">H", body, 0)
    topic = body[2:2 + tlen].decode()
    i = 2 + tlen
    plen, shift = 0, 0
    while True:
        byte = body[i]
        i += 1
        plen |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    end = i + plen
    offset = None
    while i < end:
        pid = body[i]
        i += 1
        if pid != 0x26:  # a replayed message carries only what the publisher sent (none)
            break
        (klen,) = struct.unpack_from(">H", body, i)
        key = body[i + 2:i + 2 + klen].decode()
        i += 2 + klen
        (vlen,) = struct.unpack_from(">H", body, i)
        value = body[i + 2:i + 2 + vlen].decode()
        i += 2 + vlen
        if key == "stream-offset":
            offset = int(value)
    return topic, offset, len(body) - end


def _replayer(host: str, port: int, stream: str, expected: int, cpus: list[int] | None,
              out: Any, deadline: float) -> None:
    """Worker: subscribe to `$stream/<stream>` from `earliest`, count PUBLISHes until
    `expected` arrived (or nothing for 10 s, or the deadline)."""
    loadgen._pin(cpus)
    try:
        sock = socket.create_connection((host, port), timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.sendall(_v5_connect("bench-s9-replay"))
        buf = bytearray()
        b0, body = wire.recv_packet(sock, buf, time.monotonic() + 10.0)
        if b0 >> 4 != wire.CONNACK or len(body) < 2 or body[1] != 0:
            raise wire.ProtocolError(f"CONNACK {b0:#x} {body[:2].hex()}")
    except Exception as exc:
        out.put(("error", "replay", f"replayer connect: {exc!r}"))
        return
    out.put(("ready", "replay", None))
    perf = time.perf_counter_ns
    first_body = last_body = b""
    count = 0
    suback: int | None = None
    t_first_ns = t_last_ns = 0
    data = bytes(buf)
    idle_s = 10.0
    t0_ns = perf()
    sock.sendall(_v5_subscribe(f"$stream/{stream}", "earliest"))
    try:
        while count < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(min(idle_s, left))
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                break
            if not chunk:
                break
            data = data + chunk if data else chunk
            now_ns = perf()
            i = 0
            n = len(data)
            while i + 2 <= n:
                b0 = data[i]
                rl = data[i + 1]
                j = i + 2
                if rl & 0x80:  # remaining length over 127 bytes (every replayed PUBLISH)
                    rl &= 0x7F
                    shift = 7
                    while True:
                        if j >= n:
                            rl = -1
                            break
                        byte = data[j]
                        j += 1
                        rl |= (byte & 0x7F) << shift
                        if not byte & 0x80:
                            break
                        shift += 7
                    if rl < 0:
                        break
                if j + rl > n:
                    break
                kind = b0 >> 4
                if kind == wire.PUBLISH:
                    if count == 0:
                        first_body = bytes(data[j:j + rl])
                        t_first_ns = now_ns
                    count += 1
                    if count == expected:
                        last_body = bytes(data[j:j + rl])
                elif kind == wire.SUBACK:
                    suback = data[j + 3] if rl > 3 else -1  # packet id, properties length 0
                i = j + rl
            data = data[i:]
            t_last_ns = now_ns
    except Exception as exc:
        out.put(("error", "replay", f"replayer: {exc!r}"))
        return
    with contextlib.suppress(OSError):
        sock.sendall(wire.DISCONNECT)
        sock.close()
    first = _decode_v5_publish(first_body) if first_body else None
    last = _decode_v5_publish(last_body) if last_body else None
    out.put(("done", "replay", {"received": count, "suback": suback, "t0_ns": t0_ns,
                                "t_first_ns": t_first_ns, "t_last_ns": t_last_ns,
                                "first": first, "last": last, "cpu_s": loadgen._cpu_s()}))


def replay(host: str, port: int, stream: str, expected: int, *, cpus: list[int] | None = None,
           hard_timeout_s: float = 600.0) -> dict:
    loadgen.require_loopback(host)
    crew = loadgen.Crew(hard_timeout_s)
    try:
        crew.start(_replayer, host, port, stream, expected, cpus, crew.out, crew.deadline)
        crew.wait_for({"replay"}, "done")
    finally:
        crew.close()
    result: dict = crew.results["replay"]
    return result


# --------------------------------------------------------------------------- S9


def s9(case: Case) -> Result:
    res = Result()
    if case.broker == "edge" and case.opts.edge_persistence != "memory":
        _replay_part(case, res)
    else:
        res.details["replay"] = {"skipped": "edge-broker only (streams in its SQLite store)"}
    _ingest_part(case, res)
    return res


def _wait_stream(rb: brokers.RunningBroker, name: str, count: int, timeout_s: float) -> dict:
    """Poll `streams list` until the stream holds `count` messages or stops growing."""
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    unchanged = 0
    while time.monotonic() < deadline:
        stats = stream_stats(rb, name)
        if stats.get("messages", 0) >= count:
            return stats
        unchanged = unchanged + 1 if stats == last else 0
        if unchanged >= 5:  # five polls without growth: what is stored is all there will be
            return stats
        last = stats
        time.sleep(1.0)  # polling interval, bounded by the deadline
    return last


def _replay_part(case: Case, res: Result) -> None:
    o = case.opts
    n = 10_000 if o.quick else o.s9_messages
    stream = {"name": REPLAY_STREAM, "filter": "bench/s9/#", "max_age": "30d",
              "max_bytes": 64 * 1024 * 1024 * 1024}
    errors: list[str] = []
    with launch_edge(case, [stream]) as rb:
        t0 = time.monotonic()
        fill = loadgen.publish_only(
            rb.host, rb.port,
            loadgen.PubSpec(topic=REPLAY_TOPIC, qos=0, duration_s=FILL_TIMEOUT_S,
                            max_messages=n, client_id="bench-s9-fill"),
            cpus=o.loadgen_cpus, hard_timeout_s=FILL_TIMEOUT_S + 60)
        stats = _wait_stream(rb, REPLAY_STREAM, n, FILL_TIMEOUT_S)
        fill_s = time.monotonic() - t0
        stored = int(stats.get("messages") or 0)
        settle_s = brokers.wait_quiet(rb.pid)
        disk = disk_bytes(rb, errors)
        rss0 = brokers.rss_kb(rb.pid)
        meter = brokers.CpuMeter(rb.pid)
        r = replay(rb.host, rb.port, REPLAY_STREAM, stored, cpus=o.loadgen_cpus,
                   hard_timeout_s=_hard(o, FILL_TIMEOUT_S))
        cpu = meter.percent()
        rss1 = brokers.rss_kb(rb.pid)
    window_s = (r["t_last_ns"] - r["t0_ns"]) / 1e9 if r["received"] else 0.0
    res.figures["S9.replay_msgs_per_s"] = r["received"] / window_s if window_s else None
    used = disk["used_bytes"]
    res.figures["S9.bytes_per_msg"] = (used or disk["file_bytes"] or 0) / stored if stored \
        else None
    res.details["replay"] = {
        "messages_published": fill["sent"], "stream": stats, "fill_s": round(fill_s, 1),
        "fill_publish_s": round(fill["elapsed_s"], 2), "settle_s": round(settle_s, 2),
        "disk": disk, "disk_errors": errors,
        "bytes_per_msg_basis": "used_bytes" if used else "file_bytes",
        "file_bytes_per_msg": round(disk["file_bytes"] / stored, 1) if stored else None,
        "received": r["received"], "window_s": round(window_s, 3),
        "first_message_after_s": round((r["t_first_ns"] - r["t0_ns"]) / 1e9, 3)
        if r["t_first_ns"] else None,
        "first": r["first"], "last": r["last"], "suback": r["suback"],
        "broker_cpu_pct": round(cpu, 1), "replayer_cpu_s": round(r["cpu_s"], 2),
        "rss_kb_before": rss0, "rss_kb_after": rss1}
    res.check("S9 stream filled", stored == n,
              f"{stored:,}/{n:,} messages in stream {REPLAY_STREAM} after the fill")
    res.check("S9 replayed", r["suback"] == 0 and r["received"] == stored,
              f"{r['received']:,}/{stored:,} replayed (SUBACK {r['suback']})")
    first, last = r["first"], r["last"]
    ends = (first is not None and last is not None
            and (first[1], last[1]) == (stats.get("first_offset"), stats.get("last_offset"))
            and first[0] == last[0] == REPLAY_TOPIC and first[2] == last[2] == 100)
    res.check("S9 replay offsets", ends,
              f"first/last stream-offset {first and first[1]}/{last and last[1]} (topic "
              f"{first and first[0]}, {first and first[2]}-byte payload), stream "
              f"{stats.get('first_offset')}/{stats.get('last_offset')}")


def _ingest_part(case: Case, res: Result) -> None:
    o = case.opts
    ids = [f"bench-s9-sub{k}" for k in range(10)]
    cap = 500 if o.quick else o.s4_max_messages
    errors: list[str] = []
    edge = case.broker == "edge" and o.edge_persistence != "memory"
    launcher = (launch_edge(case, [{"name": "sensors", "filter": "sensors/#"}],
                            durability="fsync") if edge else case.launch())
    with launcher as rb:
        loadgen.setup_offline_sessions(rb.host, rb.port, "sensors/#", ids)
        brokers.wait_quiet(rb.pid)
        meter = brokers.CpuMeter(rb.pid)
        p = loadgen.publish_only(rb.host, rb.port,
                                 loadgen.PubSpec(topic=INGEST_TOPIC, qos=1,
                                                 duration_s=o.duration_s, window=100,
                                                 max_messages=cap, ack_wait_s=30.0,
                                                 client_id="bench-s9-pub"),
                                 cpus=o.loadgen_cpus, hard_timeout_s=_hard(o, 60))
        cpu = meter.percent()
        stats = stream_stats(rb, "sensors") if edge else None
        disk = disk_bytes(rb, errors) if edge else None
    ingest_s = (p["t_done_ns"] - p["t_first_ns"]) / 1e9
    res.figures["S9.ingest_msgs_per_s"] = p["acked"] / ingest_s if ingest_s else None
    details: dict[str, Any] = {"published": p["sent"], "acked": p["acked"],
                               "ingest_s": round(ingest_s, 3), "sessions": len(ids),
                               "broker_cpu_pct": round(cpu, 1),
                               "durability": "fsync" if edge else "(in memory)"}
    if edge:
        details.update(stream=stats, disk=disk, disk_errors=errors)
        if p["acked"] and disk is not None:
            details["bytes_per_msg"] = round((disk["used_bytes"] or disk["file_bytes"] or 0)
                                             / p["acked"], 1)
        res.check("S9 ingest stream", stats is not None and stats.get("messages") == p["acked"],
                  f"{stats and stats.get('messages')}/{p['acked']} in stream sensors")
    res.details["ingest"] = details
    res.check("S9 ingest acked", p["acked"] == p["sent"], f"{p['acked']}/{p['sent']} PUBACKs")


if __name__ == "__main__":  # pragma: no cover - use `python -m benchmarks --scenarios S9`
    print("run: python -m benchmarks --brokers edge,mosquitto --scenarios S1,S9", file=sys.stderr)
    sys.exit(os.EX_USAGE)
