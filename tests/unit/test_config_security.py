"""[auth] password_file / acl_file and [quotas]: how they load, their defaults, their errors,
and the listener-reachability rule once a password file is an authentication source."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_broker.config import Config, UserQuota, load_config
from edge_broker.errors import ConfigError
from edge_broker.server.reload import plan_reload, reload


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "edge-broker.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def test_a_password_file_makes_anonymous_access_opt_in(write: Callable[[str], Path]) -> None:
    config = load_config(write('[auth]\npassword_file = "/etc/eb/passwd"\n'
                               'acl_file = "/etc/eb/acl"\n'))
    assert config.auth.password_file == Path("/etc/eb/passwd")
    assert config.auth.acl_file == Path("/etc/eb/acl")
    assert not config.listeners[0].anonymous_allowed(config.auth)
    explicit = load_config(write('[auth]\npassword_file = "/p"\nallow_anonymous = true\n'))
    assert explicit.listeners[0].anonymous_allowed(explicit.auth)


def test_a_password_file_lets_a_network_listener_start(write: Callable[[str], Path]) -> None:
    config = load_config(write('[auth]\npassword_file = "/p"\n'
                               '[[listeners]]\nhost = "0.0.0.0"\n'))
    assert not config.listeners[0].is_loopback
    # ...and allow_anonymous = false is no longer "nobody could connect".
    load_config(write('[auth]\npassword_file = "/p"\nallow_anonymous = false\n'))


def test_without_a_password_file_the_rules_still_hold(write: Callable[[str], Path]) -> None:
    with pytest.raises(ConfigError, match="no authentication is configured"):
        load_config(write('[[listeners]]\nhost = "0.0.0.0"\n'))
    with pytest.raises(ConfigError, match="refuses every client"):
        load_config(write("[auth]\nallow_anonymous = false\n"))


def test_quotas_and_per_user_overrides(write: Callable[[str], Path]) -> None:
    config = load_config(write(
        "[quotas]\npublish_msgs_per_s = 12.5\npublish_bytes_per_s = 4000\n"
        "max_connections = 100\nmax_connections_per_address = 5\n"
        '[[quotas.users]]\nusername = "bulk"\npublish_msgs_per_s = 0\n'
        '[[quotas.users]]\nusername = "slow"\npublish_bytes_per_s = 10\n'))
    quotas = config.quotas
    assert (quotas.max_connections, quotas.max_connections_per_address) == (100, 5)
    assert quotas.users == (UserQuota("bulk", publish_msgs_per_s=0.0),
                            UserQuota("slow", publish_bytes_per_s=10))
    assert quotas.rates_for(None) == (12.5, 4000)
    assert quotas.rates_for("bulk") == (0.0, 4000)  # 0 = unlimited for that user
    assert quotas.rates_for("slow") == (12.5, 10)
    assert quotas.rates_for("other") == (12.5, 4000)


@pytest.mark.parametrize(("text", "message"), [
    ("[quotas]\npublish_msgs_per_s = -1\n", "[quotas] publish_msgs_per_s: expected a non-neg"),
    ("[quotas]\npublish_msgs_per_s = true\n", "[quotas] publish_msgs_per_s: expected a non-neg"),
    ("[quotas]\npublish_bytes_per_s = 1.5\n", "[quotas] publish_bytes_per_s: expected a non-ne"),
    ('[[quotas.users]]\npublish_msgs_per_s = 1\n', "[[quotas.users]] #1 username: expected"),
    ('[[quotas.users]]\nusername = "a"\n[[quotas.users]]\nusername = "a"\n',
     '[[quotas.users]] #2 username: user "a" has two entries'),
    ('[[quotas.users]]\nusername = "a"\nrate = 1\n', "[[quotas.users]] #1 rate: unknown key"),
    ('[auth]\npassword_file = ""\n', "[auth] password_file: expected a non-empty string"),
    ('[auth]\nacl_file = 3\n', "[auth] acl_file: expected a non-empty string"),
])
def test_bad_values_name_the_table_and_key(write: Callable[[str], Path], text: str,
                                           message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(text))
    assert message in str(info.value)


def test_auth_files_and_quotas_are_reloadable(write: Callable[[str], Path]) -> None:
    old = load_config(write('[auth]\npassword_file = "/a"\n[quotas]\npublish_msgs_per_s = 1\n'))
    new = load_config(write('[auth]\npassword_file = "/b"\nacl_file = "/acl"\n'
                            '[quotas]\npublish_msgs_per_s = 2\nmax_connections = 3\n'))
    plan = plan_reload(old, new)
    assert set(plan.applied) == {"auth.password_file", "auth.acl_file",
                                 "quotas.publish_msgs_per_s", "quotas.max_connections"}
    assert plan.config.auth.password_file == Path("/b")
    assert plan.config.quotas.publish_msgs_per_s == 2


def test_keys_that_need_a_restart_are_named_as_in_the_file(
        write: Callable[[str], Path]) -> None:
    old = load_config(write('[broker]\nsys_interval = 10\n[auth]\npassword_file = "/p"\n'
                            "allow_anonymous = true\n"))
    new = load_config(write('[broker]\nsys_interval = 30\n[auth]\npassword_file = "/p"\n'
                            "allow_anonymous = false\n"))
    plan = plan_reload(old, new)
    assert plan.needs_restart == ("broker.sys_interval",)  # the field is sys_interval_s
    assert plan.applied == ("auth.allow_anonymous",)
    assert plan.config.broker.sys_interval_s == 10
    assert not plan.config.auth.allow_anonymous


@pytest.fixture
def root_level() -> Iterator[None]:
    """`reload` sets the root logger's level from [log]: put it back after."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


class _App:
    """What server/reload.py `reload` uses of the broker: its configuration and its gate
    (whose password and ACL files load, or not)."""

    def __init__(self, config: Config, files_load: bool) -> None:
        self.config = config
        self.gate = SimpleNamespace(reload=lambda auth: files_load)
        self.listeners = None


def test_a_reload_whose_password_file_does_not_load_keeps_the_running_auth(
        write: Callable[[str], Path], root_level: None) -> None:
    # Anonymous clients are let in; the new file adds a password file (so allow_anonymous
    # defaults to false), but that file does not load: nothing of [auth] may change, or
    # every client would be refused with no password file in force.
    app = _App(load_config(write("[log]\nlevel = \"info\"\n")), files_load=False)
    before = app.config.auth
    assert reload(app, lambda: load_config(write('[auth]\npassword_file = "/p"\n')))
    assert app.config.auth == before
    assert app.config.listeners[0].anonymous_allowed(app.config.auth)


def test_a_reload_that_would_open_a_running_network_listener_is_refused(
        write: Callable[[str], Path], root_level: None) -> None:
    # The running listener faces the network with a password file. The new file moves it to
    # loopback (a restart applies that) and drops the password file: adopting its [auth]
    # now would let anonymous clients in from the network.
    app = _App(load_config(write('[auth]\npassword_file = "/p"\n'
                                 '[[listeners]]\nhost = "0.0.0.0"\n')), files_load=True)
    before = app.config
    assert not reload(app, lambda: load_config(write("[[listeners]]\nhost = \"127.0.0.1\"\n")))
    assert app.config is before


def test_adding_an_explicit_allow_anonymous_is_not_a_restart_key(
        write: Callable[[str], Path]) -> None:
    old = load_config(write("[auth]\n"))
    new = load_config(write("[auth]\nallow_anonymous = true\n"))
    plan = plan_reload(old, new)
    assert plan.needs_restart == ()
    assert plan.config.auth == new.auth
