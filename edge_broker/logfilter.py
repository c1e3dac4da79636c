"""Repeated log lines of the libraries the broker uses, thinned.

aiokafka, nats-py and asyncio log each failed reconnect attempt, some of them many times a
second while a server is down (aiokafka: about 100 ERROR lines a second during a Kafka
outage): on a gateway's SD card and in its journal that is noise and wear. `LibraryRepeats`,
on the broker's log handler (cli.configure_logging), passes the first record of each
(logger, message template, level) and then at most one per `interval_s`, which says how many
like it were left out since. The broker's own loggers (`edge_broker...`) are never thinned:
they rate-limit what can repeat themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

OWN_LOGGER = "edge_broker"
REPEAT_INTERVAL_S = 60.0
MAX_KEYS = 1024  # distinct templates remembered; beyond that the oldest are forgotten


class LibraryRepeats(logging.Filter):
    def __init__(self, interval_s: float = REPEAT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._seen: dict[tuple[str, object, int], tuple[float, int]] = {}  # -> (at, left out)

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if (name == OWN_LOGGER or name.startswith(OWN_LOGGER + ".")
                or not isinstance(record.msg, str)):
            return True  # (a message that is an object: not a template, and maybe unhashable)
        key = (name, record.msg, record.levelno)
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            self._seen[key] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg = (f"{record.msg} ({seen[1]} more like this left out in the last "
                          f"{now - seen[0]:.0f} s)")
        self._seen.pop(key, None)
        self._seen[key] = (now, 0)
        if len(self._seen) > MAX_KEYS:
            del self._seen[next(iter(self._seen))]
        return True
