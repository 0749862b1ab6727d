"""SSRF guard for query_url: the model chooses the URLs, so a fetch must never reach the cluster itself.

A policy model can write (or be led by a page to write) http://127.0.0.1:6379/, http://10.0.0.5/,
http://169.254.169.254/latest/meta-data/ or a hostname that resolves to one of them. Every URL
is checked twice:

1. `check_url` (pure, no I/O): scheme, host, port, credentials, and the address itself when the
   host is an IP literal in any spelling that the C resolver accepts (2130706433, 0x7f.1, 0177.1,
   [::ffff:127.0.0.1]). The URL is parsed with yarl, the parser aiohttp itself uses, so the host
   checked is the host connected to (no parser-differential tricks).
2. Name resolution: every address a hostname resolves to is checked, and the fetch is refused if
   ANY of them is non-public. `GuardedResolver` does this inside the aiohttp connector, so the
   addresses checked are the very addresses connected to: there is no second lookup that a
   DNS-rebinding server could answer differently.

Operator escape hatches: `allow_hosts` lists exact hosts, as written in URLs, that skip the address
checks (tests allow "127.0.0.1"; a run may allow an intranet mirror); `allow_private` admits private,
loopback and link-local ranges. Neither ever admits a cloud metadata endpoint (by name or by any
spelling of its address), which no research page lives on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from rollout.tools.base import ToolError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host -> the IP addresses it resolves to, as strings. The default is the system resolver; tests
# inject a dict-backed one to map fake names to loopback or private addresses.
Resolver = Callable[[str], Awaitable[Sequence[str]]]

ALLOWED_SCHEMES = frozenset({"http", "https"})

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog"})

_SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Hosts that glibc's inet_aton would read as an IPv4 address (decimal, octal, hex, 1-4 parts).
# Restricting the characters first matters: inet_aton also accepts "127.0.0.1 anything".
_NUMERIC_HOST = re.compile(r"^[0-9a-fx.]+$")

_METADATA_REASON = "a cloud metadata address"


class FetchRefused(ToolError):
    """The URL points somewhere the web backend must not go; the model reads the reason."""


@dataclass(frozen=True)
class ParsedTarget:
    url: URL  # what to request; an IP-literal host is rewritten to its canonical form
    scheme: str
    host: str  # lower case, no trailing dot, no IPv6 brackets; canonical for IP literals
    port: int
    ip: IPAddress | None  # set when the host is an IP literal


def normalize_host(host: str) -> str:
    """The comparison form of a host: lower case, no trailing dot, IPv6 without brackets."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    return h


def normalize_allow_hosts(hosts: Iterable[str]) -> frozenset[str]:
    """allow_hosts entries in the comparison form of normalize_host.

    Matching is on the host as written, not on the address: allowing "127.0.0.1" does not allow
    "2130706433" or "[::ffff:127.0.0.1]", which only a trick would write.
    """
    return frozenset(normalize_host(h) for h in hosts)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host names without DNS, or None for a real hostname.

    Accepts everything getaddrinfo would treat as numeric: canonical IPv4/IPv6 and the legacy
    IPv4 spellings inet_aton reads (2130706433, 0x7f000001, 0177.0.0.1, 127.1, 0x7f.1).
    """
    h = normalize_host(host)
    if not h:
        return None
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(h):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and would be routed to (mapped, 6to4, NAT64)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_problem(ip: IPAddress) -> str | None:
    """Why a fetch may not connect to `ip` (e.g. "a loopback address"), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    inner = _embedded_ipv4(ip)
    if inner is not None:
        problem = address_problem(inner)
        return f"{problem} (embedded in {ip})" if problem else None
    if ip in METADATA_ADDRESSES:
        return _METADATA_REASON
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_SPACE:
        return "in the shared address space 100.64.0.0/10"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a public address"
    return None


def is_metadata_host(host: str) -> bool:
    """A cloud metadata endpoint by name, or by any spelling of its address."""
    name = normalize_host(host)
    if name in METADATA_HOSTS:
        return True
    ip = parse_ip_literal(name)
    problem = address_problem(ip) if ip is not None else None
    return problem is not None and problem.startswith(_METADATA_REASON)


def refusal_reason(host: str, ip: IPAddress, *, allow_hosts: frozenset[str], allow_private: bool) -> str | None:
    """The reason to refuse connecting to `ip` for `host` under the policy, or None to allow it.

    Neither escape hatch opens a cloud metadata address: an allowed host that resolves to one is
    refused like any other (a rebinding DNS answer is exactly how an allowed name would get there).
    """
    problem = address_problem(ip)
    if problem is None:
        return None
    if problem.startswith(_METADATA_REASON):
        return problem
    if host in allow_hosts or allow_private:
        return None
    return problem


def check_url(
    url: str | URL, *, allow_hosts: frozenset[str] = frozenset(), allow_private: bool = False
) -> ParsedTarget:
    """Validate a URL before any I/O: http(s), a host, a valid port, no credentials, no refused IP literal."""
    allowed = normalize_allow_hosts(allow_hosts)
    shown = str(url)[:200]
    try:
        u = url if isinstance(url, URL) else URL(url.strip())
    except (ValueError, TypeError) as e:
        raise FetchRefused(f"not a valid URL: {shown!r} ({e})") from None
    scheme = (u.scheme or "").lower()
    if scheme not in ALLOWED_SCHEMES:
        what = f"the scheme {scheme!r}" if scheme else "a URL without a scheme"
        raise FetchRefused(f"refusing to fetch {shown}: {what} is not allowed; use http:// or https://")
    raw_host = u.raw_host or ""
    # yarl keeps an IPv6 zone percent-encoded in raw_host; the decoded form parses as an address.
    host = normalize_host(u.host if ":" in raw_host and u.host else raw_host)
    if not host:
        raise FetchRefused(f"refusing to fetch {shown}: the URL has no host")
    if u.user is not None or u.password is not None:
        raise FetchRefused(f"refusing to fetch {shown}: URLs with user:password@ credentials are not fetched")
    try:
        port = u.port
    except ValueError:
        raise FetchRefused(f"refusing to fetch {shown}: invalid port") from None
    if port is None or not 1 <= port <= 65535:
        raise FetchRefused(f"refusing to fetch {shown}: invalid port {port}")
    ip = parse_ip_literal(host)
    if ip is not None:
        reason = refusal_reason(host, ip, allow_hosts=allowed, allow_private=allow_private)
        if reason is not None:
            raise FetchRefused(f"refusing to fetch {shown}: {ip} is {reason}")
        canonical = str(ip)
        if canonical != host or u.raw_host != canonical:
            # aiohttp rejects legacy numeric spellings; the canonical form fetches the same address.
            u = u.with_host(canonical)
        host = canonical
    elif host in METADATA_HOSTS:
        raise FetchRefused(f"refusing to fetch {shown}: {host} is {_METADATA_REASON}")
    return ParsedTarget(url=u, scheme=scheme, host=host, port=port, ip=ip)


async def system_resolve(host: str) -> list[str]:
    """The addresses getaddrinfo gives for `host`, in its order, without duplicates."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def checked_addresses(
    host: str,
    resolver: Resolver | None = None,
    *,
    allow_hosts: frozenset[str] = frozenset(),
    allow_private: bool = False,
) -> list[IPAddress]:
    """Resolve `host` and return its addresses, refusing if ANY of them is refused by the policy.

    One refused address is enough: a client picks among the answers, and an attacker who
    controls the DNS decides which one it picks.
    """
    allowed = normalize_allow_hosts(allow_hosts)
    name = normalize_host(host)
    literal = parse_ip_literal(name)
    if literal is not None:
        reason = refusal_reason(name, literal, allow_hosts=allowed, allow_private=allow_private)
        if reason is not None:
            raise FetchRefused(f"refusing to connect to {literal}: it is {reason}")
        return [literal]
    if name in METADATA_HOSTS:
        raise FetchRefused(f"refusing to connect to {name}: it is {_METADATA_REASON}")
    try:
        answers = await (resolver or system_resolve)(name)
    except (OSError, UnicodeError) as e:
        raise ToolError(f"could not resolve host {name!r} ({type(e).__name__})") from None
    if not answers:
        raise ToolError(f"could not resolve host {name!r}: no addresses")
    addresses: list[IPAddress] = []
    for answer in answers:
        try:
            ip = ipaddress.ip_address(answer)
        except ValueError:
            raise ToolError(f"could not resolve host {name!r}: the resolver returned {answer!r}") from None
        reason = refusal_reason(name, ip, allow_hosts=allowed, allow_private=allow_private)
        if reason is not None:
            raise FetchRefused(f"refusing to connect to {name}: it resolves to {ip}, {reason}")
        addresses.append(ip)
    return addresses


async def resolve_and_check(
    url: str | URL,
    resolver: Resolver | None = None,
    *,
    allow_hosts: frozenset[str] = frozenset(),
    allow_private: bool = False,
) -> list[IPAddress]:
    """check_url, then the addresses the URL's host resolves to, all of them allowed."""
    target = check_url(url, allow_hosts=allow_hosts, allow_private=allow_private)
    return await checked_addresses(target.host, resolver, allow_hosts=allow_hosts, allow_private=allow_private)


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that returns only addresses the policy allows, so connections are pinned to them.

    aiohttp never calls a resolver for IP-literal hosts; check_url covers those before the request.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        allow_hosts: Iterable[str] = (),
        allow_private: bool = False,
    ):
        self._resolver = resolver
        self._allow_hosts = normalize_allow_hosts(allow_hosts)
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await checked_addresses(
            host, self._resolver, allow_hosts=self._allow_hosts, allow_private=self._allow_private
        )
        results: list[ResolveResult] = []
        for ip in addresses:
            fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            if family not in (socket.AF_UNSPEC, fam):
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(ip),
                    port=port,
                    family=fam,
                    proto=0,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not results:
            raise ToolError(f"could not resolve host {host!r}: no address of the requested family")
        return results

    async def close(self) -> None:
        return None
