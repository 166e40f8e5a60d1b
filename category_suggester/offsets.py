"""Which input offsets may be committed, when work finishes out of order.

Takes the offsets of consumed messages (`track`) and the news that one is finished
(`finish`); returns, per partition, the offset to commit: the lowest offset not yet
finished (Kafka commits "the next offset to read"). An offset is therefore committed only
when every earlier offset of its partition is done, whatever order the work finished in.

Not thread-safe: the event loop owns it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


@dataclass
class _PartitionWindow:
    # Offsets consumed and not yet committable, in consumption (= offset) order.
    pending: deque[int] = field(default_factory=deque)
    finished: set[int] = field(default_factory=set)
    # Offset to commit next time; None until something finished at the head.
    committable: int | None = None


class OffsetTracker:
    """Per-partition window of in-flight offsets."""

    def __init__(self) -> None:
        self._windows: dict[TopicPartition, _PartitionWindow] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        window = self._windows.setdefault(tp, _PartitionWindow())
        if window.pending and offset <= window.pending[-1]:
            # A rewind (seek, or a re-delivery after a rebalance) restarts the window.
            window.pending.clear()
            window.finished.clear()
        window.pending.append(offset)

    def finish(self, tp: TopicPartition, offset: int) -> int | None:
        """Mark one offset done; return the new offset to commit when it moved, else None."""
        window = self._windows.get(tp)
        if window is None or not window.pending or offset < window.pending[0]:
            return None  # the partition was revoked or rewound meanwhile
        window.finished.add(offset)
        moved = False
        while window.pending and window.pending[0] in window.finished:
            head = window.pending.popleft()
            window.finished.discard(head)
            window.committable = head + 1
            moved = True
        return window.committable if moved else None

    def committable(self, tp: TopicPartition) -> int | None:
        window = self._windows.get(tp)
        return window.committable if window else None

    def inflight(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            window = self._windows.get(tp)
            return len(window.pending) if window else 0
        return sum(len(w.pending) for w in self._windows.values())

    def partitions(self) -> list[TopicPartition]:
        return list(self._windows)

    def forget(self, tp: TopicPartition) -> None:
        """Drop a partition (revoked or lost): later `finish` calls for it are ignored."""
        self._windows.pop(tp, None)
