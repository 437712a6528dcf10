"""``webhook-publisher`` / ``python -m publisher``: run the publisher until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from common import log
from publisher import settings as publisher_settings
from publisher.app import AlreadyRunning, PublisherApp


def main(argv: Sequence[str] | None = None) -> None:
    settings = publisher_settings.parse(argv)
    log.configure(settings.log_level)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(PublisherApp(settings).run())
    except AlreadyRunning as error:
        sys.exit(f"webhook-publisher: {error}")


if __name__ == "__main__":
    main()
