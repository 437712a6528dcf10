"""Reference subscribers for tests: in this process, on port 0, each on its own SQLite file."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import jwt

from subscriber import app, handlers, inbox, settings


def delivery_token(
    event_id: str,
    payload: bytes,
    *,
    key: bytes,
    audience: str,
    algorithm: str = "HS256",
    issued_ago: int = 0,
    event_type: str = "order.created",
) -> str:
    """A delivery JWT made with PyJWT, independently of the project's own signing code."""
    issued = int(time.time()) - issued_ago
    claims = {
        "iss": "tests",
        "aud": audience,
        "iat": issued,
        "exp": issued + 300,
        "jti": uuid.uuid4().hex,
        "event_id": event_id,
        "event_type": event_type,
        "attempt": 1,
        "body_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return jwt.encode(claims, "" if algorithm == "none" else key, algorithm=algorithm)


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
        # HTTP is off unless ``flags`` say where (the last flag given wins): the default is
        # the fixed port 8080, which another test run or `make run` may hold.
        config = settings.parse(
            [
                "--listen=127.0.0.1:0",
                "--http-listen=off",
                f"--database-url=sqlite:///{database}",
                *flags,
            ]
        )
        subscriber = app.SubscriberApp(config, handler=handler)
        await subscriber.start()
        self._started.append(subscriber)
        return subscriber

    async def stop_all(self) -> None:
        for subscriber in self._started:
            await subscriber.stop()
