"""The JetStream uplink's PubAcks read from the connection's bytes before nats-py parses them.

Why: a drain gets one PubAck per message, `MSG <inbox>.<token> <sid> <size>\\r\\n<json>\\r\\n`,
and nats-py's parser (nats/protocol/parser.py) handles each with a regular expression over
its buffer, a dict of arguments, two `bytearray` cuts, copies and a coroutine call: in the
uplink process that was a larger share of a drained message's time than building its HPUB
command (benchmarks/results/h5-jsdrain.md). `AckReader.feed` takes what the connection read,
hands every complete plain MSG on the ack subscription to `on_ack(token, data)` at once, and
gives everything else - any other command (PING, INFO, -ERR, an HMSG such as a 503 "no
responders" status), a MSG of another subscription or with a reply, and what follows it - to
nats-py's parser, in order. A MSG cut by the end of a read is kept until the next read
completes it. While nats-py's parser holds a part of a command (its buffer is not empty, or
it waits for a payload), everything goes to it, until it is done with it. After a reconnect
(nats-py resets its parser: a new buffer) a cut MSG kept from the old connection is dropped.

What is handed to `on_ack` is exactly what nats-py would have passed on for that message
(the token: the subject after the inbox prefix; the payload), so the sink's checks of an ack
(stored, duplicate, error) are the same either way (bridge/jetstream.py `_ack`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

_CRLF: Final = b"\r\n"
MAX_LINE: Final = 4096  # a longer control line is not an ack: nats-py's parser judges it


class AckReader:
    """See the module docstring. `parser` is nats-py's `Parser` of the connection (its
    `buf` and `state` tell whether it is in the middle of a command), `parse` its original
    `parse` method, `sid` the ack subscription's id and `prefix` its inbox prefix
    (`<inbox>.`)."""

    def __init__(self, parser: Any, parse: Callable[[bytes], Awaitable[Any]], sid: int,
                 prefix: str, on_ack: Callable[[bytes, bytes], None]) -> None:
        # Imported here, not at the top: this module is compiled into the wheel, whose
        # modules must import without the `nats` extra (buildinfo.modules, test_compiled).
        from nats.protocol.parser import AWAITING_CONTROL_LINE

        self.idle = AWAITING_CONTROL_LINE  # the parser's state between commands
        self.parser = parser
        self.parse = parse
        self.buf = parser.buf  # a new one after `reset()` (a new connection): carry dropped
        self.head = f"MSG {prefix}".encode()
        self.sid = b"%d" % sid
        self.on_ack = on_ack
        self.carry = b""  # the start of an ack MSG cut by the end of the last read

    async def feed(self, data: bytes = b"") -> None:
        """What the connection read (nats-py's `Parser.parse` signature)."""
        parser = self.parser
        if parser.buf is not self.buf:  # reconnected: what was cut belongs to the old one
            self.buf = parser.buf
            self.carry = b""
        if parser.buf or parser.state != self.idle:
            await self.parse(data)  # nats-py is in the middle of a command
            return
        if self.carry:
            data = self.carry + data
            self.carry = b""
        head = self.head
        skip = len(head)
        sid = self.sid
        on_ack = self.on_ack
        size = len(data)
        pos = 0
        while pos < size:
            if not data.startswith(head, pos):
                if size - pos < skip and head.startswith(data[pos:]):
                    self.carry = data[pos:]  # may be the start of an ack: wait for more
                    return
                break
            eol = data.find(_CRLF, pos + skip)
            if eol < 0:
                if size - pos > MAX_LINE:
                    break
                self.carry = data[pos:]
                return
            parts = data[pos + skip:eol].split(b" ")
            if len(parts) != 3 or parts[1] != sid or not parts[2].isdigit():
                break  # a reply, another subscription, or not for us to judge: nats-py
            end = eol + 2 + int(parts[2])
            if end + 2 > size:
                self.carry = data[pos:]
                return
            if data[end:end + 2] != _CRLF:
                break  # malformed: nats-py's parser says so
            on_ack(parts[0], data[eol + 2:end])
            pos = end + 2
        if pos < size:
            await self.parse(data[pos:] if pos else data)
