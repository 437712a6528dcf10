"""The publisher's flags: defaults, environment fallbacks, and refusals that name the flag."""

from __future__ import annotations

import pytest

from publisher import settings


def test_defaults_are_the_embedded_loopback_setup() -> None:
    parsed = settings.parse([])
    assert (parsed.host, parsed.port) == ("127.0.0.1", 50051)
    assert parsed.database_url == "sqlite:///webhooks.db"
    assert parsed.delivery_timeout == 15.0
    assert parsed.connect_timeout == 5.0
    assert parsed.allow_cidrs == ()
    assert parsed.smtp.host == ""
    assert parsed.retention == 30 * 24 * 3600
    assert settings.parse(["--retention", "0"]).retention == 0  # Kept forever.
    assert parsed.delivery_workers == 0  # Sent from the publisher's own process.
    assert settings.parse(["--delivery-workers", "2"]).delivery_workers == 2


def test_environment_variables_fill_in_for_missing_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKS_DATABASE_URL", "postgresql://db/webhooks")
    monkeypatch.setenv("WEBHOOKS_ALLOW_CIDR", "127.0.0.0/8, 10.1.0.0/16")
    monkeypatch.setenv("WEBHOOKS_CONNECT_TIMEOUT", "2.5")
    parsed = settings.parse(["--listen", "0.0.0.0:6000"])
    assert parsed.database_url == "postgresql://db/webhooks"
    assert parsed.allow_cidrs == ("127.0.0.0/8", "10.1.0.0/16")
    assert parsed.connect_timeout == 2.5
    assert (parsed.host, parsed.port) == ("0.0.0.0", 6000)


def test_a_subscriber_gets_half_the_slots_unless_told_otherwise() -> None:
    assert settings.parse([]).per_subscriber_in_flight == 256  # Of 512.
    assert settings.parse(["--max-in-flight", "1"]).per_subscriber_in_flight == 1
    told = ["--max-in-flight", "10", "--max-in-flight-per-subscriber", "3"]
    assert settings.parse(told).per_subscriber_in_flight == 3
    # No more than there are slots.
    too_many = ["--max-in-flight", "10", "--max-in-flight-per-subscriber", "30"]
    assert settings.parse(too_many).per_subscriber_in_flight == 10


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--delivery-timeout", "0"], "--delivery-timeout"),
        (["--connect-timeout", "soon"], "--connect-timeout"),
        (["--allow-cidr", "not-a-range"], "--allow-cidr"),
        (["--listen", "nohost"], "--listen"),
        (["--reconcile-interval", "-1"], "--reconcile-interval"),
        (["--smtp-port", "0"], "--smtp-port"),
        (["--max-in-flight-per-subscriber", "-2"], "--max-in-flight-per-subscriber"),
        (["--retention", "-1"], "--retention"),
        (["--delivery-workers", "1.5"], "--delivery-workers"),
        (["--delivery-workers", "65"], "--delivery-workers"),
    ],
)
def test_a_bad_value_stops_the_program_with_a_message_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        settings.parse(argv)
    assert stopped.value.code != 0
    message = capsys.readouterr().err + str(stopped.value.code)
    assert flag in message
