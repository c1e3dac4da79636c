"""Configuration loading: defaults, strict types, error locations, the anonymous-access rule,
command-line overrides, and that the shipped example and docs cover every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_broker.config import (
    AuthConfig,
    BrokerConfig,
    Config,
    ListenerConfig,
    LogConfig,
    MqttConfig,
    StorageConfig,
    apply_overrides,
    is_loopback_host,
    known_keys,
    load_config,
    parse_duration,
    toml_key,
)
from edge_broker.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "edge-broker.toml"
DOCS = REPO / "docs" / "configuration.md"


@pytest.fixture
def write(tmp_path: Path):
    def write(text: str, name: str = "edge-broker.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# --------------------------------------------------------------------------- defaults


def test_no_file_gives_the_documented_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.source is None
    assert config.listeners == (ListenerConfig(host="127.0.0.1", port=1883, protocol="mqtt"),)
    assert config.broker == BrokerConfig(data_dir=Path("./edge-broker-data"), sys_interval_s=10)
    assert config.auth.allow_anonymous is True
    assert config.mqtt == MqttConfig(
        max_packet_size=1_048_576, max_keepalive_s=65535, max_inflight_messages=20,
        max_queued_messages=100_000, max_queued_bytes=0, max_queued_memory_bytes=268_435_456,
        queue_full_policy="drop-oldest", queue_qos0_messages=False,
        receive_maximum=1024, topic_alias_maximum=10, max_qos=2, retain_available=True,
        allow_zero_length_clientid=True, auto_id_prefix="auto-",
        persistent_client_expiration_s=0, max_session_expiry_interval_s=0,
    )
    assert config.storage == StorageConfig(persistence="sqlite", durability="fsync",
                                           max_store_bytes=0)
    assert config.log == LogConfig(level="info")
    assert config.listeners[0].anonymous_allowed(config.auth) is True


def test_empty_file_gives_the_defaults_and_remembers_its_path(write) -> None:
    path = write("# nothing\n")
    config = load_config(path)
    assert config == Config(source=str(path))


def test_every_key_is_read(write) -> None:
    path = write("""
        [broker]
        data_dir = "/var/lib/edge-broker"
        sys_interval = "1min"

        [[listeners]]
        host = "0.0.0.0"
        port = 1884
        protocol = "mqtt"
        allow_anonymous = true

        [[listeners]]
        host = "::1"
        port = 0

        [auth]
        allow_anonymous = true

        [mqtt]
        max_packet_size = 65536
        max_keepalive = 600
        max_inflight_messages = 5
        max_queued_messages = 0
        max_queued_bytes = 1000000
        max_queued_memory_bytes = 0
        queue_full_policy = "refuse"
        queue_qos0_messages = true
        receive_maximum = 64
        topic_alias_maximum = 0
        max_qos = 1
        retain_available = false
        allow_zero_length_clientid = false
        auto_id_prefix = "gw1-"
        persistent_client_expiration = "14d"
        max_session_expiry_interval = 3600

        [storage]
        persistence = "memory"
        durability = "os"
        max_store_bytes = 100000000

        [log]
        level = "debug"
    """)
    config = load_config(path)
    assert config == Config(
        broker=BrokerConfig(data_dir=Path("/var/lib/edge-broker"), sys_interval_s=60),
        listeners=(
            ListenerConfig(host="0.0.0.0", port=1884, protocol="mqtt", allow_anonymous=True),
            ListenerConfig(host="::1", port=0),
        ),
        auth=AuthConfig(allow_anonymous=True, allow_anonymous_explicit=True),
        mqtt=MqttConfig(
            max_packet_size=65536, max_keepalive_s=600, max_inflight_messages=5,
            max_queued_messages=0, max_queued_bytes=1_000_000, max_queued_memory_bytes=0,
            queue_full_policy="refuse", queue_qos0_messages=True,
            receive_maximum=64, topic_alias_maximum=0, max_qos=1, retain_available=False,
            allow_zero_length_clientid=False, auto_id_prefix="gw1-",
            persistent_client_expiration_s=14 * 86400, max_session_expiry_interval_s=3600,
        ),
        storage=StorageConfig(persistence="memory", durability="os", max_store_bytes=100_000_000),
        log=LogConfig(level="debug"),
        source=str(path),
    )
    assert config.log.logging_level == 10


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(("written", "seconds"), [
    ("0", 0), ("45", 45), ('"30s"', 30), ('"5min"', 300), ('"2h"', 7200), ('"14d"', 14 * 86400),
    ('"1w"', 7 * 86400), ('"1y"', 365 * 86400), ('"0s"', 0),
])
def test_durations_take_seconds_or_a_unit(write, written: str, seconds: int) -> None:
    config = load_config(write(f"[mqtt]\npersistent_client_expiration = {written}\n"))
    assert config.mqtt.persistent_client_expiration_s == seconds


@pytest.mark.parametrize("written", [
    '"30"', '"1.5h"', '"5 m"', '"5M"', '"2mo"', '"-1s"', '""', "-1", "1.5", "true",
    "4294967296", '"137y"',
])
def test_bad_durations_are_rejected_naming_the_key(write, written: str) -> None:
    path = write(f"[broker]\nsys_interval = {written}\n")
    error = load_error(path)
    assert str(error).startswith(f"{path}: [broker] sys_interval: expected a duration")
    assert (error.file, error.table, error.key) == (str(path), "broker", "sys_interval")


def test_a_bare_m_is_refused_as_ambiguous_with_mosquitto_months(write) -> None:
    path = write('[mqtt]\npersistent_client_expiration = "2m"\n')
    error = load_error(path)
    assert (error.table, error.key) == ("mqtt", "persistent_client_expiration")
    assert "months" in str(error) and '"2min"' in str(error)


def test_parse_duration_is_usable_on_its_own() -> None:
    assert parse_duration("2h") == 7200
    with pytest.raises(ValueError, match="duration"):
        parse_duration("2 hours")


# --------------------------------------------------------------------------- strict values


def test_the_error_message_names_file_table_and_key(write) -> None:
    path = write('[mqtt]\nmax_inflight_messages = "20"\n')
    error = load_error(path)
    assert str(error) == (
        f'{path}: [mqtt] max_inflight_messages: expected an integer from 1 to 65535, got "20"'
    )
    assert (error.file, error.table, error.key) == (str(path), "mqtt", "max_inflight_messages")


@pytest.mark.parametrize(("table", "key", "written", "expected"), [
    ("mqtt", "max_inflight_messages", "true", "expected an integer from 1 to 65535, got true"),
    ("mqtt", "max_inflight_messages", "0", "expected an integer from 1 to 65535, got 0"),
    ("mqtt", "max_inflight_messages", "20.0", "expected an integer from 1 to 65535, got 20.0"),
    ("mqtt", "max_packet_size", "15", "expected an integer from 16 to 268435460, got 15"),
    ("mqtt", "max_keepalive", "5", "expected an integer from 10 to 65535, got 5"),
    ("mqtt", "receive_maximum", "65536", "expected an integer from 1 to 65535, got 65536"),
    ("mqtt", "topic_alias_maximum", "-1", "expected an integer from 0 to 65535, got -1"),
    ("mqtt", "max_qos", "3", "expected an integer from 0 to 2, got 3"),
    ("mqtt", "max_queued_messages", "-1", "expected a non-negative integer (0 = unlimited)"),
    ("mqtt", "max_queued_bytes", '"1MB"', 'expected a non-negative integer (0 = unlimited)'),
    ("mqtt", "max_queued_memory_bytes", "-1", "expected a non-negative integer (0 = unlimited)"),
    ("mqtt", "queue_full_policy", '"drop_oldest"', 'expected one of "drop-oldest", '
                                  '"drop-newest", "refuse", got "drop_oldest"; did you mean '
                                  '"drop-oldest"?'),
    ("mqtt", "queue_qos0_messages", "1", "expected true or false, got 1"),
    ("mqtt", "retain_available", '"yes"', 'expected true or false, got "yes"'),
    ("mqtt", "allow_zero_length_clientid", "0", "expected true or false, got 0"),
    ("mqtt", "auto_id_prefix", "7", "expected a string, got 7"),
    ("mqtt", "auto_id_prefix", '"a\\u0000b"', "control characters are not allowed"),
    ("auth", "allow_anonymous", '"true"', 'expected true or false, got "true"'),
    ("broker", "data_dir", '""', 'expected a non-empty string (a directory path), got ""'),
    ("broker", "data_dir", "[1, 2]", "got [1, 2]"),
    ("storage", "persistence", '"sqlite3"', 'expected one of "memory", "sqlite", got "sqlite3"; '
                                            'did you mean "sqlite"?'),
    ("storage", "durability", '"full"', 'expected one of "fsync", "os", "none", got "full"'),
    ("storage", "max_store_bytes", "-5", "expected a non-negative integer (0 = unlimited)"),
    ("log", "level", '"INFO"', 'got "INFO"; did you mean "info"?'),
    ("log", "level", '"verbose"', 'expected one of "debug", "info", "warning", "error"'),
    ("log", "level", "{ x = 1 }", "got a table"),
])
def test_wrong_values_are_rejected_with_table_and_key(
    write, table: str, key: str, written: str, expected: str
) -> None:
    path = write(f"[{table}]\n{key} = {written}\n")
    message = str(load_error(path))
    assert message.startswith(f"{path}: [{table}] {key}: ")
    assert expected in message


# --------------------------------------------------------------------------- typo protection


def test_unknown_key_is_an_error_with_a_suggestion(write) -> None:
    path = write("[mqtt]\nmax_inflight_message = 10\n")
    error = load_error(path)
    assert str(error) == (
        f"{path}: [mqtt] max_inflight_message: unknown key; did you mean max_inflight_messages?"
    )
    assert (error.table, error.key) == ("mqtt", "max_inflight_message")


def test_unknown_key_in_the_wrong_table_says_where_it_belongs(write) -> None:
    path = write("[mqtt]\nallow_anonymous = true\n")
    message = str(load_error(path))
    assert message.startswith(f"{path}: [mqtt] allow_anonymous: unknown key; ")
    assert "[auth]" in message


def test_unknown_key_without_a_close_match_lists_the_keys(write) -> None:
    path = write("[log]\nfile = \"/var/log/x\"\n")
    assert str(load_error(path)) == (
        f"{path}: [log] file: unknown key; the keys of [log] are: level, format"
    )


def test_unknown_table_is_an_error_with_a_suggestion(write) -> None:
    path = write("[mqqt]\nmax_qos = 1\n")
    error = load_error(path)
    assert str(error) == f"{path}: [mqqt]: unknown table; did you mean [mqtt]?"


def test_top_level_key_says_which_table_it_belongs_in(write) -> None:
    path = write('data_dir = "/tmp/x"\n')
    message = str(load_error(path))
    assert message.startswith(f"{path}: data_dir: unknown top-level key; ")
    assert "[broker]" in message


def test_listener_key_typo_names_the_listener(write) -> None:
    path = write('[[listeners]]\nhost = "127.0.0.1"\n[[listeners]]\nprot = 1884\n')
    error = load_error(path)
    assert str(error) == f"{path}: [[listeners]] #2 prot: unknown key; did you mean port?"
    assert (error.table, error.key) == ("[[listeners]] #2", "prot")


def test_toml_syntax_error_names_file_and_line(write) -> None:
    path = write("[broker]\nsys_interval = 10\n\n[mqtt]\nmax_qos = \n")
    message = str(load_error(path))
    assert message.startswith(f"{path}: line 5, column ")
    assert "invalid TOML" in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert str(load_error(path)) == (
        f"{path}: cannot read the configuration file: No such file or directory"
    )


def test_file_that_is_not_utf8_names_the_line(write, tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[mqtt]\nauto_id_prefix = "gr\xfcn-"\n')
    assert str(load_error(path)) == f"{path}: line 2: not valid UTF-8 (TOML files must be UTF-8)"


# --------------------------------------------------------------------------- listeners


def test_listener_values_are_checked(write) -> None:
    path = write('[[listeners]]\nhost = "127.0.0.1"\nport = 70000\n')
    assert str(load_error(path)) == (
        f"{path}: [[listeners]] #1 port: expected an integer from 0 to 65535, got 70000"
    )


def test_only_the_mqtt_and_websockets_protocols_are_accepted(write) -> None:
    path = write('[[listeners]]\nprotocol = "http"\n')
    assert str(load_error(path)) == (
        f'{path}: [[listeners]] #1 protocol: expected one of "mqtt", "websockets", got "http"'
    )


@pytest.mark.parametrize("host", ["[::1]", "256.1.1.1", "my host", "-bad", "a..b"])
def test_malformed_hosts_are_rejected(write, host: str) -> None:
    path = write(f'[[listeners]]\nhost = "{host}"\n')
    assert str(load_error(path)).startswith(f"{path}: [[listeners]] #1 host: ")


def test_listeners_written_as_a_single_table_is_explained(write) -> None:
    path = write("[listeners]\nport = 1884\n")
    message = str(load_error(path))
    assert message.startswith(f"{path}: [listeners]: expected an array of tables")
    assert "[[listeners]]" in message


def test_an_empty_listener_array_is_rejected(write) -> None:
    path = write("listeners = []\n")
    assert "at least one [[listeners]]" in str(load_error(path))


def test_two_listeners_on_the_same_address_are_rejected(write) -> None:
    path = write('[[listeners]]\nport = 1883\n[[listeners]]\nhost = "127.0.0.1"\nport = 1883\n')
    assert str(load_error(path)).startswith(f"{path}: [[listeners]] #2 port: ")


def test_port_zero_may_repeat(write) -> None:
    config = load_config(write("[[listeners]]\nport = 0\n[[listeners]]\nport = 0\n"))
    assert [listener.port for listener in config.listeners] == [0, 0]


# --------------------------------------------------------------------------- security rule


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost", "LOCALHOST"])
def test_loopback_listeners_need_no_explicit_anonymous_setting(write, host: str) -> None:
    config = load_config(write(f'[[listeners]]\nhost = "{host}"\n'))
    assert config.listeners[0].anonymous_allowed(config.auth) is True
    assert config.listeners[0].is_loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "192.168.1.10", "fe80::1", "gateway.lan"])
def test_reachable_listener_without_explicit_anonymous_access_is_refused(
    write, host: str
) -> None:
    path = write(f'[[listeners]]\nhost = "127.0.0.1"\n[[listeners]]\nhost = "{host}"\n')
    error = load_error(path)
    assert str(error) == (
        f'{path}: [[listeners]] #2 host: "{host}" accepts connections from other hosts; '
        "no authentication is configured (no [auth] password_file, no client certificates), "
        "so set password_file, or set allow_anonymous = true explicitly "
        "(in [auth] or on this listener) to allow anonymous access"
    )
    assert (error.table, error.key) == ("[[listeners]] #2", "host")


def test_explicit_auth_allow_anonymous_opens_every_listener(write) -> None:
    config = load_config(write('[auth]\nallow_anonymous = true\n[[listeners]]\nhost = "0.0.0.0"\n'))
    assert config.listeners[0].anonymous_allowed(config.auth)


def test_explicit_listener_allow_anonymous_opens_that_listener(write) -> None:
    config = load_config(write('[[listeners]]\nhost = "0.0.0.0"\nallow_anonymous = true\n'))
    assert config.listeners[0].anonymous_allowed(config.auth)


def test_listener_setting_overrides_auth(write) -> None:
    path = write('[auth]\nallow_anonymous = true\n'
                 '[[listeners]]\nhost = "0.0.0.0"\nallow_anonymous = false\n')
    message = str(load_error(path))
    assert message.startswith(f"{path}: [[listeners]] #1 allow_anonymous: false refuses every")


def test_refusing_anonymous_clients_without_authentication_is_an_error(write) -> None:
    # Authentication is not implemented yet: false would lock every client out.
    path = write("[auth]\nallow_anonymous = false\n")
    message = str(load_error(path))
    assert message.startswith(f"{path}: [auth] allow_anonymous: false refuses every client on "
                              "[[listeners]] #1")


def test_auth_false_is_fine_when_every_listener_allows_anonymous(write) -> None:
    config = load_config(write("[auth]\nallow_anonymous = false\n"
                               "[[listeners]]\nallow_anonymous = true\n"))
    assert config.listeners[0].anonymous_allowed(config.auth)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.255.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("localhost.", True), ("", False), ("0.0.0.0", False), ("::", False),
    ("10.0.0.1", False), ("myhost", False), ("localhost.example.com", False),
])
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# --------------------------------------------------------------------------- overrides


def test_host_and_port_replace_the_first_listener_only(write) -> None:
    config = load_config(write('[auth]\nallow_anonymous = true\n'
                               '[[listeners]]\nhost = "127.0.0.1"\nport = 1883\n'
                               '[[listeners]]\nhost = "0.0.0.0"\nport = 1884\n'))
    changed = apply_overrides(config, host="::1", port=2883)
    assert changed.listeners == (ListenerConfig(host="::1", port=2883),
                                 ListenerConfig(host="0.0.0.0", port=1884))
    assert config.listeners[0].port == 1883  # the original is untouched


def test_port_alone_keeps_the_host(write) -> None:
    config = apply_overrides(load_config(write("")), port=0)
    assert config.listeners == (ListenerConfig(host="127.0.0.1", port=0),)


def test_host_override_creates_a_listener_when_there_is_none() -> None:
    config = apply_overrides(Config(listeners=()), host="localhost")
    assert config.listeners == (ListenerConfig(host="localhost", port=1883),)


def test_data_dir_and_log_level_overrides() -> None:
    config = apply_overrides(Config(), data_dir="/srv/eb", log_level="warning")
    assert config.broker.data_dir == Path("/srv/eb")
    assert config.log.level == "warning"
    assert config.log.logging_level == 30


def test_no_overrides_changes_nothing(write) -> None:
    config = load_config(write("[mqtt]\nmax_qos = 1\n"))
    assert apply_overrides(config) == config


def test_host_flag_to_a_reachable_address_follows_the_security_rule(write) -> None:
    path = write("[log]\nlevel = \"info\"\n")
    with pytest.raises(ConfigError) as info:
        apply_overrides(load_config(path), host="0.0.0.0")
    assert str(info.value) == (
        '--host: "0.0.0.0" accepts connections from other hosts; no authentication is '
        "configured (no [auth] password_file, no client certificates), so set password_file, "
        "or set allow_anonymous = true explicitly (in [auth] or on the first "
        f"[[listeners]] table of {path}) to allow anonymous access"
    )
    assert info.value.key == "--host"


def test_host_flag_without_a_file_says_so() -> None:
    with pytest.raises(ConfigError, match=r"^--host: .* a --config file\)"):
        apply_overrides(Config(), host="")


@pytest.mark.parametrize("settings", [
    "[auth]\nallow_anonymous = true\n",
    "[[listeners]]\nallow_anonymous = true\n",
])
def test_host_flag_is_accepted_when_anonymous_access_is_explicit(write, settings: str) -> None:
    config = apply_overrides(load_config(write(settings)), host="0.0.0.0")
    assert config.listeners[0].host == "0.0.0.0"
    assert config.listeners[0].anonymous_allowed(config.auth)


@pytest.mark.parametrize(("flags", "message"), [
    ({"port": 65536}, "--port: expected an integer from 0 to 65535, got 65536"),
    ({"host": "[::]"}, '--host: write an IPv6 address without brackets, got "[::]"'),
    ({"data_dir": ""}, '--data-dir: expected a non-empty string (a directory path), got ""'),
    ({"log_level": "trace"}, '--log-level: expected one of "debug", "info", "warning", '
                             '"error", got "trace"'),
])
def test_bad_flags_name_the_flag(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), **flags)
    assert str(info.value) == message


def test_port_flag_that_collides_with_another_listener_names_the_flag(write) -> None:
    config = load_config(write('[[listeners]]\nport = 1883\n[[listeners]]\nport = 1884\n'))
    with pytest.raises(ConfigError, match=r"^--port: "):
        apply_overrides(config, port=1884)


# --------------------------------------------------------------------------- shipped files


def test_the_example_config_shows_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for table, keys in known_keys().items():
        header = "[[listeners]]" if table == "listeners" else f"[{table}]"
        assert header in text, header
        for key in keys:
            assert re.search(rf"^(# )?{key} = ", text, re.MULTILINE), f"{table}.{key}"


def test_the_example_commented_defaults_are_the_real_defaults(tmp_path: Path) -> None:
    # Uncomment every "# key = value" and "# [table]" line: the result must be the defaults
    # (apart from data_dir, which the example sets for the systemd unit).
    text = EXAMPLE.read_text(encoding="utf-8")
    # The TLS file keys and ciphers have no default: their example paths need not exist
    # here, and the cipher list is an example.
    text = re.sub(r"^# (cafile|certfile|keyfile|crlfile|ciphers) = .*$", "", text,
                  flags=re.MULTILINE)
    uncommented = re.sub(r"^# ((?:\[\[?\w+\]\]?)|(?:\w+ = .+))$", r"\1", text, flags=re.MULTILINE)
    path = tmp_path / "uncommented.toml"
    path.write_text(uncommented, encoding="utf-8")
    config = load_config(path)
    defaults = Config()
    assert config.broker.sys_interval_s == defaults.broker.sys_interval_s
    assert config.mqtt == defaults.mqtt
    assert config.storage == defaults.storage
    assert config.log == defaults.log
    assert [(x.host, x.port, x.protocol) for x in config.listeners] == [
        (x.host, x.port, x.protocol) for x in defaults.listeners]
    assert config.listeners[0].anonymous_allowed(config.auth) == (
        defaults.listeners[0].anonymous_allowed(defaults.auth))


def test_the_example_config_is_valid_and_keeps_the_broker_local() -> None:
    config = load_config(EXAMPLE)
    assert config.broker.data_dir == Path("/var/lib/edge-broker")
    assert all(listener.is_loopback for listener in config.listeners)


def test_the_reference_documents_every_key() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for table, keys in known_keys().items():
        for key in keys:
            assert f"`{key}`" in text, f"{table}.{key}"


def test_the_reload_table_lists_exactly_the_reloadable_keys() -> None:
    # docs/configuration.md "What `SIGHUP` reloads": `[table] key` (or `[table]` then keys)
    # per row, but the last ("every other key"); server/reload.py RELOADABLE, by TOML name.
    from edge_broker.server.reload import RELOADABLE

    text = DOCS.read_text(encoding="utf-8")
    section = text.split("### What `SIGHUP` reloads", 1)[1].split("\n#", 1)[0]
    documented: set[tuple[str, str]] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        table = ""
        for name in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            parts = re.fullmatch(r"\[(\w+)\](?: (\w+))?", name)
            if parts:
                table = parts[1]
                name = parts[2] or ""
            if name:
                documented.add((table, name))
    toml_names = {(table, toml_key(table, field)) for table, field in RELOADABLE}
    assert documented == toml_names
