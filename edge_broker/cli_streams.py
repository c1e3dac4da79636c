"""`edge-broker streams list|show NAME|delete NAME [--yes]` and `edge-broker replay`.

While a broker holds the data directory, every request goes to it over its admin socket
(server/admin.py, answered in server/streams.py); with none running, the commands read the
store file read-only (`store/log/replay.py`: a consistent WAL view) or, for `delete`, open
the store. `replay` prints NDJSON to stdout, one object per message: `offset`, `time`
(ISO-8601 UTC with milliseconds), `topic`, `qos`, `retain`, `payload`, `payload_encoding`
(`"utf-8"` or `"base64"`), `properties`. A replay or republish ends at the stream's last
offset when it starts: what is appended meanwhile (its own republished messages included, when
PREFIX/<topic> matches the stream's filter) is not read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from .config import Config, parse_duration
from .errors import EdgeBrokerError
from .mqtt.topics import is_valid_topic_filter, is_valid_topic_name
from .server import admin
from .server.app import store_path
from .server.streams import REPLAY_PAGE_MAX, row_json, stats_json

EXIT_NOT_FOUND: Final = 1
EXIT_USAGE: Final = 2


def add_subcommands(commands: Any, add_admin_flags: Any) -> None:
    streams = commands.add_parser(
        "streams", help="named streams: list, show, delete (safe while the broker runs)",
        description="Through the running broker when one holds the data directory, else "
                    "from the store file.")
    add_admin_flags(streams)
    actions = streams.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every stream: offsets, messages, bytes, oldest")
    add_admin_flags(listing, suppress=True)
    show = actions.add_parser("show", help="one stream")
    show.add_argument("stream", metavar="NAME")
    add_admin_flags(show, suppress=True)
    delete = actions.add_parser("delete", help="drop every message of a stream")
    delete.add_argument("stream", metavar="NAME")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_admin_flags(delete, suppress=True)

    replay = commands.add_parser(
        "replay", help="print a stream's messages as NDJSON (safe while the broker runs)",
        description="Print the messages of a stream (or of what a bridge sent to its "
                    "central log), one JSON object per line. A stream's replay ends at its "
                    "last message when the command starts.")
    add_admin_flags(replay, with_json=False)  # its output is JSON (NDJSON) already
    source = replay.add_mutually_exclusive_group(required=True)
    source.add_argument("--stream", metavar="NAME", help="a stream of this broker's log")
    source.add_argument("--bridge", metavar="NAME",
                        help="the central log a jetstream or kafka bridge writes to, read "
                             "with the bridge's configuration (see cli_bridges_replay)")
    start = replay.add_mutually_exclusive_group(required=True)
    start.add_argument("--from", dest="from_offset", metavar="OFFSET",
                       help="an offset (inclusive), earliest or latest")
    start.add_argument("--since", metavar="DURATION",
                       help='messages published in the last DURATION (seconds, or "2h", '
                            '"30min", "1d")')
    start.add_argument("--at", metavar="TIME",
                       help="messages published at or after TIME (ISO-8601 UTC, e.g. "
                            "2026-12-01T08:00:00Z)")
    replay.add_argument("--topic", metavar="FILTER",
                        help="only topics this MQTT filter matches (not a $share/ filter)")
    replay.add_argument("--limit", metavar="N", type=int, help="at most N messages")
    replay.add_argument("--republish", metavar="PREFIX",
                        help="publish the messages again into the running broker under "
                             "PREFIX/<original topic> (through its admin socket) instead of "
                             "printing them; prints how many")


def _position(args: argparse.Namespace) -> str | int | float:
    if args.from_offset is not None:
        text = str(args.from_offset).strip()
        if text in ("earliest", "latest"):
            return text
        if not text.isdigit():
            raise ValueError(f"--from: expected an offset, earliest or latest, got {text!r}")
        return int(text)
    if args.since is not None:
        text = args.since.strip()
        try:  # whole seconds are digits on a command line (an integer in TOML)
            return time.time() - parse_duration(int(text) if text.isdigit() else text)
        except ValueError as error:
            raise ValueError(f"--since: {error}") from None
    try:
        moment = datetime.fromisoformat(args.at.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--at: expected an ISO-8601 UTC time such as "
                         f"2026-12-01T08:00:00Z, got {args.at!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _check_replay(args: argparse.Namespace) -> None:
    """The options of `replay` (ValueError: a usage error) other than the start."""
    topic = args.topic
    if topic is not None and (topic.startswith("$share/") or not is_valid_topic_filter(topic)):
        # 4.7.1 (5.0), as a [[streams]] filter: '#' alone and last, '+' alone in its level.
        raise ValueError(f"--topic: expected an MQTT topic filter such as \"sensors/#\" or "
                         f"\"+/temp\" (not a $share/ filter), got {topic!r}")
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit: expected 0 or more")
    prefix = args.republish
    if prefix is not None and (not prefix or prefix.startswith("$")
                               or not is_valid_topic_name(prefix)):
        # As the broker checks it (server/streams.py, admin.publish_request).
        raise ValueError(f"--republish: expected a topic prefix such as \"replayed\" (no "
                         f"wildcards, not starting with $), got {prefix!r}")


def run_command(config: Config, args: argparse.Namespace) -> int:
    if args.command == "replay" and getattr(args, "bridge", None) is not None:
        from .cli_bridges import run_replay

        try:
            position = _position(args)
            _check_replay(args)
        except ValueError as error:
            print(f"edge-broker: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        return run_replay(config, args, position)
    data_dir = Path(config.broker.data_dir)
    command = "streams.replay" if args.command == "replay" else f"streams.{args.action}"
    request: dict[str, Any] = {"command": command}
    if getattr(args, "stream", None) is not None:
        request["stream"] = args.stream
    try:
        if command == "streams.replay":
            request["position"] = _position(args)
            request["topic"] = args.topic
            _check_replay(args)
    except ValueError as error:
        print(f"edge-broker: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if command == "streams.delete" and not args.yes and not _confirm(args.stream):
        print("edge-broker: not deleted", file=sys.stderr)
        return EXIT_NOT_FOUND
    running = admin.broker_running(data_dir)
    try:
        if command == "streams.replay" and args.republish is not None:
            if not running:
                print("edge-broker: --republish needs the broker running on "
                      f"{data_dir}", file=sys.stderr)
                return EXIT_USAGE
            return _republish(config, dict(request, command="streams.republish",
                                           prefix=args.republish), args.limit)
        if command == "streams.replay":
            return _replay(config, request, args.limit, running)
        reply = asyncio.run(_ask(config, request) if running else _from_file(config, request))
    except (OSError, EdgeBrokerError) as error:
        print(f"edge-broker: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if "error" in reply:
        print(f"edge-broker: {reply['error']}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(_render(command, reply, args))
    return 0 if reply.get("deleted", True) else EXIT_NOT_FOUND


def _confirm(name: str) -> bool:
    if not sys.stdin.isatty():
        print(f"edge-broker: refusing to delete stream {name!r} without --yes "
              "(stdin is not a terminal)", file=sys.stderr)
        return False
    answer = input(f"Delete every message of stream {name!r}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


async def _ask(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    try:
        return await admin.admin_request(Path(config.broker.data_dir), request)
    except (OSError, TimeoutError) as error:
        raise EdgeBrokerError(f"the broker's admin socket does not answer ({error})") from None


async def _from_file(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    from .store.log.replay import open_read_only, stream_stats

    path = store_path(config)
    command = request["command"]
    missing = _no_store(config)
    if missing is not None:
        return {"error": missing}
    if command == "streams.delete":
        from .store.sqlite import SqliteStore

        store = SqliteStore(path, durability=config.storage.durability,
                            streams=config.streams)
        await store.open()
        try:
            if request["stream"] not in store.stream_names:
                return {"error": f"no stream {request['stream']!r} in the configuration"}
            return {"deleted": await store.delete_stream(request["stream"])}
        finally:
            await store.close()
    opened = open_read_only(path)
    if opened is None:
        return {"streams": []} if command == "streams.list" else {
            "error": f"no stream {request.get('stream')!r}"}
    log, conn = opened
    try:
        if command == "streams.list":
            return {"streams": [stats_json(stream_stats(log, conn, name))
                                for name in sorted(log.streams)]}
        if request["stream"] not in log.streams:
            return {"error": f"no stream {request['stream']!r}"}
        return {"stream": stats_json(stream_stats(log, conn, request["stream"]))}
    finally:
        conn.close()


def _no_store(config: Config) -> str | None:
    """Why no broker running means nothing to read, as `sessions` and `store stats` say
    (cli_admin): not "no streams", which a mistyped --data-dir would look like."""
    if config.storage.persistence != "sqlite":
        return 'streams need [storage] persistence = "sqlite"'
    return admin.missing_store_file(store_path(config))


def _replay(config: Config, request: dict[str, Any], limit: int | None,
            running: bool) -> int:
    rows = _rows_from_broker(config, request, limit) if running else _rows_from_file(
        config, request, limit)
    out = sys.stdout
    try:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    except KeyError as error:
        print(f"edge-broker: no stream {error.args[0]!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except _Refused as error:
        print(f"edge-broker: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    out.flush()
    return 0


class _Refused(Exception):
    pass


def _republish(config: Config, request: dict[str, Any], limit: int | None) -> int:
    """Page by page through the broker, up to the stream's last offset when it starts: each
    page is published and committed before the next is asked for."""
    total = expired = 0
    try:
        for reply in _pages(config, request, limit):
            total += int(reply["republished"])
            expired += int(reply.get("expired", 0))
    except _Refused as error:
        print(f"edge-broker: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    prefix = str(request["prefix"]).rstrip("/")
    gone = f" ({expired} expired, not published)" if expired else ""
    print(f"republished {total} message(s) of stream {request['stream']} under {prefix}/{gone}")
    return 0


def _rows_from_broker(config: Config, request: dict[str, Any],
                      limit: int | None) -> Iterator[dict[str, Any]]:
    for reply in _pages(config, request, limit):
        yield from reply["rows"]


def _pages(config: Config, request: dict[str, Any],
           limit: int | None) -> Iterator[dict[str, Any]]:
    """The broker's answers to `request` (`streams.replay` or `streams.republish`) page by
    page, at most `limit` messages in all, up to the stream's last offset when the first is
    asked for (`until`). The broker bounds a page by rows and by bytes (server/streams.py
    `REPLAY_PAGE_MAX`, `REPLAY_PAGE_BYTES`)."""
    shown = asyncio.run(_ask(config, {"command": "streams.show", "stream": request["stream"]}))
    if "error" in shown:
        raise _Refused(shown["error"])
    end = shown["stream"]["last_offset"]
    if end is None:
        return  # an empty stream
    left = limit
    while left is None or left > 0:
        page = dict(request, until=end, limit=REPLAY_PAGE_MAX if left is None
                    else min(left, REPLAY_PAGE_MAX))
        reply = asyncio.run(_ask(config, page))
        if "error" in reply:
            raise _Refused(reply["error"])
        last = (reply["rows"][-1]["offset"] if reply.get("rows")
                else reply.get("last_offset"))
        if last is None:
            return  # nothing more up to `end`
        if "rows" in reply:  # (a broker older than `until` goes on past it)
            reply = dict(reply, rows=[row for row in reply["rows"] if row["offset"] <= end])
            if not reply["rows"]:
                return
        yield reply
        if left is not None:
            left -= len(reply["rows"]) if "rows" in reply else (
                int(reply["republished"]) + int(reply.get("expired", 0)))
        if last >= end:
            return
        request = dict(request, position=int(last) + 1)


def _rows_from_file(config: Config, request: dict[str, Any],
                    limit: int | None) -> Iterator[dict[str, Any]]:
    from .store.log.replay import open_read_only, replay, stream_start

    missing = _no_store(config)
    if missing is not None:
        raise _Refused(missing)
    opened = open_read_only(store_path(config))
    if opened is None:
        raise _Refused(f"no stream {request['stream']!r}")
    log, conn = opened
    try:
        name = request["stream"]
        if name not in log.streams:
            raise _Refused(f"no stream {name!r}")
        start = stream_start(log, conn, name, request["position"])
        for row in replay(log, conn, name, start, request.get("topic"), limit):
            yield row_json(row)
    finally:
        conn.close()


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _render(command: str, reply: dict[str, Any], args: argparse.Namespace) -> str:
    if command == "streams.delete":
        return f"stream {args.stream}: every message deleted"
    streams = reply["streams"] if command == "streams.list" else [reply["stream"]]
    rows = [("STREAM", "FIRST", "LAST", "MESSAGES", "BYTES", "OLDEST")]
    for s in streams:
        rows.append((s["name"], "-" if s["first_offset"] is None else str(s["first_offset"]),
                     "-" if s["last_offset"] is None else str(s["last_offset"]),
                     str(s["messages"]), str(s["bytes"]), _when(s["oldest_at"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
