"""Rows of the SQLite store checked as they are read at open; invalid ones are quarantined.

Theory of operation
-------------------
A stored row can be wrong although SQLite finds the file sound (`PRAGMA quick_check` checks
pages and indexes, not what the values mean): a flipped bit in a JSON column, a payload stored
as TEXT, `qos = 7`, a packet id of 70000, a will topic with a wildcard, text that is not
UTF-8. Decoding such a row used to raise at start-up (exit 1, restarted by systemd for ever)
or, later, on every connect of its session. Now every row the snapshot is built from passes
through a checker here, which turns it into its record or raises `BadRow` saying why. The
checkers accept exactly what this code writes: values of the stored type and range, topic
names and filters valid for MQTT, properties that belong in a stored message (the
pass-through ones, see `core.broker._pass_through`) or a will, and that the codec can encode
again (so nothing read here can fail later when it is sent).

`check_rows` takes the raw rows of every table (read by opening.py; this package is the one that
talks to SQLite) and returns the snapshot of the valid rows plus the `Quarantined` entries:
- an invalid row is quarantined itself;
- rows that cannot stand without it follow it (counted as dependents): the subscriptions,
  deliveries and incoming QoS 2 ids of a quarantined session, and the deliveries and retained
  entries of a quarantined (or missing) message body;
- a session whose will alone is invalid, or its username (version 5: the rights the will is
  published with), keeps everything else: only its will is quarantined (the row is kept, its
  will columns and username are cleared; the session is anonymous until it connects again);
- an inflight delivery whose packet id another inflight delivery of the client already uses
  (in delivery order) is quarantined: restoring both would silently lose one.
Rows of a session that is missing without being quarantined are left as they always were (the
core ignores them).

opening.py then, in the transaction of the open, copies each entry into the `quarantine` table
(`table_name, row_key, client_id, reason, row_json, at`; schema version 2) and deletes the row
from its live table, logs it (a warning naming table, client and key; the first
`LOG_DETAIL_LIMIT` one by one, then a summary) and starts with everything else.
`edge-broker store stats` shows how many rows the quarantine table holds. Bodies no delivery
or retained entry refers to any more are pruned as usual.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ...core.changes import (
    AWAIT_COMP,
    QUEUED,
    DeliveryRecord,
    Message,
    SessionRecord,
    Snapshot,
    SubscriptionRecord,
)
from ...mqtt.errors import LocalProtocolError
from ...mqtt.packets import Will
from ...mqtt.properties import (
    NO_PROPERTIES,
    PROPERTY_TABLE,
    WILL,
    Properties,
    PropertyType,
    encode_properties_body,
)
from ...mqtt.topics import is_valid_topic_filter, is_valid_topic_name
from ...mqtt.types import PacketType
from ...mqtt.wire import utf8_bytes

__all__ = [
    "COLUMNS",
    "LOG_DETAIL_LIMIT",
    "BadRow",
    "Quarantined",
    "Undecodable",
    "check_rows",
    "decode_ids",
    "delivery_record",
    "message",
    "row_json",
    "session_record",
    "subscription_record",
    "tolerant_text",
]

LOG_DETAIL_LIMIT: Final = 20  # quarantined rows logged one by one per open; then a summary

MAX_U16: Final = 0xFFFF
MAX_U32: Final = 0xFFFFFFFF
MAX_VARINT: Final = 268_435_455

# The columns each table is read with, in order (opening.py selects exactly these).
COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "sessions": ("client_id", "protocol_level", "expiry_interval", "disconnected_at",
                 "will_topic", "will_payload", "will_qos", "will_retain", "will_properties",
                 "username"),
    "subscriptions": ("client_id", "topic_filter", "qos", "no_local", "retain_as_published",
                      "retain_handling", "subscription_id"),
    "messages": ("id", "topic", "payload", "qos", "retain", "properties", "received_at",
                 "expires_at", "origin"),
    "deliveries": ("client_id", "delivery_id", "message_id", "qos", "retain",
                   "subscription_ids", "packet_id", "state", "dup"),
    "retained": ("topic", "message_id"),
    "incoming_qos2": ("client_id", "packet_id"),
}
# The primary key of each table (the columns a quarantined row is deleted by).
KEYS: Final[dict[str, tuple[str, ...]]] = {
    "sessions": ("client_id",), "subscriptions": ("client_id", "topic_filter"),
    "messages": ("id",), "deliveries": ("client_id", "delivery_id"), "retained": ("topic",),
    "incoming_qos2": ("client_id", "packet_id"),
}

# What a stored message may carry: the pass-through properties (core.broker._pass_through).
MESSAGE_PROPERTIES: Final = frozenset({"payload_format_indicator", "content_type",
                                       "response_topic", "correlation_data",
                                       "user_properties"})
WILL_PROPERTIES: Final = frozenset(spec.attribute for spec in PROPERTY_TABLE.values()
                                   if WILL in spec.allowed_in)
_ID_TO_SPEC: Final = {int(pid): spec for pid, spec in PROPERTY_TABLE.items()}


class BadRow(ValueError):
    """A stored row that cannot be used; the message says why."""


class Undecodable(bytes):
    """A TEXT value that is not valid UTF-8 (read with `tolerant_text`): never valid."""


def tolerant_text(raw: bytes) -> str:
    """A text factory for sqlite3 that does not raise on bad UTF-8 (the row is then bad)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return Undecodable(raw)  # type: ignore[return-value]


# --------------------------------------------------------------------------- value checks


def _kind(value: object) -> str:
    if isinstance(value, Undecodable):
        return "text that is not UTF-8"
    return {bytes: "a BLOB", str: "TEXT", int: "an INTEGER", float: "a REAL",
            type(None): "NULL"}.get(type(value), type(value).__name__)


def _int(value: object, name: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise BadRow(f"{name} is {_kind(value)}, not an integer")
    if not low <= value <= high:
        raise BadRow(f"{name} {value} is out of range ({low}..{high})")
    return value


def _flag(value: object, name: str) -> bool:
    return bool(_int(value, name, 0, 1))


def _text(value: object, name: str) -> str:
    if type(value) is not str:
        raise BadRow(f"{name} is {_kind(value)}, not text")
    try:
        utf8_bytes(value)
    except LocalProtocolError as error:
        raise BadRow(f"{name}: {error}") from None
    return value


def _blob(value: object, name: str) -> bytes:
    if type(value) is not bytes:
        raise BadRow(f"{name} is stored as {_kind(value)}, not as a BLOB")
    return value


def _time(value: object, name: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise BadRow(f"{name} is {_kind(value)} {value!r}, not a time")
    return value


def _topic(value: object, name: str) -> str:
    topic = _text(value, name)
    if not is_valid_topic_name(topic):  # [MQTT-3.3.2-2] (5.0): no wildcards, not empty
        raise BadRow(f"{name} {topic!r} is not a valid topic name")
    return topic


def _property_value(spec: Any, value: Any) -> Any:
    ptype = spec.type
    if ptype is PropertyType.BINARY_DATA:
        if not isinstance(value, dict) or not isinstance(value.get("b"), str):
            raise BadRow(f"{spec.attribute} is not {{\"b\": base64}}")
        try:
            return base64.b64decode(value["b"], validate=True)
        except (binascii.Error, ValueError):
            raise BadRow(f"{spec.attribute} is not valid base64") from None
    if ptype is PropertyType.UTF8_STRING_PAIR:
        if not isinstance(value, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(type(s) is str for s in p)
                for p in value):
            raise BadRow(f"{spec.attribute} is not a list of [name, value] strings")
        return tuple((k, v) for k, v in value)
    if spec.attribute == "subscription_identifiers":
        if not isinstance(value, list) or not all(type(i) is int for i in value):
            raise BadRow(f"{spec.attribute} is not a list of integers")
        return tuple(value)
    if ptype is PropertyType.UTF8_STRING:
        if type(value) is not str:
            raise BadRow(f"{spec.attribute} is not a string")
        return value
    if type(value) is not int:
        raise BadRow(f"{spec.attribute} is not an integer")
    return value


def properties(text: object, name: str, allowed: frozenset[str],
               kind: PacketType | str) -> Properties:
    """Stored properties (JSON keyed by property identifier; see sql.py), checked."""
    if text is None or text == "":
        return NO_PROPERTIES
    if type(text) is not str:
        raise BadRow(f"{name} is {_kind(text)}, not JSON text")
    try:
        data = json.loads(text)
    except ValueError:
        raise BadRow(f"{name} is not valid JSON: {text[:60]!r}") from None
    if not isinstance(data, dict):
        raise BadRow(f"{name} is not a JSON object")
    values: dict[str, Any] = {}
    for key, value in data.items():
        try:
            spec = _ID_TO_SPEC.get(int(key))
        except ValueError:
            raise BadRow(f"{name}: {key!r} is not a property identifier") from None
        if spec is None:  # an identifier this version does not know: nothing to put it in
            continue
        if spec.attribute not in allowed:
            raise BadRow(f"{name}: {spec.attribute} does not belong here")
        values[spec.attribute] = _property_value(spec, value)
    if not values:
        return NO_PROPERTIES
    result = Properties(**values)
    try:  # ranges, UTF-8, lengths: what sending it would check
        encode_properties_body(result, kind)
    except (LocalProtocolError, TypeError, ValueError, OverflowError) as error:
        raise BadRow(f"{name}: {error}") from None
    return result


def decode_ids(text: object) -> tuple[int, ...]:
    """Subscription identifiers stored as "1,7" (or NULL)."""
    if text is None or text == "":
        return ()
    if type(text) is not str:
        raise BadRow(f"subscription_ids is {_kind(text)}, not text")
    ids = []
    for part in text.split(","):
        if not part.isascii() or not part.isdigit():
            raise BadRow(f"subscription_ids {text[:40]!r} is not a list of identifiers")
        ids.append(_int(int(part), "a subscription identifier", 1, MAX_VARINT))
    return tuple(ids)


# --------------------------------------------------------------------------- row checks


def session_record(row: Sequence[Any]) -> tuple[SessionRecord, str | None]:
    """The session, and why its will was dropped (None: the will, if any, is sound).

    The username (version 5 on; NULL: anonymous) is only the rights its will is published
    with: a damaged one drops the will with it (the session is kept, anonymous), as a
    damaged will does, instead of the session with its subscriptions and queue."""
    client_id = _text(row[0], "client_id")
    level = _int(row[1], "protocol_level", 3, 5)
    expiry = _int(row[2], "expiry_interval", 0, MAX_U32)
    disconnected_at = _time(row[3], "disconnected_at", optional=True)
    username = None
    will = None
    will_problem = None
    try:
        username = None if row[9] is None else _text(row[9], "username")
        if row[4] is not None:
            will = Will(_topic(row[4], "will_topic"), _blob(row[5], "will_payload"),
                        _int(row[6], "will_qos", 0, 2), _flag(row[7], "will_retain"),
                        properties(row[8], "will_properties", WILL_PROPERTIES, WILL))
    except BadRow as error:
        will_problem = str(error)
    return SessionRecord(client_id, level, expiry, will, disconnected_at,
                         username), will_problem


def subscription_record(row: Sequence[Any]) -> SubscriptionRecord:
    topic_filter = _text(row[1], "topic_filter")
    if not is_valid_topic_filter(topic_filter):  # 4.7.1 (5.0)
        raise BadRow(f"topic_filter {topic_filter!r} is not a valid topic filter")
    subscription_id = row[6]
    if subscription_id is not None:
        _int(subscription_id, "subscription_id", 1, MAX_VARINT)  # 3.8.2.1.2 (5.0)
    return SubscriptionRecord(_text(row[0], "client_id"), topic_filter,
                              _int(row[2], "qos", 0, 2), _flag(row[3], "no_local"),
                              _flag(row[4], "retain_as_published"),
                              _int(row[5], "retain_handling", 0, 2), subscription_id)


def message(row: Sequence[Any]) -> Message:
    return Message(_int(row[0], "id", 1, 2**63 - 1), _topic(row[1], "topic"),
                   _blob(row[2], "payload"), _int(row[3], "qos", 0, 2), _flag(row[4], "retain"),
                   properties(row[5], "properties", MESSAGE_PROPERTIES, PacketType.PUBLISH),
                   _time(row[6], "received_at"), _time(row[7], "expires_at", optional=True),
                   _text(row[8], "origin"))


def delivery_record(row: Sequence[Any]) -> DeliveryRecord:
    qos = _int(row[3], "qos", 0, 2)
    packet_id = row[6]
    if packet_id is not None:
        _int(packet_id, "packet_id", 1, MAX_U16)  # [MQTT-2.2.1-3] (3.1.1): non-zero
    state = _int(row[7], "state", 0, 2)
    # Without a packet id a sent state is restored as queued (what the core did always).
    if state != QUEUED and packet_id is not None:
        if qos == 0:  # nothing would ever acknowledge it: its slot would be taken for good
            raise BadRow(f"state {state} (sent, packet_id {packet_id}) is not for QoS 0")
        if state == AWAIT_COMP and qos != 2:
            raise BadRow(f"state {state} (PUBREL sent) is for QoS 2, not QoS {qos}")
    return DeliveryRecord(_text(row[0], "client_id"), _int(row[1], "delivery_id", 1, 2**63 - 1),
                          _int(row[2], "message_id", 1, 2**63 - 1), qos, _flag(row[4], "retain"),
                          decode_ids(row[5]), packet_id, state, _flag(row[8], "dup"))


def _retained(row: Sequence[Any]) -> tuple[str, int]:
    return _topic(row[0], "topic"), _int(row[1], "message_id", 1, 2**63 - 1)


def _incoming(row: Sequence[Any]) -> tuple[str, int]:
    return _text(row[0], "client_id"), _int(row[1], "packet_id", 1, MAX_U16)


# --------------------------------------------------------------------------- the whole store


@dataclass(slots=True)
class Quarantined:
    """One row to move to the quarantine table (or, `will_only`, whose will to clear)."""

    table: str
    row: tuple[Any, ...]
    reason: str
    dependent: bool = False  # quarantined because a row it needs was
    will_only: bool = False

    @property
    def key(self) -> dict[str, Any]:
        columns = COLUMNS[self.table]
        return {name: self.row[columns.index(name)] for name in KEYS[self.table]}

    @property
    def client_id(self) -> str | None:
        if "client_id" not in COLUMNS[self.table]:
            return None
        return _printable(self.row[0])

    def describe_key(self, *, client: bool = True) -> str:
        return ", ".join(f"{k}={_printable(v)}" for k, v in self.key.items()
                         if client or k != "client_id")


def _printable(value: object) -> str:
    if isinstance(value, Undecodable):
        return repr(bytes(value))
    return value if isinstance(value, str) else repr(value)


def _jsonable(value: object) -> object:
    if isinstance(value, Undecodable):
        return {"text_not_utf8_base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, bytes):
        return {"blob_base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def row_json(entry: Quarantined) -> str:
    """The row as JSON, column by column (BLOBs and non-UTF-8 text as base64), for forensics."""
    return json.dumps({name: _jsonable(value)
                       for name, value in zip(COLUMNS[entry.table], entry.row, strict=True)},
                      ensure_ascii=False)


@dataclass(slots=True)
class _Checked:
    snapshot: Snapshot = field(default_factory=Snapshot.empty)
    quarantined: list[Quarantined] = field(default_factory=list)

    def bad(self, table: str, row: Sequence[Any], reason: str, *,
            dependent: bool = False) -> None:
        self.quarantined.append(Quarantined(table, tuple(row), reason, dependent))


def check_rows(rows: Mapping[str, Iterable[Sequence[Any]]]) -> tuple[Snapshot,
                                                                      list[Quarantined]]:
    """Check every table's rows (`COLUMNS` order; deliveries in delivery id order). Returns
    the snapshot of the sound rows, and what to quarantine (see the module docstring)."""
    out = _Checked()
    snap = out.snapshot
    bad_sessions: set[object] = set()
    for row in rows["sessions"]:
        try:
            record, will_problem = session_record(row)
        except BadRow as error:
            out.bad("sessions", row, str(error))
            bad_sessions.add(row[0])
            continue
        if will_problem is not None:
            out.quarantined.append(Quarantined("sessions", tuple(row),
                                               f"will dropped: {will_problem}", will_only=True))
        snap.sessions.append(record)
    session_gone = "its session was quarantined"

    for row in rows["subscriptions"]:
        if row[0] in bad_sessions:
            out.bad("subscriptions", row, session_gone, dependent=True)
            continue
        try:
            snap.subscriptions.append(subscription_record(row))
        except BadRow as error:
            out.bad("subscriptions", row, str(error))

    bad_messages: set[object] = set()
    for row in rows["messages"]:
        try:
            m = message(row)
        except BadRow as error:
            out.bad("messages", row, str(error))
            bad_messages.add(row[0])
            continue
        snap.messages[m.id] = m

    def body_missing(mid: object) -> str:
        return (f"its message {mid} was quarantined" if mid in bad_messages
                else f"its message {mid} is missing")

    inflight: dict[str, dict[int, int]] = {}  # client -> packet id -> delivery id
    for row in rows["deliveries"]:
        if row[0] in bad_sessions:
            out.bad("deliveries", row, session_gone, dependent=True)
            continue
        try:
            drec = delivery_record(row)
        except BadRow as error:
            out.bad("deliveries", row, str(error))
            continue
        if drec.message_id not in snap.messages:
            out.bad("deliveries", row, body_missing(drec.message_id),
                    dependent=drec.message_id in bad_messages)
            continue
        if drec.state != QUEUED and drec.packet_id is not None:
            used = inflight.setdefault(drec.client_id, {})
            other = used.get(drec.packet_id)
            if other is not None:
                out.bad("deliveries", row, f"packet_id {drec.packet_id} is already used by "
                                           f"inflight delivery {other}")
                continue
            used[drec.packet_id] = drec.delivery_id
        snap.deliveries.append(drec)

    for row in rows["retained"]:
        try:
            topic, mid = _retained(row)
        except BadRow as error:
            out.bad("retained", row, str(error))
            continue
        if mid not in snap.messages:
            out.bad("retained", row, body_missing(mid), dependent=mid in bad_messages)
            continue
        snap.retained[topic] = mid

    for row in rows["incoming_qos2"]:
        if row[0] in bad_sessions:
            out.bad("incoming_qos2", row, session_gone, dependent=True)
            continue
        try:
            snap.incoming_qos2.append(_incoming(row))
        except BadRow as error:
            out.bad("incoming_qos2", row, str(error))

    # Bodies nothing refers to any more are pruned from the file: not in the snapshot either.
    referenced = {d.message_id for d in snap.deliveries} | set(snap.retained.values())
    snap.messages = {mid: m for mid, m in snap.messages.items() if mid in referenced}
    return snap, out.quarantined
