from streams.refresh import RefreshQueue, due_time


def test_cold_user_is_due_at_once_then_debounced():
    assert due_time(10.0, None, 5.0) == 10.0
    assert due_time(10.0, 8.0, 5.0) == 13.0
    assert due_time(20.0, 8.0, 5.0) == 20.0


def test_events_coalesce_into_one_refresh_with_newest_trigger():
    q = RefreshQueue(min_interval_s=5)
    for i in range(100):
        q.schedule("u1", f"e{i}", 0, now=1.0 + i * 0.001)
    assert len(q) == 1
    [r] = q.take_due(2.0, limit=10)
    assert r.trigger_event_id == "e99" and r.first_seen_at == 1.0


def test_user_refreshed_recently_waits_min_interval():
    q = RefreshQueue(min_interval_s=5)
    q.schedule("u1", "e1", 0, now=0.0)
    batch = q.take_due(0.0, limit=10)
    q.schedule("u1", "e2", 0, now=1.0)  # arrives while in flight
    assert q.take_due(1.0, limit=10) == []
    q.finish(batch, now=1.5)
    assert q.next_due() == 5.0
    assert q.take_due(4.9, limit=10) == []
    assert [r.trigger_event_id for r in q.take_due(5.0, limit=10)] == ["e2"]


def test_take_due_respects_limit_and_order():
    q = RefreshQueue(min_interval_s=0)
    for i in range(5):
        q.schedule(f"u{i}", f"e{i}", 0, now=float(5 - i))
    batch = q.take_due(10.0, limit=3)
    assert [r.user_id for r in batch] == ["u4", "u3", "u2"]
    assert len(q) == 2 and q.in_flight == 3


def test_retry_keeps_newer_trigger_and_published_is_known_until_acknowledged():
    q = RefreshQueue(min_interval_s=0)
    q.schedule("u1", "e1", 2, now=0.0)
    batch = q.take_due(0.0, 10)
    q.retry(batch, due_at=3.0)
    assert q.take_due(2.0, 10) == []
    batch = q.take_due(3.0, 10)
    q.finish(batch, now=3.0)
    assert q.is_known("u1", "e1") and not q.is_known("u1", "e2")
    q.acknowledge("u1", "e1")
    assert not q.is_known("u1", "e1")


def test_forget_partitions_and_prune():
    q = RefreshQueue(min_interval_s=1)
    q.schedule("a", "e1", 0, now=0.0)
    q.schedule("b", "e2", 1, now=0.0)
    q.forget_partitions({1})
    assert not q.is_known("b") and q.is_known("a")
    q.finish(q.take_due(0.0, 10), now=0.0)
    q.prune(now=10.0)
    q.schedule("a", "e3", 0, now=10.0)
    assert q.next_due() == 10.0
