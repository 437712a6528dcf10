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
# webhook-timestamp is in whole seconds, so a narrower window refuses fresh deliveries; a
# wider one than a day leaves a captured request replayable for so long that the window is
# off in all but name, and clocks a day apart are wrong, not skewed.
MIN_TIMESTAMP_TOLERANCE = 1.0
MAX_TIMESTAMP_TOLERANCE = 24 * 3600.0
# Each round is at least one call to the publisher: a shorter interval is a tight loop
# against it, and nothing missed needs to be found sooner than this.
MIN_CATCH_UP_INTERVAL = 0.1


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
    # Written as "not <=" so that NaN is refused too.
    if not MIN_TIMESTAMP_TOLERANCE <= args.timestamp_tolerance <= MAX_TIMESTAMP_TOLERANCE:
        parser.error(
            f"--timestamp-tolerance: must be {MIN_TIMESTAMP_TOLERANCE:g} to "
            f"{MAX_TIMESTAMP_TOLERANCE:g} seconds"
        )
    audience = None
    if args.audience is not None:
        audience = args.audience.strip()
        # A blank one would turn the audience check off while seeming to set it.
        if not audience:
            parser.error("--audience: must not be blank; leave it out to check no audience")
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
        _, port = config.host_port(publisher, "--catch-up-publisher")
        # Port 0 picks a free port to listen on; to connect to, it names nothing.
        if port == 0:
            parser.error("--catch-up-publisher: the port must be 1 to 65535")
        if audience is None:
            parser.error(
                "--audience: required with --catch-up-publisher, "
                "since the feed to read is that subscriber id's"
            )
        # Written as "not <" so that NaN is refused too; infinity would mean one round only.
        if not MIN_CATCH_UP_INTERVAL <= args.catch_up_interval < math.inf:
            parser.error(
                f"--catch-up-interval: must be a finite number of seconds, at least "
                f"{MIN_CATCH_UP_INTERVAL:g}"
            )
        if not args.catch_up_issuer.strip():
            parser.error("--catch-up-issuer: must name the publisher")
        catch_up = CatchUp(
            publisher=publisher,
            subscriber_id=audience,
            interval=args.catch_up_interval,
            issuer=args.catch_up_issuer.strip(),
        )
    return Settings(
        listen=config.host_port(args.listen, "--listen"),
        http_listen=http_listen,
        database_url=args.database_url,
        keys=keys,
        audience=audience,
        allowlist=allowlist,
        timestamp_tolerance=args.timestamp_tolerance,
        log_level=args.log_level,
        catch_up=catch_up,
    )
