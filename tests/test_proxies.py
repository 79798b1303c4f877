"""Which address X-Forwarded-For names, and when it is believed."""

from __future__ import annotations

import ipaddress

import pytest

from sparc.proxies import TrustedProxies, parse_address

PROXIES = TrustedProxies([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")])


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1:4711 ", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("unknown", None),
        ("", None),
        ("192.0.2.1; DROP TABLE users", None),
    ],
)
def test_addresses_are_read_as_proxies_write_them(text: str, address: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed is not None else None) == address


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("192.0.2.50", ["203.0.113.1"], "192.0.2.50"),  # an untrusted peer: header ignored
        ("10.1.2.3", ["203.0.113.1"], "203.0.113.1"),
        ("10.1.2.3", ["198.51.100.9, 203.0.113.1"], "203.0.113.1"),  # the client's own entry
        ("10.1.2.3", ["203.0.113.1, 10.9.9.9"], "203.0.113.1"),  # a second trusted tier
        ("10.1.2.3", ["203.0.113.1", "10.9.9.9"], "203.0.113.1"),  # two headers
        ("10.1.2.3", ["10.7.7.7, 10.9.9.9"], "10.7.7.7"),  # every hop trusted
        ("10.1.2.3", ["not-an-address"], "10.1.2.3"),  # a broken chain is not believed
        ("::1", ["2001:db8::5"], "2001:db8::5"),
    ],
)
def test_the_client_is_the_rightmost_entry_not_a_trusted_proxy(
    peer: str, forwarded_for: list[str], client: str
) -> None:
    assert PROXIES.client_address(peer, forwarded_for) == client
