"""A micro-batcher per model: concurrent requests are merged into one model call.

Work is cut into batches by item count and a token budget (items x longest item). The queue
is bounded: when it is full the request is refused at once (Overloaded, 503 + Retry-After)
rather than held in unbounded memory. Model calls run on the model's own threads, so the
event loop only queues and awaits.

A model may run several calls at once (`streams`, each on its own thread with its own
onnxruntime threads; see appliance.runtime.session.plan_streams): while one call runs, the
next batch is cut from what queued meanwhile and runs beside it. Batches are cut one at a
time, so a batch is never split between two calls.

Each stream's thread cuts its own next batch the moment its call ends, and hands the results
back with one callback on the loop per batch. When the loop cut the batches (a task per
stream), a stream whose call had ended waited for the loop to answer that call's requests
before it could start the next: at c=32 short texts the model threads sat 10% of their time
idle with work queued (measured on this 2-core machine), a tenth of the model's capacity. The
loop wakes a waiting stream once per loop step, not per request, so the requests that arrive
together are cut into one batch, as before.

Work has a priority: real-time requests (REALTIME) go before batch jobs (BACKGROUND), and a
batch never mixes priorities, so a real-time request waits at most for the model call that is
already running, never behind queued job lines.

A lone request's small call runs on the event loop itself: when the server answers no other
request (`alone`), the model is idle and nothing is queued, handing a call of at most
INLINE_TOKENS to a model thread and back only adds latency (two thread wake-ups, ~0.3 ms of
a 1-2 ms call for a short text on the 2-core test machine); nothing else waits meanwhile.
Only while this model's small calls take at most INLINE_SECONDS (a moving average of every
such call, either way): tokens alone do not bound the time (a 24-layer model, pairs padded
to the longest one), and the loop must not stop for longer. Such a call may go to its own
`run_alone` (a session with every core: nothing else runs meanwhile); a lone request too
long for the loop still gets that session, on a model thread (all-MiniLM-L6-v2, one
128-token text in-process: 12.4 ms of one call on two threads against 18.3 on one).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from appliance.errors import ModelUnavailable, Overloaded, ValidationFailed
from appliance.runtime import memory

log = logging.getLogger("appliance.batcher")

T = TypeVar("T")
R = TypeVar("R")

REALTIME = 0
"""Priority of an API request answered while the client waits: served first."""
BACKGROUND = 10
"""Priority of a batch job's lines: served when no real-time work is queued."""

INLINE_TOKENS = 64
"""A lone request's call of at most this many tokens may run on the event loop (see above)."""
INLINE_SECONDS = 0.005
"""... while such calls of this model take at most this long on average."""


@dataclass(slots=True)
class _Pending(Generic[T]):
    item: T
    cost: int
    future: asyncio.Future[Any] = field(repr=False)
    enqueued: float = field(default_factory=time.perf_counter)
    priority: int = REALTIME


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        name: str,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue: int,
        observe: Callable[[int, list[float], float], None] | None = None,
        streams: int = 1,
        alone: Callable[[], bool] | None = None,
        run_alone: Callable[[list[T]], Sequence[R]] | None = None,
    ) -> None:
        self._alone = alone  # no other request is being answered (None: never inline)
        self._run_alone = run_alone or run_batch  # the inline call
        self._lone_session = run_alone is not None  # a session with every core, for it
        self._small_call_s: float | None = None  # moving average, calls <= INLINE_TOKENS
        self._run_batch = run_batch
        self._observe = observe  # (items, seconds each waited, seconds the call took)
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.streams = max(1, streams)
        # A heap of (priority, arrival number, item): lowest priority value first, FIFO
        # within one. Shared by the loop (which adds) and the streams (which cut): _ready's
        # lock guards it, the carry and the count of running calls.
        self._heap: list[tuple[int, int, _Pending[T]]] = []
        self._ready = threading.Condition(threading.Lock())
        self._cutting = threading.Lock()  # one stream cuts a batch at a time
        self._carry: tuple[int, int, _Pending[T]] | None = None  # overflowed the last batch
        self._running = 0  # model calls running now
        self._arrivals = itertools.count()
        self._threads: list[threading.Thread] = []
        self._lone_executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{name}-lone")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_due = False  # a wake-up of a waiting stream is scheduled on the loop
        self._closed = False  # no new work
        self._stopping = False  # the streams end
        self._trim_timer: asyncio.TimerHandle | None = None  # a deferred idle trim

    @property
    def depth(self) -> int:
        return len(self._heap)

    def start(self) -> None:
        if not self._threads:
            self._loop = asyncio.get_running_loop()
            self._threads = [
                threading.Thread(target=self._stream, name=f"model-{self.name}_{i}", daemon=True)
                for i in range(self.streams)
            ]
            for thread in self._threads:
                thread.start()

    async def drain(self, timeout: float = 30.0) -> None:
        """Refuse new work, and wait (up to `timeout`) for queued and running work to finish."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._heap or self._carry or self._running) and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._closed = True
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        threads, self._threads = self._threads, []
        loop = asyncio.get_running_loop()
        # Joined off the loop: a call still running hands its results back meanwhile.
        await loop.run_in_executor(None, lambda: [t.join() for t in threads])
        await loop.run_in_executor(None, self._lone_executor.shutdown)
        with self._ready:
            leftovers = [self._carry] if self._carry is not None else []
            leftovers.extend(self._heap)
            self._carry, self._heap = None, []
        for _, _, pending in leftovers:
            if not pending.future.done():
                pending.future.set_exception(Overloaded("The model is shutting down."))

    async def submit(
        self, items: Sequence[T], costs: Sequence[int], *, priority: int = REALTIME
    ) -> list[R]:
        """Queue the items (all or none) and wait for their results, in order. Queued work of
        a lower `priority` value is run first (REALTIME before BACKGROUND)."""
        if self._closed:
            raise ModelUnavailable(f"Model {self.name} was removed.", retry_after=1)
        if not self._threads:
            raise RuntimeError("batcher not started")
        if len(items) > self.max_queue:  # would never fit: no retry can help
            raise ValidationFailed(
                f"This request needs {len(items)} model items at once; model {self.name} "
                f"queues at most {self.max_queue} (runtime.max_queue): send fewer.",
                details={"items": len(items), "max_items": self.max_queue},
            )
        if len(self._heap) + len(items) > self.max_queue:
            raise Overloaded(
                f"Model {self.name} has {len(self._heap)} items queued; retry shortly.",
                retry_after=1,
            )
        if (
            self._alone is not None
            and priority == REALTIME
            and not self._running
            and self._carry is None
            and not self._heap
            and self._alone()
        ):
            if (
                sum(costs) <= INLINE_TOKENS
                and self._small_call_s is not None
                and self._small_call_s <= INLINE_SECONDS
            ):
                return await self._run_lone(items, costs, on_loop=True)
            if self._lone_session:  # too long for the loop: every core, on a model thread
                return await self._run_lone(items, costs, on_loop=False)
        loop = asyncio.get_running_loop()
        pending = [
            _Pending(item, cost, loop.create_future(), priority=priority)
            for item, cost in zip(items, costs, strict=True)
        ]
        with self._ready:
            for p in pending:
                heapq.heappush(self._heap, (priority, next(self._arrivals), p))
        if not self._wake_due:
            # After this loop step, so that what arrives in the same step makes one batch.
            self._wake_due = True
            loop.call_soon(self._wake)
        try:
            if len(pending) == 1:  # most requests: skip gather's own future and callbacks
                return [await pending[0].future]
            return list(await asyncio.gather(*(p.future for p in pending)))
        except BaseException:
            for p in pending:
                p.future.cancel()  # left in the queue, skipped by the stream that cuts it
            raise

    def _wake(self) -> None:
        self._wake_due = False
        with self._ready:
            self._ready.notify()  # only the stream that is cutting ever waits on it

    async def _run_lone(
        self, items: Sequence[T], costs: Sequence[int], *, on_loop: bool
    ) -> list[R]:
        """A lone request's call (`run_alone`): on the event loop itself, or, too long for
        it, on a thread of its own (a stream's one-thread session would leave the other
        cores idle)."""
        started = time.perf_counter()
        with self._ready:
            self._running += 1  # counted as a stream's call: others queue, and run beside it
        try:
            if on_loop:
                results = self._run_alone(list(items))
            else:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._lone_executor, self._run_alone, list(items)
                )
        except Exception:
            log.exception("model %s: batch of %d failed", self.name, len(items))
            raise
        finally:
            with self._ready:
                self._running -= 1
        self._called(sum(costs), [0.0] * len(items), time.perf_counter() - started)
        return list(results)

    def _called(self, cost: int, waits: list[float], took: float) -> None:
        """After a model call, on the loop: the small calls' moving average, the metrics,
        and, when the model has gone idle, its freed memory handed back."""
        if cost <= INLINE_TOKENS:
            last = self._small_call_s
            self._small_call_s = took if last is None else 0.8 * last + 0.2 * took
        if self._observe is not None:
            self._observe(len(waits), waits, took)
        self._trim_if_idle()

    def _trim_if_idle(self) -> None:
        """Idle: give the big batch buffers back (a thread of the loop's own pool, so the
        next model call never queues behind it). A model that goes idle within the interval
        of the last trim gets its own once the interval is over: else what its last calls
        freed stayed held until the next request (after 32 texts of 128 tokens at c=1 on
        this machine: 272 MB, 193 MB once trimmed)."""
        if self._running or self._heap or self._stopping:
            return
        loop = asyncio.get_running_loop()
        if memory.trim_due():
            loop.run_in_executor(None, memory.release_free_memory)
        elif memory.trims() and self._trim_timer is None:
            self._trim_timer = loop.call_later(memory.seconds_to_trim(), self._deferred_trim)

    def _deferred_trim(self) -> None:
        self._trim_timer = None
        self._trim_if_idle()

    def _stream(self) -> None:
        """One stream's thread: cut a batch, call the model, hand the results to the loop."""
        while True:
            with self._cutting:
                batch = self._cut()
            if batch is None:
                return
            started = time.perf_counter()
            results: Sequence[R] | None = None
            error: Exception | None = None
            try:
                results = self._run_batch([p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} items")
            except Exception as exc:  # the whole call failed: every waiter hears of it
                log.exception("model %s: batch of %d failed", self.name, len(batch))
                error = exc
            took = time.perf_counter() - started
            with self._ready:
                self._running -= 1
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                self._loop.call_soon_threadsafe(self._finish, batch, results, error, started, took)

    def _cut(self) -> list[_Pending[T]] | None:
        """The next batch (None: stop); waits for work, and up to max_wait_s for more."""
        with self._ready:
            if self._carry is not None:
                # Back in the heap with its place: more urgent work that came since goes first.
                heapq.heappush(self._heap, self._carry)
                self._carry = None
            first: _Pending[T] | None = None
            while first is None:
                while not self._heap and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return None
                entry = heapq.heappop(self._heap)
                if not entry[2].future.done():  # done: its request was cancelled
                    first = entry[2]
            batch = [first]
            longest = first.cost
            deadline = time.monotonic() + self.max_wait_s
            size = self.max_batch_size
            idle = self.streams - self._running  # this one included
            if idle > 1:
                # Share what is queued among the idle streams: two half batches on two cores
                # finish sooner than one whole batch on one core while the other waits.
                size = min(size, -(-(len(self._heap) + 1) // idle))
            while len(batch) < size:
                if not self._heap:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._ready.wait(remaining)
                    continue
                entry = heapq.heappop(self._heap)
                nxt = entry[2]
                if nxt.future.done():
                    continue
                candidate = max(longest, nxt.cost)
                if (
                    nxt.priority != first.priority
                    or candidate * (len(batch) + 1) > self.max_batch_tokens
                ):
                    # Another priority, or over the token budget: this item opens the next batch.
                    self._carry = entry
                    break
                batch.append(nxt)
                longest = candidate
            self._running += 1
            return batch

    def _finish(
        self,
        batch: list[_Pending[T]],
        results: Sequence[R] | None,
        error: Exception | None,
        started: float,
        took: float,
    ) -> None:
        """On the loop: a stream's call is over; its waiters get their results (`results`
        is None only with an `error`)."""
        if error is not None:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        assert results is not None
        self._called(sum(p.cost for p in batch), [started - p.enqueued for p in batch], took)
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
