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
        # Integer flags take whole numbers: int() would cut a fraction down, 0.5 to 0.
        (["--claim-batch", "0.5"], "--claim-batch"),
        (["--max-in-flight", "0.5"], "--max-in-flight"),
        (["--max-in-flight", "2.5"], "--max-in-flight"),
        (["--max-payload-bytes", "0.5"], "--max-payload-bytes"),
        (["--max-in-flight-per-subscriber", "1.5"], "--max-in-flight-per-subscriber"),
        (["--smtp-port", "25.5"], "--smtp-port"),
        (["--smtp-port", "0.5"], "--smtp-port"),
        (["--operator-email", "a@example.com, b@example.com"], "operator_email"),
        (["--operator-email", 'ops"@example.com'], "operator_email"),
        (["--operator-email", "josé@example.com"], "operator_email"),
        (["--smtp-from", "Webhooks <hooks@example.com>"], "sender"),
        (["--smtp-from", "hooks"], "sender"),
        # With no window every replica's round may take the same digest's turn.
        (["--notify-window", "0"], "--notify-window"),
        (["--notify-interval", "0"], "--notify-interval"),
    ],
)
def test_a_bad_value_stops_the_program_with_a_message_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        settings.parse(argv)
    assert stopped.value.code != 0
    message = capsys.readouterr().err + str(stopped.value.code)
    # "flag:" as the error says it; the usage line names every flag without a colon.
    assert f"{flag}:" in message


def test_integer_flags_take_whole_numbers_however_written() -> None:
    """A whole number written as a float is the number; only a fraction is refused."""
    parsed = settings.parse(["--claim-batch", "1e3", "--max-in-flight", "8.0", "--smtp-port", "25"])
    assert (parsed.claim_batch, parsed.max_in_flight, parsed.smtp.port) == (1000, 8, 25)
    assert isinstance(parsed.claim_batch, int)


def test_an_operator_address_on_a_local_host_is_accepted() -> None:
    """Unlike a subscriber's contact, the operators' address may be on a host without a dot."""
    assert settings.parse(["--operator-email", "ops@localhost"]).smtp.operator_email == (
        "ops@localhost"
    )
