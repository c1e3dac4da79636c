"""The edge-broker command: check-config output and exit codes (and the start-up files it
reads as `run` does), run with flags and a configuration file, start-up errors, logging
set-up."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_broker import certs, cli
from edge_broker.auth.passwd import PasswordFile
from edge_broker.config import Config, ListenerConfig, load_config
from edge_broker.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "edge-broker.toml"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Replace edge_broker.server.run with a fake whose main() records its Config."""
    calls: list[Config] = []

    def main(config: Config, *, recover: bool = False, reload_config: object = None,
             stop_requested: object = None) -> int:
        calls.append(config)
        logging.getLogger("edge_broker.server.run").info("fake broker running")
        return 0

    module = types.ModuleType("edge_broker.server.run")
    module.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edge_broker.server.run", module)
    return calls


def set_app_main(monkeypatch: pytest.MonkeyPatch, main: Callable[[Config], int]) -> None:
    module = types.ModuleType("edge_broker.server.run")
    module.main = lambda config, **_: main(config)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edge_broker.server.run", module)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge-broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- check-config


def test_check_config_accepts_a_good_file_and_summarises_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[auth]\nallow_anonymous = true\n'
                           '[[listeners]]\nhost = "0.0.0.0"\nport = 1884\n'
                           '[mqtt]\nmax_inflight_messages = 5\nmax_queued_messages = 0\n'
                           '[storage]\npersistence = "memory"\n')
    assert cli.main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines()[0] == f"{path}: OK"
    assert "0.0.0.0:1884 (reachable from other hosts), anonymous clients allowed" in out
    assert "storage: memory" in out
    assert "max_inflight_messages 5" in out
    assert "max_queued_messages unlimited" in out


def test_check_config_reports_a_bad_file_on_stderr_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[mqtt]\nmax_inflight_messages = "20"\n')
    assert cli.main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f'{path}: [mqtt] max_inflight_messages: expected an integer from 1 to '
                   '65535, got "20"\n')


def test_check_config_of_a_missing_file_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", str(tmp_path / "nope.toml")]) == 1
    assert "nope.toml: cannot read the configuration file" in capsys.readouterr().err


def test_check_config_summarises_the_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[storage]\npersistence = "sqlite"\ndurability = "os"\n')
    assert cli.main(["check-config", str(path)]) == 0
    assert "storage: sqlite, durability os" in capsys.readouterr().out


def test_the_shipped_example_config_passes_check_config(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1:1883 (this machine only)" in out
    assert "data_dir: /var/lib/edge-broker" in out


def test_check_config_rejects_run_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--port", "1884", "check-config", str(EXAMPLE)])
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err


# check-config reads what `run` reads before it listens: the [auth] files and the TLS files.


def passwd_file(tmp_path: Path, *users: str) -> Path:
    passwords = PasswordFile()
    for user in users:
        passwords.set(user, f"{user}-secret")
    path = tmp_path / "passwd"
    path.write_text(passwords.dumps(), encoding="utf-8")
    return path


def auth_config(tmp_path: Path, *, password_file: Path | None = None,
                acl_file: Path | None = None, extra: str = "") -> Path:
    """A configuration a real start-up may be tried with: memory store, data_dir in tmp_path,
    a loopback listener on any free port."""
    auth = "".join(f'{key} = "{value}"\n' for key, value in
                   (("password_file", password_file), ("acl_file", acl_file))
                   if value is not None)
    return write(tmp_path, f'[broker]\ndata_dir = "{tmp_path / "data"}"\n'
                           f'[storage]\npersistence = "memory"\n[auth]\n{auth}'
                           f'[[listeners]]\nport = 0\n{extra}')


def bad_password_file_missing(tmp_path: Path) -> tuple[Path, str]:
    missing = tmp_path / "absent-passwd"
    return (auth_config(tmp_path, password_file=missing),
            f"{missing}: cannot read the password file: No such file or directory")


def bad_acl_line(tmp_path: Path) -> tuple[Path, str]:
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic read\n", encoding="utf-8")
    return (auth_config(tmp_path, acl_file=acl),
            f"{acl}: line 2: topic needs a topic filter")


def bad_password_hash(tmp_path: Path) -> tuple[Path, str]:
    passwd = tmp_path / "passwd"
    passwd.write_text("# users\nalice:$7$101$bad$bad\n", encoding="utf-8")
    return (auth_config(tmp_path, password_file=passwd),
            f"{passwd}: line 2 (user 'alice'): salt or hash is not valid base64")


def bad_tls_key(tmp_path: Path) -> tuple[Path, str]:
    certs.init_ca(tmp_path / "ca")
    issued = certs.issue_server(tmp_path / "ca", ips=["127.0.0.1"])
    wrong_key = tmp_path / "ca" / "ca.key"  # readable, but not server.crt's key
    path = auth_config(tmp_path, extra=f'certfile = "{issued.cert}"\n'
                                       f'keyfile = "{wrong_key}"\n')
    return path, f"{path}: [[listeners]] #1 keyfile: cannot use {str(issued.cert)!r} with "


BAD_STARTUP_FILES = [bad_password_file_missing, bad_acl_line, bad_password_hash, bad_tls_key]


@pytest.mark.parametrize("make", BAD_STARTUP_FILES, ids=lambda make: make.__name__)
def test_check_config_fails_on_a_file_run_would_stop_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], tuple[Path, str]]
) -> None:
    path, expected = make(tmp_path)
    assert cli.main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(expected), err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "data").exists()  # nothing started


@pytest.mark.parametrize("make", BAD_STARTUP_FILES, ids=lambda make: make.__name__)
async def test_check_config_prints_what_the_broker_stops_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], tuple[Path, str]]
) -> None:
    from edge_broker.server.app import BrokerApp

    path, _ = make(tmp_path)
    assert cli.main(["check-config", str(path)]) == 1
    printed = capsys.readouterr().err
    app = BrokerApp(load_config(path))
    with pytest.raises(ConfigError) as refused:  # what `run` logs, then exits 2
        await app.start()
    assert printed == f"{refused.value}\n"


def test_check_config_summarises_the_password_file_and_the_acl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passwd = passwd_file(tmp_path, "alice", "bob", "carol")
    acl = tmp_path / "acl"
    acl.write_text("# sensors\ntopic read $SYS/#\nuser alice\ntopic sensors/#\n"
                   "pattern write devices/%c/#\n", encoding="utf-8")
    path = auth_config(tmp_path, password_file=passwd, acl_file=acl)
    assert cli.main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"auth: password file {passwd} (3 users); ACL file {acl} (3 rules)" in out
    assert "anonymous clients refused" in out


def test_check_config_says_when_there_are_no_auth_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", str(auth_config(tmp_path))]) == 0
    assert ("auth: no password file; no ACL file (every client may use every topic)"
            in capsys.readouterr().out.splitlines())


def test_check_config_loads_good_tls_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = certs.init_ca(tmp_path / "ca")
    server = certs.issue_server(tmp_path / "ca", ips=["127.0.0.1"])
    path = auth_config(tmp_path, extra=f'certfile = "{server.cert}"\n'
                                       f'keyfile = "{server.key}"\ncafile = "{ca.cert}"\n'
                                       f'crlfile = "{tmp_path / "ca" / "ca.crl"}"\n'
                                       "require_certificate = true\n")
    assert cli.main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines()[0] == f"{path}: OK"


JETSTREAM_BRIDGE = """
[[bridges]]
name = "central"
kind = "jetstream"
servers = ["nats://10.0.0.5:4222"]
uplink = ["sensors/#"]
subject_prefix = "site1.gw7"
jetstream_stream = "EDGE"
"""


@pytest.mark.parametrize("persistence", ["sqlite", "memory"])
def test_check_config_needs_a_bridge_kinds_package_where_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    persistence: str
) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)  # `import nats` fails: not installed
    path = write(tmp_path, f'[storage]\npersistence = "{persistence}"\n{JETSTREAM_BRIDGE}')
    if persistence == "memory":  # run starts no bridge without the SQLite store: no error
        assert cli.main(["check-config", str(path)]) == 0
        return
    assert cli.main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'{path}: [[bridges]] #1 "central" kind: the "jetstream" bridge '
                          "needs the Python module 'nats'"), err
    assert err.endswith("pip install nats-py\n"), err


def test_check_config_needs_the_websockets_package_for_a_websocket_listener(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As `run`, which stops on it when it opens the listener.
    import edge_broker.server as server_package

    # `import websockets` and its submodules fail (those imported already by other tests
    # would be found in sys.modules without their package)
    for name in ["websockets", *[n for n in sys.modules if n.startswith("websockets.")]]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "edge_broker.server.websocket", raising=False)
    monkeypatch.delattr(server_package, "websocket", raising=False)
    path = auth_config(tmp_path, extra='protocol = "websockets"\n')
    assert cli.main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == (f'{path}: [[listeners]] #1 protocol: "websockets" needs the websockets '
                   "package: pip install 'edge-broker[websocket]'\n"), err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("edge-broker ")


# --------------------------------------------------------------------------- run


def test_no_command_runs_the_broker_with_the_defaults(app: list[Config]) -> None:
    assert cli.main([]) == 0
    assert app == [Config()]


def test_run_loads_the_file_and_applies_the_flags(tmp_path: Path, app: list[Config]) -> None:
    path = write(tmp_path, '[broker]\ndata_dir = "/srv/a"\n[log]\nlevel = "warning"\n'
                           '[[listeners]]\nport = 1883\n[[listeners]]\nport = 1884\n')
    argv = ["run", "--config", str(path), "--host", "::1", "--port", "0",
            "--data-dir", "/srv/b", "--log-level", "DEBUG"]
    assert cli.main(argv) == 0
    (config,) = app
    assert config.source == str(path)
    assert config.listeners == (ListenerConfig(host="::1", port=0),
                                ListenerConfig(host="127.0.0.1", port=1884))
    assert config.broker.data_dir == Path("/srv/b")
    assert config.log.level == "debug"


def test_flags_work_before_and_after_run(tmp_path: Path, app: list[Config]) -> None:
    assert cli.main(["--port", "1999", "run", "--log-level", "error"]) == 0
    assert app[0].listeners[0].port == 1999
    assert app[0].log.level == "error"
    assert cli.main(["--port", "1999", "run", "--port", "2000"]) == 0
    assert app[1].listeners[0].port == 2000


def test_the_exit_code_is_the_apps(monkeypatch: pytest.MonkeyPatch) -> None:
    set_app_main(monkeypatch, lambda config: 3)
    assert cli.main(["run"]) == 3


def test_a_bad_config_file_at_startup_exits_2_without_starting(
    tmp_path: Path, app: list[Config], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[mqtt]\nmax_qos = 3\n")
    assert cli.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"edge-broker: error: {path}: [mqtt] max_qos: expected an integer from 0 to 2, got 3\n"
    )
    assert app == []


def test_an_unsafe_host_flag_exits_2_naming_the_flag(
    app: list[Config], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.startswith(
        'edge-broker: error: --host: "0.0.0.0" accepts connections from other hosts; '
    )
    assert app == []


def test_a_config_error_raised_by_the_app_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(config: Config) -> int:
        raise ConfigError("not implemented yet", file="x.toml", table="storage",
                          key="persistence")

    set_app_main(monkeypatch, refuse)
    assert cli.main([]) == 2
    assert capsys.readouterr().err.endswith(
        "\nedge-broker: error: x.toml: [storage] persistence: not implemented yet\n"
    )


def test_a_missing_config_file_exits_2(
    tmp_path: Path, app: list[Config], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml: cannot read the configuration file" in capsys.readouterr().err


def test_an_unknown_log_level_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--log-level", "trace"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- logging


def test_run_logs_to_stderr_with_time_level_and_logger(
    tmp_path: Path, app: list[Config], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--log-level", "info"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "fake broker running" in x)
    # e.g. "2024-05-01 12:00:00,123 INFO edge_broker.server.run: fake broker running"
    date, clock, level, logger, *_ = line.split(" ")
    assert len(date) == 10 and ":" in clock
    assert (level, logger) == ("INFO", "edge_broker.server.run:")


def test_the_log_level_filters(app: list[Config], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--log-level", "warning"]) == 0
    assert "fake broker running" not in capsys.readouterr().err


def test_running_twice_does_not_duplicate_log_lines(
    app: list[Config], capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main([])
    cli.main([])
    capsys.readouterr()
    logging.getLogger("edge_broker.test").warning("once")
    assert capsys.readouterr().err.count("once") == 1


def test_under_systemd_log_lines_carry_the_journal_priority(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    status = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    cli.configure_logging(logging.INFO)
    logging.getLogger("edge_broker.test").warning("careful")
    logging.getLogger("edge_broker.test").info("fine")
    err = capfd.readouterr().err
    assert "<4>WARNING edge_broker.test: careful" in err.splitlines()
    assert "<6>INFO edge_broker.test: fine" in err.splitlines()  # no time: journald adds it


def test_json_logs_one_object_per_line(monkeypatch: pytest.MonkeyPatch,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    cli.configure_logging(logging.INFO, "json")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("edge_broker.test").exception("it broke: %s", "why")
    (line,) = capfd.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error" and entry["logger"] == "edge_broker.test"
    assert entry["message"] == "it broke: why" and "ValueError: boom" in entry["exception"]
    assert entry["time"]
    status = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    cli.configure_logging(logging.INFO, "json")
    logging.getLogger("edge_broker.test").warning("careful")
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("<4>{")
    assert "time" not in json.loads(line[3:])
    cli.configure_logging(logging.INFO)


@pytest.mark.parametrize(("argv", "expected"), [
    ([], False), (["--recover"], True), (["run", "--recover"], True)])
def test_recover_reaches_the_app(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                 expected: bool) -> None:
    seen: list[bool] = []

    def main(config: Config, *, recover: bool = False, reload_config: object = None,
             stop_requested: object = None) -> int:
        seen.append(recover)
        return 0

    module = types.ModuleType("edge_broker.server.run")
    module.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edge_broker.server.run", module)
    assert cli.main(argv) == 0
    assert seen == [expected]
