import asyncio
import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.tools.base import ToolError
from rollout.tools.fetch_guard import (
    FetchRefused,
    GuardedResolver,
    address_problem,
    check_url,
    checked_addresses,
    parse_ip_literal,
    resolve_and_check,
)


def run(coro):
    return asyncio.run(coro)


def fake_resolver(table: dict[str, list[str]]):
    calls: list[str] = []

    async def resolve(host: str) -> list[str]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    resolve.calls = calls
    return resolve


NON_PUBLIC_V4 = [
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "100.64.0.0/10", "224.0.0.0/4", "0.0.0.0/8", "240.0.0.0/4",
]
NON_PUBLIC_V6 = ["::1/128", "fc00::/7", "fe80::/10", "ff00::/8"]


def in_network(cidr: str):
    net = ipaddress.ip_network(cidr)
    return st.integers(0, net.num_addresses - 1).map(lambda i: net[i])


non_public_v4 = st.one_of(*[in_network(c) for c in NON_PUBLIC_V4])
non_public_v6 = st.one_of(*[in_network(c) for c in NON_PUBLIC_V6])
public_v4 = (
    # 11.0.0.0-223.255.255.255: mostly global, so the filter below rejects few draws (Hypothesis
    # favours small integers, which over the whole range would all be 0.0.0.x).
    st.integers(11 << 24, (224 << 24) - 1)
    .map(ipaddress.IPv4Address)
    .filter(lambda ip: ip.is_global and not ip.is_multicast and ip not in ipaddress.ip_network("100.64.0.0/10"))
)


def spellings(ip: ipaddress.IPv4Address) -> list[str]:
    """Ways to write one IPv4 address in a URL host that getaddrinfo/inet_aton accept."""
    octets = str(ip).split(".")
    n = int(ip)
    return [
        str(ip),
        str(n),  # decimal
        f"0x{n:08x}",  # hex
        ".".join(f"0{int(o):o}" for o in octets),  # octal parts
        f"{octets[0]}.{n & 0xFFFFFF}",  # a.b form
        f"0x{int(octets[0]):x}.{n & 0xFFFFFF}",
        f"{str(ip)}.",  # trailing dot
        f"[::ffff:{ip}]",  # IPv4-mapped IPv6
    ]


# -- check_url: pure checks ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(non_public_v4, st.integers(0, 7))
def test_every_spelling_of_a_non_public_ipv4_is_refused(ip, which):
    host = spellings(ip)[which]
    with pytest.raises(FetchRefused):
        check_url(f"http://{host}/x")


@settings(max_examples=100, deadline=None)
@given(non_public_v6)
def test_non_public_ipv6_literals_are_refused(ip):
    with pytest.raises(FetchRefused):
        check_url(f"http://[{ip}]:8080/")


@settings(max_examples=150, deadline=None)
@given(public_v4, st.integers(0, 7))
def test_public_ipv4_passes_in_any_spelling_and_is_canonicalised(ip, which):
    host = spellings(ip)[which]
    target = check_url(f"https://{host}/page?q=1")
    if which == 7:  # the mapped form stays IPv6; it still names the same public address
        assert target.ip.ipv4_mapped == ip
    else:
        assert target.ip == ip
        assert target.host == str(ip)
        assert target.url.host == str(ip)
    assert target.url.path == "/page" and target.url.query_string == "q=1"


@settings(max_examples=100, deadline=None)
@given(non_public_v4.filter(lambda ip: ip != ipaddress.ip_address("169.254.169.254")))
def test_allow_private_admits_private_ranges(ip):
    assert check_url(f"http://{ip}/", allow_private=True).ip == ip


@settings(max_examples=100, deadline=None)
@given(st.one_of(non_public_v4, non_public_v6))
def test_address_problem_names_every_non_public_address_and_embedded_forms(ip):
    assert address_problem(ip) is not None
    if ip.version == 4:
        assert address_problem(ipaddress.IPv6Address(f"::ffff:{ip}")) is not None  # IPv4-mapped
        assert address_problem(ipaddress.IPv6Address(f"64:ff9b::{ip}")) is not None  # NAT64
        sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80))
        assert address_problem(sixtofour) is not None


@settings(max_examples=100, deadline=None)
@given(public_v4)
def test_address_problem_passes_public_addresses(ip):
    assert address_problem(ip) is None
    assert address_problem(ipaddress.IPv6Address(f"::ffff:{ip}")) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.google.internal./computeMetadata/v1/",
    ],
)
def test_metadata_endpoints_are_refused_even_with_allow_private(url):
    with pytest.raises(FetchRefused, match="metadata"):
        check_url(url, allow_private=True)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///etc/passwd", "scheme"),
        ("ftp://example.com/x", "scheme"),
        ("gopher://example.com:70/", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("//example.com/x", "scheme"),
        ("http:///path-only", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com:0/", "port"),
        ("http://example.com:99999/", "valid URL"),
        ("http://127.0.0.1\\@example.com/", "valid URL"),
    ],
)
def test_malformed_or_unsupported_urls_are_refused_with_a_reason(url, why):
    with pytest.raises(FetchRefused, match=why):
        check_url(url)


def test_refusal_is_a_tool_error_the_model_can_read():
    with pytest.raises(ToolError, match=r"127\.0\.0\.1 is a loopback address"):
        check_url("http://2130706433/")


def test_allow_hosts_matches_the_host_as_written_not_other_spellings_of_its_address():
    allow = frozenset({"127.0.0.1", "LocalHost."})
    assert check_url("http://127.0.0.1:8080/", allow_hosts=allow).port == 8080
    assert check_url("http://localhost/", allow_hosts=allow).host == "localhost"
    for trick in ["http://0x7f.1/", "http://2130706433/", "http://[::ffff:127.0.0.1]/", "http://127.0.0.2/"]:
        with pytest.raises(FetchRefused, match="loopback"):
            check_url(trick, allow_hosts=allow)


def test_parse_ip_literal_leaves_hostnames_alone():
    for name in ["example.com", "cafe.face", "deadbeef", "1.2.3.4.5", "0x.com", "a.b.c.d"]:
        assert parse_ip_literal(name) is None, name
    assert str(parse_ip_literal("0177.0.0.1")) == "127.0.0.1"
    assert str(parse_ip_literal("[::1]")) == "::1"


def test_unicode_digits_that_idna_folds_into_a_loopback_address_are_refused():
    with pytest.raises(FetchRefused, match="loopback"):
        check_url("http://①②⑦.0.0.1/")


# -- resolution ----------------------------------------------------------------------------------


def test_a_hostname_resolving_to_any_non_public_address_is_refused():
    resolver = fake_resolver({
        "public.test": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        "mixed.test": ["93.184.216.34", "10.0.0.7"],
        "rebind.test": ["::ffff:127.0.0.1"],
        "meta.test": ["169.254.169.254"],
    })
    ips = run(resolve_and_check("https://public.test/a", resolver))
    assert [str(i) for i in ips] == ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    with pytest.raises(FetchRefused, match=r"mixed\.test.*10\.0\.0\.7, a private address"):
        run(resolve_and_check("https://mixed.test/", resolver))
    with pytest.raises(FetchRefused, match="loopback"):
        run(resolve_and_check("http://rebind.test/", resolver))
    with pytest.raises(FetchRefused, match="metadata"):
        run(resolve_and_check("http://meta.test/", resolver, allow_private=True))


@settings(max_examples=60, deadline=None)
@given(st.lists(public_v4, max_size=3), non_public_v4, st.lists(public_v4, max_size=3))
def test_one_bad_address_among_many_is_enough_to_refuse(before, bad, after):
    answers = [str(i) for i in [*before, bad, *after]]
    resolver = fake_resolver({"h.test": answers})
    with pytest.raises(FetchRefused):
        run(checked_addresses("h.test", resolver))
    if address_problem(bad).startswith("a cloud metadata address"):
        with pytest.raises(FetchRefused, match="metadata"):  # not even for an allowed host
            run(checked_addresses("h.test", resolver, allow_hosts=frozenset({"h.test"})))
    else:
        assert run(checked_addresses("h.test", resolver, allow_hosts=frozenset({"h.test"})))


def test_allow_hosts_is_by_name_not_by_address():
    # Allowing 127.0.0.1 must not allow every name that resolves to it.
    resolver = fake_resolver({"evil.test": ["127.0.0.1"], "ok.test": ["127.0.0.1"]})
    allow = frozenset({"127.0.0.1", "ok.test"})
    with pytest.raises(FetchRefused):
        run(resolve_and_check("http://evil.test/", resolver, allow_hosts=allow))
    assert [str(i) for i in run(resolve_and_check("http://ok.test/", resolver, allow_hosts=allow))] == ["127.0.0.1"]


def test_resolution_failures_are_tool_errors_not_refusals():
    resolver = fake_resolver({"empty.test": [], "junk.test": ["not-an-ip"]})
    for host in ["missing.test", "empty.test", "junk.test"]:
        with pytest.raises(ToolError, match="could not resolve") as err:
            run(resolve_and_check(f"http://{host}/", resolver))
        assert not isinstance(err.value, FetchRefused)


def test_ip_literals_do_not_touch_the_resolver():
    resolver = fake_resolver({})
    assert [str(i) for i in run(resolve_and_check("http://8.8.8.8/", resolver))] == ["8.8.8.8"]
    assert resolver.calls == []


def test_guarded_resolver_returns_only_the_checked_addresses_of_the_asked_family():
    resolver = fake_resolver({"dual.test": ["93.184.216.34", "2606:2800:220:1::1"], "bad.test": ["10.1.2.3"]})
    guard = GuardedResolver(resolver)

    async def scenario():
        both = await guard.resolve("dual.test", 443, socket.AF_UNSPEC)
        v4 = await guard.resolve("dual.test", 443, socket.AF_INET)
        with pytest.raises(FetchRefused):
            await guard.resolve("bad.test", 80, socket.AF_UNSPEC)
        return both, v4

    both, v4 = run(scenario())
    assert [(r["host"], r["port"], r["family"]) for r in both] == [
        ("93.184.216.34", 443, socket.AF_INET),
        ("2606:2800:220:1::1", 443, socket.AF_INET6),
    ]
    assert [r["host"] for r in v4] == ["93.184.216.34"]
    assert all(r["hostname"] == "dual.test" for r in both)


@pytest.mark.parametrize("answer", ["169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254", "100.100.100.200"])
def test_an_allowed_host_resolving_to_a_metadata_address_is_refused(answer):
    resolver = fake_resolver({"mirror.intranet": [answer]})
    allow = frozenset({"mirror.intranet"})
    with pytest.raises(FetchRefused, match="metadata"):
        run(resolve_and_check("http://mirror.intranet/", resolver, allow_hosts=allow))
    with pytest.raises(FetchRefused, match="metadata"):
        run(resolve_and_check("http://mirror.intranet/", resolver, allow_hosts=allow, allow_private=True))


@pytest.mark.parametrize(
    "host", ["169.254.169.254", "0xa9fea9fe", "[::ffff:169.254.169.254]", "metadata.google.internal"]
)
def test_allow_hosts_cannot_name_a_metadata_endpoint(host):
    from pydantic import ValidationError

    from rollout.tools.web import WebToolsSettings

    with pytest.raises(FetchRefused, match="metadata"):
        check_url(f"http://{host}/latest/meta-data/", allow_hosts=frozenset({host.strip("[]")}))
    with pytest.raises(ValidationError, match="cloud metadata endpoint"):
        WebToolsSettings(allow_hosts=[host])
