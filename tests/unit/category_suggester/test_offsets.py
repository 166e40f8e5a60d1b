import random

from category_suggester.offsets import OffsetTracker

TP = ("topic", 0)


def test_commits_only_past_a_contiguous_prefix() -> None:
    tracker = OffsetTracker()
    for offset in range(10, 15):
        tracker.track(TP, offset)
    assert tracker.finish(TP, 12) is None
    assert tracker.finish(TP, 11) is None
    assert tracker.committable(TP) is None
    assert tracker.finish(TP, 10) == 13  # 10, 11, 12 done: next to read is 13
    assert tracker.finish(TP, 14) is None
    assert tracker.finish(TP, 13) == 15
    assert tracker.inflight(TP) == 0


def test_random_completion_order_never_commits_an_unfinished_offset() -> None:
    rng = random.Random(7)
    tracker = OffsetTracker()
    offsets = list(range(1000))
    for offset in offsets:
        tracker.track(TP, offset)
    order = offsets[:]
    rng.shuffle(order)
    done: set[int] = set()
    for offset in order:
        done.add(offset)
        committable = tracker.finish(TP, offset)
        if committable is not None:
            assert all(o in done for o in range(committable))
            assert committable == min(set(offsets) - done, default=1000)
    assert tracker.committable(TP) == 1000


def test_partitions_are_independent_and_forget_drops_late_finishes() -> None:
    tracker = OffsetTracker()
    other = ("topic", 1)
    tracker.track(TP, 0)
    tracker.track(other, 0)
    assert tracker.finish(other, 0) == 1
    assert tracker.committable(TP) is None
    tracker.forget(TP)
    assert tracker.finish(TP, 0) is None
    assert tracker.inflight() == 0


def test_rewind_restarts_the_window() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 5)
    tracker.track(TP, 6)
    tracker.track(TP, 5)  # redelivered after a seek
    assert tracker.inflight(TP) == 1
    assert tracker.finish(TP, 5) == 6
