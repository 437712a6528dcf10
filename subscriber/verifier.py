"""Who may deliver, and whether what they delivered is signed: IP allowlist, JWT, Standard Webhooks.

Every check raises ``errors.PermissionDenied`` (the address may not call at
all), ``errors.Unauthenticated`` (the signature does not hold) or
``errors.InvalidArgument`` (a header is malformed), with the reason in the
message, so that both receivers answer the same way for the same fault.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from common import errors, log, signing

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Allowlist:
    """The networks deliveries may come from; no networks means every address may."""

    networks: tuple[Network, ...] = ()

    def allows(self, address: Address | None) -> bool:
        if not self.networks:
            return True
        if address is None:
            return False
        return any(address in network for network in self.networks)


def parse_allowlist(values: Iterable[str], field: str = "allow_ip") -> Allowlist:
    """Networks like ``10.0.0.0/8``, ``192.0.2.7`` (one host), ``2001:db8::/32``.

    Raises InvalidArgument naming ``field`` for an entry that is not one.
    """
    networks: list[Network] = []
    for value in values:
        text = value.strip()
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as error:
            # ip_network(strict=True) refuses "10.0.0.1/8": the operator meant
            # either one host or the whole network, and guessing could open it.
            raise errors.InvalidArgument(field, f"{text!r} is not an IP network: {error}") from None
    return Allowlist(tuple(networks))


def parse_address(text: str | None) -> Address | None:
    """An IP address, with IPv4-mapped IPv6 (``::ffff:10.1.2.3``) unwrapped; None if not an IP."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def grpc_peer_address(peer: str) -> Address | None:
    """The IP of a gRPC peer (``ipv4:127.0.0.1:5555``, ``ipv6:[::1]:5555``); None if not IP."""
    # Some gRPC versions percent-encode the brackets of IPv6 peers.
    scheme, _, rest = urllib.parse.unquote(peer).partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    host, _, _port = rest.rpartition(":")
    return parse_address(host)


class Verifier:
    """The checks both receivers run, configured once from the subscriber's settings."""

    def __init__(
        self,
        *,
        keys: Sequence[bytes],
        audience: str | None,
        allowlist: Allowlist,
        timestamp_tolerance: float,
        clock: Callable[[], float] = log.now,
    ) -> None:
        self._keys = tuple(keys)
        self._audience = audience
        self._allowlist = allowlist
        self._tolerance = timestamp_tolerance
        self._clock = clock

    def check_address(self, address: Address | None) -> None:
        if not self._allowlist.allows(address):
            shown = "an address that is not IP" if address is None else str(address)
            raise errors.PermissionDenied(f"{shown} is not in the IP allowlist")

    def delivery(self, authorization: str | None, payload: bytes) -> signing.DeliveryClaims:
        """The claims of a valid delivery token over exactly ``payload``."""
        token = signing.bearer_token(authorization)
        return signing.verify_delivery(token, self._keys, audience=self._audience, payload=payload)

    def delivery_token(self, authorization: str | None) -> signing.DeliveryClaims:
        """The claims of a valid delivery token, before its body is read: the caller
        checks the body with ``signing.check_payload``."""
        token = signing.bearer_token(authorization)
        return signing.delivery_token(token, self._keys, audience=self._audience)

    def status_query(self, authorization: str | None, event_id: str) -> None:
        """A status query carries a status token for ``event_id`` (see signing.verify_status)."""
        token = signing.bearer_token(authorization)
        signing.verify_status(token, self._keys, audience=self._audience, event_id=event_id)

    def standard(
        self,
        message_id: str | None,
        timestamp: str | None,
        signature: str,
        body: bytes,
    ) -> None:
        """Standard Webhooks v1: a signature of ``id.timestamp.body`` matches, the time is fresh."""
        if not message_id:
            raise errors.InvalidArgument("webhook-id", "header is required with webhook-signature")
        if not timestamp:
            raise errors.InvalidArgument(
                "webhook-timestamp", "header is required with webhook-signature"
            )
        try:
            message_id.encode()
        except UnicodeEncodeError:
            # Undecodable header bytes arrive as lone surrogates, which cannot be signed over.
            raise errors.InvalidArgument("webhook-id", "is not valid UTF-8") from None
        try:
            seconds = int(timestamp)
            # In float, as the clock is: int() takes any number of digits, and past
            # float's range the arithmetic below would raise OverflowError.
            skew = float(seconds) - self._clock()
        except ValueError:
            raise errors.InvalidArgument(
                "webhook-timestamp", f"{timestamp!r} is not integer epoch seconds"
            ) from None
        except OverflowError:
            raise errors.InvalidArgument(
                "webhook-timestamp", "is out of range for epoch seconds"
            ) from None
        # A stale timestamp alone proves nothing about the signature, but
        # refusing it is what stops a captured request from being replayed later.
        if abs(skew) > self._tolerance:
            direction = "old" if skew < 0 else "far in the future"
            raise errors.Unauthenticated(
                f"webhook-timestamp is {abs(skew):.0f} s {direction}; "
                f"tolerance is {self._tolerance:g} s"
            )
        signing.verify_standard(self._keys, message_id, seconds, body, signature)
