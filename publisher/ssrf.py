"""The SSRF guard: subscriber endpoints may only reach public addresses, unless allowlisted.

An endpoint is checked when it is registered and again whenever a delivery
opens a connection to it, because DNS answers change. On delivery the HTTP
client connects to exactly the addresses ``Guard.resolve`` returned; a second
lookup, which DNS rebinding could answer differently, never happens.

The tables below are explicit on purpose: ``ipaddress``'s ``is_private`` and
``is_global`` changed meaning across Python versions.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence

import yarl

from common import errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNRESOLVABLE = "unresolvable"
# A host that looks like an IP address (digits and dots, or a colon) but is not one as written.
NOT_STANDARD = "not-standard"
# A registration waits this long for DNS before refusing the endpoint.
REGISTRATION_LOOKUP_SECONDS = 5.0
# Endpoint hosts are few; the bound only keeps a flood of distinct literals from growing memory.
_REMEMBERED_LITERALS = 4096

# First match wins, so broadcast is named before the 240/4 block that holds it.
_IPV4 = [
    (ipaddress.IPv4Network(network), address_class)
    for network, address_class in [
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "documentation"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    ]
]

# Checked before the embedded IPv4 forms, since :: and ::1 also lie in ::/96.
_IPV6 = [
    (ipaddress.IPv6Network(network), address_class)
    for network, address_class in [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("100::/64", "reserved"),
        ("2001:2::/48", "benchmarking"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ]
]

# Forms that carry an IPv4 address in their low 32 bits: mapped, SIIT-translated,
# IPv4-compatible, and NAT64. Local-use NAT64 (64:ff9b:1::/48) is read with the
# /96 layout like the well-known prefix; a translator configured with a shorter
# RFC 6052 prefix would place the IPv4 bits elsewhere.
_LOW_32_BITS = [
    ipaddress.IPv6Network(network)
    for network in ["::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96", "64:ff9b:1::/48"]
]
# Only 2000::/3 is allocated as global unicast; the rest of the space is not
# reachable on the internet, whatever IANA assigns it later.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


class Refused(Exception):
    """The guard will not let a delivery reach this address."""

    def __init__(self, target: str, address_class: str) -> None:
        self.target = target
        self.address_class = address_class
        if address_class == UNRESOLVABLE:
            message = f"refused {target}: the name does not resolve"
        elif address_class == NOT_STANDARD:
            message = f"refused {target}: not an IP address in standard form (a.b.c.d or [IPv6])"
        else:
            message = f"refused {target}: {address_class} address (allow it with --allow-cidr)"
        super().__init__(message)


def classify(ip: IPAddress) -> str | None:
    """The class that makes ``ip`` refused, or None when it is public."""
    if isinstance(ip, ipaddress.IPv4Address):
        return next((name for network, name in _IPV4 if ip in network), None)
    for network, name in _IPV6:
        if ip in network:
            return name
    embedded = _embedded_ipv4(ip)
    if not embedded:
        return None if ip in _GLOBAL_UNICAST else "reserved"
    # The packet ends up at the IPv4 address, so that address decides.
    for ipv4 in embedded:
        address_class = classify(ipv4)
        if address_class is not None:
            return address_class
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to, for the forms that embed one."""
    if any(ip in network for network in _LOW_32_BITS):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return []


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells out, or None when it is a name to resolve."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def looks_numeric(host: str) -> bool:
    """Whether ``host`` looks like an IP address: it has a colon, or only digits and dots.

    Such a host must be an address as written. The system resolver reads legacy
    forms its own way (``134744072`` is 8.8.8.8, ``127.1`` is 127.0.0.1) and sends
    others (``1.2.3.4.5``) to DNS, and HTTP libraries disagree on which of them
    are literals: what the guard checked and what a library connects to could differ.
    """
    return ":" in host or host.replace(".", "").isdigit()


class Guard:
    """Refuses non-public addresses, except those inside the allowed CIDRs."""

    def __init__(self, allow: Sequence[str] = ()) -> None:
        self._allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for cidr in allow:
            try:
                # Host bits are dropped as --allow-cidr parsing does: 10.1.2.3/16 opens 10.1.0.0/16.
                self._allow.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as error:
                raise ValueError(f"invalid allowed CIDR {cidr!r}: {error}") from None
        self._literals: dict[str, tuple[IPAddress | None, str | None]] = {}

    def check_ip(self, ip: IPAddress) -> None:
        """Raises Refused unless ``ip`` is public or inside an allowed CIDR."""
        refusal = self._refusal(ip)
        if refusal is not None:
            raise Refused(str(ip), refusal)

    def _refusal(self, ip: IPAddress) -> str | None:
        if any(ip in network for network in self._allow):
            return None
        return classify(ip)

    def check_literal(self, host: str) -> IPAddress | None:
        """The address ``host`` spells out, checked (Refused if refused); None for a name,
        which ``resolve`` checks when a connection is opened.

        Remembered per host: every connection opened to an IP endpoint asks, and
        parsing and classifying the address was 3% of the publisher's CPU in
        e2e_http when every delivery asked.
        """
        known = self._literals.get(host)
        if known is None:
            literal = ip_literal(host)
            if literal is not None:
                known = (literal, self._refusal(literal))
            elif looks_numeric(host):
                known = (None, NOT_STANDARD)
            else:
                known = (None, None)
            if len(self._literals) < _REMEMBERED_LITERALS:
                self._literals[host] = known
        literal, refusal = known
        if refusal is not None:
            raise Refused(host if literal is None else str(literal), refusal)
        return literal

    async def resolve(
        self, host: str, port: int | None, *, family: int = socket.AF_UNSPEC
    ) -> list[str]:
        """The addresses of ``host``, all checked; Refused if any one of them is refused.

        One refused address refuses the name: in a DNS answer that mixes a public
        and a private address, the connector falls through to the private one as
        soon as the public one fails to connect.
        """
        literal = self.check_literal(host)
        if literal is not None:
            return [str(literal)]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG
            )
        except (OSError, UnicodeError):
            raise Refused(host, UNRESOLVABLE) from None
        addresses = list(
            dict.fromkeys(
                str(sockaddr[0])
                for info_family, _, _, _, sockaddr in infos
                if info_family in (socket.AF_INET, socket.AF_INET6)
            )
        )
        if not addresses:
            raise Refused(host, UNRESOLVABLE)
        for address in addresses:
            try:
                self.check_ip(ipaddress.ip_address(address))
            except Refused as refused:
                raise Refused(f"{host} ({address})", refused.address_class) from None
        return addresses

    async def check_url(self, url: str) -> None:
        """Registration-time check; ValueError for a malformed URL, Refused for a refused host."""
        try:
            parsed = yarl.URL(url)
        except ValueError as error:
            raise ValueError(f"{url!r}: {error}") from None
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"{url!r}: the scheme must be http or https")
        if not parsed.raw_host:
            raise ValueError(f"{url!r}: no host")
        await self.resolve(parsed.raw_host, parsed.port)

    async def check_registration(self, url: str, field: str) -> None:
        """``check_url`` for a request: InvalidArgument naming ``field`` and the address class."""
        try:
            async with asyncio.timeout(REGISTRATION_LOOKUP_SECONDS):
                await self.check_url(url)
        except Refused as refused:
            raise errors.InvalidArgument(field, str(refused)) from None
        except ValueError as error:
            raise errors.InvalidArgument(field, str(error)) from None
        except TimeoutError:
            raise errors.InvalidArgument(field, f"looking up {url!r} timed out") from None
