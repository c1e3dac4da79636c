"""The subscription trie against the reference matcher (mqtt.topics.topic_matches)."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edge_broker.core.changes import SubscriptionRecord
from edge_broker.core.router import Router
from edge_broker.mqtt.topics import is_valid_topic_filter, topic_matches

# Few distinct level names, so that filters and topics collide often; "" is an empty level and
# "$sys" starts a topic with "$".
NAME_LEVELS = st.sampled_from(["a", "b", "c", "", "$sys"])
FILTER_LEVELS = st.one_of(NAME_LEVELS, st.just("+"))


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVELS, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels)
    assume(is_valid_topic_filter(topic_filter))  # only "" (one empty level) is not
    return topic_filter


topics = st.lists(NAME_LEVELS, min_size=1, max_size=5).map("/".join)
clients = st.sampled_from(["c1", "c2", "c3"])
subscriptions = st.lists(st.tuples(clients, topic_filters(), st.sampled_from([None, "g1", "g2"])),
                         max_size=25)


Sub = tuple[str, str, str | None]  # client id, filter, shared group (None: not shared)


def _build(subs: list[Sub]) -> tuple[Router, set[Sub]]:
    router = Router()
    live: set[Sub] = set()
    for client_id, topic_filter, group in subs:
        record = SubscriptionRecord(client_id, topic_filter, 0)
        router.subscribe(record, topic_filter, group)
        live.add((client_id, topic_filter, group))
    return router, live


def _matched(router: Router, topic: str) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    normal, groups = router.match(topic)
    found = {(r.client_id, r.topic_filter) for r in normal}
    assert len(found) == len(normal), "a subscription was reported twice"
    shared = {(g.name, g.topic_filter) for g in groups}
    assert len(shared) == len(groups), "a shared group was reported twice"
    return found, shared


@settings(max_examples=400, deadline=None)
@given(subscriptions, st.lists(topics, min_size=1, max_size=8))
def test_match_equals_reference_matcher(subs: list[Sub], published: list[str]) -> None:
    router, live = _build(subs)
    assert router.count == len(live)
    for topic in published:
        found, shared = _matched(router, topic)
        assert found == {(c, f) for c, f, g in live if g is None and topic_matches(f, topic)}
        assert shared == {(g, f) for c, f, g in live if g is not None and topic_matches(f, topic)}


@settings(max_examples=300, deadline=None)
@given(subscriptions, st.data())
def test_unsubscribe_removes_exactly_that_subscription(subs: list[Sub],
                                                       data: st.DataObject) -> None:
    router, live = _build(subs)
    probes = data.draw(st.lists(topics, min_size=1, max_size=5))
    for topic in probes:  # fills the match cache, which the removals must invalidate
        _matched(router, topic)
    removals = data.draw(st.lists(st.sampled_from(sorted(live, key=str)), unique=True)
                         if live else st.just([]))
    for client_id, topic_filter, group in removals:
        assert router.unsubscribe(client_id, topic_filter, group)
        assert not router.unsubscribe(client_id, topic_filter, group)
        live.discard((client_id, topic_filter, group))
    assert router.count == len(live)
    for topic in probes:
        found, shared = _matched(router, topic)
        assert found == {(c, f) for c, f, g in live if g is None and topic_matches(f, topic)}
        assert shared == {(g, f) for c, f, g in live if g is not None and topic_matches(f, topic)}
    if not live:
        # Every node was pruned: nothing is left behind for a long-lived broker to leak.
        assert not router._root.children


def test_shared_group_rotates_over_online_members_and_falls_back_to_offline() -> None:
    router = Router()
    for client_id in ("m1", "m2", "m3"):
        router.subscribe(SubscriptionRecord(client_id, "$share/g/t", 1), "t", "g")
    (group,) = router.match("t")[1]
    online = {"m1", "m3"}
    picks = [group.pick(online.__contains__) for _ in range(4)]
    assert [p.client_id for p in picks if p] == ["m1", "m3", "m1", "m3"]
    fallback = group.pick(lambda _client: False)
    assert fallback is not None and fallback.client_id in {"m1", "m2", "m3"}
