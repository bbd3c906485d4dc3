"""DecodeBatcher without Ray: requests queued while the model is busy form the next batch."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from moe_lab.serving.batching import DecodeBatcher


class _Model:
    """A fake model: doubles its inputs, records batch sizes, can be held busy."""

    def __init__(self):
        self.batches = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()  # set once a batch is on the model thread
        self.fail_on = None

    def run(self, items, deadlines):
        self.started.set()
        self.release.wait(10)
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        return [2 * x for x in items]


@pytest.fixture
def model():
    return _Model()


def _batcher(model, **kw):
    return DecodeBatcher(model.run, ThreadPoolExecutor(max_workers=1), **kw)


def _later(s):
    return time.monotonic() + s


async def _until_busy(model):
    while not model.started.is_set():  # a batch is held on the model thread
        await asyncio.sleep(0.005)


async def _while_busy(model, batcher, first, rest, **submit_kw):
    """Submit ``first``, hold the model on it, submit ``rest``, then release the model."""
    model.release.clear()
    head = asyncio.ensure_future(batcher.submit(first, _later(30)))
    await _until_busy(model)
    tails = [asyncio.ensure_future(batcher.submit(x, _later(30))) for x in rest]
    await asyncio.sleep(0.05)
    model.release.set()
    return await asyncio.gather(head, *tails, return_exceptions=True)


def test_requests_queued_while_busy_form_one_batch(model):
    b = _batcher(model, max_batch_size=8)
    results = asyncio.run(_while_busy(model, b, 0, [1, 2, 3, 4, 5]))
    assert results == [0, 2, 4, 6, 8, 10]
    assert model.batches == [[0], [1, 2, 3, 4, 5]]
    assert b.stats() == {"batches": 2, "batched_requests": 6, "max_batch": 5}


def test_max_batch_size_is_respected_in_order(model):
    b = _batcher(model, max_batch_size=4)
    results = asyncio.run(_while_busy(model, b, 0, list(range(1, 10))))
    assert results == [2 * x for x in range(10)]
    assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_expired_items_time_out_without_decoding(model):
    b = _batcher(model)

    async def go():
        model.release.clear()
        head = asyncio.ensure_future(b.submit(1, _later(30)))
        await _until_busy(model)
        late = asyncio.ensure_future(b.submit(2, _later(0.01)))  # expires while the model is busy
        await asyncio.sleep(0.1)
        model.release.set()
        return await asyncio.gather(head, late, return_exceptions=True)

    head, late = asyncio.run(go())
    assert head == 2 and isinstance(late, asyncio.TimeoutError)
    assert model.batches == [[1]]


def test_a_cancelled_caller_is_dropped(model):
    b = _batcher(model)

    async def go():
        model.release.clear()
        head = asyncio.ensure_future(b.submit(1, _later(30)))
        await _until_busy(model)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.submit(2, _later(30)), timeout=0.05)  # the caller gives up
        model.release.set()
        return await head, await b.submit(3, _later(30))

    assert asyncio.run(go()) == (2, 6)
    assert model.batches == [[1], [3]]  # 2 never reached the model


def test_a_failing_batch_fails_only_its_items(model):
    b = _batcher(model)
    model.fail_on = 1

    async def go():
        bad = await asyncio.gather(b.submit(1, _later(30)), return_exceptions=True)
        return bad[0], await b.submit(5, _later(30))

    bad, good = asyncio.run(go())
    assert isinstance(bad, RuntimeError) and str(bad) == "boom" and good == 10


def test_batch_wait_timeout_lets_a_batch_fill(model):
    b = _batcher(model, max_batch_size=3, batch_wait_timeout_s=2.0)

    async def go():
        first = asyncio.ensure_future(b.submit(1, _later(30)))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(b.submit(2, _later(30)))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        third = await b.submit(3, _later(30))  # fills the batch: no need to wait the full 2 s
        return await first, await second, third, time.monotonic() - start

    *results, waited = asyncio.run(go())
    assert results == [2, 4, 6] and model.batches == [[1, 2, 3]] and waited < 1.5


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="max_batch_size"):
        DecodeBatcher(lambda i, d: i, ThreadPoolExecutor(1), max_batch_size=0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        DecodeBatcher(lambda i, d: i, ThreadPoolExecutor(1), batch_wait_timeout_s=-1)
