"""``webhook-publisher`` / ``python -m publisher``: run the publisher, or migrate its database.

webhook-publisher [FLAGS]                      serve until SIGTERM or Ctrl-C
webhook-publisher migrate [--database-url URL] [--stamp REVISION]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from common import config, db, grpc_server, log
from publisher import migrate
from publisher import settings as publisher_settings
from publisher.app import AlreadyRunning, PublisherApp
from publisher.transport_pool import NotStarted


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["migrate"]:
        sys.exit(_migrate(args[1:]))
    settings = publisher_settings.parse(args)
    log.configure(settings.log_level)
    try:
        _runner()(PublisherApp(settings).run())
    except (AlreadyRunning, migrate.SchemaMismatch, NotStarted, grpc_server.BindError) as error:
        sys.exit(f"webhook-publisher: {error}")


def _migrate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="webhook-publisher migrate",
        description="Upgrade the publisher's database schema to this version's (Alembic).",
    )
    config.add(parser, "--database-url", "sqlite:///webhooks.db", "SQLite file or PostgreSQL URL")
    parser.add_argument(
        "--stamp", metavar="REVISION", help="record REVISION as applied without migrating"
    )
    args = parser.parse_args(argv)
    path = db.sqlite_path(args.database_url)
    lock = db.FileLock(path + ".lock") if path is not None else None
    if lock is not None and not lock.acquire():
        print(f"webhook-publisher migrate: a publisher is running on {path}", file=sys.stderr)
        return 1
    try:
        if args.stamp:
            asyncio.run(migrate.stamp(args.database_url, args.stamp))
        else:
            asyncio.run(migrate.upgrade(args.database_url))
        print(f"database at revision {asyncio.run(migrate.current(args.database_url))}")
    except migrate.SchemaAhead as error:
        print(f"webhook-publisher migrate: {error}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
    return 0


def _runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


if __name__ == "__main__":
    main()
