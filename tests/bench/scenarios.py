"""The scenarios. Each starts its own processes, runs ``runs`` times, and adds one value per
run to each of its figures; the orchestrator (tests.bench.__main__) reports them."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.gen.webhooks.v1 import publisher_pb2

from . import backlog, cluster, cpu, procs, runtime, stats, work

PY = [procs.PYTHON, "-m"]
# CPU time per event (or call) of one process, user and system, all its threads.
CPU_UNIT = "µs/event"
# e2e_http_workers' --delivery-workers: two made e2e_http 23% faster here, one 13%.
HTTP_WORKERS = 2


class Skip(Exception):
    """The scenario cannot run here; the message says why."""


@dataclass(frozen=True)
class Config:
    runs: int
    # Calls in flight: the raw clients, the unary load and the publisher's --max-in-flight.
    concurrency: int
    raw_seconds: float
    unary_events: int
    batch_events: int
    batch_size: int
    # EmitBatch calls in flight.
    batch_concurrency: int
    http_events: int
    paced_seconds: float
    backlog_small: int
    backlog_large: int
    # Deliveries timed in each backlog run (at most the backlog).
    backlog_window: int
    fanout: int
    postgres_events: int
    postgres_url: str
    workdir: Path
    profile_dir: Path | None


@dataclass
class Metric:
    unit: str
    values: list[float] = field(default_factory=list)


@dataclass
class Result:
    name: str
    about: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    error: str = ""
    seconds: float = 0.0

    def add(self, metric: str, unit: str, value: float) -> None:
        self.metrics.setdefault(metric, Metric(unit)).values.append(value)

    def median(self, metric: str) -> float | None:
        found = self.metrics.get(metric)
        if found is None or not found.values:
            return None
        return statistics.median(found.values)


@dataclass
class Bench:
    config: Config
    results: dict[str, Result] = field(default_factory=dict)

    def group(self) -> procs.Group:
        return procs.Group(self.config.workdir)

    def median(self, scenario: str, figure: str) -> float | None:
        """The median of ``figure`` in ``scenario``; None where it was not measured."""
        result = self.results.get(scenario)
        return None if result is None else result.median(figure)


Scenario = Callable[[Bench, Result], Awaitable[None]]


# -- the raw transports ------------------------------------------------------------------------


async def raw_grpc_unary(bench: Bench, result: Result) -> None:
    await _raw(bench, result, "raw_grpc", ["call", "--target"], "address", "calls/s")


async def raw_http_post(bench: Bench, result: Result) -> None:
    await _raw(bench, result, "raw_http", ["post", "--url"], "url", "requests/s")


async def _raw(
    bench: Bench, result: Result, module: str, client_verb: list[str], ready_key: str, unit: str
) -> None:
    """A bare server and a closed-loop client of ``tests.bench.<module>``: the ceiling."""
    config = bench.config
    for _ in range(config.runs):
        async with bench.group() as group:
            server, ready = await group.helper(module, "serve")
            server_cpu = cpu.process(server.pid)
            client = await group.start(
                f"{module}-{client_verb[0]}",
                [*PY, f"tests.bench.{module}", *client_verb, ready[ready_key],
                 "--concurrency", str(config.concurrency), "--seconds", str(config.raw_seconds)],
            )  # fmt: skip
            measured = await client.finish(config.raw_seconds + 30)
            server_cpu = cpu.process(server.pid) - server_cpu
        _check_clean(measured)
        result.add("rate", unit, measured["rate"])
        result.add("cpu_client", "µs/call", 1e6 * measured["cpu_seconds"] / measured["calls"])
        result.add("cpu_server", "µs/call", 1e6 * server_cpu / measured["calls_total"])


def _check_clean(measured: dict[str, Any]) -> None:
    if measured["errors"]:
        raise RuntimeError(
            f"{measured['errors']} calls failed, the last with {measured['last_error']}"
        )


# -- end to end: load generator -> publisher(s) -> ack subscriber ---------------------------
# The floor rows put tests.bench.relay in the publisher's place: the same load, ack and
# measurement, with nothing persisted or signed.


@dataclass(frozen=True)
class Load:
    mode: str  # unary, batch or paced (see tests.bench.load)
    count: int
    concurrency: int
    batch_size: int = 1
    rate: float = 0.0


def _unary_load(config: Config) -> Load:
    return Load("unary", config.unary_events, config.concurrency)


def _batch_load(config: Config) -> Load:
    return Load("batch", config.batch_events, config.batch_concurrency, config.batch_size)


def _http_load(config: Config) -> Load:
    return Load("batch", config.http_events, config.batch_concurrency, config.batch_size)


# Starts what takes the load (publishers, or the floor's relay) in the group; the first
# answered is the one the subscriber is registered with and the deliveries are asked of.
Start = Callable[[procs.Group], Awaitable[list[cluster.Publisher]]]


def _publishers(database_urls: list[str], per_subscriber: int, workers: int = 0) -> Start:
    async def start(group: procs.Group) -> list[cluster.Publisher]:
        if not database_urls[0].startswith("sqlite"):
            await cluster.migrate(group, database_urls[0])
        # Replicas start side by side, as the ack subscriber does (see _e2e_run).
        started = await asyncio.gather(
            *(
                cluster.start_publisher(
                    group,
                    url,
                    per_subscriber=per_subscriber,
                    workers=workers,
                    name=f"publisher{index}",
                )
                for index, url in enumerate(database_urls)
            )
        )
        return list(started)

    return start


def _relay(deliver: str, max_in_flight: int) -> Start:
    async def start(group: procs.Group) -> list[cluster.Publisher]:
        return [await cluster.start_relay(group, deliver, max_in_flight=max_in_flight)]

    return start


async def _e2e_run(
    bench: Bench, result: Result, *, run: int, ack: str, load: Load, start: Start
) -> None:
    """One run: emit ``load.count`` events, time until the first publisher started (or the
    relay) reports them all delivered."""
    config = bench.config
    stem = f"{result.name}-{run}"
    emits = config.workdir / f"{stem}-emits.json"
    receipts = config.workdir / f"{stem}-receipts.json"
    budget = 60 + load.count / 100
    async with bench.group() as group:
        # Side by side: each spends about a second importing before it is ready.
        (subscriber, ready), publishers = await asyncio.gather(group.helper(ack), start(group))
        first = publishers[0]
        subscriber_id = await first.register(ready.get("address") or ready["url"])
        profilers = []
        if config.profile_dir is not None:
            for index, publisher in enumerate(publishers):
                output = config.profile_dir / f"{stem}-{index}.txt"
                profilers.append(await _profile(group, publisher, output))
        usage = _Usage(subscriber, [p.process for p in publishers])
        generator = await group.start(
            "load",
            [*PY, "tests.bench.load", *[f"--target={p.address}" for p in publishers],
             "--mode", load.mode, "--count", str(load.count),
             "--concurrency", str(load.concurrency), "--batch-size", str(load.batch_size),
             "--rate", str(load.rate or 1), "--out", str(emits)],
        )  # fmt: skip
        emitted = await generator.finish(budget)
        arrived = await subscriber.request(
            {"cmd": "wait", "count": load.count, "timeout": budget}, budget + 10
        )
        if not arrived["reached"]:
            raise RuntimeError(f"{arrived['count']} of {load.count} deliveries in {budget:g}s")
        settled = await first.settled_at(within=budget, subscriber_id=subscriber_id)
        usage.stop()
        for profiler in profilers:
            await profiler.stop(grace=30, sig=signal.SIGINT)
        delivered = await first.count(cluster.DELIVERED, subscriber_id=subscriber_id)
        if delivered != load.count:
            raise RuntimeError(
                f"{first.process.name} reports {delivered} of {load.count} delivered"
            )
        await subscriber.request({"cmd": "dump", "path": str(receipts)}, 60)
    began = emitted["first_start"]
    latencies = stats.latencies(emits, receipts)
    result.add("rate", "events/s", load.count / (settled - began))
    result.add("emit_rate", "events/s", load.count / (emitted["last_end"] - began))
    result.add("p50", "ms", 1000 * stats.percentile(latencies, 0.5))
    result.add("p99", "ms", 1000 * stats.percentile(latencies, 0.99))
    usage.report(result, load.count, emitted["cpu_seconds"])
    if arrived["repeats"]:
        result.notes.append(f"run {run}: {arrived['repeats']} deliveries arrived twice")
    if emitted["late"]:
        result.notes.append(f"run {run}: {emitted['late']} paced emits started late")
    for path in (emits, receipts):
        path.unlink(missing_ok=True)


class _Usage:
    """The CPU the subscriber and the publishers (or the relay) spend while the load runs,
    and how many of the machine's cores were busy meanwhile."""

    def __init__(self, subscriber: procs.Process, publishers: list[procs.Process]) -> None:
        self._subscriber = subscriber
        self._publishers = publishers
        self._machine = cpu.Machine.read()
        self._before = self._read()
        self._spent: dict[str, float] = {}
        self._cores = 0.0

    def _read(self) -> dict[str, float]:
        reading = {
            "subscriber": cpu.process(self._subscriber.pid),
            "publisher": 0.0,
            "loop": 0.0,
            "threads": 0.0,
            "workers": 0.0,
        }
        for publisher in self._publishers:
            workers = cpu.children(publisher.pid)
            reading["publisher"] += cpu.process(publisher.pid) + workers
            reading["workers"] += workers
            # The event loop's share, and that of the other threads Python started (the
            # store's, on SQLite, and grpc.aio's poller); the rest is gRPC's core.
            reading["loop"] += cpu.main_thread(publisher.pid)
            reading["threads"] += cpu.python_threads(publisher.pid)
        return reading

    def stop(self) -> None:
        after = self._read()
        self._spent = {key: after[key] - self._before[key] for key in after}
        self._cores = cpu.Machine.read().cores_busy_since(self._machine)

    def report(self, result: Result, events: int, load_cpu: float) -> None:
        result.add("cpu_load", CPU_UNIT, 1e6 * load_cpu / events)
        result.add("cpu_publisher", CPU_UNIT, 1e6 * self._spent["publisher"] / events)
        result.add("cpu_publisher_loop", CPU_UNIT, 1e6 * self._spent["loop"] / events)
        result.add("cpu_publisher_threads", CPU_UNIT, 1e6 * self._spent["threads"] / events)
        # Its delivery workers' (--delivery-workers), counted in cpu_publisher too.
        result.add("cpu_publisher_workers", CPU_UNIT, 1e6 * self._spent["workers"] / events)
        result.add("cpu_subscriber", CPU_UNIT, 1e6 * self._spent["subscriber"] / events)
        result.add("cores_busy", "cores", self._cores)


async def _profile(group: procs.Group, publisher: cluster.Publisher, output: Path) -> procs.Process:
    """py-spy samples the publisher (or relay) until stopped with SIGINT (only with --profile)."""
    process = await group.start(
        "py-spy",
        [procs.PY_SPY, "record", "--pid", str(publisher.process.pid), "--rate", "250",
         "--nonblocking", "--gil", "--format", "raw", "--output", str(output)],
    )  # fmt: skip
    # py-spy needs a moment to attach before the load starts.
    await asyncio.sleep(1.0)
    return process


def _database(bench: Bench, stem: str) -> Path:
    return bench.config.workdir / f"{stem}.db"


def _sqlite(bench: Bench, stem: str) -> str:
    return f"sqlite:///{_database(bench, stem)}"


def _forget(bench: Bench, stem: str) -> None:
    """Removes the SQLite file of ``stem`` and what SQLite and the publisher keep beside it."""
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{_database(bench, stem)}{suffix}").unlink(missing_ok=True)


async def _sqlite_runs(
    bench: Bench,
    result: Result,
    ack: str,
    load: Load,
    runs: int | None = None,
    workers: int = 0,
) -> None:
    for run in range(runs or bench.config.runs):
        stem = f"{result.name}-{run}"
        try:
            start = _publishers([_sqlite(bench, stem)], bench.config.concurrency, workers)
            await _e2e_run(bench, result, run=run, ack=ack, load=load, start=start)
        finally:
            _forget(bench, stem)


async def e2e_grpc_unary(bench: Bench, result: Result) -> None:
    await _sqlite_runs(bench, result, "ack_grpc", _unary_load(bench.config))


async def e2e_grpc_batch(bench: Bench, result: Result) -> None:
    await _sqlite_runs(bench, result, "ack_grpc", _batch_load(bench.config))


async def e2e_http(bench: Bench, result: Result) -> None:
    await _sqlite_runs(bench, result, "ack_http", _http_load(bench.config))


async def e2e_http_workers(bench: Bench, result: Result) -> None:
    result.notes.append(f"publisher started with --delivery-workers {HTTP_WORKERS}")
    await _sqlite_runs(bench, result, "ack_http", _http_load(bench.config), workers=HTTP_WORKERS)


async def latency_at_half_load(bench: Bench, result: Result) -> None:
    config = bench.config
    full = None
    if "e2e_grpc_unary" in bench.results:
        full = bench.results["e2e_grpc_unary"].median("rate")
    if full is None:
        # Not measured in this invocation (--only): measure it once here.
        probe = Result("half-load-probe", "")
        await _sqlite_runs(bench, probe, "ack_grpc", _unary_load(config), runs=1)
        full = probe.median("rate")
        assert full is not None
        result.notes.append(f"e2e_grpc_unary measured once here: {full:,.0f} events/s")
    rate = full / 2
    result.notes.append(f"paced at {rate:,.0f} events/s, half the e2e_grpc_unary rate")
    load = Load("paced", max(1, round(rate * config.paced_seconds)), config.concurrency, rate=rate)
    await _sqlite_runs(bench, result, "ack_grpc", load)


async def _relay_runs(bench: Bench, result: Result, ack: str, load: Load) -> None:
    deliver = "http" if ack == "ack_http" else "grpc"
    for run in range(bench.config.runs):
        start = _relay(deliver, bench.config.concurrency)
        await _e2e_run(bench, result, run=run, ack=ack, load=load, start=start)


async def floor_grpc_unary(bench: Bench, result: Result) -> None:
    await _relay_runs(bench, result, "ack_grpc", _unary_load(bench.config))


async def floor_grpc_batch(bench: Bench, result: Result) -> None:
    await _relay_runs(bench, result, "ack_grpc", _batch_load(bench.config))


async def floor_http(bench: Bench, result: Result) -> None:
    await _relay_runs(bench, result, "ack_http", _http_load(bench.config))


async def floor_work(bench: Bench, result: Result) -> None:
    """The least CPU per event of signing and persisting, and the store's alone, in this
    process (tests.bench.work)."""
    payload = runtime.payload()
    for _ in range(bench.config.runs):
        sign_grpc, sign_http = await asyncio.to_thread(work.signing_us, payload)
        sqlite = await asyncio.to_thread(work.sqlite_us, bench.config.workdir, payload)
        store = await asyncio.to_thread(work.store_us, bench.config.workdir, payload)
        result.add("sign_grpc", CPU_UNIT, sign_grpc)
        result.add("sign_http", CPU_UNIT, sign_http)
        result.add("sqlite", CPU_UNIT, sqlite)
        result.add("store_alone", CPU_UNIT, store)


# -- PostgreSQL ------------------------------------------------------------------------------


async def _postgres(bench: Bench, result: Result, replicas: int) -> None:
    config = bench.config
    problem = await cluster.postgres_problem(config.postgres_url)
    if problem:
        raise Skip(problem)
    load = Load("batch", config.postgres_events, config.batch_concurrency, config.batch_size)
    for run in range(config.runs):
        async with cluster.postgres_database(config.postgres_url) as url:
            start = _publishers([url] * replicas, config.concurrency)
            await _e2e_run(bench, result, run=run, ack="ack_grpc", load=load, start=start)


async def e2e_grpc_batch_pg_1(bench: Bench, result: Result) -> None:
    await _postgres(bench, result, 1)


async def e2e_grpc_batch_pg_2(bench: Bench, result: Result) -> None:
    await _postgres(bench, result, 2)


# -- backlog ---------------------------------------------------------------------------------


async def backlog_rate(bench: Bench, result: Result) -> None:
    """Claim-and-deliver rate with a small and a large backlog already in the SQLite file."""
    config = bench.config
    sizes = {"small": config.backlog_small, "large": config.backlog_large}
    async with bench.group() as group:
        subscriber, ready = await group.helper("ack_grpc")
        files: dict[str, tuple[Path, str]] = {}
        for label, size in sizes.items():
            path = _database(bench, f"backlog-{label}")
            async with bench.group() as setup:
                publisher = await cluster.start_publisher(
                    setup, f"sqlite:///{path}", per_subscriber=config.concurrency
                )
                subscriber_id = await publisher.register(ready["address"])
            began = time.monotonic()
            await asyncio.to_thread(backlog.fill, path, subscriber_id, size)
            result.notes.append(f"{size:,} pending rows written in {time.monotonic() - began:.1f}s")
            files[label] = (path, subscriber_id)
        try:
            for run in range(config.runs):
                for label, size in sizes.items():
                    path, subscriber_id = files[label]
                    if run:
                        await asyncio.to_thread(backlog.requeue, path, subscriber_id)
                    await _backlog_run(bench, result, subscriber, path, label, size)
        finally:
            for label in sizes:
                _forget(bench, f"backlog-{label}")


async def _backlog_run(
    bench: Bench, result: Result, subscriber: procs.Process, path: Path, label: str, size: int
) -> None:
    config = bench.config
    window = min(config.backlog_window, size)
    early = min(1000, window)
    budget = 60 + window / 100
    await subscriber.request({"cmd": "reset"}, 10)
    async with bench.group() as group:
        publisher = await cluster.start_publisher(
            group, f"sqlite:///{path}", per_subscriber=config.concurrency
        )
        first = await subscriber.request(
            {"cmd": "wait", "count": early, "timeout": budget}, budget + 10
        )
        arrived = await subscriber.request(
            {"cmd": "wait", "count": window, "timeout": budget}, budget + 10
        )
        if not arrived["reached"]:
            raise RuntimeError(f"{arrived['count']} of {window} deliveries in {budget:g}s")
        peak = publisher.process.peak_rss_bytes()
    began = arrived["first_at"]
    result.add(f"rate_{label}", "deliveries/s", (window - 1) / (arrived["at"] - began))
    # From the publisher's start: imports, startup work on the database, first claim.
    result.add(f"first_delivery_{label}", "s", began - publisher.process.started_at)
    if label == "large":
        result.add("rate_large_first_1k", "deliveries/s", (early - 1) / (first["at"] - began))
        result.add("peak_rss_large", "MB", peak / 1e6)


# -- fan-out ---------------------------------------------------------------------------------


async def fanout(bench: Bench, result: Result) -> None:
    """One event to many subscribers: the time to commit it, and to have every copy delivered."""
    config = bench.config
    stem = "fanout"
    try:
        async with bench.group() as group:
            subscriber, ready = await group.helper("ack_grpc")
            publisher = await cluster.start_publisher(
                group, _sqlite(bench, stem), per_subscriber=config.concurrency
            )
            began = time.monotonic()
            room = asyncio.Semaphore(16)

            async def register(index: int) -> None:
                async with room:
                    await publisher.register(ready["address"], f"fanout-{index}", "bench.fanout")

            await asyncio.gather(*(register(index) for index in range(config.fanout)))
            result.notes.append(
                f"{config.fanout:,} subscribers registered in {time.monotonic() - began:.1f}s"
            )
            for _ in range(config.runs):
                await subscriber.request({"cmd": "reset"}, 10)
                request = publisher_pb2.EmitRequest(type="bench.fanout", payload=runtime.payload())
                began_at = time.time()
                response = await publisher.stub.Emit(request, timeout=30)
                committed = time.time() - began_at
                if response.delivery_count != config.fanout:
                    raise RuntimeError(f"the event went to {response.delivery_count} subscribers")
                arrived = await subscriber.request(
                    {"cmd": "wait", "count": config.fanout, "timeout": 60}, 70
                )
                if not arrived["reached"]:
                    raise RuntimeError(f"{arrived['count']} of {config.fanout} deliveries in 60s")
                settled = await publisher.settled_at(within=60, event_id=response.event_id)
                result.add("commit", "s", committed)
                result.add("all_delivered", "s", settled - began_at)
    finally:
        _forget(bench, stem)


SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "raw_grpc_unary": ("bare grpc.aio unary calls, no persistence", raw_grpc_unary),
    "raw_http_post": ("bare aiohttp POSTs of 1 KiB", raw_http_post),
    "floor_grpc_unary": (
        "bare relay: Emit -> memory -> gRPC, no persistence or signing",
        floor_grpc_unary,
    ),
    "floor_grpc_batch": (
        "bare relay: EmitBatch -> memory -> gRPC, no persistence or signing",
        floor_grpc_batch,
    ),
    "floor_http": (
        "bare relay: EmitBatch -> memory -> HTTP, no persistence or signing",
        floor_http,
    ),
    "floor_work": (
        "least CPU of signing and persisting, and the store's alone, in-process",
        floor_work,
    ),
    "e2e_grpc_unary": ("Emit per event -> SQLite -> gRPC ack", e2e_grpc_unary),
    "e2e_grpc_batch": ("EmitBatch -> SQLite -> gRPC ack", e2e_grpc_batch),
    "e2e_http": ("EmitBatch -> SQLite -> HTTP ack", e2e_http),
    "e2e_http_workers": (
        "the same, sent from delivery workers (not a target: a flag, not the default)",
        e2e_http_workers,
    ),
    "latency_at_half_load": ("paced Emit at half the e2e_grpc_unary rate", latency_at_half_load),
    "backlog": ("claim-and-deliver with a backlog in SQLite", backlog_rate),
    "fanout": ("one event to many subscribers", fanout),
    "e2e_grpc_batch_pg_1": ("EmitBatch -> PostgreSQL, 1 replica", e2e_grpc_batch_pg_1),
    "e2e_grpc_batch_pg_2": ("EmitBatch -> PostgreSQL, 2 replicas", e2e_grpc_batch_pg_2),
}
