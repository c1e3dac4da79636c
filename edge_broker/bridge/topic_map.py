"""Topic mapping for bridges: MQTT topics <-> NATS subjects, Kafka routes, MQTT topic lines.

NATS subjects
-------------
A message on MQTT topic T goes to the subject `<prefix>.<T'>` where T' is T with each level
escaped (table below) and the levels joined by ".". NATS splits subjects into tokens at ".";
a token may not be empty and may not contain whitespace, and the tokens "*" and ">" are
wildcards. MQTT allows all of these in a topic name. So each MQTT level is escaped:

    =========================  ==========  ==========================================
    in an MQTT level            becomes     why
    =========================  ==========  ==========================================
    ``~``                       ``~7E``     the escape character itself
    ``.``                       ``~2E``     the NATS token separator
    ``*``                       ``~2A``     NATS wildcard
    ``>``                       ``~3E``     NATS wildcard
    space, tab, CR, LF, ...     ``~XX``     NATS forbids whitespace (every character
                                            ``str.isspace()`` calls whitespace: ``~XX``
                                            for code points below 0x100, ``~uXXXX`` or
                                            ``~UXXXXXXXX`` above)
    control characters < 0x20   ``~XX``     not safe in a NATS protocol line
    an empty level              ``~``       NATS forbids empty tokens (``a//b``,
                                            a leading or trailing ``/``)
    =========================  ==========  ==========================================

Hex digits are upper case. Every other character, including "/"-free UTF-8 text, "$", "+"
and "#" (which cannot appear in a topic name anyway), passes unchanged. The escaping is
reversible: `subject_to_topic(prefix, topic_to_subject(prefix, t)) == t` for every valid
topic name t (property-tested). Examples with prefix "site1.gw7":

    sensors/t1           site1.gw7.sensors.t1
    sensors/v1.2         site1.gw7.sensors.v1~2E2
    /a//b/               site1.gw7.~.a.~.b.~
    room 1/temp          site1.gw7.room~201.temp
    a/~/b                site1.gw7.a.~7E.b

Kafka routes
------------
`route_kafka(routes, topic)` returns the Kafka topic of the FIRST route whose MQTT filter
matches the topic (configuration order), or None.

MQTT topic lines
----------------
`parse_topic_line("sensors/# out 1 \\"\\" site1/gw7/")` reads mosquitto's bridge `topic`
syntax: `pattern [direction [qos [local_prefix [remote_prefix]]]]`, whitespace-separated,
`""` for an empty prefix. A local topic `<local_prefix><rest>` whose `<rest>` matches the
pattern goes upstream as `<remote_prefix><rest>`; the reverse for "in"; with the empty
pattern `""`, the prefixes are the two topics, mapped one to the other (mosquitto's form for
one fixed topic). When several lines
send a local topic, the first one's prefixes apply and the highest of their QoS
(`map_topic_out`).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from edge_broker.mqtt.topics import is_valid_topic_filter, is_valid_topic_name, topic_matches

ESCAPE: Final = "~"
EMPTY_LEVEL: Final = "~"
_RESERVED: Final = frozenset(".*>~")


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"~{code:02X}"
    if code < 0x10000:
        return f"~u{code:04X}"
    return f"~U{code:08X}"


def _needs_escape(ch: str) -> bool:
    return ch in _RESERVED or ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F


def escape_level(level: str) -> str:
    """One MQTT topic level as one NATS token (see the table in the module docstring)."""
    if not level:
        return EMPTY_LEVEL
    if not any(_needs_escape(ch) for ch in level):
        return level
    return "".join(_escape_char(ch) if _needs_escape(ch) else ch for ch in level)


def unescape_token(token: str) -> str:
    """The MQTT level of one NATS token; ValueError when it is not an escaped level."""
    if token == EMPTY_LEVEL:
        return ""
    if ESCAPE not in token:
        return token
    out: list[str] = []
    i = 0
    n = len(token)
    while i < n:
        ch = token[i]
        if ch != ESCAPE:
            out.append(ch)
            i += 1
            continue
        if token.startswith("u", i + 1):
            width, start = 4, i + 2
        elif token.startswith("U", i + 1):
            width, start = 8, i + 2
        else:
            width, start = 2, i + 1
        digits = token[start:start + width]
        if len(digits) != width or any(c not in "0123456789ABCDEF" for c in digits):
            raise ValueError(f"bad escape at {i} in NATS token {token!r}")
        out.append(chr(int(digits, 16)))
        i = start + width
    return "".join(out)


def is_valid_subject(subject: str) -> bool:
    """A literal NATS subject a message may be published to: non-empty tokens without
    whitespace, and no wildcard tokens."""
    if not subject:
        return False
    for token in subject.split("."):
        if not token or token in ("*", ">") or any(ch.isspace() for ch in token):
            return False
    return True


def is_valid_subject_filter(subject: str) -> bool:
    """A NATS subject that may contain `*` tokens and a final `>` token."""
    if not subject:
        return False
    tokens = subject.split(".")
    for index, token in enumerate(tokens):
        if not token or any(ch.isspace() for ch in token):
            return False
        if ">" in token and (token != ">" or index != len(tokens) - 1):
            return False
        if "*" in token and token != "*":
            return False
    return True


def topic_to_subject(prefix: str, topic: str) -> str:
    """`<prefix>.<escaped levels>`; `prefix` "" gives the escaped topic alone."""
    body = ".".join(escape_level(level) for level in topic.split("/"))
    return f"{prefix}.{body}" if prefix else body


def subject_to_topic(prefix: str, subject: str) -> str:
    """The reverse of `topic_to_subject`. ValueError when the subject is not under the prefix
    or is not an escaped topic."""
    if prefix:
        head = prefix + "."
        if not subject.startswith(head) or len(subject) == len(head):
            raise ValueError(f"subject {subject!r} is not under {prefix!r}")
        subject = subject[len(head):]
    return "/".join(unescape_token(token) for token in subject.split("."))


# --------------------------------------------------------------------------- Kafka


@dataclass(frozen=True, slots=True)
class KafkaRoute:
    """One `topic_map` entry: messages whose MQTT topic matches `filter` go to `topic`."""

    filter: str
    topic: str


def route_kafka(routes: Sequence[KafkaRoute], mqtt_topic: str) -> str | None:
    """The Kafka topic of the first route matching `mqtt_topic`, or None."""
    for route in routes:
        if topic_matches(route.filter, mqtt_topic):
            return route.topic
    return None


def is_valid_kafka_topic(name: str) -> bool:
    """Kafka's rule: 1 to 249 characters of ASCII letters, digits, '.', '_', '-'; not '.'
    or '..'."""
    if not 0 < len(name) <= 249 or name in (".", ".."):
        return False
    return all(c.isascii() and (c.isalnum() or c in "._-") for c in name)


# --------------------------------------------------------------------------- MQTT lines

Direction = Literal["in", "out", "both"]
DIRECTIONS: Final[tuple[Direction, ...]] = ("out", "in", "both")


@dataclass(frozen=True, slots=True)
class TopicLine:
    """One mosquitto-style bridge topic line."""

    pattern: str
    direction: Direction = "out"
    qos: int = 0
    local_prefix: str = ""
    remote_prefix: str = ""

    @property
    def uplink(self) -> bool:
        return self.direction in ("out", "both")

    @property
    def downlink(self) -> bool:
        return self.direction in ("in", "both")

    @property
    def local_filter(self) -> str:
        return self.local_prefix + self.pattern

    @property
    def remote_filter(self) -> str:
        return self.remote_prefix + self.pattern

    def to_remote(self, local_topic: str) -> str | None:
        """The remote topic of a local one, or None when this line does not send it."""
        if not self.uplink:
            return None
        return _swap(self.pattern, self.local_prefix, self.remote_prefix, local_topic)

    def to_local(self, remote_topic: str) -> str | None:
        """The local topic of a remote one, or None when this line does not take it."""
        if not self.downlink:
            return None
        return _swap(self.pattern, self.remote_prefix, self.local_prefix, remote_topic)


def _swap(pattern: str, prefix: str, other: str, topic: str) -> str | None:
    """`topic` with `prefix` replaced by `other` if the rest matches `pattern`; an empty
    pattern (mosquitto's form for one fixed topic) takes `prefix` exactly."""
    if not pattern:
        return other if topic == prefix else None
    if not topic.startswith(prefix):
        return None
    rest = topic[len(prefix):]
    # An empty rest is the prefix's own empty last level ("LH/" under "LH/" with "#"): the
    # pattern says whether it matches.
    if (not rest and not prefix) or not topic_matches(pattern, rest):
        return None
    return other + rest


def parse_topic_line(line: str) -> TopicLine:
    """A TopicLine from mosquitto's syntax; ValueError with a readable reason."""
    try:
        fields = shlex.split(line, posix=True)
    except ValueError as exc:
        raise ValueError(f"cannot split {line!r}: {exc}") from None
    if not 1 <= len(fields) <= 5:
        raise ValueError("expected \"pattern [direction [qos [local_prefix [remote_prefix]]]]\","
                         f" got {len(fields)} fields")
    pattern = fields[0]
    if pattern and (not is_valid_topic_filter(pattern) or pattern.startswith("$share/")):
        raise ValueError(f"{pattern!r} is not a valid MQTT topic filter")
    direction = fields[1] if len(fields) > 1 else "out"
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be out, in or both, got {direction!r}")
    # Default QoS: 2 for a line that takes downlink ("in", "both"), so that commands are
    # queued by the remote while the gateway is away and come in exactly once (mosquitto's
    # default, 0, would lose them); 0 for "out", as mosquitto.
    qos_text = fields[2] if len(fields) > 2 else ("0" if direction == "out" else "2")
    if qos_text not in ("0", "1", "2"):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos_text!r}")
    local_prefix = fields[3] if len(fields) > 3 else ""
    remote_prefix = fields[4] if len(fields) > 4 else ""
    for what, prefix in (("local_prefix", local_prefix), ("remote_prefix", remote_prefix)):
        if "+" in prefix or "#" in prefix or "\x00" in prefix:
            raise ValueError(f"{what} {prefix!r} may not contain wildcards")
    if not pattern and not (local_prefix and remote_prefix):
        raise ValueError('an empty pattern ("") needs both prefixes: they are the local and '
                         "the remote topic")
    line_obj = TopicLine(pattern, direction, int(qos_text), local_prefix, remote_prefix)
    return line_obj


def map_topic_out(lines: Sequence[TopicLine], local_topic: str) -> tuple[str, int] | None:
    """(remote topic, qos) for `local_topic`, or None when no "out"/"both" line sends it.

    The remote topic is the FIRST such line's (its prefixes); the QoS is the HIGHEST of all
    the lines that send it, as overlapping subscriptions deliver a message at the highest
    QoS of those it matches ([MQTT-3.3.4-2] (5.0), [MQTT-3.3.5-1] (3.1.1); mosquitto's
    bridge does the same): `m/# out 0` then `m/x out 2` sends a QoS 2 message on m/x at 2."""
    found: str | None = None
    qos = 0
    for line in lines:
        remote = line.to_remote(local_topic)
        if remote is None or not is_valid_topic_name(remote):
            continue
        if found is None:
            found = remote
        if line.qos > qos:
            qos = line.qos
            if qos == 2:
                break  # no higher; the topic is already the first line's
    return None if found is None else (found, qos)


def map_topic_in(lines: Sequence[TopicLine], remote_topic: str) -> str | None:
    """The local topic of the first "in"/"both" line that takes `remote_topic`."""
    for line in lines:
        local = line.to_local(remote_topic)
        if local is not None and is_valid_topic_name(local):
            return local
    return None
