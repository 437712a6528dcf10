"""The SSRF guard: which addresses are refused, what the allowlist opens, and how names resolve."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from publisher import ssrf

AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # IPv4
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.255", "cgnat"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("192.0.0.8", "reserved"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.1", "documentation"),
        ("203.0.113.1", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.255", "benchmarking"),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        # IPv6
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fc00::1", "unique-local"),
        ("fd12:3456::1", "unique-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("2001:2::1", "benchmarking"),
        ("100::1", "reserved"),
        ("5f00::1", "reserved"),
        ("2606:4700::1111", None),
        ("2001:4860:4860::8888", None),
        # IPv6 forms that embed an IPv4 address
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:0:10.0.0.1", "private"),
        ("::ffff:8.8.8.8", None),
        ("::127.0.0.1", "loopback"),
        ("::10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),
        ("2002:a9fe:a9fe::1", "link-local"),
        ("2002:808:808::1", None),
        ("64:ff9b::127.0.0.1", "loopback"),
        ("64:ff9b::100.64.0.1", "cgnat"),
        ("64:ff9b::8.8.8.8", None),
        ("64:ff9b:1::10.0.0.1", "private"),
        ("64:ff9b:1::8.8.8.8", None),
        # Teredo: server 65.54.227.120, client 192.0.2.45 (stored inverted).
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "documentation"),
        # Teredo: server 8.8.8.8, client 127.0.0.1.
        ("2001:0:808:808::80ff:fffe", "loopback"),
        # Teredo: server 192.168.0.1, client 8.8.8.8.
        ("2001:0:c0a8:1::f7f7:f7f7", "private"),
        # Teredo: server 8.8.8.8, client 8.8.8.8.
        ("2001:0:808:808::f7f7:f7f7", None),
    ],
)
def test_classify_names_the_refused_class_or_none_for_public(
    address: str, expected: str | None
) -> None:
    assert ssrf.classify(ipaddress.ip_address(address)) == expected


def test_refused_names_the_address_its_class_and_the_way_to_allow_it() -> None:
    with pytest.raises(ssrf.Refused) as caught:
        ssrf.Guard([]).check_ip(ipaddress.ip_address("127.0.0.1"))
    assert caught.value.address_class == "loopback"
    assert str(caught.value) == "refused 127.0.0.1: loopback address (allow it with --allow-cidr)"


def test_public_addresses_pass_without_an_allowlist() -> None:
    guard = ssrf.Guard([])
    guard.check_ip(ipaddress.ip_address("8.8.8.8"))
    guard.check_ip(ipaddress.ip_address("2606:4700::1111"))


@pytest.mark.parametrize(
    ("allow", "opened", "still_refused"),
    [
        (["127.0.0.0/8"], ["127.0.0.1", "127.1.2.3"], ["10.0.0.1", "::1", "::ffff:127.0.0.1"]),
        (["10.1.0.0/16"], ["10.1.2.3"], ["10.2.0.1", "192.168.0.1"]),
        (["10.1.2.3/16"], ["10.1.0.1", "10.1.255.254"], ["10.2.0.1"]),
        (["fd00::/8"], ["fd00::1"], ["fc00::1", "::1"]),
        (["169.254.169.254"], ["169.254.169.254"], ["169.254.169.253"]),
    ],
)
def test_the_allowlist_opens_exactly_the_ranges_it_names(
    allow: list[str], opened: list[str], still_refused: list[str]
) -> None:
    guard = ssrf.Guard(allow)
    for address in opened:
        guard.check_ip(ipaddress.ip_address(address))
    for address in still_refused:
        with pytest.raises(ssrf.Refused):
            guard.check_ip(ipaddress.ip_address(address))


@pytest.mark.parametrize("cidr", ["not-a-cidr", "10.0.0.0/33", "fd00::/129", ""])
def test_an_invalid_allowed_cidr_is_a_value_error_naming_it(cidr: str) -> None:
    with pytest.raises(ValueError, match=repr(cidr)):
        ssrf.Guard(["127.0.0.0/8", cidr])


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Callable[[Mapping[str, list[str]]], list[str]]:
    """Makes the running loop's getaddrinfo answer from a table; returns the names looked up."""
    looked_up: list[str] = []

    def install(table: Mapping[str, list[str]]) -> list[str]:
        async def getaddrinfo(host: str, port: int | None, **_: Any) -> list[AddrInfo]:
            looked_up.append(host)
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            infos: list[AddrInfo] = []
            for address in table[host]:
                if ":" in address:
                    infos.append(
                        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port or 0, 0, 0))
                    )
                else:
                    infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0)))
            return infos

        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        return looked_up

    return install


async def test_localhost_is_refused_as_loopback_unless_allowlisted() -> None:
    with pytest.raises(ssrf.Refused) as caught:
        await ssrf.Guard([]).resolve("localhost", 80)
    assert caught.value.address_class == "loopback"
    assert "localhost" in str(caught.value)


async def test_localhost_passes_when_127_0_0_0_8_is_allowed() -> None:
    addresses = await ssrf.Guard(["127.0.0.0/8"]).resolve("localhost", 80, family=socket.AF_INET)
    assert "127.0.0.1" in addresses
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("127.0.0.0/8") for a in addresses)


async def test_a_name_that_does_not_resolve_is_refused_as_unresolvable() -> None:
    with pytest.raises(ssrf.Refused) as caught:
        await ssrf.Guard([]).resolve("nonexistent.invalid", 443)
    assert caught.value.address_class == ssrf.UNRESOLVABLE
    assert "nonexistent.invalid" in str(caught.value)


async def test_ip_literals_are_checked_without_a_dns_lookup(
    fake_dns: Callable[[Mapping[str, list[str]]], list[str]],
) -> None:
    looked_up = fake_dns({})
    guard = ssrf.Guard([])
    # Asked twice, as every delivery asks: the remembered verdict is the same verdict.
    for _ in range(2):
        assert await guard.resolve("8.8.8.8", 443) == ["8.8.8.8"]
        with pytest.raises(ssrf.Refused, match="link-local"):
            await guard.resolve("169.254.169.254", 80)
    assert await guard.resolve("2606:4700::1111", 443) == ["2606:4700::1111"]
    assert looked_up == []


@pytest.mark.parametrize(
    "host", ["1.2.3.4.5", "134744072", "8.8.8.8.", "0010.0.0.1", "8.8.8", "::ffff:8.8.8.8.8"]
)
async def test_hosts_that_look_numeric_must_be_addresses_as_written(
    fake_dns: Callable[[Mapping[str, list[str]]], list[str]], host: str
) -> None:
    """A host of digits and dots (or with a colon) that is not an address is refused without
    a lookup, public answer or not: resolvers and HTTP libraries each read such hosts their
    own way, so the address checked need not be the one connected to."""
    looked_up = fake_dns({host: ["8.8.8.8"]})
    guard = ssrf.Guard(["0.0.0.0/0", "::/0"])
    for _ in range(2):
        with pytest.raises(ssrf.Refused) as caught:
            await guard.resolve(host, 443)
        assert caught.value.address_class == ssrf.NOT_STANDARD
        assert str(caught.value) == (
            f"refused {host}: not an IP address in standard form (a.b.c.d or [IPv6])"
        )
    assert looked_up == []


async def test_one_refused_address_in_a_dns_answer_refuses_the_name(
    fake_dns: Callable[[Mapping[str, list[str]]], list[str]],
) -> None:
    fake_dns({"mixed.example": ["8.8.8.8", "10.0.0.1"]})
    with pytest.raises(ssrf.Refused) as caught:
        await ssrf.Guard([]).resolve("mixed.example", 443)
    assert caught.value.address_class == "private"
    assert "10.0.0.1" in str(caught.value)


async def test_a_public_dns_answer_comes_back_checked_and_deduplicated(
    fake_dns: Callable[[Mapping[str, list[str]]], list[str]],
) -> None:
    fake_dns({"public.example": ["93.184.215.14", "2606:2800:21f:cb07::1", "93.184.215.14"]})
    addresses = await ssrf.Guard([]).resolve("public.example", 443)
    assert addresses == ["93.184.215.14", "2606:2800:21f:cb07::1"]


@pytest.mark.parametrize(
    ("url", "address_class"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://[::ffff:169.254.169.254]/latest/meta-data", "link-local"),
        ("https://[fd00::1]/hook", "unique-local"),
        ("http://localhost/hook", "loopback"),
        # Legacy numeric forms that the C resolver maps onto 127.0.0.1: those of digits and
        # dots are refused as written, the others are looked up and the answer refused.
        ("http://2130706433/hook", ssrf.NOT_STANDARD),
        ("http://0x7f.1/hook", "loopback"),
        ("http://nonexistent.invalid/hook", ssrf.UNRESOLVABLE),
    ],
)
async def test_check_url_refuses_urls_that_reach_non_public_addresses(
    url: str, address_class: str
) -> None:
    with pytest.raises(ssrf.Refused) as caught:
        await ssrf.Guard([]).check_url(url)
    assert caught.value.address_class == address_class


@pytest.mark.parametrize(
    "url", ["ftp://8.8.8.8/hook", "file:///etc/passwd", "http:///hook", "http://[::1", "not a url"]
)
async def test_check_url_rejects_malformed_urls_and_other_schemes(url: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        await ssrf.Guard([]).check_url(url)


async def test_check_url_accepts_a_public_endpoint() -> None:
    await ssrf.Guard([]).check_url("https://8.8.8.8:8443/hooks")
