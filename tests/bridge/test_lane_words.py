"""The broker's words of QoS 0 lane drops to the uplink process, through the broker's
handling of the process's frames (server/bridge_proc.py `ProcessForwarder._handle`,
server/bridge_lane.py `Lane.tell`): one word at a time, the next once the process answered
the last or acknowledged past it - and then at once, not at the next drop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edge_broker.bridge.config import parse_bridges
from edge_broker.core.changes import Message
from edge_broker.server.bridge_lane import Lane
from edge_broker.server.bridge_lane_child import LaneReader
from edge_broker.server.bridge_proc import ProcessForwarder
from edge_broker.store.log.lane_file import LaneFile
from edge_broker.store.log.lane_view import LaneView
from edge_broker.store.sqlite import SqliteStore


def _messages(start: int, count: int) -> list[Message]:
    return [Message(n, "t", b"%d" % n, 0, False, received_at=100.0 + n, origin="dev")
            for n in range(start, start + count)]


@contextlib.asynccontextmanager
async def _rig(tmp_path: Path, **lane_file: Any) -> AsyncIterator[tuple[
        ProcessForwarder, LaneFile, Lane, list[tuple[object, ...]], list[tuple[object, ...]],
        LaneReader]]:
    """The broker's side (ProcessForwarder, its Lane and LaneFile: `lane_file` its options)
    and the process's LaneReader, joined by two lists: the words broker -> process and the
    answers process -> broker, each in order."""
    (config,) = parse_bridges([{"name": "central", "kind": "jetstream",
                                "servers": ["nats://127.0.0.1:9"], "uplink": ["s/#"],
                                "subject_prefix": "gw", "jetstream_stream": "EDGE",
                                "separate_process": True}],
                              file=None, gateway_id="gw")
    store = SqliteStore(tmp_path / "edge.db", durability="none", ballast_bytes=0)
    await store.open()  # (the broker's store: ProcessForwarder listens to its commits)
    broker = ProcessForwarder(config, store.bridges, path="", gateway_id="gw",
                              store_id="x", cursor=0)
    path = str(tmp_path / "lane")
    file = LaneFile(path, "x", **lane_file)
    words: list[tuple[object, ...]] = []
    lane = Lane("central", "bridge-central", file, mark=0, notify=words.append,
                row_interval_s=0)
    broker._lane_file = file
    broker.lane = lane
    answers: list[tuple[object, ...]] = []
    reader = LaneReader(LaneView(path, 0, 0), mark=0, send=answers.append)
    try:
        yield broker, file, lane, words, answers, reader
    finally:
        lane.close()
        file.close(5)
        reader.close()
        await store.close()


async def test_drops_made_while_a_word_was_out_are_told_once_the_process_acked_past_it(
        tmp_path: Path) -> None:
    """The process acknowledges past the word of a drop instead of answering it; the drops
    made meanwhile (the word out, no other until an answer or such an acknowledgement) are
    told then. Before, they waited for the next drop, counted nowhere meanwhile: with
    nothing more published, for ever."""
    async with _rig(tmp_path, max_backlog_bytes=1) as (broker, file, lane, words, answers,
                                                         reader):  # each row drops the last
        lane.send(_messages(0, 2))  # 1-2
        assert file.wait_written()
        assert [m.offset for m in await reader.read_after(0, 10)] == [1, 2]
        lane.send(_messages(2, 2))  # 3-4: 1-2 dropped (in flight)
        assert [(kind, floor) for kind, _last, floor in words] == [("lane", 2)]
        await reader.commit_cursor(2)  # the remote side acknowledged 1-2
        lane.send(_messages(4, 2))  # 5-6: 3-4 dropped; the word of 1-2 still out
        assert len(words) == 1
        broker._handle(answers.pop(0))  # ("lane_ack", 2, 2): 1-2 forwarded
        assert file.dropped == 0 and file._unsettled_count == 2  # 3-4
        # Past the word now: the drop of 3-4 is told at once (before: no word). (The last
        # offset a word gives is the writer thread's, whatever it committed by then.)
        assert [(kind, floor) for kind, _last, floor in words] == [("lane", 2), ("lane", 4)]
        for word in words:  # the process reads them in order
            reader.appended(int(word[1]), int(word[2]))  # type: ignore[call-overload]
        assert answers == [("lane_held", 4, ())]  # (none to the first: acked past it)
        broker._handle(answers.pop(0))
        assert file.dropped == 2 and file._unsettled_count == 0
        assert file.backlog_messages == 2  # 5-6; 1-2 forwarded


async def test_no_word_for_an_acknowledgement_without_a_drop(tmp_path: Path) -> None:
    """Acknowledgements alone tell the process nothing new (it made them): no frame per
    acknowledgement, only the first word (the floor a new run starts from). The review of
    the change above found one "lane" frame per acknowledgement (10 for 10)."""
    async with _rig(tmp_path) as (broker, file, lane, words, answers, reader):  # no drop
        for i in range(10):
            lane.send(_messages(i * 3, 3))
        assert file.wait_written()
        cursor = acks = 0
        while batch := await reader.read_after(cursor, 3):
            cursor = batch[-1].offset
            await reader.commit_cursor(cursor)
            broker._handle(answers.pop(0))
            acks += 1
        assert acks == 10 and file.dropped == 0
        assert len(words) <= 1, f"{len(words)} words for {acks} acknowledgements, no drop"
