"""The bench's output: a table of median [min, max] per figure, ratios, targets, and JSON."""

from __future__ import annotations

import json
import operator
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import budget, scenarios

# (ratio, numerator scenario and figure, denominator scenario and figure)
RATIOS = [
    ("e2e_grpc_unary_vs_raw", ("e2e_grpc_unary", "rate"), ("raw_grpc_unary", "rate")),
    ("e2e_grpc_batch_vs_raw", ("e2e_grpc_batch", "rate"), ("raw_grpc_unary", "rate")),
    ("e2e_http_vs_raw", ("e2e_http", "rate"), ("raw_http_post", "rate")),
    # The floor (a bare relay) against the transports, and the product against the floor:
    # information, not targets.
    ("floor_grpc_unary_vs_raw", ("floor_grpc_unary", "rate"), ("raw_grpc_unary", "rate")),
    ("floor_grpc_batch_vs_raw", ("floor_grpc_batch", "rate"), ("raw_grpc_unary", "rate")),
    ("floor_http_vs_raw", ("floor_http", "rate"), ("raw_http_post", "rate")),
    ("e2e_grpc_unary_vs_floor", ("e2e_grpc_unary", "rate"), ("floor_grpc_unary", "rate")),
    ("e2e_grpc_batch_vs_floor", ("e2e_grpc_batch", "rate"), ("floor_grpc_batch", "rate")),
    ("e2e_http_vs_floor", ("e2e_http", "rate"), ("floor_http", "rate")),
    ("e2e_http_workers_vs_raw", ("e2e_http_workers", "rate"), ("raw_http_post", "rate")),
    ("backlog_1m_vs_1k", ("backlog", "rate_large"), ("backlog", "rate_small")),
    ("e2e_grpc_batch_pg_1_vs_raw", ("e2e_grpc_batch_pg_1", "rate"), ("raw_grpc_unary", "rate")),
    ("e2e_grpc_batch_pg_2_vs_1", ("e2e_grpc_batch_pg_2", "rate"), ("e2e_grpc_batch_pg_1", "rate")),
]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Target:
    name: str
    # ("ratio", name) or (scenario, figure)
    source: tuple[str, str]
    op: str
    bound: float
    unit: str = ""


TARGETS = [
    Target("e2e_grpc_unary_vs_raw", ("ratio", "e2e_grpc_unary_vs_raw"), ">=", 0.40),
    Target("e2e_grpc_batch_vs_raw", ("ratio", "e2e_grpc_batch_vs_raw"), ">=", 0.80),
    Target("e2e_http_vs_raw", ("ratio", "e2e_http_vs_raw"), ">=", 0.60),
    Target("p99 at half load", ("latency_at_half_load", "p99"), "<=", 50, "ms"),
    Target("backlog_1m_vs_1k", ("ratio", "backlog_1m_vs_1k"), ">=", 0.80),
    Target("peak RSS with 1M pending", ("backlog", "peak_rss_large"), "<=", 300, "MB"),
    Target("fan-out commit", ("fanout", "commit"), "<", 1, "s"),
    Target("fan-out all delivered", ("fanout", "all_delivered"), "<", 5, "s"),
]


def ratios(bench: scenarios.Bench) -> dict[str, float | None]:
    """Ratios of medians; None where a figure was not measured."""
    found: dict[str, float | None] = {}
    for name, (top_scenario, top), (bottom_scenario, bottom) in RATIOS:
        numerator = bench.median(top_scenario, top)
        denominator = bench.median(bottom_scenario, bottom)
        found[name] = numerator / denominator if numerator is not None and denominator else None
    return found


def verdicts(bench: scenarios.Bench, found: dict[str, float | None]) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        kind, name = target.source
        value = found.get(name) if kind == "ratio" else bench.median(kind, name)
        rows.append(
            {
                "target": target.name,
                "value": value,
                "op": target.op,
                "bound": target.bound,
                "unit": target.unit,
                "pass": None if value is None else _OPS[target.op](value, target.bound),
            }
        )
    return rows


def budgets(bench: scenarios.Bench) -> list[budget.Budget]:
    return budget.budgets(bench, {t.name: t.bound for t in TARGETS if t.source[0] == "ratio"})


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.2g}"


def _spread(metric: scenarios.Metric) -> tuple[str, str, str]:
    values = metric.values
    return _number(statistics.median(values)), _number(min(values)), _number(max(values))


def table(
    bench: scenarios.Bench, found: dict[str, float | None], rows: list[dict[str, Any]]
) -> str:
    runs = bench.config.runs
    lines = [
        f"{'scenario':<22} {'figure':<22} {'median':>10} {'min':>10} {'max':>10}  unit",
        "-" * 86,
    ]
    for result in bench.results.values():
        lines.append(f"{result.name:<22} {result.about}  ({result.seconds:.0f}s)")
        if result.skipped:
            lines.append(f"{'':<22} SKIPPED: {result.skipped}")
        if result.error:
            lines.append(f"{'':<22} FAILED: {result.error.splitlines()[0]}")
        for figure, metric in result.metrics.items():
            median, low, high = _spread(metric)
            lines.append(f"{'':<22} {figure:<22} {median:>10} {low:>10} {high:>10}  {metric.unit}")
        lines.extend(f"{'':<22} note: {note}" for note in result.notes)
    lines += ["", f"medians of {runs} run(s); ratios are ratios of medians", ""]
    lines.append(f"{'ratio':<34} {'value':>8}")
    for name, ratio in found.items():
        lines.append(f"{name:<34} {'n/a' if ratio is None else f'{ratio:.2f}':>8}")
    lines += ["", f"{'target':<34} {'value':>10}   {'bound':<12} verdict"]
    for row in rows:
        shown = "n/a" if row["value"] is None else f"{_number(row['value'])} {row['unit']}"
        bound = f"{row['op']} {_number(row['bound'])} {row['unit']}".strip()
        verdict = {None: "n/a", True: "PASS", False: "FAIL"}[row["pass"]]
        lines.append(f"{row['target']:<34} {shown:>10}   {bound:<12} {verdict}")
    found_budgets = budgets(bench)
    if found_budgets:
        lines += [
            "",
            "what each throughput target leaves one publisher process, CPU µs per event"
            " (tests/bench/budget.py)",
            f"{'target':<24} {'asks/s':>7} {'allowed':>8} {'relay':>7} {'left':>7}"
            f" {'least':>7} {'own now':>8}  gap",
        ]
        for each in found_budgets:
            lines.append(
                f"{each.target:<24} {each.asked:>7,.0f} {each.allowed:>8,.0f}"
                f" {each.relay:>7,.0f} {each.left:>7,.0f} {each.least:>7,.0f}"
                f" {each.product:>8,.0f}  {each.gap}"
            )
        lines.append(
            "allowed: one core (less what the load and subscriber take) over the asked rate;"
            " left: allowed - relay; least: signing + SQLite (floor_work); own now: e2e - relay"
        )
        lines += [
            "",
            "the same targets over all the cores: CPU µs per event of load, subscriber and"
            " every publisher process together",
            f"{'target':<24} {'asks/s':>7} {'capacity':>9} {'least':>7} {'now':>7}  gap",
        ]
        for each in found_budgets:
            lines.append(
                f"{each.target:<24} {each.asked:>7,.0f} {each.capacity:>9,.0f}"
                f" {each.whole_least:>7,.0f} {each.whole_now:>7,.0f}  {each.gap_all_cores}"
            )
        lines.append(
            "capacity: the cores over the asked rate; least: the bare relay + the load's and"
            " subscriber's least in either run + signing + SQLite; now: the e2e run's"
        )
    return "\n".join(lines)


def write_json(
    path: Path,
    bench: scenarios.Bench,
    found: dict[str, float | None],
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
) -> None:
    config = {
        key: str(value) if isinstance(value, Path) or value is None else value
        for key, value in asdict(bench.config).items()
        if key not in ("postgres_url", "workdir", "profile_dir")
    }
    document = {
        "meta": {**meta, "config": config},
        "scenarios": {name: _result(result) for name, result in bench.results.items()},
        "ratios": found,
        "targets": rows,
        "budgets": [
            {
                **asdict(row),
                "machine_bound": row.machine_bound,
                "gap": row.gap,
                "gap_all_cores": row.gap_all_cores,
            }
            for row in budgets(bench)
        ],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def _result(result: scenarios.Result) -> dict[str, Any]:
    return {
        "about": result.about,
        "seconds": round(result.seconds, 1),
        "skipped": result.skipped,
        "error": result.error,
        "notes": result.notes,
        "metrics": {
            figure: {
                "unit": metric.unit,
                "median": statistics.median(metric.values),
                "min": min(metric.values),
                "max": max(metric.values),
                "runs": metric.values,
            }
            for figure, metric in result.metrics.items()
        },
    }
