"""service.client_address: whose forwarded headers are believed, which hop is the client, one spelling
per address, and the login limit's bucket (IPv6 by /64)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from service.auth import Authenticator, AuthSettings
from service.client_address import parse, rate_limit_bucket, resolve
from sessions.tokens import TokenSigner
from tests.unit.fakes import FakeStore

pytestmark = pytest.mark.unit

PROXIES = (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64"))


@pytest.mark.parametrize(("text", "address"), [
    ("203.0.113.7", "203.0.113.7"),
    (" 203.0.113.7:5678 ", "203.0.113.7"),
    ("2001:DB8::1", "2001:db8::1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("::ffff:203.0.113.7", "203.0.113.7"),  # IPv4-mapped: the IPv4 client it is
])
def test_addresses_are_parsed_in_one_spelling(text: str, address: str) -> None:
    assert str(parse(text)) == address


@pytest.mark.parametrize("text", ["", "unknown", "_hidden", "203.0.113", "1.2.3.4.5", "example.com"])
def test_what_is_not_an_address_is_none(text: str) -> None:
    assert parse(text) is None


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    assert resolve("203.0.113.7", ["198.51.100.1"], "198.51.100.2", PROXIES) == "203.0.113.7"
    # xheaders off: no proxy is trusted, whoever connects
    assert resolve("10.0.0.5", ["198.51.100.1"], "198.51.100.2", ()) == "10.0.0.5"


def test_behind_trusted_proxies_the_right_most_untrusted_hop_is_the_client() -> None:
    # The client wrote "1.1.1.1" itself; the proxy appended the address it saw.
    assert resolve("10.0.0.5", ["1.1.1.1, 198.51.100.9"], None, PROXIES) == "198.51.100.9"
    # Two trusted hops (one IPv6), each vouching for the next address to its left; the header twice.
    assert resolve("10.0.0.5", ["1.1.1.1, 198.51.100.9", "fd00::3, 10.0.0.7"], None, PROXIES) == "198.51.100.9"
    # X-Real-Ip only without X-Forwarded-For, and only from a trusted peer.
    assert resolve("10.0.0.5", [], "198.51.100.3", PROXIES) == "198.51.100.3"
    assert resolve("10.0.0.5", ["198.51.100.9"], "198.51.100.3", PROXIES) == "198.51.100.9"
    # The peer itself spelled as an IPv4-mapped IPv6 address is still the trusted proxy.
    assert resolve("::ffff:10.0.0.5", ["198.51.100.9"], None, PROXIES) == "198.51.100.9"


def test_a_hop_that_is_not_an_address_stops_at_the_last_trusted_one() -> None:
    assert resolve("10.0.0.5", ["198.51.100.9, garbage"], None, PROXIES) == "10.0.0.5"
    assert resolve("10.0.0.5", ["garbage, 10.0.0.7"], None, PROXIES) == "10.0.0.7"
    assert resolve("10.0.0.5", [], "garbage", PROXIES) == "10.0.0.5"
    assert resolve("10.0.0.5", ["10.0.0.8, 10.0.0.7"], None, PROXIES) == "10.0.0.8"  # all trusted: the left-most


def test_the_login_limit_counts_ipv6_by_its_64_and_ipv4_mapped_as_ipv4() -> None:
    spellings = ["2001:db8:1:2::1", "2001:DB8:1:2::1", "2001:db8:1:2:0:0:0:1", "[2001:db8:1:2::1]:443",
                 "2001:db8:1:2::2", "2001:db8:1:2:ffff:ffff:ffff:ffff"]
    assert {rate_limit_bucket(text) for text in spellings} == {"2001:db8:1:2::/64"}
    assert rate_limit_bucket("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert rate_limit_bucket("::ffff:203.0.113.7") == rate_limit_bucket("203.0.113.7") == "203.0.113.7"


def test_admit_login_charges_the_bucket(store: FakeStore, signer: TokenSigner) -> None:
    auth = Authenticator(signer, store, AuthSettings(login_rate_limit_per_minute=5))
    asyncio.run(auth.admit_login("", "2001:db8:1:2::1"))
    asyncio.run(auth.admit_login("", "::ffff:203.0.113.7"))
    assert store.called("take_login") == ["address:2001:db8:1:2::/64", "address:203.0.113.7"]
