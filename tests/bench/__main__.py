"""``python -m tests.bench [--quick] [--only NAME[,NAME]]``: runs the benchmark scenarios.

Prints a table (median, min and max of the runs per figure), the ratios against
the raw transports and the targets with PASS/FAIL, and writes it all as JSON
to ``--out`` (default ``$BENCH_OUT`` or ``bench-results.json``). The exit status
is 1 when a scenario failed to run, whatever the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import report, runtime, scenarios

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

FULL = scenarios.Config(
    runs=3,
    # The publisher's default --max-in-flight-per-subscriber (half of its 512 slots), the
    # most it sends the one subscriber at once; the raw transports are measured at the same.
    concurrency=256,
    # Sized for at least about 3 s of steady load per run at the slowest rates seen on this
    # machine, and for all of `make bench` to stay under 5 minutes there.
    raw_seconds=2.0,
    unary_events=3_000,
    batch_events=6_000,
    batch_size=500,
    batch_concurrency=2,
    http_events=6_000,
    paced_seconds=3.0,
    backlog_small=1_000,
    backlog_large=1_000_000,
    backlog_window=6_000,
    fanout=1_000,
    postgres_events=4_000,
    postgres_url=DEFAULT_POSTGRES_URL,
    workdir=Path(),
    profile_dir=None,
)
QUICK = dataclasses.replace(
    FULL,
    runs=1,
    raw_seconds=1.0,
    unary_events=500,
    batch_events=2_000,
    http_events=2_000,
    paced_seconds=1.5,
    backlog_large=20_000,
    backlog_window=5_000,
    fanout=100,
    postgres_events=2_000,
)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 run each, small counts")
    parser.add_argument(
        "--only", default="", help=f"comma-separated, of: {', '.join(scenarios.SCENARIOS)}"
    )
    parser.add_argument(
        "--out", default=os.environ.get("BENCH_OUT", "bench-results.json"), help="JSON results"
    )
    parser.add_argument("--concurrency", type=int, help="calls in flight (default 256)")
    parser.add_argument("--runs", type=int, help="runs per scenario (default 3, --quick 1)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("WEBHOOKS_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="server for the PostgreSQL scenarios (databases are created and dropped)",
    )
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of publishers")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args()
    args.out = Path(args.out).absolute()
    if args.profile is not None:
        args.profile = args.profile.absolute()
        args.profile.mkdir(parents=True, exist_ok=True)
    unknown = set(filter(None, args.only.split(","))) - set(scenarios.SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
    for flag in ("concurrency", "runs"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive")
    return args


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    workdir = Path(tempfile.mkdtemp(prefix="webhooks-bench-"))
    config = dataclasses.replace(
        QUICK if args.quick else FULL,
        postgres_url=args.postgres_url,
        workdir=workdir,
        profile_dir=args.profile,
    )
    if args.concurrency:
        config = dataclasses.replace(config, concurrency=args.concurrency)
    if args.runs:
        config = dataclasses.replace(config, runs=args.runs)
    chosen = [name for name in args.only.split(",") if name] or list(scenarios.SCENARIOS)
    bench = scenarios.Bench(config)
    keep = False
    try:
        await _run(bench, chosen)
        keep = args.keep or any(result.error for result in bench.results.values())
    finally:
        # Interrupted runs leave nothing behind either (the backlog file alone is GBs).
        if keep:
            _progress(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    found = report.ratios(bench)
    rows = report.verdicts(bench, found)
    wall = time.monotonic() - started
    print(report.table(bench, found, rows))
    if args.quick:
        print("\n--quick: small counts and one run; a smoke check, not figures to compare")
    print(f"\nwall time {wall:.0f}s")
    meta = {
        "started": started_at,
        "wall_seconds": round(wall, 1),
        "quick": args.quick,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "uvloop": _has_uvloop(),
    }
    report.write_json(args.out, bench, found, rows, meta)
    print(f"results written to {args.out}")
    return 1 if any(result.error for result in bench.results.values()) else 0


async def _run(bench: scenarios.Bench, chosen: list[str]) -> None:
    for name, (about, scenario) in scenarios.SCENARIOS.items():
        if name not in chosen:
            continue
        result = bench.results[name] = scenarios.Result(name, about)
        _progress(f"{name}: {about} ...")
        began = time.monotonic()
        try:
            await scenario(bench, result)
        except scenarios.Skip as skip:
            result.skipped = str(skip)
        except Exception as error:
            result.error = f"{type(error).__name__}: {error}"
            _progress(traceback.format_exc())
        result.seconds = time.monotonic() - began
        outcome = "skipped" if result.skipped else "failed" if result.error else "done"
        _progress(f"{name}: {outcome} in {result.seconds:.0f}s")


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _progress(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _entry() -> None:
    args = parse()
    codes: list[int] = []

    async def run() -> None:
        # SIGTERM cancels like Ctrl-C does, so every process is stopped and every database dropped.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        codes.append(await main(args))

    try:
        runtime.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("bench interrupted")
    sys.exit(codes[0])


if __name__ == "__main__":
    _entry()
