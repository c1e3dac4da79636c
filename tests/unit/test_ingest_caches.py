"""The caches and coalescing of the durable ingest path (issue 8, S4) keep their answers exact.

- `Router.merged`: a topic's non-shared subscriptions merged per client, cached with `match`,
  forgotten at every subscribe/unsubscribe; None (no cache) when No Local is in play.
- `plan_group`: only the last `ReaderCounted` of a reader is written, after the group's other
  reader records, unless a `ReaderOpened`/`ReaderClosed` of that reader follows it.
"""

from __future__ import annotations

from edge_broker.core.changes import (
    LogAppended,
    Message,
    ReaderClosed,
    ReaderCounted,
    ReaderMoved,
    ReaderOpened,
    SessionDeleted,
    SubscriptionRecord,
    reader_name,
)
from edge_broker.core.router import Router
from edge_broker.store.sqlite.plan import plan_group


def _sub(client: str, topic_filter: str, qos: int, **kw: object) -> SubscriptionRecord:
    return SubscriptionRecord(client, topic_filter, qos, **kw)  # type: ignore[arg-type]


def test_merged_is_one_entry_per_client_and_follows_subscription_changes() -> None:
    router = Router()
    router.subscribe(_sub("a", "s/#", 0), "s/#")
    router.subscribe(_sub("a", "s/+", 1, subscription_id=7), "s/+")
    router.subscribe(_sub("b", "s/x", 1, retain_as_published=True), "s/x")
    normal, _ = router.match("s/x")
    merged = router.merged("s/x", normal)
    assert merged is not None
    assert sorted(merged) == [("a", 1, False, (7,)), ("b", 1, True, ())]
    assert router.merged("s/x", normal) is merged  # cached
    router.subscribe(_sub("b", "s/x", 2), "s/x")  # replaced: QoS 2, not as published
    normal, _ = router.match("s/x")
    assert sorted(router.merged("s/x", normal) or []) == [("a", 1, False, (7,)),
                                                          ("b", 2, False, ())]
    router.unsubscribe("a", "s/+")
    normal, _ = router.match("s/x")
    assert sorted(router.merged("s/x", normal) or []) == [("a", 0, False, ()),
                                                          ("b", 2, False, ())]


def test_merged_is_none_with_no_local() -> None:
    router = Router()
    router.subscribe(_sub("a", "s/#", 1, no_local=True), "s/#")
    router.subscribe(_sub("b", "s/#", 1), "s/#")
    normal, _ = router.match("s/x")
    assert router.merged("s/x", normal) is None


def _message(offset: int) -> Message:
    return Message(offset, "s/x", b"p", 1, False, offset=offset)


def test_plan_keeps_only_the_last_count_of_a_reader_after_its_other_records() -> None:
    r = reader_name("c")
    group = [([LogAppended(_message(1)), ReaderCounted(r, 1, 10, 0)], None),
             ([LogAppended(_message(2)), ReaderMoved(r, 1), ReaderCounted(r, 2, 20, 1)], None)]
    plan = plan_group(group, 0, 0)  # type: ignore[arg-type]
    assert plan.readers == [ReaderMoved(r, 1)]
    assert plan.counted == [(r, 2, 20, 1)]
    assert [m.offset for m in plan.log] == [1, 2]


def test_plan_writes_a_count_before_its_reader_is_opened_again_or_closed() -> None:
    r = reader_name("c")
    opened = ReaderOpened(r, 5, (("s/#", 5),))
    group = [([ReaderCounted(r, 1, 10, 0)], None), ([opened], None),
             ([ReaderCounted(r, 3, 30, 0)], None)]
    plan = plan_group(group, 0, 0)  # type: ignore[arg-type]
    # The first count belongs to the reader before it was made again; the last one to the
    # new reader, after it was opened.
    assert plan.readers == [ReaderCounted(r, 1, 10, 0), opened]
    assert plan.counted == [(r, 3, 30, 0)]
    group = [([ReaderCounted(r, 1, 10, 0)], None), ([SessionDeleted("c")], None)]
    plan = plan_group(group, 0, 0)  # type: ignore[arg-type]
    assert plan.readers == [ReaderCounted(r, 1, 10, 0), ReaderClosed(r)]
    assert plan.counted == []
