"""Exactly-once at a chosen step of the transaction protocol: a proxy in front of the
broker holds back the transaction coordinator's answer to EndTxn (the commit), so the
service's commit outlasts its transaction timeout, deterministically.

librdkafka: a commit that times out goes on in the background and is resumed by calling
commit_transaction again; abort is refused while it is under way (`__CONFLICT`). Before
the fix the service aborted after a commit timeout, spun on the refused abort until its
time was up, then replaced its producer and rewound every partition: each slow commit
became a full rewind. Now it waits for the commit, and nothing is lost or duplicated
for read_committed readers either way (GUARANTEES.md, "Duplicates after broker
crashes").
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.kafka import KafkaBroker
from devstack.process import StackError, free_port
from tests.conftest import ServiceFactory, Topics
from tests.integration.faults.harness import (
    EventFlow,
    FaultRecord,
    LedgerWatch,
    ServiceGroup,
    tiny_photos,
)
from tests.support.kafka_proxy import ApiKey, KafkaProxy, proxied_listener
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration

# The service's transaction timeout in these tests (the default), and how long the
# coordinator's answer to a commit is held: longer, so the commit call times out.
TRANSACTION_TIMEOUT_S = 10
HOLD_S = 12


@pytest.fixture(scope="module")
def proxy() -> Iterator[KafkaProxy]:
    proxy = KafkaProxy(upstream_port=free_port(), port=free_port()).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory, proxy: KafkaProxy) -> Iterator[KafkaBroker]:
    """A broker of this module's own whose EXTERNAL listener is reached through `proxy`
    (the tests' own clients use its direct PLAINTEXT listener)."""
    port, controller_port = free_port(), free_port()
    broker = KafkaBroker(
        tmp_path_factory.mktemp("proxied-kafka"),
        port=port,
        controller_port=controller_port,
        extra_properties=proxied_listener(
            broker_port=port,
            controller_port=controller_port,
            external_port=proxy.upstream_port,
            proxy_port=proxy.port,
        ),
    )
    try:
        broker.start()
    except StackError as exc:
        pytest.fail(f"the proxied broker could not start: {exc}", pytrace=False)
    yield broker
    broker.stop()


REPLACED = "transactional producer failed; replacing it and rewinding"
REWOUND = "rewound to the committed offsets"


def test_a_commit_slower_than_the_transaction_timeout_is_waited_for_not_rewound(
    kafka: KafkaBroker,
    proxy: KafkaProxy,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    events = 600
    urls = tiny_photos(image_origin, "endtxn")
    group = ServiceGroup(
        start_service,
        1,
        env={
            "SUGGESTER_DELIVERY": "exactly_once",
            "SUGGESTER_KAFKA__BOOTSTRAP_SERVERS": proxy.address,
            "SUGGESTER_KAFKA__TRANSACTION_TIMEOUT_MS": str(TRANSACTION_TIMEOUT_S * 1000),
        },
    ).start()
    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    flow = EventFlow(kafka.bootstrap_servers, topics.input, urls, events, rate=50).start()
    watch.progress(100, timeout_s=120)
    # The next two commits' answers are held: a commit call that gives up at the
    # transaction timeout times out, and librdkafka's own retry of EndTxn (after its
    # request timeout) is held as well.
    rule = proxy.delay_responses(ApiKey.END_TXN, seconds=HOLD_S, count=2)
    flow.join()
    watch.answered(events, timeout_s=180, diagnostics=group.logs)
    assert group.terminate_all() == [0], group.logs()
    totals = watch.final_totals()
    watch.close()
    log_text = group.processes[0].log_path.read_text(errors="replace")
    fault_records.append(
        FaultRecord(
            "EndTxn answer held 12 s",
            f"exactly_once {events} events",
            totals,
            {
                "commits_held": rule.matched,
                "producer_replacements": log_text.count(REPLACED),
                "rewinds": log_text.count(REWOUND),
            },
        )
    )
    assert rule.matched == 2, "the proxy held no commit: the fault did not happen"
    assert totals.events == events
    assert totals.lost == 0, totals.lost_sample
    assert totals.duplicated == 0, totals.duplicated_sample
    assert log_text.count(REPLACED) == 0, "a slow commit replaced the producer:\n" + group.logs()
    assert log_text.count(REWOUND) == 0, "a slow commit rewound the partitions"
