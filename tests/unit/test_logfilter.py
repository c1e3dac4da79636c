"""edge_broker/logfilter.py: a library's repeated log lines are thinned on the broker's
handler (aiokafka logs about 100 ERROR lines a second while Kafka is down); the broker's own
are not."""

from __future__ import annotations

import logging

import pytest

from edge_broker import cli
from edge_broker.logfilter import LibraryRepeats


def test_a_library_line_repeated_fast_is_logged_once_then_with_a_count() -> None:
    now = [0.0]
    thin = LibraryRepeats(interval_s=60, clock=lambda: now[0])

    def passes(name: str, msg: str = "Unable connect to node with id %s: %s") -> bool:
        record = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (1, "refused"), None)
        return thin.filter(record)

    assert passes("aiokafka.conn")
    assert not any(passes("aiokafka.conn") for _ in range(99))
    assert passes("aiokafka.conn", "another message")  # its own template
    assert passes("edge_broker.bridges")  # the broker's own: never thinned
    assert passes("edge_broker.bridges")
    now[0] = 61.0
    record = logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1,
                               "Unable connect to node with id %s: %s", (1, "refused"), None)
    assert thin.filter(record)
    assert record.getMessage() == ("Unable connect to node with id 1: refused "
                                   "(99 more like this left out in the last 61 s)")


def test_the_broker_s_handler_thins_them(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    cli.configure_logging(logging.INFO)
    try:
        for _ in range(100):
            logging.getLogger("aiokafka.conn").error("Unable connect to node with id %s", 1)
    finally:  # the handler writes to this test's captured stderr: not kept
        root.handlers[:] = handlers
        root.setLevel(level)
    assert capsys.readouterr().err.count("Unable connect to node") == 1


def test_a_message_that_is_not_a_template_passes_untouched() -> None:
    # logging.getLogger("lib").error({"a": 1}): the filter must not raise (an unhashable
    # key) into the library's call, nor keep the object.
    thin = LibraryRepeats()
    record = logging.LogRecord("lib", logging.ERROR, __file__, 1, {"a": 1}, None, None)
    assert thin.filter(record) and thin.filter(record)
