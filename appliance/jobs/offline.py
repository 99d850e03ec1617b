"""`appliance batch run`: answer an NDJSON file without a server, in this process or spread
over a Ray cluster with Ray Data, with the batch jobs' own work functions and result lines.

Both ways split the file the same way (`read_lines`: on b"\\n" only; a line over
server.max_body_bytes is answered 413 without being held), answer lines with the same
`LineAnswerer` (answer_line() of the job runner), and frame the answers in input order with
result_line(), so their outputs are equal line for line. Only the transport differs: on Ray,
read tasks cut the file into byte ranges, an actor pool holds the INT8 sessions, and the driver
numbers and writes what comes back in order.

A run has no response cache and no rate limits (like a job: it uses what it is given). With a
key, lines run as that key (its model allowlist), and usage is recorded and the quota charged
as each block is written; the run stops after the block that spends the quota.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import msgspec

from appliance.config import Settings
from appliance.errors import InsufficientBalance
from appliance.gateway.keys import ApiKey
from appliance.gateway.usage import Record, UsageLog
from appliance.jobs.store import BLANK
from appliance.jobs.worker import UnmeteredLimiter, answer_line, result_line

if TYPE_CHECKING:
    import pyarrow as pa

BLOCK_LINES = 256
"""Lines answered together: the micro-batcher merges them into few model calls."""
RANGE_BYTES = 32 << 20
"""Ray read tasks cut the input into byte ranges of about this size."""
LOCAL_KEY = ApiKey(id="batch-run", name="batch run", hash="", scopes=["admin"], created_at="")
"""Who lines run as without --key: every model, no quota, nothing recorded."""


def read_lines(fh: BinaryIO, max_line_bytes: int, end: int | None = None) -> Iterator[bytes | None]:
    """Every line from the file's position (the newline dropped; None for a line over the
    limit, skipped in pieces, never held), up to the first line that starts at or after
    `end`."""
    position = fh.tell()
    while end is None or position < end:
        piece = fh.readline(max_line_bytes + 1)
        if not piece:
            return
        position += len(piece)
        if len(piece) > max_line_bytes and not piece.endswith(b"\n"):
            while piece and not piece.endswith(b"\n"):
                piece = fh.readline(1 << 20)
                position += len(piece)
            yield None
            continue
        yield piece[:-1] if piece.endswith(b"\n") else piece


@dataclass(frozen=True)
class RunSpec:
    """What every process answering lines needs (pickled to Ray's actors)."""

    settings: Settings
    endpoint: str
    model: str | None = None
    classifier: str | None = None
    key: ApiKey = LOCAL_KEY


@dataclass(slots=True)
class Answer:
    status: int
    """0 for a blank line: counted, not answered."""
    payload: bytes
    tokens: int = 0
    model: str | None = None


class _Unmetered:
    """Quota accounting inside the answering processes: none. The driver charges the key as it
    writes each block (one place, whatever the number of processes)."""

    def reserve(self, key_id: str, quota: int | None, tokens: int) -> None:
        return None

    def refund(self, key_id: str, tokens: int) -> None:
        return None


class LineAnswerer:
    """The server's runtime without HTTP: the models under models_dir (each opened at its first
    line), inference without rate limits or cache, the endpoint's work function. Callable on
    a pyarrow batch, as Ray Data's actors are; `answer` for this process."""

    def __init__(self, spec: RunSpec, streams: int = 0) -> None:
        from appliance.api.tasks import Work
        from appliance.classifiers import ClassifierStore
        from appliance.fallbacks import Fallbacks
        from appliance.gateway.cache import ResponseCache
        from appliance.inference import Call, Inference
        from appliance.jobs.endpoints import JOB_ENDPOINTS
        from appliance.models.registry import Registry
        from appliance.runtime.batcher import BACKGROUND

        s = spec.settings
        settings = msgspec.structs.replace(
            s,
            models=msgspec.structs.replace(s.models, lazy=True, watch_interval_seconds=0),
            # On Ray: one session stream per CPU the actor was given, one thread each (the
            # default shares out os.cpu_count(), the whole node's, among every actor's streams).
            runtime=msgspec.structs.replace(
                s.runtime, streams=streams, intra_op_threads=1, warmup=False
            )
            if streams
            else s.runtime,
        )
        self.spec = spec
        self.target = JOB_ENDPOINTS[spec.endpoint]
        self.registry = Registry(settings)
        cache = ResponseCache(settings.cache_path, size_limit_bytes=1, ttl_seconds=0, enabled=False)
        inference = Inference(
            self.registry,
            cache,
            UnmeteredLimiter(),
            _Unmetered(),
            settings.limits,  # type: ignore[arg-type]
            Fallbacks(settings.fallbacks),
        )
        classifiers = ClassifierStore(settings.data_path / "classifiers.json")

        def work() -> tuple[Any, Any]:
            call = Call(spec.key, read_cache=False, write_cache=False)
            return call, Work(call, inference, settings, classifiers, BACKGROUND)

        self._work: Callable[[], tuple[Any, Any]] = work
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self.registry.start())

    async def _one(self, raw: bytes | None) -> Answer:
        if raw is not None and raw in BLANK:
            return Answer(0, b"")
        call, work = self._work()
        status, payload = await answer_line(
            raw, self.target, work, (self.spec.model, self.spec.classifier)
        )
        return Answer(status, payload, call.tokens, call.model)

    def answer(self, raws: Sequence[bytes | None]) -> list[Answer]:
        async def run() -> list[Answer]:
            return list(await asyncio.gather(*(self._one(raw) for raw in raws)))

        return self._loop.run_until_complete(run())

    def __call__(self, batch: pa.Table) -> dict[str, list[Any]]:
        answers = self.answer(batch.column("raw").to_pylist())
        return {
            "status": [a.status for a in answers],
            "payload": [a.payload for a in answers],
            "tokens": [a.tokens for a in answers],
            "model": [a.model for a in answers],
        }

    def close(self) -> None:
        self._loop.run_until_complete(self.registry.stop())
        self._loop.close()


@dataclass
class RunSummary:
    lines: int = 0
    """Lines answered (blank ones not counted)."""
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped: dict[str, Any] | None = None
    """Why the run stopped early (the key's quota spent): an API error body."""


class _Writer:
    """Numbers the answers in input order, writes their result lines, charges the key."""

    def __init__(self, out: BinaryIO, spec: RunSpec, usage: UsageLog | None) -> None:
        self.out, self.spec, self.usage = out, spec, usage
        self.number = 0
        self.summary = RunSummary()
        self.started = time.perf_counter()

    def block(self, answers: Iterable[Answer]) -> bool:
        """Write one block; False once the key's quota is spent (the run stops there)."""
        groups: dict[tuple[str | None, int], list[int]] = defaultdict(lambda: [0, 0])
        data: list[bytes] = []
        for a in answers:
            self.number += 1
            if a.status == 0:
                continue
            line, _ = result_line(self.number, a.status, a.payload, f"batch-run:{self.number}")
            data.append(line)
            group = groups[(a.model, a.status)]
            group[0] += 1
            group[1] += a.tokens
        self.out.write(b"".join(data))
        s = self.summary
        for (_, status), (count, tokens) in groups.items():
            s.lines += count
            s.failed += count if status >= 400 else 0
            s.tokens += tokens
        return self._charge(groups)

    def _charge(self, groups: dict[tuple[str | None, int], list[int]]) -> bool:
        key, usage = self.spec.key, self.usage
        if usage is None or key is LOCAL_KEY:
            return True
        now = time.time()
        for (model, status), (_, tokens) in groups.items():
            usage.record(
                Record(
                    ts=now,
                    key_id=key.id,
                    endpoint=f"RUN {self.spec.endpoint}",
                    model=model,
                    status=status,
                    latency_ms=0.0,
                    tokens=tokens,
                    cached=False,
                    request_id=f"batch-run:{self.number}",
                )
            )
        tokens = sum(t for _, t in groups.values())
        try:
            usage.reserve(key.id, key.token_quota, tokens)
        except InsufficientBalance as exc:
            usage.reserve(key.id, None, tokens)  # what ran is spent all the same
            self.summary.stopped = {"code": exc.code, "message": exc.message}
            return False
        return True


def run_in_process(
    input_path: Path, out: BinaryIO, spec: RunSpec, usage: UsageLog | None
) -> RunSummary:
    """The reference: read, answer and write block by block in this process."""
    limit = spec.settings.server.max_body_bytes
    writer = _Writer(out, spec, usage)
    answerer = LineAnswerer(spec)
    try:
        with open(input_path, "rb") as fh:
            lines = read_lines(fh, limit)
            while block := list(itertools.islice(lines, BLOCK_LINES)):
                if not writer.block(answerer.answer(block)):
                    break
    finally:
        answerer.close()
    writer.summary.seconds = time.perf_counter() - writer.started
    return writer.summary


def ndjson_ranges(path: Path, max_line_bytes: int, range_bytes: int = RANGE_BYTES) -> Any:
    """A Ray Data datasource of the file's lines, cut into byte ranges read in parallel. A line
    belongs to the range it starts in, so ranges need no coordination. One row per line, blank
    ones included, so that row order gives the line numbers. The file must be at the same path
    on every node (a shared volume)."""
    import pyarrow as pa
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    size = path.stat().st_size

    def read(start: int, end: int) -> Iterator[pa.Table]:
        with open(path, "rb") as fh:
            if start:
                fh.seek(start - 1)
                fh.readline()  # the rest of a line that started in the range before
            rows: list[bytes | None] = []
            for raw in read_lines(fh, max_line_bytes, end):
                rows.append(raw)
                if len(rows) == BLOCK_LINES * 16:
                    yield pa.table({"raw": pa.array(rows, pa.binary())})
                    rows = []
            if rows:
                yield pa.table({"raw": pa.array(rows, pa.binary())})

    class NdjsonRanges(Datasource):  # type: ignore[misc]
        def estimate_inmemory_data_size(self) -> int:
            return size

        def get_read_tasks(self, parallelism: int, **_: Any) -> list[ReadTask]:
            count = max(1, min(parallelism, -(-size // range_bytes)))
            bounds = [size * i // count for i in range(count + 1)]
            return [
                ReadTask(
                    lambda a=a, b=b: read(a, b),
                    BlockMetadata(
                        num_rows=None, size_bytes=b - a, exec_stats=None, input_files=[str(path)]
                    ),
                )
                for a, b in itertools.pairwise(bounds)
            ]

    return NdjsonRanges()


def run_on_ray(
    input_path: Path,
    out: BinaryIO,
    spec: RunSpec,
    usage: UsageLog | None,
    *,
    address: str,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    range_bytes: int = RANGE_BYTES,
) -> RunSummary:
    """Ray Data reads the ranges, an actor pool (each with one session stream per CPU it gets)
    answers blocks of lines, and this driver writes the answers in input order."""
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # row order = line order
    context.enable_progress_bars = False
    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_actor)
    limit = spec.settings.server.max_body_bytes
    writer = _Writer(out, spec, usage)
    dataset = ray.data.read_datasource(
        ndjson_ranges(input_path, limit, range_bytes),
        # Reading is I/O: its tasks take no CPU slot, or an actor pool that holds every CPU
        # would leave them none and the run would wait forever.
        ray_remote_args={"num_cpus": 0},
    ).map_batches(
        LineAnswerer,
        fn_constructor_args=(spec, cpus_per_actor),
        batch_size=BLOCK_LINES,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
    )
    for batch in dataset.iter_batches(batch_size=BLOCK_LINES, batch_format="pyarrow"):
        columns = [
            batch.column(name).to_pylist() for name in ("status", "payload", "tokens", "model")
        ]
        if not writer.block(Answer(*row) for row in zip(*columns, strict=True)):
            break
    writer.summary.seconds = time.perf_counter() - writer.started
    return writer.summary
