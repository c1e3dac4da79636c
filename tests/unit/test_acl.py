"""ACL files in mosquitto's syntax (edge_broker.auth.acl): the syntax and the decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_broker.auth.acl import Acl
from edge_broker.errors import ConfigError

EXAMPLE = """\
# anonymous clients
topic read $SYS/broker/#
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic sensors/+/temp

user bob
topic write bob/out
pattern read devices/%c/in
user alice
topic read shared/alice-too

pattern write devices/%c/out
pattern readwrite users/%u/#
pattern deny users/%u/locked
"""


@pytest.fixture
def acl() -> Acl:
    return Acl.parse(EXAMPLE, "acl")


def pub(acl: Acl, topic: str, username: str | None = "alice", client_id: str = "c1") -> bool:
    return acl.can_publish(topic, username=username, client_id=client_id)


def read(acl: Acl, topic: str, username: str | None = "alice", client_id: str = "c1") -> bool:
    return acl.can_read(topic, username=username, client_id=client_id)


def sub(acl: Acl, topic_filter: str, username: str | None = "alice",
        client_id: str = "c1") -> bool:
    return acl.can_subscribe(topic_filter, username=username, client_id=client_id)


# --------------------------------------------------------------------------- syntax


def test_rules_before_any_user_line_are_the_anonymous_clients(acl: Acl) -> None:
    assert read(acl, "public/news", username=None)
    assert read(acl, "$SYS/broker/uptime", username=None)
    assert not pub(acl, "public/news", username=None)
    assert not read(acl, "public/news", username="alice")  # not alice's rule
    assert not read(acl, "alice/x", username=None)


def test_no_access_word_means_readwrite(acl: Acl) -> None:
    assert pub(acl, "sensors/1/temp") and read(acl, "sensors/1/temp")


def test_a_user_appearing_twice_adds_up(acl: Acl) -> None:
    assert read(acl, "shared/alice-too") and read(acl, "alice/x")


def test_patterns_apply_to_every_user_wherever_they_are_written(acl: Acl) -> None:
    # `pattern read devices/%c/in` is written in bob's section, yet applies to all
    assert read(acl, "devices/c1/in", username="alice", client_id="c1")
    assert read(acl, "devices/c9/in", username=None, client_id="c9")
    assert pub(acl, "devices/dev7/out", username="carol", client_id="dev7")
    assert not pub(acl, "devices/dev7/out", username="carol", client_id="dev8")
    assert not read(acl, "devices/dev7/out", username="carol", client_id="dev7")


def test_topic_may_contain_spaces_and_lines_may_be_indented() -> None:
    acl = Acl.parse("  topic read a b/c d  \n\t# comment\n", "acl")
    assert read(acl, "a b/c d", username=None)
    assert not read(acl, "a", username=None)


def test_a_topic_named_like_an_access_word_and_tabs() -> None:
    acl = Acl.parse("topic write read\ntopic\tread\tdeny\n")
    assert pub(acl, "read", username=None) and not read(acl, "read", username=None)
    assert read(acl, "deny", username=None)


@pytest.mark.parametrize(("text", "message"), [
    ("topic read a\nfoo bar\n", "line 2: unknown keyword 'foo'"),
    ("topic read\n", "line 1: topic needs a topic filter"),
    ("\n\npattern deny\n", "line 3: pattern needs a topic filter"),
    ("topic read a/#/b\n", "line 1: 'a/#/b' is not a valid topic filter"),
    ("topic read a+/b\n", "line 1: 'a+/b' is not a valid topic filter"),
    ("topic $share/g/a\n", "line 1: '$share/g/a' is not a valid topic filter"),
    ("user\n", "line 1: 'user' needs a username"),
    ("Topic read a\n", "line 1: unknown keyword 'Topic'"),
])
def test_bad_lines_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Acl.parse(text, "/etc/edge-broker/acl")
    assert str(caught.value).startswith(f"/etc/edge-broker/acl: {message}")


def test_load_reads_a_file_and_refuses_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "acl"
    path.write_text(EXAMPLE)
    assert pub(Acl.load(path), "alice/x")
    path.write_bytes(b"topic read a\ntopic read \xff\n")
    with pytest.raises(ConfigError, match=r"acl: line 2: not valid UTF-8"):
        Acl.load(path)
    with pytest.raises(ConfigError, match="cannot read the ACL file"):
        Acl.load(tmp_path / "missing")


# --------------------------------------------------------------------------- decisions


def test_deny_beats_allow_in_the_same_section(acl: Acl) -> None:
    assert pub(acl, "alice/x") and read(acl, "alice/x")
    assert not pub(acl, "alice/secret/x") and not read(acl, "alice/secret")


def test_access_word_limits_the_direction(acl: Acl) -> None:
    assert pub(acl, "bob/out", username="bob") and not read(acl, "bob/out", username="bob")


def test_mosquitto_order_own_topic_rules_before_patterns() -> None:
    acl = Acl.parse("user alice\ntopic read users/alice/locked\n"
                    "pattern deny users/%u/locked\npattern read users/%u/#\n")
    assert read(acl, "users/alice/locked")  # own topic allow decides before pattern deny
    assert not read(acl, "users/alice/locked", username="bob")  # no own rule: pattern deny
    assert not read(acl, "users/bob/locked", username="bob")
    assert read(acl, "users/bob/x", username="bob")


def test_a_matching_rule_of_another_access_decides_nothing() -> None:
    acl = Acl.parse("user a\ntopic write x/#\ntopic read x/y\n")
    assert read(acl, "x/y", username="a") and pub(acl, "x/y", username="a")
    assert not read(acl, "x/z", username="a")


def test_unknown_user_has_only_the_patterns(acl: Acl) -> None:
    assert pub(acl, "users/zed/x", username="zed")
    assert not read(acl, "public/news", username="zed")


def test_username_pattern_does_not_apply_to_anonymous_clients() -> None:
    acl = Acl.parse("pattern readwrite users/%u/#\npattern deny x/%u\ntopic read x/#\n")
    assert not read(acl, "users/%u/x", username=None)
    assert not read(acl, "users//x", username=None)
    assert read(acl, "x/y", username=None)


def test_substitution_inside_a_level() -> None:
    acl = Acl.parse("pattern readwrite site/dev-%c/%u-data\n")
    assert pub(acl, "site/dev-7/ann-data", username="ann", client_id="7")
    assert not pub(acl, "site/dev-8/ann-data", username="ann", client_id="7")


def test_a_client_id_that_looks_like_a_variable_is_not_substituted_again() -> None:
    acl = Acl.parse("pattern readwrite devices/%c/#\npattern readwrite users/%u/%c\n")
    assert not pub(acl, "devices/alice/x", username="alice", client_id="%u")
    assert pub(acl, "devices/%u/x", username="alice", client_id="%u")
    assert pub(acl, "users/%c/b", username="%c", client_id="b")
    assert not pub(acl, "users/b/b", username="%c", client_id="b")


@pytest.mark.parametrize("client_id", ["+", "#", "a/b", "a+", "x#", ""])
def test_client_ids_that_would_widen_a_pattern_get_no_pattern_access(client_id: str) -> None:
    acl = Acl.parse("pattern readwrite devices/%c/#\npattern read public/#\n"
                    "user u\ntopic read own/#\n")
    assert not pub(acl, f"devices/{client_id}/x", username="u", client_id=client_id)
    assert not pub(acl, "devices/a/b/x", username="u", client_id=client_id)
    assert not read(acl, "devices/other/x", username="u", client_id=client_id)
    assert not read(acl, "public/x", username="u", client_id=client_id)
    assert not sub(acl, "devices/#", username="u", client_id=client_id)
    assert read(acl, "own/x", username="u", client_id=client_id)  # topic rules still apply
    assert read(acl, "public/x", username="u", client_id="safe")


@pytest.mark.parametrize("username", ["+", "#", "a/b", ""])
def test_usernames_that_would_widen_a_pattern_get_no_pattern_access(username: str) -> None:
    acl = Acl.parse("pattern readwrite users/%u/#\n")
    assert not pub(acl, f"users/{username}/x", username=username)
    assert not read(acl, "users/a/b/x", username=username)
    assert pub(acl, "users/ok/x", username="ok")


def test_unsafe_username_does_not_matter_when_no_pattern_uses_it() -> None:
    acl = Acl.parse("pattern readwrite devices/%c/#\n")
    assert pub(acl, "devices/c1/x", username="a/b", client_id="c1")


@pytest.mark.parametrize(("patterns", "username", "client_id"), [
    ("pattern readwrite users/%u/#\n", "alice", "x+"),
    ("pattern readwrite users/%u/#\n", "alice", "x#"),
    ("pattern readwrite devices/%c/#\n", "u+x", "c1"),
    ("pattern readwrite devices/%c/#\n", "u#", "c1")])
def test_a_wildcard_in_the_client_id_or_username_gets_no_pattern_at_all(
        patterns: str, username: str, client_id: str) -> None:
    """As mosquitto ("dangerous client id"): whichever variable the patterns use, and a
    pattern without any too; the client's own `topic` rules still apply. Before, a client id
    `x+` was refused only by patterns using %c: with these it could publish and read
    users/alice/... and public/...."""
    acl = Acl.parse(f"{patterns}pattern readwrite public/#\n"
                    f"user {username}\ntopic read own/#\n")
    own = f"users/{username}/1" if "%u" in patterns else f"devices/{client_id}/1"
    assert not pub(acl, own, username=username, client_id=client_id)
    assert not read(acl, own, username=username, client_id=client_id)
    assert not pub(acl, "public/1", username=username, client_id=client_id)
    assert read(acl, "own/1", username=username, client_id=client_id)  # its own rules
    assert pub(acl, "public/1", username="alice", client_id="c1")


def test_dollar_topics_follow_the_wildcard_rules() -> None:
    acl = Acl.parse("topic readwrite #\ntopic read +/x\ntopic read $SYS/#\n")
    assert pub(acl, "a/b", username=None)
    assert not pub(acl, "$SYS/broker/x", username=None)  # [MQTT-4.7.2-1] (5.0)
    assert read(acl, "$SYS/broker/x", username=None)
    assert not read(acl, "$x/x", username=None)
    assert sub(acl, "$share/g/a", username=None)
    assert not sub(acl, "$share/#", username=None)  # not a valid shared filter


def test_subscribe_partly_readable_filter_is_granted(acl: Acl) -> None:
    assert sub(acl, "#")
    assert sub(acl, "alice/+")
    assert sub(acl, "+/+/temp")
    assert sub(acl, "alice/secret/#") is False
    assert sub(acl, "alice/secret/x") is False
    assert sub(acl, "bob/#") is False
    assert sub(acl, "#", username=None)
    assert sub(acl, "$SYS/#", username=None)
    assert not sub(acl, "$SYS/other/#", username=None)


def test_subscribe_granted_by_a_write_only_rule_is_refused(acl: Acl) -> None:
    assert not sub(acl, "bob/out", username="bob")


def test_subscribe_covered_by_denies_is_refused() -> None:
    acl = Acl.parse("user a\ntopic read x/+\ntopic deny x/#\n")
    assert not sub(acl, "x/#", username="a") and not sub(acl, "#", username="a")
    acl = Acl.parse("user a\ntopic read x/#\ntopic deny x/+/#\n")
    assert sub(acl, "x/#", username="a")  # "x" itself is readable
    assert not sub(acl, "x/+", username="a")
    acl = Acl.parse("user a\ntopic read x/+\ntopic deny x/y\n")
    assert sub(acl, "x/+", username="a")  # any other level than y
    assert not sub(acl, "x/y", username="a")


def test_subscribe_through_an_empty_level() -> None:
    acl = Acl.parse("topic read a/\ntopic read /b\n")
    assert sub(acl, "a/+", username=None) and sub(acl, "a/#", username=None)
    assert sub(acl, "+/b", username=None) and sub(acl, "#", username=None)
    assert not sub(acl, "a/x", username=None)


def test_subscribe_not_granted_by_the_empty_topic() -> None:
    # `/#` matches "/", "/x", ... (two levels or more, the first empty) and, through the
    # parent-level rule of "#", "": which is no topic name [MQTT-4.7.3-1] (3.1.1, 5.0). So a
    # grant of the one-level topics `+` reads nothing `/#` can deliver.
    acl = Acl.parse("topic read +\n")
    assert not sub(acl, "/#", username=None)
    assert not sub(acl, "/+", username=None)
    assert sub(acl, "#", username=None) and sub(acl, "+/#", username=None)


def test_subscribe_shared_and_invalid_filters() -> None:
    acl = Acl.parse("topic read a/#\n")
    assert sub(acl, "$share/g/a/b", username=None)
    assert not sub(acl, "$share/g/b", username=None)
    assert not sub(acl, "a/#/b", username=None)
    assert not sub(acl, "", username=None)


def test_a_thousand_rules(acl: Acl) -> None:
    lines = []
    for index in range(500):
        lines += [f"user dev{index}", f"topic readwrite plant/line{index % 7}/dev{index}/#",
                  f"topic deny plant/line{index % 7}/dev{index}/config"]
    big = Acl.parse("\n".join(lines))
    assert big.rule_count == 1000
    for index in range(0, 500, 37):
        name = f"dev{index}"
        assert pub(big, f"plant/line{index % 7}/{name}/temp", username=name)
        assert not pub(big, f"plant/line{index % 7}/{name}/config", username=name)
        assert not pub(big, f"plant/line{index % 7}/dev{index + 1}/temp", username=name)
        assert sub(big, "plant/#", username=name)
        assert not sub(big, f"plant/line{index % 7}/{name}/config", username=name)
