"""The subscriber's configuration: flags with ``WEBHOOKS_*`` environment fallbacks, checked once."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from common import config, db, errors, signing
from subscriber import verifier

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True, slots=True)
class Settings:
    listen: tuple[str, int]
    # None when the HTTP receiver is off.
    http_listen: tuple[str, int] | None
    database_url: str
    # Decoded keys of every configured secret; several allow rotation.
    keys: tuple[bytes, ...] = field(repr=False)
    # The subscriber id the publisher assigned; None means the JWT audience is not checked.
    audience: str | None
    allowlist: verifier.Allowlist
    timestamp_tolerance: float
    log_level: str


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webhook-subscriber",
        description="Reference webhook subscriber: receives events over gRPC and HTTP, "
        "verifies them and records each one once.",
    )
    config.add(parser, "--listen", "127.0.0.1:50052", "gRPC HOST:PORT (port 0 picks one)")
    config.add(
        parser, "--http-listen", "127.0.0.1:8080", "HTTP HOST:PORT (port 0 picks one), or 'off'"
    )
    config.add(parser, "--database-url", "sqlite:///subscriber.db", "SQLite or PostgreSQL URL")
    config.add_list(parser, "--secret", "whsec_... secret shared with the publisher")
    config.add(
        parser,
        "--audience",
        None,
        "subscriber id the publisher assigned; the JWT aud must equal it",
    )
    config.add_list(parser, "--allow-ip", "CIDR deliveries may come from (none: any address)")
    config.add(
        parser,
        "--timestamp-tolerance",
        "300",
        "seconds a webhook-timestamp may differ from now",
        type=float,
    )
    config.add(parser, "--log-level", "INFO", "one of " + ", ".join(LOG_LEVELS), type=str.upper)
    return parser


def parse(argv: Sequence[str]) -> Settings:
    """Settings from ``argv`` and the environment; exits with a message naming the bad flag."""
    parser = _parser()
    args = parser.parse_args(argv)

    secrets = config.list_value(args, "--secret")
    if not secrets:
        parser.error("--secret: at least one whsec_ secret is required")
    try:
        keys = tuple(signing.secret_key(secret, field="--secret") for secret in secrets)
        allowlist = verifier.parse_allowlist(
            config.list_value(args, "--allow-ip"), field="--allow-ip"
        )
    except errors.InvalidArgument as error:
        parser.error(str(error))
    try:
        db.normalize_url(args.database_url)
    except errors.InvalidArgument as error:
        # normalize_url names its field database_url; the operator typed the flag.
        parser.error("--database-url: " + str(error).removeprefix(f"{error.field}: "))
    # Written as "not >" so that NaN is refused too.
    if not args.timestamp_tolerance > 0:
        parser.error("--timestamp-tolerance: must be a positive number of seconds")
    if args.log_level not in LOG_LEVELS:
        parser.error(f"--log-level: must be one of {', '.join(LOG_LEVELS)}")

    http_listen = (
        None
        if args.http_listen.strip().lower() == "off"
        else config.host_port(args.http_listen, "--http-listen")
    )
    return Settings(
        listen=config.host_port(args.listen, "--listen"),
        http_listen=http_listen,
        database_url=args.database_url,
        keys=keys,
        audience=args.audience or None,
        allowlist=allowlist,
        timestamp_tolerance=args.timestamp_tolerance,
        log_level=args.log_level,
    )
