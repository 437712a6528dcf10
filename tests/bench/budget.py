"""What a throughput target leaves a one-process publisher for its own work, per event.

A target asks for a rate: its bound times the raw transport's rate measured in
the same run. At that rate the load generator and the subscriber take their
measured CPU per event from the machine's cores, and the publisher, one Python
process whose Python runs under one lock, gets at most one core of the rest.
That allowance must cover a bare relay's CPU per event (the floor rows: the
same transports, nothing persisted or signed) and the product's own work, of
which signing each delivery and persisting it cost at the least what floor_work
measures. When that least is more than the allowance leaves, no change to the
code of one process meets the target on this machine: the gap is the machine's.
When the product's own work already fits in what is left, there is no gap.

A publisher can also use more than one process (--delivery-workers), so each
budget is weighed a second way, over all the machine's cores at once: at the
asked rate the cores have ``capacity`` µs per event, to be shared by the load
generator, the subscriber and every process of the publisher. The least that
sum can be is the bare relay's CPU per event, the least the load generator and
the subscriber took in either run, and the product's least own work; more than
the capacity, and no split of the work over processes could reach the target
here either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import scenarios

# (target, raw transport, floor relay row, product row, floor_work signing figure)
CASES = [
    ("e2e_grpc_unary_vs_raw", "raw_grpc_unary", "floor_grpc_unary", "e2e_grpc_unary", "sign_grpc"),
    ("e2e_grpc_batch_vs_raw", "raw_grpc_unary", "floor_grpc_batch", "e2e_grpc_batch", "sign_grpc"),
    ("e2e_http_vs_raw", "raw_http_post", "floor_http", "e2e_http", "sign_http"),
]


@dataclass(frozen=True)
class Budget:
    target: str
    # The rate the target asks for, events/s.
    asked: float
    # CPU µs per event the publisher may spend at that rate.
    allowed: float
    # ...of which a bare relay spends this much, leaving ``left`` for the product's own work,
    relay: float
    left: float
    # ...which costs at least ``least`` (signing and SQLite), and costs ``product`` as it is.
    least: float
    product: float
    # Over all cores: µs per event they have at the asked rate, the least a bare relay's
    # run plus the least own work take of it, and what the product's run takes now.
    capacity: float
    whole_least: float
    whole_now: float

    @property
    def machine_bound(self) -> bool:
        return self.least > self.left

    @property
    def fits(self) -> bool:
        """The product's own work already fits what the target leaves: no gap to explain."""
        return self.product <= self.left

    @property
    def gap(self) -> str:
        if self.fits:
            return "none"
        return "the machine's" if self.machine_bound else "the code's"

    @property
    def gap_all_cores(self) -> str:
        if self.whole_now <= self.capacity:
            return "none"
        return "the machine's" if self.whole_least > self.capacity else "the code's"


def budgets(bench: scenarios.Bench, bounds: dict[str, float]) -> list[Budget]:
    """One budget per throughput target whose figures were all measured in this run."""
    found = []
    cores = os.cpu_count() or 1
    for target, raw, floor, product, sign in CASES:
        figures = [
            bench.median(raw, "rate"),
            bench.median(product, "cpu_load"),
            bench.median(product, "cpu_subscriber"),
            bench.median(floor, "cpu_publisher"),
            bench.median(product, "cpu_publisher"),
            bench.median("floor_work", sign),
            bench.median("floor_work", "sqlite"),
            bench.median(floor, "cpu_load"),
            bench.median(floor, "cpu_subscriber"),
        ]
        if any(figure is None for figure in figures) or target not in bounds:
            continue
        (
            raw_rate,
            load_us,
            subscriber_us,
            relay_us,
            product_us,
            sign_us,
            sqlite_us,
            floor_load_us,
            floor_subscriber_us,
        ) = (float(figure or 0.0) for figure in figures)
        asked = bounds[target] * raw_rate
        spare_cores = cores - asked * (load_us + subscriber_us) / 1e6
        allowed = 1e6 * min(1.0, spare_cores) / asked
        found.append(
            Budget(
                target=target,
                asked=asked,
                allowed=allowed,
                relay=relay_us,
                left=allowed - relay_us,
                least=sign_us + sqlite_us,
                product=product_us - relay_us,
                capacity=1e6 * cores / asked,
                # The load generator and the subscriber do the same job in both runs: the
                # least either run cost them.
                whole_least=min(load_us, floor_load_us)
                + min(subscriber_us, floor_subscriber_us)
                + relay_us
                + sign_us
                + sqlite_us,
                whole_now=load_us + subscriber_us + product_us,
            )
        )
    return found
