"""The micro-batcher: merges concurrent work, keeps order, honours budgets, refuses when full."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from appliance.errors import Overloaded, ValidationFailed
from appliance.runtime.batcher import Batcher


class Recorder:
    """A fake model: doubles its inputs and records the batches it was called with."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate

    def __call__(self, items: list[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(list(items))
        return [2 * i for i in items]


def make(model: Callable[[list[int]], list[int]], **kw: Any) -> Batcher[int, int]:
    defaults: dict[str, Any] = {
        "name": "t",
        "max_wait_s": 0.0,
        "max_queue": 100,
        "max_batch_size": 8,
        "max_batch_tokens": 10_000,
    }
    return Batcher(model, **(defaults | kw))


def test_concurrent_requests_share_model_calls() -> None:
    async def main() -> None:
        gate = threading.Event()
        model = Recorder(gate)
        b = make(model)
        b.start()
        first = asyncio.create_task(b.submit([0], [1]))
        await asyncio.sleep(0.05)  # the first call is running and blocked on the gate
        rest = [asyncio.create_task(b.submit([i, i + 100], [1, 1])) for i in range(1, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        assert await first == [0]
        assert [await t for t in rest] == [[2 * i, 2 * i + 200] for i in range(1, 4)]
        assert model.batches == [[0], [1, 101, 2, 102, 3, 103]]
        await b.stop()

    asyncio.run(main())


def test_batches_are_cut_by_size_and_token_budget() -> None:
    async def main() -> None:
        gate = threading.Event()
        model = Recorder(gate)
        b = make(model, max_batch_size=3, max_batch_tokens=20)
        b.start()
        blocker = asyncio.create_task(b.submit([-1], [1]))
        await asyncio.sleep(0.05)
        # Budget is items x longest: 5 one-token items are cut by size (3, then 2, since adding
        # an 8-token item would make 3 x 8 > 20); the 8-token items go two at a time (16 <= 20).
        small = asyncio.create_task(b.submit(list(range(5)), [1] * 5))
        big = asyncio.create_task(b.submit([10, 11, 12], [8, 8, 8]))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, small, big)
        assert model.batches[1:] == [[0, 1, 2], [3, 4], [10, 11], [12]]
        await b.stop()

    asyncio.run(main())


def test_full_queue_is_refused_at_once() -> None:
    async def main() -> None:
        gate = threading.Event()
        b = make(Recorder(gate), max_queue=4)
        b.start()
        running = asyncio.create_task(b.submit([0], [1]))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(b.submit([1, 2, 3], [1, 1, 1]))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as info:
            await b.submit([4, 5], [1, 1])
        assert info.value.status_code == 503 and info.value.retry_after == 1
        gate.set()
        await asyncio.gather(running, queued)
        await b.stop()

    asyncio.run(main())


def test_work_bigger_than_the_whole_queue_is_a_422_not_a_503() -> None:
    """A 503 says "retry shortly": a request that can never fit must not be told so (a batch
    job would retry it forever)."""

    async def main() -> None:
        b = make(Recorder(threading.Event()), max_queue=4)
        b.start()
        with pytest.raises(ValidationFailed) as info:
            await b.submit([0, 1, 2, 3, 4], [1] * 5)
        assert info.value.status_code == 422 and info.value.details["max_items"] == 4
        await b.stop()

    asyncio.run(main())


def test_a_failing_call_fails_its_waiters_only() -> None:
    async def main() -> None:
        calls = 0

        def flaky(items: list[int]) -> list[int]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("model error")
            return items

        b = Batcher(
            flaky, name="t", max_batch_size=8, max_batch_tokens=100, max_wait_s=0, max_queue=10
        )
        b.start()
        with pytest.raises(RuntimeError):
            await b.submit([1], [1])
        assert await b.submit([2], [1]) == [2]
        await b.stop()

    asyncio.run(main())


def test_streams_run_model_calls_side_by_side() -> None:
    """With two streams a second batch runs while the first is still in the model; with one
    stream it waits. Each batch is cut whole: no item is in two calls, none is lost."""

    async def run(streams: int) -> tuple[int, list[list[int]]]:
        gate = threading.Event()
        lock = threading.Lock()
        inside = [0, 0]  # now, most at once

        def model(items: list[int]) -> list[int]:
            with lock:
                inside[0] += 1
                inside[1] = max(inside[1], inside[0])
            gate.wait(5)
            with lock:
                inside[0] -= 1
            return [2 * i for i in items]

        b: Batcher[int, int] = Batcher(
            model,
            name="t",
            max_wait_s=0.0,
            max_batch_size=8,
            max_batch_tokens=10_000,
            max_queue=100,
            streams=streams,
        )
        b.start()
        first = asyncio.create_task(b.submit([0], [1]))
        await asyncio.sleep(0.05)  # the first call holds one stream
        rest = [asyncio.create_task(b.submit([i], [1])) for i in range(1, 6)]
        await asyncio.sleep(0.1)
        at_once = inside[1]
        gate.set()
        results = [await first, *[await t for t in rest]]
        await b.drain(1)
        await b.stop()
        return at_once, results

    one, results_one = asyncio.run(run(1))
    two, results_two = asyncio.run(run(2))
    assert one == 1 and two == 2
    assert results_one == results_two == [[2 * i] for i in range(6)]


def test_stream_plan_shares_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.config import RuntimeConfig
    from appliance.runtime import session

    monkeypatch.setattr(session, "usable_cores", lambda: 4)
    # Encoders: one call per core, one thread each; per-token decoders: one call, all cores.
    assert session.plan_streams(RuntimeConfig(), "feature-extraction") == (4, 1)
    assert session.plan_streams(RuntimeConfig(), "text-generation") == (1, 4)
    assert session.plan_streams(RuntimeConfig(streams=2), "feature-extraction") == (2, 2)
    assert session.plan_streams(RuntimeConfig(streams=1), "text-classification") == (1, 4)
    assert session.plan_streams(RuntimeConfig(intra_op_threads=3), "feature-extraction") == (4, 3)


def test_a_lone_call_gets_every_core_in_its_own_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.config import RuntimeConfig
    from appliance.runtime import session

    monkeypatch.setattr(session, "usable_cores", lambda: 4)
    assert session.lone_call_threads(RuntimeConfig(), "feature-extraction") == 4
    assert session.lone_call_threads(RuntimeConfig(lone_call_threads=2), "text-classification") == 2
    # Not when the streams' calls have as many threads already, nor without lone calls:
    assert session.lone_call_threads(RuntimeConfig(lone_call_threads=1), "feature-extraction") == 0
    assert session.lone_call_threads(RuntimeConfig(streams=1), "feature-extraction") == 0
    assert session.lone_call_threads(RuntimeConfig(lone_call_threads=8), "feature-extraction") == 4
    for task in ("text-generation", "question-answering", "zero-shot-classification", "custom"):
        assert session.lone_call_threads(RuntimeConfig(), task) == 0
    assert session.lone_call_threads(RuntimeConfig(), "feature-extraction", workers=4) == 0
    assert session.lone_call_threads(RuntimeConfig(), "feature-extraction", workers=2) == 2


def test_idle_model_threads_hand_freed_memory_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a model goes idle its freed buffers go back to the OS (glibc malloc_trim), at most
    once per interval, and never while work is queued."""
    from appliance.runtime import memory

    trims: list[float] = []
    monkeypatch.setattr(memory, "_LIBC", object())  # as on glibc
    monkeypatch.setattr(memory, "_last_trim", 0.0)
    monkeypatch.setattr(
        memory, "release_free_memory", lambda: trims.append(memory.time.monotonic())
    )

    async def main() -> None:
        b = make(Recorder())
        b.start()
        await b.submit([1], [1])
        await asyncio.sleep(0.05)
        assert len(trims) == 1
        await b.submit([2], [1])  # within the interval: no second trim yet
        await asyncio.sleep(0.05)
        assert len(trims) == 1
        await b.stop()  # and none after it stopped

        monkeypatch.setattr(memory, "TRIM_INTERVAL_SECONDS", 0.3)
        monkeypatch.setattr(memory, "_last_trim", 0.0)
        trims.clear()
        b = make(Recorder())
        b.start()
        await b.submit([1], [1])
        for i in range(3):  # idle again within the interval, three times: one trim later
            await b.submit([i], [1])
        await asyncio.sleep(0.05)
        assert len(trims) == 1
        await asyncio.sleep(0.4)  # what the last calls freed is not held until a request
        assert len(trims) == 2 and trims[1] - trims[0] >= 0.29
        await asyncio.sleep(0.4)
        assert len(trims) == 2  # once idle and trimmed, nothing more to do
        await b.stop()

    asyncio.run(main())


class ThreadRecorder(Recorder):
    """Records the thread each call ran on; each call takes `seconds`."""

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.seconds = seconds

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return super().__call__(items)


def test_a_lone_small_request_runs_on_the_event_loop_and_others_on_model_threads() -> None:
    async def main() -> None:
        in_flight = [1]
        model = ThreadRecorder()
        observed: list[tuple[int, float]] = []
        b = make(
            model,
            observe=lambda n, waits, took: observed.append((n, took)),
            alone=lambda: in_flight[0] <= 1,
        )
        b.start()
        loop_thread = threading.current_thread().name
        assert await b.submit([0], [10]) == [0]  # how long small calls take: not known yet
        assert await b.submit([1], [10]) == [2]  # alone, small, fast: on the loop
        assert model.threads == ["model-t_0", loop_thread] and [n for n, _ in observed] == [1, 1]
        assert await b.submit([2], [65]) == [4]  # over INLINE_TOKENS: a model thread
        in_flight[0] = 2
        assert await b.submit([3], [10]) == [6]  # another request in flight: a model thread
        in_flight[0] = 1
        assert await b.submit([4], [1], priority=10) == [8]  # a job's line: a model thread
        assert model.threads[2:] == ["model-t_0"] * 3
        await b.stop()

        lone = ThreadRecorder()  # the lone call's own runner (a session with every core)
        model = ThreadRecorder()
        b = make(model, alone=lambda: in_flight[0] <= 1, run_alone=lone)
        b.start()
        assert await b.submit([0], [10]) == [0]  # call time not known yet: a model thread
        assert await b.submit([1], [10]) == [2]  # then on the loop
        assert await b.submit([2], [200]) == [4]  # too long for the loop: a model thread
        in_flight[0] = 2
        assert await b.submit([3], [10]) == [6]  # not alone: a stream's own session
        in_flight[0] = 1
        assert await b.submit([4], [200], priority=10) == [8]  # a job's line: a stream's
        # The lone call's session (every core) whenever the request is alone, on the loop
        # when it is short enough for it, on a model thread when not.
        assert lone.threads == ["model-t-lone_0", loop_thread, "model-t-lone_0"]
        assert model.threads == ["model-t_0"] * 2
        await b.stop()

        slow = ThreadRecorder(seconds=0.02)  # small calls slower than INLINE_SECONDS
        b = make(slow, name="slow", alone=lambda: True)
        b.start()
        for i in range(3):
            assert await b.submit([i], [5]) == [2 * i]
        assert slow.threads == ["model-slow_0"] * 3
        await b.stop()

    asyncio.run(main())


def test_a_stream_cuts_its_next_batch_without_the_event_loop() -> None:
    """A call's end starts the next queued batch at once, even while the loop is busy (here:
    blocked) answering; and what arrives in one loop step is one batch, not one call each."""

    async def main() -> None:
        gate = threading.Event()
        starts: list[tuple[float, list[int]]] = []

        def model(items: list[int]) -> list[int]:
            starts.append((time.monotonic(), list(items)))
            if len(starts) == 1:
                gate.wait(5)
            return [2 * i for i in items]

        b = make(model, max_batch_size=8)
        b.start()
        first = asyncio.create_task(b.submit([0], [1]))
        await asyncio.sleep(0.05)  # the first call runs, blocked on the gate
        rest = [asyncio.create_task(b.submit([i], [1])) for i in range(1, 4)]
        await asyncio.sleep(0.05)  # queued behind it
        gate.set()
        blocked = time.monotonic()
        time.sleep(0.3)  # the loop is busy: nothing of the batcher runs on it meanwhile
        unblocked = time.monotonic()
        assert await first == [0] and [await t for t in rest] == [[2], [4], [6]]
        assert [items for _, items in starts] == [[0], [1, 2, 3]]
        assert blocked <= starts[1][0] < unblocked - 0.2  # started while the loop was blocked

        starts.clear()
        together = [b.submit([i], [1]) for i in range(10, 15)]  # one loop step, model idle
        assert await asyncio.gather(*together) == [[20], [22], [24], [26], [28]]
        assert [items for _, items in starts] == [[10, 11, 12, 13, 14]]
        await b.stop()

    asyncio.run(main())
