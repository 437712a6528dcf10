"""The publisher's configuration: flags, each with a ``WEBHOOKS_*`` environment variable."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from common import config
from publisher import mailer

DEFAULT_ISSUER = "grpc-webhooks"
# Each worker is a process of its own: past a few per core they only take turns.
MAX_DELIVERY_WORKERS = 64


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    database_url: str = "sqlite:///webhooks.db"
    issuer: str = DEFAULT_ISSUER
    delivery_timeout: float = 15.0
    # HTTP deliveries: how long establishing a connection may take, within the timeout.
    connect_timeout: float = 5.0
    max_payload_bytes: int = 1024 * 1024
    max_in_flight: int = 512
    # At most this many of those to one subscriber; 0 means half of max_in_flight.
    max_in_flight_per_subscriber: int = 0
    claim_batch: int = 256
    # Child processes that make the attempts (publisher/transport_pool.py); 0 = this one.
    delivery_workers: int = 0
    # CIDRs the SSRF guard lets HTTP deliveries reach although they are not public.
    allow_cidrs: tuple[str, ...] = field(default=())
    smtp: mailer.SmtpSettings = field(default_factory=mailer.SmtpSettings)
    # Seconds between rounds of the notifier (dead-letter digests, automatic disabling).
    notify_interval: float = 30.0
    # At most one dead-letter digest per subscriber per this many seconds.
    notify_window: float = 3600.0
    # Disable a subscriber after this many seconds of nothing but failures (0 = never).
    disable_after: float = 5 * 24 * 3600.0
    # Settled events older than this many seconds are deleted (0 = kept forever).
    retention: float = 30 * 24 * 3600.0
    # Seconds between sweeps that ask subscribers about uncertain attempts (0 = off).
    reconcile_interval: float = 0.0
    log_level: str = "INFO"

    @property
    def per_subscriber_in_flight(self) -> int:
        """The limit per subscriber in force: one slow subscriber keeps at most this many."""
        if self.max_in_flight_per_subscriber:
            return min(self.max_in_flight_per_subscriber, self.max_in_flight)
        return max(1, self.max_in_flight // 2)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="webhook-publisher",
        description="Stores events and delivers them to subscribers over gRPC and HTTP.",
    )
    config.add(p, "--listen", "127.0.0.1:50051", "gRPC address to serve on (port 0 picks one)")
    config.add(p, "--database-url", "sqlite:///webhooks.db", "SQLite file or PostgreSQL URL")
    config.add(p, "--name", DEFAULT_ISSUER, "this publisher's name, the JWT issuer")
    config.add(p, "--delivery-timeout", "15", "seconds one delivery attempt may take")
    config.add(p, "--connect-timeout", "5", "seconds an HTTP delivery may take to connect")
    config.add(p, "--max-payload-bytes", str(1024 * 1024), "largest accepted event payload")
    config.add(p, "--max-in-flight", "512", "deliveries sent at the same time")
    config.add(
        p,
        "--max-in-flight-per-subscriber",
        "0",
        "of those, at most this many to one subscriber; 0 = half of --max-in-flight",
    )
    config.add(p, "--claim-batch", "256", "deliveries claimed per database round trip")
    config.add(
        p,
        "--delivery-workers",
        "0",
        "child processes that send deliveries; 0 = send from the publisher's own process",
    )
    config.add_list(p, "--allow-cidr", "non-public range HTTP deliveries may reach (SSRF guard)")
    config.add(p, "--reconcile-interval", "60", "seconds between uncertain-delivery sweeps, 0=off")
    config.add(
        p, "--retention", str(30 * 24 * 3600), "seconds settled events are kept, 0 = forever"
    )
    mail = p.add_argument_group("email to people when deliveries fail")
    config.add(mail, "--smtp-host", "", "SMTP server; empty disables email")
    config.add(mail, "--smtp-port", "25", "SMTP port")
    config.add(mail, "--smtp-from", "grpc-webhooks@localhost", "sender address")
    config.add(
        mail, "--smtp-security", "none", "none, starttls or tls", choices=mailer.SECURITY_MODES
    )
    config.add(mail, "--smtp-username", "", "SMTP login (optional)")
    config.add(mail, "--smtp-password", "", "SMTP password (optional)")
    config.add(mail, "--operator-email", "", "operators' address, copied on every email")
    config.add(mail, "--notify-interval", "30", "seconds between notifier rounds")
    config.add(mail, "--notify-window", "3600", "at most one digest per subscriber per window (s)")
    config.add(mail, "--disable-after", str(5 * 24 * 3600), "disable after failing this long (s)")
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
        connect_timeout=_positive(p, args.connect_timeout, "--connect-timeout"),
        max_payload_bytes=_positive_count(p, args.max_payload_bytes, "--max-payload-bytes"),
        max_in_flight=_positive_count(p, args.max_in_flight, "--max-in-flight"),
        max_in_flight_per_subscriber=_count(
            p, args.max_in_flight_per_subscriber, "--max-in-flight-per-subscriber"
        ),
        claim_batch=_positive_count(p, args.claim_batch, "--claim-batch"),
        delivery_workers=_workers(p, args.delivery_workers),
        allow_cidrs=cidrs,
        smtp=_smtp(p, args),
        notify_interval=_positive(p, args.notify_interval, "--notify-interval"),
        notify_window=_positive(p, args.notify_window, "--notify-window"),
        disable_after=_non_negative(p, args.disable_after, "--disable-after"),
        reconcile_interval=_non_negative(p, args.reconcile_interval, "--reconcile-interval"),
        retention=_non_negative(p, args.retention, "--retention"),
        log_level=args.log_level,
    )


def _smtp(p: argparse.ArgumentParser, args: argparse.Namespace) -> mailer.SmtpSettings:
    try:
        return mailer.SmtpSettings(
            host=args.smtp_host,
            port=_positive_count(p, args.smtp_port, "--smtp-port"),
            sender=args.smtp_from,
            operator_email=args.operator_email,
            security=args.smtp_security,
            username=args.smtp_username,
            password=args.smtp_password,
        )
    except ValueError as error:
        p.error(f"SMTP settings: {error}")


def _workers(p: argparse.ArgumentParser, value: str) -> int:
    number = _count(p, value, "--delivery-workers")
    if number > MAX_DELIVERY_WORKERS:
        p.error(f"--delivery-workers: a whole number from 0 to {MAX_DELIVERY_WORKERS}")
    return number


def _positive_count(p: argparse.ArgumentParser, value: str, flag: str) -> int:
    number = _count(p, value, flag)
    if number == 0:
        p.error(f"{flag}: must be positive")
    return number


def _count(p: argparse.ArgumentParser, value: str, flag: str) -> int:
    """A whole number, 0 or more; written as a float ("1e3") is fine, a fraction is not:
    cutting 0.5 down to 0 would turn a typo into a publisher that never claims."""
    number = _non_negative(p, value, flag)
    if number != int(number):
        p.error(f"{flag}: must be a whole number, not {value!r}")
    return int(number)


def _positive(p: argparse.ArgumentParser, value: str, flag: str) -> float:
    number = _non_negative(p, value, flag)
    if number == 0:
        p.error(f"{flag}: must be positive")
    return number


def _non_negative(p: argparse.ArgumentParser, value: str, flag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        p.error(f"{flag}: {value!r} is not a number")
    if not number >= 0 or number == float("inf"):
        p.error(f"{flag}: must be a finite number, 0 or more")
    return number
