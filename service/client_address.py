"""Who a request comes from: one resolved client address, and the bucket the login limit counts it in.

Behind a proxy the socket's peer is the proxy, and the client's address arrives in a header. Headers
are written by whoever connects, so they are believed only from peers in http.trusted_proxies (with
http.xheaders on): from any other peer they are ignored. `X-Forwarded-For` is read from the right,
the end a trusted proxy appends to: each trusted hop vouches for the one to its left, and the first
untrusted address is the client (what a client put in the header itself lies further left and is
never reached). `X-Real-Ip` is read only when there is no `X-Forwarded-For`.

Addresses are normalised (one spelling per address; IPv4-mapped IPv6 as IPv4), and the login limit
counts IPv6 clients per /64, the block one subscriber gets, so that varying the low bits of an
address does not buy a new bucket.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The prefix an IPv6 client is counted by: the smallest block a subscriber is usually given.
IPV6_BUCKET_PREFIX = 64


def parse(text: str) -> IPAddress | None:
    """An address as a header or a socket spells it ("2001:DB8::1", "[2001:db8::1]:443", "1.2.3.4:80",
    "::ffff:1.2.3.4", "fe80::1%eth0"), normalised: IPv4-mapped IPv6 as IPv4, no zone. None when it is
    not an address ("unknown", an obfuscated RFC 7239 name, garbage)."""
    text = text.strip()
    if text.startswith("["):  # [v6] or [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def trusted(address: IPAddress, proxies: Iterable[Network]) -> bool:
    return any(address.version == network.version and address in network for network in proxies)


def resolve(peer: str, forwarded_for: list[str], real_ip: str | None, proxies: tuple[Network, ...]) -> str:
    """The client's address, normalised: the socket's `peer`, or where that peer is a trusted proxy
    the right-most untrusted hop of `X-Forwarded-For` (every value of the header, in order), else its
    `X-Real-Ip`. A hop that is not an address stops the walk at the last trusted hop: the server
    never counts a client by a name it cannot check."""
    client = parse(peer)
    if client is None:
        return peer  # not an IP socket (a Unix socket's peer has no address)
    if not proxies or not trusted(client, proxies):
        return str(client)
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    if not hops:
        real = parse(real_ip) if real_ip else None
        return str(real or client)
    for hop in reversed(hops):
        address = parse(hop)
        if address is None:
            break
        client = address
        if not trusted(address, proxies):
            break
    return str(client)


def rate_limit_bucket(address: str) -> str:
    """What the login limit counts `address` as: an IPv4 address itself, an IPv6 one by its /64."""
    parsed = parse(address)
    if parsed is None:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        shift = 128 - IPV6_BUCKET_PREFIX
        return str(ipaddress.IPv6Network((int(parsed) >> shift << shift, IPV6_BUCKET_PREFIX)))
    return str(parsed)
