"""The sink's error policy without services: bisecting a refused batch (poison rows versus a
store that refuses everything), splitting hand-overs by bytes, and retrying refused produces."""

import threading

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException

from streams import telemetry
from streams.ingest.poison import UnfitRows, land
from streams.contracts.messages import Deployments, EventBatch
from streams.ingest.sink import Handovers, is_data_error

DATA_ERROR = RuntimeError("Code: 53. DB::Exception: Type mismatch in VALUES section. (TYPE_MISMATCH)")
DETACHED = RuntimeError("Code: 60. DB::Exception: Table trackside.events does not exist. (UNKNOWN_TABLE)")


class FakeStore:
    """An insert function over plain rows: `refuse(chunk)` says why a chunk is refused, or None."""

    def __init__(self, refuse):  # noqa: ANN001
        self.refuse = refuse
        self.landed: list[int] = []
        self.attempts = 0

    def insert(self, chunk: list[int]) -> None:
        self.attempts += 1
        error = self.refuse(chunk)
        if error is not None:
            raise error
        self.landed += chunk


def test_a_batch_the_store_takes_lands_in_one_insert():
    store = FakeStore(lambda chunk: None)
    landing = land(list(range(1000)), store.insert, is_data_error)
    assert (store.landed, store.attempts) == (list(range(1000)), 1)
    assert not landing.poison and not landing.unlanded


@pytest.mark.parametrize("poison", [{0}, {517}, {999}, {3, 4, 700}, set(range(0, 1000, 97))])
def test_rows_refused_for_their_data_are_isolated_and_the_rest_lands(poison):
    store = FakeStore(lambda chunk: DATA_ERROR if poison & set(chunk) else None)
    landing = land(list(range(1000)), store.insert, is_data_error)
    assert {row for row, _ in landing.poison} == poison
    assert all(error is DATA_ERROR for _, error in landing.poison)
    assert sorted(store.landed) == sorted(set(range(1000)) - poison)
    assert not landing.unlanded
    assert store.attempts <= 1 + 2 * len(poison) * 10  # ~2 log2(1000) per poison row


def test_a_store_that_refuses_everything_is_not_bisected_and_nothing_is_poison():
    store = FakeStore(lambda chunk: DETACHED)
    landing = land(list(range(20000)), store.insert, is_data_error)
    assert landing.poison == []
    assert landing.unlanded == list(range(20000)) and landing.error is DETACHED
    assert store.attempts == 3  # the batch, then its two halves


def test_a_row_refused_without_a_data_code_is_poison_when_the_rest_of_its_batch_lands():
    store = FakeStore(lambda chunk: RuntimeError("Code: 1001. std::exception") if 42 in chunk else None)
    landing = land(list(range(100)), store.insert, is_data_error)
    assert [row for row, _ in landing.poison] == [42]
    assert sorted(store.landed) == [row for row in range(100) if row != 42]
    assert not landing.unlanded


def test_a_batch_too_large_for_the_store_is_split_and_lands_whole():
    # chdb's TOO_MANY_PARTS: an insert may span at most 100 partitions; it is not a data error
    too_many = RuntimeError("Code: 252. DB::Exception: Too many partitions for single INSERT block")
    store = FakeStore(lambda chunk: too_many if len(chunk) > 100 else None)
    landing = land(list(range(150)), store.insert, is_data_error)
    assert sorted(store.landed) == list(range(150))
    assert not landing.poison and not landing.unlanded


def test_a_single_row_refused_without_a_data_code_waits_for_the_store():
    store = FakeStore(lambda chunk: DETACHED)
    landing = land([7], store.insert, is_data_error)
    assert landing.unlanded == [7] and landing.poison == []


def test_data_errors_are_told_by_clickhouse_code_or_by_rows_that_cannot_be_typed():
    assert is_data_error(DATA_ERROR)
    assert is_data_error(UnfitRows("the runs columns cannot hold these rows"))
    assert not is_data_error(DETACHED)
    assert not is_data_error(ConnectionRefusedError(111, "Connection refused"))


def test_hand_overs_are_split_by_bytes_and_read_back_whole():
    rows = [["e%d" % i, "x" * (i % 700)] for i in range(2000)]
    messages = EventBatch(3, rows).encode_split(20_000)
    assert len(messages) > 1
    assert all(len(message) <= 20_000 for message in messages)
    decoded = [EventBatch.decode(message) for message in messages]
    assert {batch.partition for batch in decoded} == {3}
    assert [event for batch in decoded for event in batch.events] == rows


def test_an_item_larger_than_the_limit_travels_alone():
    messages = Deployments([{"a": "small"}, {"a": "x" * 5000}, {"a": "small"}]).encode_split(1000)
    assert [len(orjson.loads(message)["deployments"]) for message in messages] == [1, 1, 1]


class FakeProducer:
    """Refuses the first `refusals` deliveries to a topic through the delivery callback, as a broker would."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.queue: list[tuple] = []
        self.delivered: list[bytes] = []

    def produce(self, topic, value, on_delivery, **options):  # noqa: ANN001, ANN003
        self.queue.append((topic, value, on_delivery))

    def flush(self, timeout):  # noqa: ANN001
        queue, self.queue = self.queue, []
        for topic, value, on_delivery in queue:
            if self.refusals:
                self.refusals -= 1
                on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
            else:
                self.delivered.append(value)
                on_delivery(None, None)
        return 0

    def __len__(self) -> int:
        return len(self.queue)


def _failures(topic: str) -> float:
    return telemetry.HANDOVER_FAILURES.labels(topic)._value.get()


def test_a_refused_delivery_is_produced_again_until_the_broker_takes_it(caplog):
    producer = FakeProducer(refusals=2)
    handovers = Handovers(producer, retry_max_seconds=0.01)
    before = _failures("t")
    handovers.produce("t", b"batch-1", partition=0)
    handovers.produce("t", b"batch-2", partition=1)
    assert handovers.settle(threading.Event()) is True
    assert sorted(producer.delivered) == [b"batch-1", b"batch-2"]
    assert _failures("t") - before == 2
    assert "the broker refused" in caplog.text and "offsets not committed" in caplog.text


def test_a_produce_refused_at_once_is_retried_and_a_stop_ends_the_retry_unsettled():
    class Refusing(FakeProducer):
        def produce(self, topic, value, on_delivery, **options):  # noqa: ANN001, ANN003
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))

    stop = threading.Event()
    handovers = Handovers(Refusing(refusals=0), retry_max_seconds=0.01)
    handovers.produce("big", b"x" * 100)
    threading.Timer(0.3, stop.set).start()
    before = _failures("big")
    assert handovers.settle(stop) is False
    assert _failures("big") - before >= 3  # retried while refused, until the stop
