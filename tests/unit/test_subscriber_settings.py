"""The subscriber's flags: values that would quietly disable a check or hammer the publisher
stop the program with a message naming the flag; sensible values at the bounds are kept."""

from __future__ import annotations

import base64

import pytest

from subscriber import settings

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
CATCH_UP = ("--audience=sub_1", "--catch-up-publisher=127.0.0.1:50051")


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        pytest.param(("--timestamp-tolerance=inf",), "--timestamp-tolerance", id="tolerance-inf"),
        pytest.param(("--timestamp-tolerance=nan",), "--timestamp-tolerance", id="tolerance-nan"),
        pytest.param(("--timestamp-tolerance=0",), "--timestamp-tolerance", id="tolerance-0"),
        pytest.param(
            ("--timestamp-tolerance=0.5",), "--timestamp-tolerance", id="tolerance-under-1s"
        ),
        pytest.param(
            ("--timestamp-tolerance=1e300",), "--timestamp-tolerance", id="tolerance-over-a-day"
        ),
        pytest.param(("--audience= ",), "--audience", id="audience-blank"),
        pytest.param(("--audience=",), "--audience", id="audience-empty"),
        pytest.param(
            ("--audience=sub_1", "--catch-up-publisher=127.0.0.1:0"),
            "--catch-up-publisher",
            id="publisher-port-0",
        ),
        pytest.param(
            (*CATCH_UP, "--catch-up-interval=1e-9"), "--catch-up-interval", id="interval-1e-9"
        ),
        pytest.param(
            (*CATCH_UP, "--catch-up-interval=0.05"), "--catch-up-interval", id="interval-0.05"
        ),
        pytest.param(
            (*CATCH_UP, "--catch-up-interval=inf"), "--catch-up-interval", id="interval-inf"
        ),
    ],
)
def test_a_nonsense_value_stops_the_program_with_a_message_naming_the_flag(
    flags: tuple[str, ...], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these is refused at start, rather than quietly turning a check off."""
    with pytest.raises(SystemExit) as stopped:
        settings.parse([f"--secret={SECRET}", *flags])

    assert stopped.value.code != 0
    # "flag:" as the error says it; the usage line names every flag without a colon.
    assert f"{flag}:" in capsys.readouterr().err + str(stopped.value.code)


def test_values_at_the_bounds_are_accepted() -> None:
    """The narrowest and widest timestamp window, the shortest interval and port 1 all work."""
    narrowest = settings.parse([f"--secret={SECRET}", "--timestamp-tolerance=1"])
    widest = settings.parse([f"--secret={SECRET}", "--timestamp-tolerance=86400"])
    fastest = settings.parse(
        [
            f"--secret={SECRET}",
            "--audience=sub_1",
            "--catch-up-publisher=publisher.internal:1",
            "--catch-up-interval=0.1",
        ]
    )

    assert (narrowest.timestamp_tolerance, widest.timestamp_tolerance) == (1.0, 86400.0)
    assert fastest.catch_up is not None
    assert (fastest.catch_up.publisher, fastest.catch_up.interval) == ("publisher.internal:1", 0.1)


def test_the_audience_is_stripped_and_absent_means_unchecked() -> None:
    """Spaces around the subscriber id are dropped, for the check and the catch-up feed alike;
    without --audience no audience is checked."""
    config = settings.parse([f"--secret={SECRET}", "--audience= sub_1 ", *CATCH_UP[1:]])

    assert config.audience == "sub_1"
    assert config.catch_up is not None
    assert config.catch_up.subscriber_id == "sub_1"
    assert settings.parse([f"--secret={SECRET}"]).audience is None
