"""Delivery: where the pipeline's answers go, and when their input offsets count as done.

The pipeline (app.py) turns each consumed message into one answer (a suggestion or a
DLQ record) and knows nothing of how answers reach Kafka. A `Delivery` does, in one of
two modes (settings.delivery):

- `AtLeastOnce` (at_least_once.py): publish each answer at once; store an input offset
  for the consumer to commit once every earlier offset of its partition is answered.
- `ExactlyOnce` (exactly_once.py): keep answers per partition and publish each
  partition's ready prefix in offset order inside a Kafka transaction that also commits
  the offsets; replace a broken producer and rewind the partitions.

The pipeline calls the delivery on the event loop; the delivery calls back through the
`Host` it is bound to (the pipeline): the in-flight window, the offset tracker's
committable offsets, the partitions' epochs. It is given the Kafka source it works with
(consume.py's `Source`: offsets to store, the group metadata, the rewind) when built.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from category_suggester.consume import Partition
from category_suggester.publish import OutputRecord

__all__ = ["Delivery", "Host"]


class Host(Protocol):
    """What a delivery needs of the pipeline it serves."""

    def is_current(self, tp: Partition, epoch: int) -> bool:
        """Whether work of `tp` from `epoch` still counts (not revoked, lost or rewound)."""
        ...

    def committable(self, tp: Partition) -> int | None:
        """The partition's next offset to commit: every offset below it is answered."""
        ...

    def committable_offsets(self) -> dict[Partition, int]:
        """`committable` of every partition that has one."""
        ...

    def release(self, count: int) -> None:
        """`count` answers left the in-flight window."""
        ...

    def abandon_all(self) -> None:
        """Drop every partition's work in memory: it is read again."""
        ...


class Delivery(Protocol):
    """One delivery mode; see the module docstring."""

    def bind(self, host: Host) -> None:
        """Attach to the pipeline, once, before anything else is called."""
        ...

    @property
    def taking(self) -> bool:
        """False while messages handed over must not be processed (exactly-once: a
        rewind is due or under way; they are read again after it)."""
        ...

    async def deliver(
        self,
        tp: Partition,
        offset: int,
        epoch: int,
        record: OutputRecord,
        *,
        uploaded_at: datetime | None,
    ) -> None:
        """The answer of (`tp`, `offset`), read in `epoch`; `uploaded_at` for a
        suggestion's end-to-end latency. At-least-once publishes it before returning
        (raising `PublishError` as publish.py says); exactly-once keeps it for its
        partition's transaction."""
        ...

    def answered(self, tp: Partition, committable: int | None) -> bool:
        """An event of `tp` was answered in the current epoch; `committable` is the
        partition's new next offset to commit, when it moved. True: the event stays in
        the in-flight window until the delivery `release`s it (exactly-once: until its
        transaction commits)."""
        ...

    async def revoked(
        self, partitions: Sequence[Partition], give_up_at: float
    ) -> dict[Partition, int]:
        """These partitions move to another member: settle their finished work (until
        the loop time `give_up_at`). Returns the offsets the consumer commits for them
        (none, when the delivery committed them itself)."""
        ...

    def dropped(self, tp: Partition) -> None:
        """The partition's work was abandoned: forget what is kept of it."""
        ...

    def holding(self) -> set[Partition]:
        """Partitions with answers kept."""
        ...

    def final_offsets(self) -> dict[Partition, int]:
        """At shutdown: the offsets the consumer commits as its own."""
        ...

    def start(self) -> None:
        """Start whatever runs in the background (the transaction loop)."""
        ...

    async def finish(self) -> None:
        """Shutdown, once no more answers come: settle what is ready."""
        ...

    async def close(self) -> None:
        """Close the producer."""
        ...
