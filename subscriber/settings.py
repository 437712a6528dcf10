"""The subscriber's configuration: flags with ``WEBHOOKS_*`` environment fallbacks, checked once."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from common import config, db, errors, signing
from subscriber import verifier

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The publisher's own default --name, which its catch-up tokens must be addressed to.
DEFAULT_PUBLISHER_NAME = "grpc-webhooks"


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Where to pull missed events from, and whose."""

    # The publisher's gRPC HOST:PORT.
    publisher: str
    # The feed's subscriber: --audience, the id the publisher assigned.
    subscriber_id: str
    interval: float
    # The publisher's name: the audience of the catch-up token.
    issuer: str


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
    # None when catch-up is off.
    catch_up: CatchUp | None


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
    catch_up = parser.add_argument_group(
        "catch-up: pull missed events from the publisher's ListEvents feed"
    )
    config.add(
        catch_up,
        "--catch-up-publisher",
        "",
        "publisher gRPC HOST:PORT to read this subscriber's feed from; empty: off "
        "(needs --audience)",
    )
    config.add(catch_up, "--catch-up-interval", "30", "seconds between catch-up rounds", type=float)
    config.add(
        catch_up,
        "--catch-up-issuer",
        DEFAULT_PUBLISHER_NAME,
        "the publisher's --name, the audience of the catch-up token",
    )
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
    catch_up = None
    if args.catch_up_publisher.strip():
        publisher = args.catch_up_publisher.strip()
        config.host_port(publisher, "--catch-up-publisher")
        if not args.audience:
            parser.error(
                "--audience: required with --catch-up-publisher, "
                "since the feed to read is that subscriber id's"
            )
        # Written as "not <" so that NaN is refused too; infinity would mean one round only.
        if not 0 < args.catch_up_interval < math.inf:
            parser.error("--catch-up-interval: must be a positive number of seconds")
        if not args.catch_up_issuer.strip():
            parser.error("--catch-up-issuer: must name the publisher")
        catch_up = CatchUp(
            publisher=publisher,
            subscriber_id=args.audience,
            interval=args.catch_up_interval,
            issuer=args.catch_up_issuer.strip(),
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
        catch_up=catch_up,
    )
