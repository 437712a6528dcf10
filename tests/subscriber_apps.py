"""Reference subscribers for tests: in this process, on port 0, each on its own SQLite file."""

from __future__ import annotations

from pathlib import Path

from subscriber import app, handlers, inbox, settings


class Handled:
    """A handler that remembers what it was given, to count effects."""

    def __init__(self) -> None:
        self.entries: list[inbox.Entry] = []

    async def __call__(self, entry: inbox.Entry) -> None:
        self.entries.append(entry)


class SubscriberApps:
    """Starts reference subscribers with the given flags; ``stop_all`` stops every one."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._started: list[app.SubscriberApp] = []

    async def start(self, *flags: str, handler: handlers.Handler) -> app.SubscriberApp:
        database = self._tmp_path / f"inbox{len(self._started)}.db"
        config = settings.parse(
            ["--listen=127.0.0.1:0", f"--database-url=sqlite:///{database}", *flags]
        )
        subscriber = app.SubscriberApp(config, handler=handler)
        await subscriber.start()
        self._started.append(subscriber)
        return subscriber

    async def stop_all(self) -> None:
        for subscriber in self._started:
            await subscriber.stop()
