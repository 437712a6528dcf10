"""Command-line flags: WEBHOOKS_* environment fallback, repeatable lists and HOST:PORT parsing."""

from __future__ import annotations

import argparse

import pytest

from common import config


def _parser(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """A parser with one plain, one typed and one list flag, built under the given environment."""
    for name in ("WEBHOOKS_DATABASE_URL", "WEBHOOKS_WORKERS", "WEBHOOKS_SECRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser(exit_on_error=False)
    config.add(parser, "--database-url", "sqlite+aiosqlite:///webhooks.db", "database URL")
    config.add(parser, "--workers", "4", "delivery workers", type=int)
    config.add_list(parser, "--secret", "whsec_ secret")
    return parser


@pytest.mark.parametrize(
    ("flag", "name"),
    [
        ("--database-url", "WEBHOOKS_DATABASE_URL"),
        ("--listen", "WEBHOOKS_LISTEN"),
        ("--allow-cidr", "WEBHOOKS_ALLOW_CIDR"),
    ],
)
def test_env_name_is_the_upper_snake_case_flag(flag: str, name: str) -> None:
    """`--database-url` reads WEBHOOKS_DATABASE_URL."""
    assert config.env_name(flag) == name


def test_default_applies_without_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """With neither flag nor environment variable, the coded default is used."""
    args = _parser(monkeypatch).parse_args([])
    assert args.database_url == "sqlite+aiosqlite:///webhooks.db"
    assert args.workers == 4


def test_env_variable_replaces_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """WEBHOOKS_X is the fallback when the flag is not given."""
    parser = _parser(
        monkeypatch,
        {"WEBHOOKS_DATABASE_URL": "postgresql+asyncpg://db/webhooks", "WEBHOOKS_WORKERS": "16"},
    )
    args = parser.parse_args([])
    assert args.database_url == "postgresql+asyncpg://db/webhooks"
    assert args.workers == 16


def test_flag_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag on the command line wins over its environment variable."""
    parser = _parser(
        monkeypatch,
        {"WEBHOOKS_DATABASE_URL": "postgresql+asyncpg://db/webhooks", "WEBHOOKS_WORKERS": "16"},
    )
    args = parser.parse_args(["--database-url", "sqlite+aiosqlite:///other.db", "--workers", "2"])
    assert args.database_url == "sqlite+aiosqlite:///other.db"
    assert args.workers == 2


def test_help_names_the_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """--help tells the operator which environment variable a flag reads."""
    assert "WEBHOOKS_DATABASE_URL" in _parser(monkeypatch).format_help()


def test_repeated_list_flag_collects_every_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeatable flag given several times yields each value in order."""
    args = _parser(monkeypatch).parse_args(["--secret", "whsec_a", "--secret", "whsec_b"])
    assert config.list_value(args, "--secret") == ["whsec_a", "whsec_b"]


def test_list_env_is_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The list's environment variable holds comma-separated values; blanks are dropped."""
    args = _parser(monkeypatch, {"WEBHOOKS_SECRET": " whsec_a, whsec_b,,whsec_c ,"}).parse_args([])
    assert config.list_value(args, "--secret") == ["whsec_a", "whsec_b", "whsec_c"]


def test_list_flag_beats_list_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the flag is given, the environment's list is ignored entirely."""
    parser = _parser(monkeypatch, {"WEBHOOKS_SECRET": "whsec_env1,whsec_env2"})
    args = parser.parse_args(["--secret", "whsec_flag"])
    assert config.list_value(args, "--secret") == ["whsec_flag"]


def test_list_is_empty_without_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No flag and no variable give an empty list."""
    args = _parser(monkeypatch).parse_args([])
    assert config.list_value(args, "--secret") == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost:50051", ("localhost", 50051)),
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("[::1]:50051", ("::1", 50051)),
        ("[::]:0", ("::", 0)),
        ("hooks.example.com:443", ("hooks.example.com", 443)),
    ],
)
def test_host_port_splits_host_and_port(value: str, expected: tuple[str, int]) -> None:
    """HOST:PORT splits on the last colon; IPv6 hosts lose their brackets."""
    assert config.host_port(value, "--listen") == expected


@pytest.mark.parametrize(
    "value", ["localhost", "localhost:", ":50051", "localhost:http", "localhost:-1", ""]
)
def test_host_port_exits_naming_the_flag(value: str) -> None:
    """A value that is not HOST:PORT exits with a message naming the flag and the value."""
    with pytest.raises(SystemExit) as info:
        config.host_port(value, "--http-listen")
    message = str(info.value.code)
    assert message.startswith("--http-listen")
    assert repr(value) in message


@pytest.mark.parametrize("value", ["localhost:65536", "localhost:99999", "[]:50051"])
def test_host_port_exits_on_an_out_of_range_port_or_empty_host(value: str) -> None:
    """A port above 65535, or a host that is only brackets, is not a usable HOST:PORT."""
    with pytest.raises(SystemExit) as info:
        config.host_port(value, "--listen")
    assert str(info.value.code).startswith("--listen")


@pytest.mark.parametrize("value", ["localhost:\u00b2", "localhost:\u0663"])
def test_host_port_exits_on_non_ascii_digits(value: str) -> None:
    """A port spelt with non-ASCII digits exits naming the flag instead of crashing or passing."""
    with pytest.raises(SystemExit) as info:
        config.host_port(value, "--listen")
    assert str(info.value.code).startswith("--listen")
