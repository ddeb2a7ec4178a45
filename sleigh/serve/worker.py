"""One model replica: a `Pipeline` that runs one generation at a time in its own thread, with a bounded
queue in front of it.

Each generation owns its KV cache, so a `Pipeline` could run several at once, but without batching
they would only share the replica's cores: one thread runs them in turn, and the event loop never
runs model work. A request's events (text pieces, then the result or an error) cross to the event
loop through `loop.call_soon_threadsafe`. A cancelled job (its client went away) frees its place in
the queue at once, or, running, stops between two tokens; a prefill cannot be interrupted
(`ModelWorker.close`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime.pipeline import ModelFault, Pipeline
from sleigh.runtime.prompt import Turn
from sleigh.runtime.sampling import SamplingOptions

log = logging.getLogger("sleigh.serve")

# After the first piece the worker waits (at most this) until the event loop has passed it on: the two
# threads then do not take turns on the GIL while it goes out (thread wake-ups in the time to first token).
FIRST_PIECE_WAIT_S = 0.05


@dataclass
class GenerationRequest:
    turns: list[Turn]
    system: str | None
    image: Image.Image | None
    max_new_tokens: int
    sampling: SamplingOptions
    stop: tuple[str, ...] = ()
    max_tiles: int | None = None
    ignore_eos: bool = False
    fit_context: bool = False  # max_new_tokens is the server's default, which the context may cut


class QueueFull(Exception):
    pass


@dataclass(eq=False)  # a job is itself: the worker finds it in its queue by identity
class Job:
    """A request's life in the worker. Events on `events`: ("piece", str)..., then one of
    ("done", GenerationResult), ("error", exception) or ("cancelled", None)."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_piece_sent: threading.Event = field(default_factory=threading.Event)  # set by the event loop
    submitted: float = field(default_factory=time.perf_counter)
    withdraw: Callable[[Job], None] | None = None  # the worker's: a job still queued stops counting

    def cancel(self) -> None:
        self.cancelled.set()
        self.first_piece_sent.set()
        if self.withdraw is not None:
            self.withdraw(self)

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            pass


class ModelWorker:
    """`pipeline` run by one thread; `submit` refuses (QueueFull) once `max_queue` requests wait.
    `owns_pipeline`: the worker opened the pipeline (app.load_worker) and closes it with itself; a
    pipeline lent to it stays open for its lender.

    The waiting jobs are the worker's own queue, which a cancelled job leaves at once (with its image
    and prompt, its "cancelled" event sent): the server holds at most max_queue waiting requests,
    however many clients give up while they wait."""

    def __init__(self, pipeline: Pipeline, *, max_queue: int, owns_pipeline: bool = False):
        self.pipeline = pipeline
        self.owns_pipeline = owns_pipeline
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: deque[Job] = deque()  # submitted, not started, not withdrawn
        self._current: Job | None = None  # the one generating
        self.closed = False
        self._thread = threading.Thread(target=self._loop, name="sleigh-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return int(self._current is not None)

    @property
    def full(self) -> bool:
        return self.waiting + self.running > self.max_queue

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request; called on the event loop."""
        with self._lock:
            if self.closed:
                raise SleighError("model worker", "closed: it takes no more requests",
                                  "requests before the server shuts down, or a new worker")
            if self.full:
                raise QueueFull
            job = Job(request, asyncio.get_running_loop(), withdraw=self._withdraw)
            self._queue.append(job)
            self._ready.notify()
        return job

    def _withdraw(self, job: Job) -> None:
        """A cancelled job that has not started leaves the queue now, not when the thread reaches it:
        otherwise clients that gave up while waiting would keep new requests out (503), and their
        images in memory, until then."""
        with self._lock:
            if job not in self._queue:  # running (it stops between two tokens) or over
                return
            self._queue.remove(job)
        self._withdrawn(job)

    @staticmethod
    def _withdrawn(job: Job) -> None:
        job.request = None  # its image may be large: nothing keeps it now
        job.emit("cancelled")

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self.closed:
                    self._ready.wait()
                if not self._queue:  # closed, and nothing left
                    return
                job = self._queue.popleft()
                self._current = job
            self._run(job)

    def _run(self, job: Job) -> None:
        try:
            self._generate(job)
        except SleighError as e:  # the request's fault (a prompt past the context, ...), or the model's
            if isinstance(e, ModelFault):
                log.error("generation failed: %s", e)
            job.emit("error", e)
        except Exception as e:  # noqa: BLE001 - a bug or a backend failure: logged here, one line to the client
            log.exception("generation failed")
            job.emit("error", e)
        finally:
            with self._lock:
                self._current = None

    def _generate(self, job: Job) -> None:
        if job.cancelled.is_set():
            job.emit("cancelled")
            return
        r = job.request
        gen = self.pipeline.generate(r.image, r.turns, system=r.system, max_new_tokens=r.max_new_tokens,
                                     sampling=r.sampling, max_tiles=r.max_tiles, stop=r.stop,
                                     ignore_eos=r.ignore_eos, fit_context=r.fit_context)
        first = True
        for piece in gen.each_token():  # also the tokens without text: a client gone stops any of them
            if job.cancelled.is_set():  # between two tokens: no further model work for this request
                job.emit("cancelled")
                return
            if piece:
                job.emit("piece", piece)
                if first:
                    job.first_piece_sent.wait(FIRST_PIECE_WAIT_S)
                    first = False
        job.emit("done", gen.result)

    def close(self) -> None:
        """Cancel every job (each ends with its "cancelled" event), wait until the thread has stopped
        (a running generation stops at its next token, a prefill first runs to its end), then close the
        pipeline if the worker owns it. Later `submit` calls raise a SleighError."""
        with self._lock:  # the queue emptied at once: the thread must not start a job after this
            self.closed = True
            queued, current = list(self._queue), self._current
            self._queue.clear()
            self._ready.notify()
        for job in queued:
            job.cancel()
            self._withdrawn(job)
        if current is not None:
            current.cancel()
        self._thread.join()
        if self.owns_pipeline:
            self.pipeline.close()
