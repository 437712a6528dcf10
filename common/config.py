"""Command-line flags that fall back to ``WEBHOOKS_*`` environment variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any


def env_name(flag: str) -> str:
    """``--database-url`` -> ``WEBHOOKS_DATABASE_URL``."""
    return "WEBHOOKS_" + flag.lstrip("-").replace("-", "_").upper()


def add(
    parser: argparse._ActionsContainer, flag: str, default: str | None, help: str, **kwargs: Any
) -> None:
    """A flag whose default comes from its environment variable, then from ``default``."""
    name = env_name(flag)
    value = os.environ.get(name, default)
    parser.add_argument(
        flag, default=value, help=f"{help} [env {name}; default {default!r}]", **kwargs
    )


def add_list(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A repeatable flag; its environment variable holds comma-separated values."""
    name = env_name(flag)
    env_value = os.environ.get(name, "")
    default = [item.strip() for item in env_value.split(",") if item.strip()]
    parser.add_argument(
        flag,
        action="append",
        default=None,
        help=f"{help} (repeatable) [env {name}, comma-separated]",
    )
    parser.set_defaults(**{flag.lstrip("-").replace("-", "_") + "_env": default})


def list_value(args: argparse.Namespace, flag: str) -> list[str]:
    """The repeated flag's values, or its environment variable's when the flag was not given."""
    dest = flag.lstrip("-").replace("-", "_")
    given: Sequence[str] | None = getattr(args, dest)
    return list(given) if given is not None else list(getattr(args, dest + "_env"))


def host_port(value: str, flag: str) -> tuple[str, int]:
    """Splits ``HOST:PORT`` (``[::1]:PORT`` for IPv6), or exits with a message naming the flag."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise SystemExit(f"{flag}: expected HOST:PORT with a port up to 65535, got {value!r}")
    return host, int(port)
