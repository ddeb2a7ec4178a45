"""The model worker's lifecycle: it closes only the pipeline it opened, and closing it ends every
request cleanly (a cancelled request, never the pipeline's "used after close()" error)."""

import asyncio

import pytest

from sleigh.errors import SleighError

from sleigh.runtime.pipeline import Pipeline
from sleigh.runtime.prompt import Turn
from sleigh.runtime.sampling import SamplingOptions
from sleigh.serve.worker import GenerationRequest, ModelWorker

TIMEOUT_S = 60


def _request(max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest([Turn("user", "Go on.")], None, None, max_new_tokens, SamplingOptions(), ignore_eos=True)


def test_a_worker_closes_only_the_pipeline_it_owns(tiny_pkg):
    with Pipeline.load(tiny_pkg) as lent:
        ModelWorker(lent, max_queue=0).close()
        assert not lent.closed  # still the lender's, and it still answers
        assert lent.generate(None, "hi", max_new_tokens=2, ignore_eos=True).result.token_ids
    owned = Pipeline.load(tiny_pkg)
    worker = ModelWorker(owned, max_queue=0, owns_pipeline=True)
    worker.close()
    assert owned.closed

    async def submit_after_close():
        with pytest.raises(SleighError, match=r"^model worker \| closed: it takes no more requests\. Expected: "):
            worker.submit(_request(1))
    asyncio.run(submit_after_close())
    assert worker.waiting == 0  # the refused request left no count behind
    # a request that reaches the server as it shuts down is told so (503), not a server error
    from starlette.testclient import TestClient

    from sleigh.serve.app import ServeSettings, create_app

    response = TestClient(create_app(ServeSettings(model=tiny_pkg), worker)).post(
        "/v1/chat/completions", json={"model": tiny_pkg.name, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503 and "closed" in response.json()["error"]["message"], response.text


def test_closing_the_worker_ends_running_and_queued_requests_as_cancelled(tiny_pkg):
    """close() while one request is generating and another waits: the running one stops at its next
    token, the waiting one never starts; both end with "cancelled" (no error, nothing left hanging),
    and the pipeline the worker owns is closed after its thread has stopped."""
    pipeline = Pipeline.load(tiny_pkg)
    worker = ModelWorker(pipeline, max_queue=1, owns_pipeline=True)

    async def scenario():
        running, queued = worker.submit(_request(1000)), worker.submit(_request(1000))
        first = await asyncio.wait_for(running.events.get(), TIMEOUT_S)
        running.first_piece_sent.set()
        await asyncio.to_thread(worker.close)
        ends = []
        for job, event in ((running, first), (queued, None)):
            event = event or await asyncio.wait_for(job.events.get(), TIMEOUT_S)
            pieces = 0
            while event[0] == "piece":
                pieces += 1
                event = await asyncio.wait_for(job.events.get(), TIMEOUT_S)
            ends.append((event, pieces))
        return ends

    (running_end, pieces), (queued_end, queued_pieces) = asyncio.run(scenario())
    assert running_end == ("cancelled", None) and 1 <= pieces < 1000
    assert queued_end == ("cancelled", None) and queued_pieces == 0
    assert pipeline.closed and worker.running == worker.waiting == 0


def test_a_request_cancelled_while_it_waits_frees_its_place_at_once(tiny_pkg):
    """A client that gives up while its request waits frees the queue place then, not when the thread
    reaches the job: otherwise new requests would be refused (503), and its image held, for as long as
    the running generation lasts. Its "cancelled" event comes at once too."""
    async def drain(job) -> tuple:
        event = await asyncio.wait_for(job.events.get(), TIMEOUT_S)
        while event[0] == "piece":
            job.first_piece_sent.set()
            event = await asyncio.wait_for(job.events.get(), TIMEOUT_S)
        return event

    with Pipeline.load(tiny_pkg) as pipeline:
        worker = ModelWorker(pipeline, max_queue=1)

        async def scenario():
            running = worker.submit(_request(1000))
            assert (await asyncio.wait_for(running.events.get(), TIMEOUT_S))[0] == "piece"
            running.first_piece_sent.set()
            queued = worker.submit(_request(5))
            assert worker.full and worker.waiting == 1
            queued.cancel()
            assert worker.waiting == 0 and not worker.full  # at once, while the first still generates
            assert queued.request is None  # nothing holds its prompt or image
            queued_end = await asyncio.wait_for(queued.events.get(), TIMEOUT_S)
            assert worker.running == 1  # the first still generates as the withdrawn one hears it
            later = worker.submit(_request(5))  # QueueFull before
            running.cancel()
            return await drain(running), queued_end, await drain(later)

        try:
            running_end, queued_end, later_end = asyncio.run(scenario())
        finally:
            worker.close()
        assert running_end == queued_end == ("cancelled", None)
        assert later_end[0] == "done" and len(later_end[1].token_ids) == 5
        assert worker.running == worker.waiting == 0


def test_a_cancelled_request_stops_between_tokens_that_add_no_text():
    """A model whose tokens add no text (special tokens under ignore_eos, held-back bytes, a stop
    string's possible start) yields no pieces: the worker checked its client only at a piece, so a
    client that left kept the model busy (the demo model: 1,990 such tokens, 1.5 s) and its tokens
    were counted as a finished answer. It stops at the next token now."""
    import threading
    import time

    from sleigh.runtime.pipeline import Generation

    class Silent:  # a stand-in pipeline: each token adds no text, up to 20,000 of them
        def __init__(self):
            self.tokens, self.started = 0, threading.Event()

        def generate(self, *args, **kwargs):
            def steps():
                for _ in range(20_000):
                    self.tokens += 1
                    self.started.set()
                    time.sleep(0.001)
                    yield ""
            return Generation(steps())

    model = Silent()
    worker = ModelWorker(model, max_queue=1)

    async def scenario():
        job = worker.submit(_request(20_000))
        await asyncio.to_thread(model.started.wait, TIMEOUT_S)
        job.cancel()
        return await asyncio.wait_for(job.events.get(), 10)

    try:
        end = asyncio.run(scenario())
        stopped_at = model.tokens
        time.sleep(0.05)
        assert end == ("cancelled", None) and model.tokens == stopped_at < 20_000
    finally:
        worker.close()
