"""``webhook-subscriber`` / ``python -m subscriber``: run the reference subscriber."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence

from common import log
from subscriber import app, settings


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> None:
    config = settings.parse(sys.argv[1:] if argv is None else argv)
    log.configure(config.log_level)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(app.SubscriberApp(config).run())


if __name__ == "__main__":
    main()
