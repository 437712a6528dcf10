"""The publisher's configuration: flags, each with a ``WEBHOOKS_*`` environment variable."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from common import config

DEFAULT_ISSUER = "grpc-webhooks"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    database_url: str = "sqlite:///webhooks.db"
    issuer: str = DEFAULT_ISSUER
    delivery_timeout: float = 15.0
    max_payload_bytes: int = 1024 * 1024
    max_in_flight: int = 256
    claim_batch: int = 256
    # CIDRs the SSRF guard lets HTTP deliveries reach although they are not public.
    allow_cidrs: tuple[str, ...] = field(default=())
    log_level: str = "INFO"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="webhook-publisher",
        description="Stores events and delivers them to subscribers over gRPC and HTTP.",
    )
    config.add(p, "--listen", "127.0.0.1:50051", "gRPC address to serve on (port 0 picks one)")
    config.add(p, "--database-url", "sqlite:///webhooks.db", "SQLite file or PostgreSQL URL")
    config.add(p, "--name", DEFAULT_ISSUER, "this publisher's name, the JWT issuer")
    config.add(p, "--delivery-timeout", "15", "seconds one delivery attempt may take")
    config.add(p, "--max-payload-bytes", str(1024 * 1024), "largest accepted event payload")
    config.add(p, "--max-in-flight", "256", "deliveries sent at the same time")
    config.add(p, "--claim-batch", "256", "deliveries claimed per database round trip")
    config.add_list(p, "--allow-cidr", "non-public range HTTP deliveries may reach (SSRF guard)")
    config.add(p, "--log-level", "INFO", "DEBUG, INFO, WARNING or ERROR")
    return p


def parse(argv: Sequence[str] | None = None) -> Settings:
    p = parser()
    args = p.parse_args(argv)
    host, port = config.host_port(args.listen, "--listen")
    cidrs = tuple(config.list_value(args, "--allow-cidr"))
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            p.error(f"--allow-cidr: {cidr!r} is not a CIDR range")
    return Settings(
        host=host,
        port=port,
        database_url=args.database_url,
        issuer=args.name,
        delivery_timeout=_positive(p, args.delivery_timeout, "--delivery-timeout"),
        max_payload_bytes=int(_positive(p, args.max_payload_bytes, "--max-payload-bytes")),
        max_in_flight=int(_positive(p, args.max_in_flight, "--max-in-flight")),
        claim_batch=int(_positive(p, args.claim_batch, "--claim-batch")),
        allow_cidrs=cidrs,
        log_level=args.log_level,
    )


def _positive(p: argparse.ArgumentParser, value: str, flag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        p.error(f"{flag}: {value!r} is not a number")
    if number <= 0:
        p.error(f"{flag}: must be positive")
    return number
