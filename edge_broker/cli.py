"""The `edge-broker` command.

    edge-broker [--config FILE] [--host H] [--port P] [--data-dir DIR] [--log-level LEVEL]
    edge-broker run [same flags]
    edge-broker check-config FILE
    edge-broker sessions list|show|delete [CLIENT] [--config FILE | --data-dir DIR] [--json]
    edge-broker store stats [--config FILE | --data-dir DIR] [--json]
    edge-broker status [--config FILE | --data-dir DIR] [--json]
    edge-broker streams list|show NAME|delete NAME [--yes] [--config FILE | --data-dir DIR]
    edge-broker replay --stream NAME (--from OFFSET | --since 2h | --at TIME) [--topic F]
                       [--limit N] [--republish PREFIX]   (see cli_streams)
    edge-broker replay --bridge NAME (same options: JetStream or Kafka history; cli_bridges)
    edge-broker bridges status [NAME] [--config FILE | --data-dir DIR] [--json]
    edge-broker passwd [-c | -D] [--password-stdin] [--scrypt] FILE USER
    edge-broker certs init-ca|server|device|revoke|crl DIR ...   (see cli_security)
    (the flags of sessions and store may also come before the action)
    edge-broker --version

Exit codes: 0 success; 1 check-config found a problem; 2 a usage or configuration error at
start-up (the systemd unit does not restart on 2: retrying cannot fix a bad file); otherwise
whatever `edge_broker.server.run.main` returns.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Final

from edge_broker.config import LOG_LEVELS, Config, ListenerConfig, apply_overrides, load_config
from edge_broker.dist import installed_version
from edge_broker.errors import ConfigError
from edge_broker.logfilter import LibraryRepeats

PROG: Final = "edge-broker"
EXIT_CHECK_FAILED: Final = 1
EXIT_CONFIG_ERROR: Final = 2


_RUN_FLAGS: Final = ("config", "host", "port", "data_dir", "log_level")
_LOG_HANDLER_NAME: Final = "edge-broker-stderr"

log = logging.getLogger(__name__)


def version() -> str:
    """The installed distribution's version ("unknown" when run from an uninstalled tree)."""
    return installed_version() or "unknown (not installed)"


class _VersionAction(argparse.Action):
    """`--version`: the version is looked up only when asked for (not for every parse)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"{PROG} {version()}")  # on stdout, as argparse's own "version" action
        parser.exit()


def _add_run_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # On the `run` subparser the defaults are SUPPRESS so that a flag given before `run`
    # (edge-broker --port 1884 run) is not reset by the subparser's own default.
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", metavar="FILE", default=default,
                        help="TOML configuration file (default: the built-in defaults)")
    parser.add_argument("--host", metavar="H", default=default,
                        help="address of the first listener (replaces the file's)")
    parser.add_argument("--port", metavar="P", type=int, default=default,
                        help="port of the first listener (replaces the file's; 0 = any free)")
    parser.add_argument("--data-dir", metavar="DIR", default=default,
                        help="replaces [broker] data_dir")
    parser.add_argument("--log-level", metavar="LEVEL", type=str.lower, choices=LOG_LEVELS,
                        default=default, help="replaces [log] level: " + ", ".join(LOG_LEVELS))
    parser.add_argument("--recover", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="if the store file is damaged, move it aside (to "
                             "<file>.corrupt-<time>) and start with an empty store")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="MQTT 3.1.1 and 5.0 broker for IoT edge gateways. "
                    "Without a command, runs the broker.",
    )
    parser.add_argument("--version", action=_VersionAction)
    _add_run_flags(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the broker (the default command)",
                              description="Run the broker until SIGTERM or SIGINT.")
    _add_run_flags(run, suppress=True)

    check = commands.add_parser(
        "check-config", help="validate a configuration file and summarise it",
        description="Validate FILE and read what the broker reads before it listens (the "
                    "[auth] password and ACL files, TLS listeners' certificates, keys, CA "
                    "and CRL), without starting it; print a summary and exit 0, or print "
                    "the problem to stderr and exit 1.")
    check.add_argument("file", metavar="FILE")

    sessions = commands.add_parser(
        "sessions", help="list, show or delete sessions (safe while the broker runs)",
        description="Through the running broker when one holds the data directory, else "
                    "from the store file.")
    _add_admin_flags(sessions)
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every session, one line each")
    _add_admin_flags(listing, suppress=True)
    show = actions.add_parser("show", help="one session: subscriptions and queue")
    show.add_argument("client_id", metavar="CLIENT")
    _add_admin_flags(show, suppress=True)
    delete = actions.add_parser("delete", help="end a session and drop its queue "
                                "(a connected client is disconnected with 0x98)")
    delete.add_argument("client_id", metavar="CLIENT")
    _add_admin_flags(delete, suppress=True)

    store = commands.add_parser("store", help="store statistics (safe while the broker runs)")
    _add_admin_flags(store)
    store_actions = store.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = commands.add_parser(
        "status", help="one screen with what /metrics says (asks the running broker)",
        description="Clients, sessions, traffic, drops, queues, the store and the process, "
                    "from the broker running on the data directory; exit 3 if none runs.")
    _add_admin_flags(status)

    stats = store_actions.add_parser("stats", help="sessions, queued messages and bytes, "
                                     "oldest message, file size")
    _add_admin_flags(stats, suppress=True)

    # passwd and certs: their parsers and handlers live in cli_security.
    importlib.import_module("edge_broker.cli_security").add_subcommands(commands)

    # streams and replay: their parsers and handlers live in cli_streams.
    importlib.import_module("edge_broker.cli_streams").add_subcommands(commands,
                                                                       _add_admin_flags)

    # bridges (status): its parser and handler live in cli_bridges.
    importlib.import_module("edge_broker.cli_bridges").add_subcommands(commands,
                                                                       _add_admin_flags)

    # Later subcommands go here: add a subparser above and its handler to _COMMANDS below.
    return parser


def _add_admin_flags(parser: argparse.ArgumentParser, *, suppress: bool = False,
                     with_json: bool = True) -> None:
    # Accepted before and after the action (`store --json stats`, `store stats --json`); on
    # the action's parser the defaults are SUPPRESS so a flag given before it is kept.
    # `with_json=False`: a command whose output is JSON anyway (`replay`) has no --json.
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", dest="admin_config", metavar="FILE", default=default,
                        help="the broker's configuration file (to find its data directory)")
    parser.add_argument("--data-dir", dest="admin_data_dir", metavar="DIR", default=default,
                        help="the broker's data directory (replaces the file's)")
    if with_json:
        parser.add_argument("--json", action="store_true",
                            default=argparse.SUPPRESS if suppress else False, help="print JSON")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: str = args.command or "run"
    if command != "run":
        if hasattr(args, "admin_config"):
            # `edge-broker --config FILE sessions list` means what `sessions list --config
            # FILE` does: the flags that locate a broker apply to the commands that ask it.
            for run_flag, admin_flag in (("config", "admin_config"),
                                         ("data_dir", "admin_data_dir")):
                value = getattr(args, run_flag, None)
                if value is not None:
                    if getattr(args, admin_flag, None) is None:
                        setattr(args, admin_flag, value)
                    setattr(args, run_flag, None)
        given = [f"--{name.replace('_', '-')}" for name in _RUN_FLAGS
                 if getattr(args, name, None) is not None]
        if given:
            parser.error(f"{', '.join(given)}: for running the broker only, "
                         f"not for {command}")
    return _COMMANDS[command](args)


# --------------------------------------------------------------------------- run


class _EarlyStop:
    """Signals that arrive before the broker's event loop handles them: a stop request is
    remembered (the broker stops as soon as it has started), the others are ignored. So no
    signal systemd or an operator sends during start-up has its default, fatal action."""

    _SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                       signal.SIGUSR2)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _EarlyStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self._SIGNALS:
                stops = signum in (signal.SIGINT, signal.SIGTERM)
                self._previous[signum] = signal.signal(
                    signum, self._request if stops else signal.SIG_IGN)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _request(self, signum: int, frame: object) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def _cmd_run(args: argparse.Namespace) -> int:
    with _EarlyStop() as early_stop:
        return _run(args, early_stop)


def _run(args: argparse.Namespace, early_stop: _EarlyStop) -> int:
    # Start-up (the server's imports, the store's open, the restore) makes many objects that
    # live as long as the process and no cyclic garbage worth a collection: the cyclic GC is
    # paused until the broker has started (server/run.py serve() resumes it), about 6 % of
    # the start-up's instructions with a million queued messages (S8).
    gc.disable()
    try:
        return _run_paused(args, early_stop)
    finally:
        gc.enable()


def _run_paused(args: argparse.Namespace, early_stop: _EarlyStop) -> int:
    try:
        config = load_config(args.config)
        config = apply_overrides(config, host=args.host, port=args.port,
                                 data_dir=args.data_dir, log_level=args.log_level)
    except ConfigError as exc:
        return _config_error(exc)
    configure_logging(config.log.logging_level, config.log.format)
    log.info("%s %s starting; configuration: %s", PROG, version(),
             config.source if config.source is not None else "built-in defaults")
    # Imported here so that check-config and --version do not load the server.
    app = importlib.import_module("edge_broker.server.run")
    run_app: Callable[..., int] = app.main

    def reload_config() -> Config:  # SIGHUP: the same file and flags, read again
        return apply_overrides(load_config(args.config), host=args.host, port=args.port,
                               data_dir=args.data_dir, log_level=args.log_level)

    try:
        return run_app(config, recover=args.recover, stop_requested=early_stop,
                       reload_config=reload_config if args.config is not None else None)
    except ConfigError as exc:  # the server refused the configuration at start-up
        return _config_error(exc)


def _config_error(exc: ConfigError) -> int:
    # Under systemd, stderr is the journal: "<3>" gives the line priority "err", so that
    # `journalctl -p warning` shows it (a bare line would be filed as info).
    priority = "<3>" if _stderr_is_journal() else ""
    print(f"{priority}{PROG}: error: {exc}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


_PRIORITIES: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                      logging.CRITICAL: 2}


class _LogFormatter(logging.Formatter):
    """`[log] format`: "text" is `time LEVEL logger: message`, "json" one object per line
    (`time`, `level`, `logger`, `message`, `exception`). Under journald (stderr is the journal)
    the time is left out, the journal stamps every line itself, and each line starts with its
    syslog priority (<3> for errors...), so `journalctl -p warning` works."""

    def __init__(self, fmt: str, *, journal: bool) -> None:
        super().__init__()
        self.json = fmt == "json"
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        exception = self.formatException(record.exc_info) if record.exc_info else None
        if self.json:
            entry: dict[str, object] = {}
            if not self.journal:
                entry["time"] = self.formatTime(record)
            entry.update(level=record.levelname.lower(), logger=record.name, message=message)
            if exception:
                entry["exception"] = exception
            line = json.dumps(entry, ensure_ascii=False)
        else:
            line = f"{record.levelname} {record.name}: {message}"
            if not self.journal:
                line = f"{self.formatTime(record)} {line}"
            if exception:
                line = f"{line}\n{exception}"
        if self.journal:
            priority = _PRIORITIES.get(record.levelno, 6 if record.levelno < 30 else 3)
            line = f"<{priority}>{line}"
        return line


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM=<device>:<inode> of the stream it connected to the journal.
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        status = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


def configure_logging(level: int, fmt: str = "text") -> None:
    """Log records at `level` and above to stderr in `fmt` ("text" or "json"; see
    `_LogFormatter`).

    Replaces the handler a previous call installed (main() may run more than once in tests)
    and leaves other handlers alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _LOG_HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_LOG_HANDLER_NAME)
    handler.setFormatter(_LogFormatter(fmt, journal=_stderr_is_journal()))
    handler.addFilter(LibraryRepeats())  # aiokafka's reconnect errors, and the like
    root.addHandler(handler)
    root.setLevel(level)


# --------------------------------------------------------------------------- check-config


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        users, rules = load_startup_files(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)  # the text `run` logs for the same problem
        return EXIT_CHECK_FAILED
    print(summary(config, users=users, rules=rules))
    return 0


def load_startup_files(config: Config) -> tuple[int | None, int | None]:
    """Read what `run` reads before it listens, with the loaders it uses and in its order,
    without starting anything (no data directory, lock, store, socket or network):

    - `[auth] password_file` and `acl_file` (server/gate.py `read_auth_files`);
    - with a SQLite store (`run` starts bridges only then), the optional module of each
      enabled bridge kind (bridge/config.py `require_extras`, from `BridgeManager.start`);
    - each TLS listener's certificate, key, CA and CRL (server/tls.py `build_context`,
      from `open_listeners`), and the `websockets` package for a WebSocket listener.

    Returns the number of users in the password file and of rules in the ACL (None where
    no such file is set). Raises the ConfigError `run` would stop on (file and line).
    Bridges' credentials and TLS files are read only when a bridge connects, so not here.
    """
    # Imported here, as the server is by `run`.
    from edge_broker.server.gate import read_auth_files

    passwords, acl = read_auth_files(config.auth)
    if config.bridges and config.storage.persistence != "memory":
        from edge_broker.bridge.config import require_extras

        require_extras(config.bridges, file=config.source)
    if any(listener.tls or listener.protocol == "websockets" for listener in config.listeners):
        from edge_broker.server.listeners import listener_label, websocket_module
        from edge_broker.server.tls import build_context

        for index, listener in enumerate(config.listeners):
            if listener.protocol == "websockets":
                websocket_module(listener_label(index), config.source)
            if listener.tls:
                build_context(listener, label=listener_label(index), file=config.source)
    return (None if passwords is None else len(passwords),
            None if acl is None else acl.rule_count)


def _address(listener: ListenerConfig) -> str:
    if listener.host == "":
        host = "*"
    elif ":" in listener.host:
        host = f"[{listener.host}]"
    else:
        host = listener.host
    return f"{host}:{listener.port}"


def _limit(value: int, unit: str = "") -> str:
    return "unlimited" if value == 0 else f"{value}{unit}"


def summary(config: Config, *, users: int | None = None, rules: int | None = None) -> str:
    """The short report check-config prints for a valid configuration; `users` and `rules`
    are the counts `load_startup_files` found in the password file and the ACL."""
    lines = [f"{config.source or 'built-in defaults'}: OK", "listeners:"]
    for index, listener in enumerate(config.listeners, start=1):
        notes = ["any free port"] if listener.port == 0 else []
        notes.append("this machine only" if listener.is_loopback
                     else "reachable from other hosts")
        anonymous = "allowed" if listener.anonymous_allowed(config.auth) else "refused"
        lines.append(f"  #{index} {listener.protocol} {_address(listener)} "
                     f"({', '.join(notes)}), anonymous clients {anonymous}")
    lines.append(f"auth: {_auth_summary(config, users, rules)}")
    data_dir = config.broker.data_dir
    relative = "" if data_dir.is_absolute() else " (relative to the working directory)"
    lines.append(f"data_dir: {data_dir}{relative}")
    storage = config.storage
    if storage.persistence == "memory":
        lines.append("storage: memory (sessions and queued messages are lost on restart)")
    else:
        lines.append(f"storage: {storage.persistence}, durability {storage.durability}, "
                     f"max_store_bytes {_limit(storage.max_store_bytes)}")
    mqtt = config.mqtt
    lines.append(
        f"limits: max_packet_size {mqtt.max_packet_size} bytes, max_qos {mqtt.max_qos}, "
        f"max_keepalive {mqtt.max_keepalive_s} s, receive_maximum {mqtt.receive_maximum}"
    )
    lines.append(
        f"queues per client: max_inflight_messages {mqtt.max_inflight_messages}, "
        f"max_queued_messages {_limit(mqtt.max_queued_messages)}, "
        f"max_queued_bytes {_limit(mqtt.max_queued_bytes, ' bytes')}, "
        f"queue_full_policy {mqtt.queue_full_policy}; all queues: max_queued_memory_bytes "
        f"{_limit(mqtt.max_queued_memory_bytes, ' bytes')}"
    )
    expiry = mqtt.persistent_client_expiration_s
    cap = mqtt.max_session_expiry_interval_s
    lines.append(
        f"sessions: persistent_client_expiration {f'{expiry} s' if expiry else 'never'}, "
        f"max_session_expiry_interval {f'{cap} s' if cap else 'no cap'}"
    )
    sys_interval = config.broker.sys_interval_s
    lines.append(f"$SYS: {f'every {sys_interval} s' if sys_interval else 'disabled'}; "
                 f"log level: {config.log.level}")
    lines += _bridge_lines(config)
    return "\n".join(lines)


def _auth_summary(config: Config, users: int | None, rules: int | None) -> str:
    auth = config.auth
    if auth.password_file is None:
        passwords = "no password file"
    else:
        count = "" if users is None else f" ({users} user{'' if users == 1 else 's'})"
        passwords = f"password file {auth.password_file}{count}"
    if auth.acl_file is None:
        acl = "no ACL file (every client may use every topic)"
    else:
        count = "" if rules is None else f" ({rules} rule{'' if rules == 1 else 's'})"
        acl = f"ACL file {auth.acl_file}{count}"
    return f"{passwords}; {acl}"


def _bridge_lines(config: Config) -> list[str]:
    """check-config's bridges: name, kind, servers, then what goes up and what comes down."""
    if not config.bridges:
        return ["bridges: none"]
    lines = [f"bridges (gateway_id {config.broker.gateway_id}):"]
    for bridge in config.bridges:
        if not bridge.enabled:
            lines.append(f"  {bridge.name}: {bridge.kind}, disabled (enabled = false)")
            continue
        tls = ", TLS" if bridge.tls.enabled else ""
        backlog = _limit(bridge.max_backlog_bytes, " bytes")
        kind = f"mqtt {bridge.mqtt.mqtt_version}" if bridge.mqtt is not None else bridge.kind
        lines.append(f"  {bridge.name}: {kind}, servers {', '.join(bridge.servers)}"
                     f"{tls}, max_backlog_bytes {backlog}")
        up: list[str] = []
        down: list[str] = []
        if bridge.jetstream is not None:
            js = bridge.jetstream
            if bridge.uplink:
                up.append(f"{', '.join(bridge.uplink)} -> {js.subject_prefix}.<topic> in stream "
                          f"{js.stream} (replicas {js.stream_replicas} when created)")
            if bridge.downlink:
                down.append(f"{', '.join(bridge.downlink)} (stream {js.downlink_stream}, "
                            f"durable {js.downlink_durable}) -> <topic>")
        elif bridge.kafka is not None:
            kafka = bridge.kafka
            routes = ", ".join(f"{r.filter} -> {r.topic}" for r in kafka.topic_map)
            if bridge.uplink:
                up.append(f"{', '.join(bridge.uplink)} -> topic_map [{routes}], key "
                          f"{kafka.key}")
            if bridge.downlink:
                down.append(f"{', '.join(bridge.downlink)} (group {kafka.downlink_group}) -> "
                            f"mqtt-topic header or {kafka.downlink_local_prefix}<kafka topic>")
        elif bridge.mqtt is not None:
            for line in bridge.mqtt.topics:
                local, remote = line.local_filter, line.remote_filter
                if line.uplink:
                    up.append(f"{local} -> {remote} (QoS {line.qos})")
                if line.downlink:
                    down.append(f"{remote} -> {local} (QoS {line.qos})")
        lines.append(f"    uplink: {'; '.join(up) or 'none'}")
        lines.append(f"    downlink: {'; '.join(down) or 'none'}")
    return lines


# --------------------------------------------------------------------------- sessions, store


def _admin_command(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command that finds the broker through --config/--data-dir, then runs
    `module.function(config, args)` (imported only when that command runs)."""

    def run(args: argparse.Namespace) -> int:
        try:
            config = apply_overrides(load_config(args.admin_config),
                                     data_dir=args.admin_data_dir)
        except ConfigError as exc:
            return _config_error(exc)
        command: Callable[[Config, argparse.Namespace], int] = getattr(
            importlib.import_module(module), function)
        return command(config, args)

    return run


_cmd_admin = _admin_command("edge_broker.cli_admin", "run_command")
_cmd_streams = _admin_command("edge_broker.cli_streams", "run_command")
_cmd_status = _admin_command("edge_broker.cli_status", "run_status")
_cmd_bridges = _admin_command("edge_broker.cli_bridges", "run_command")


def _cmd_security(args: argparse.Namespace) -> int:
    security = importlib.import_module("edge_broker.cli_security")
    command: Callable[[argparse.Namespace], int] = security.run_command
    return command(args)


_COMMANDS: Final[dict[str, Callable[[argparse.Namespace], int]]] = {
    "run": _cmd_run,
    "check-config": _cmd_check_config,
    "sessions": _cmd_admin,
    "store": _cmd_admin,
    "status": _cmd_status,
    "streams": _cmd_streams,
    "replay": _cmd_streams,
    "bridges": _cmd_bridges,
    "passwd": _cmd_security,
    "certs": _cmd_security,
}
