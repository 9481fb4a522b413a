"""Where the pool may connect: the ``network`` policy for URLs that clients choose.

Input URLs and webhooks are chosen by whoever sends a prediction, so by default the pool
refuses to connect to addresses that only make sense from inside the host or its network:
loopback, private (RFC 1918, RFC 4193, carrier-grade NAT), link-local, multicast,
unspecified, reserved and documentation ranges, and the cloud metadata services
(169.254.169.254, fd00:ec2::254, ...). Otherwise a request could read the instance's cloud
credentials or drive the pool's own ``/shutdown``.

The check is made on the address the socket actually connects to, never on a name checked
earlier: :class:`GuardedResolver` filters every DNS answer inside the aiohttp connector (so a
name that resolves to a public address for a check and a private one for the connect, "DNS
rebinding", cannot slip through), and :func:`client_session` adds a client middleware that
checks literal IP hosts and the scheme on every request *and every redirect hop* (aiohttp
runs client middlewares once per hop; literal IPs never reach a resolver).

Operators who need private targets allow them: ``network.allow_cidrs`` (address ranges),
``network.allow_hosts`` (host names, exact or ``*.suffix``; every address they resolve to is
allowed), or ``network.allow_private: true`` (everything except the metadata addresses, which
only ``allow_cidrs`` can allow). Uploads of output files go to the operator's own
``files.upload_url``: that URL is trusted and not checked.

Also here: :func:`redact_url`, the one way a URL is written to a log line or an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
import socket
import urllib.parse
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from pool.config import NetworkConfig
from pool.errors import PoolError

__all__ = [
    "METADATA_ADDRESSES",
    "GuardedResolver",
    "NetworkPolicy",
    "NetworkRefused",
    "UrlChecker",
    "UrlUnresolvable",
    "client_session",
    "redact_text",
    "redact_url",
    "refusal",
]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services (AWS/GCP/Azure/OpenStack, AWS IPv6, ECS task, Alibaba): the
# address an SSRF is usually after. allow_private does not open them; allow_cidrs can.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
_SCHEMES = frozenset({"http", "https"})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")


class NetworkRefused(PoolError):
    """A URL's address is refused by the network policy; the message names URL and address."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{redact_url(url)} is refused by the network policy: {reason}")
        self.url = url
        self.reason = reason


class UrlUnresolvable(PoolError):
    """A URL's host name does not resolve (or not in time): nothing could ever be sent there."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{redact_url(url)}: {reason}")
        self.url = url
        self.reason = reason


class _AddressRefused(OSError):
    """Raised inside the connector's resolver; :func:`refusal` turns it into NetworkRefused."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(reason)
        self.host = host
        self.reason = reason


def _category(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None when it is one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _category(ip.ipv4_mapped)  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks = (
        ("unspecified", ip.is_unspecified),  # 0.0.0.0 reaches this host on Linux
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private or (ip.version == 4 and ip in _CGNAT)),
        ("non-global", not ip.is_global),
    )
    for name, hit in checks:
        if hit:
            return f"{'an' if name[0] in 'aeiou' else 'a'} {name} address"
    return None


def _fix(reason: str) -> str:
    return (
        f"{reason} (allow it with network.allow_cidrs, network.allow_hosts or "
        "network.allow_private; see docs/configuration.md)"
    )


class NetworkPolicy:
    """The ``network`` section, compiled: which addresses and hosts may be connected to."""

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self.allow_private = config.allow_private
        self.cidrs: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in config.allow_cidrs
        )
        hosts = [h.strip().lower().rstrip(".") for h in config.allow_hosts]
        self.hosts = frozenset(h for h in hosts if not h.startswith("*."))
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))  # ".example.com"

    def host_allowed(self, host: str) -> bool:
        """An allowlisted host name (exact, or under a ``*.suffix`` entry)."""
        name = host.lower().rstrip(".")
        return name in self.hosts or any(name.endswith(s) for s in self.suffixes)

    def address_refusal(self, address: str | IPAddress) -> str | None:
        """Why connecting to ``address`` is refused, or None when it is allowed."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if any(ip in net for net in self.cidrs):
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            if any(ip.ipv4_mapped in net for net in self.cidrs):
                return None
        category = _category(ip)
        if category is None:
            return None
        if self.allow_private and category != "a cloud metadata address":
            return None
        return f"{ip} is {category}"

    def url_refusal(self, url: str) -> str | None:
        """Why ``url`` is refused before any connection: its scheme, or a literal IP host.

        Host names are checked later, on the addresses they resolve to
        (:class:`GuardedResolver`).
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in _SCHEMES:
            return f"scheme {parts.scheme or '(none)'!r} is not http or https"
        host = parts.hostname
        if not host:
            return "the URL has no host"
        if self.host_allowed(host):
            return None
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None  # a name: its addresses are checked when it is resolved
        reason = self.address_refusal(ip)
        return _fix(reason) if reason else None

    def check_url(self, url: str) -> None:
        """Raise :class:`NetworkRefused` when :meth:`url_refusal` refuses ``url``."""
        reason = self.url_refusal(url)
        if reason is not None:
            raise NetworkRefused(url, reason)


class GuardedResolver(AbstractResolver):
    """A resolver that drops the addresses the policy refuses (in the connector itself)."""

    def __init__(self, policy: NetworkPolicy, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._resolver = resolver or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._resolver.resolve(host, port, family)
        if self.policy.host_allowed(host):
            return answers
        allowed: list[ResolveResult] = []
        refused: list[str] = []
        for answer in answers:
            reason = self.policy.address_refusal(answer["host"].split("%", 1)[0])
            if reason is None:
                allowed.append(answer)
            else:
                refused.append(reason)
        if not allowed:
            raise _AddressRefused(
                host, _fix(f"{host} resolves only to refused addresses: {'; '.join(refused)}")
            )
        return allowed

    async def close(self) -> None:
        await self._resolver.close()


Resolve = Callable[[str, int], list[str]]
"""(host, port) -> the addresses it resolves to; blocking (it runs in a worker thread)."""


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]).split("%", 1)[0] for info in infos]


class UrlChecker:
    """Checks a URL a client hands in, before it is accepted (a webhook at submission), as the
    connection will be checked when it is used: its scheme, a literal address, and the
    addresses its host name resolves to. So a client learns at once why nothing would arrive.

    Names are resolved off the event loop, in a few threads of the checker's own (a resolver
    that hangs holds those, never the loop's default executor), each within ``timeout_s``.
    The check at connect time stays (:class:`GuardedResolver`): DNS answers may change.
    """

    def __init__(
        self,
        policy: NetworkPolicy | NetworkConfig,
        *,
        timeout_s: float,
        resolve: Resolve = _getaddrinfo,
        threads: int = 4,
    ) -> None:
        self.policy = policy if isinstance(policy, NetworkPolicy) else NetworkPolicy(policy)
        self.timeout_s = timeout_s
        self._resolve = resolve
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="cog-pool-resolve"
        )

    async def check(self, url: str) -> None:
        """Raise :class:`NetworkRefused` when the policy refuses ``url`` (after resolving its
        host), :class:`UrlUnresolvable` when its host does not resolve within ``timeout_s``."""
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError as e:
            raise NetworkRefused(url, f"the URL cannot be parsed ({e})") from None
        self.policy.check_url(url)  # the scheme and a literal address
        if host is None:
            raise NetworkRefused(url, "the URL has no host")
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            return  # a literal address: check_url judged it
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            addresses = await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._resolve, host, port), self.timeout_s
            )
        except TimeoutError:
            raise UrlUnresolvable(
                url,
                f"its host {host} did not resolve: no answer within {self.timeout_s} s "
                "(network.resolve_timeout_s)",
            ) from None
        except OSError as e:  # socket.gaierror: no such name, no DNS server, ...
            why = e.strerror or str(e) or type(e).__name__
            raise UrlUnresolvable(url, f"its host {host} did not resolve: {why}") from None
        except UnicodeError as e:  # the IDNA codec: an empty label, a label over 63 characters
            raise UrlUnresolvable(
                url, f"its host {_short(host)} is not a valid host name ({e})"
            ) from None
        if not addresses:
            raise UrlUnresolvable(url, f"its host {host} did not resolve: no address")
        if self.policy.host_allowed(host):
            return
        refused = []
        for address in dict.fromkeys(addresses):
            reason = self.policy.address_refusal(address)
            if reason is None:
                return  # the connection will go to an allowed address
            refused.append(reason)
        raise NetworkRefused(
            url, _fix(f"{host} resolves only to refused addresses: {'; '.join(refused)}")
        )

    def close(self) -> None:
        """Let the resolver threads go once the lookups asked for have ended (not waited for;
        each caller still gets its answer or its timeout)."""
        self._executor.shutdown(wait=False)


def _middleware(policy: NetworkPolicy) -> Any:
    async def guard(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        # Runs for the first request and again for every redirect hop.
        policy.check_url(str(request.url))
        return await handler(request)

    return guard


def client_session(policy: NetworkPolicy | NetworkConfig, **kwargs: Any) -> aiohttp.ClientSession:
    """An aiohttp session that connects only where ``policy`` allows (redirects included).

    Requests it refuses raise :class:`NetworkRefused` (a literal address or a scheme) or an
    aiohttp connection error that :func:`refusal` recognises (a name's addresses).
    """
    if isinstance(policy, NetworkConfig):
        policy = NetworkPolicy(policy)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy))
    return aiohttp.ClientSession(
        connector=connector, middlewares=(_middleware(policy),), trust_env=False, **kwargs
    )


def refusal(exc: BaseException, url: str) -> NetworkRefused | None:
    """The policy refusal behind ``exc`` (raised by a guarded session), else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, NetworkRefused):
            return current
        if isinstance(current, _AddressRefused):
            return NetworkRefused(url, current.reason)
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, _AddressRefused):
            return NetworkRefused(url, os_error.reason)
        current = current.__cause__ or current.__context__
    return None


def redact_url(url: str) -> str:
    """A URL fit for a log line or an error: no credentials, no query, no fragment.

    Signed URLs and webhook URLs carry their secrets in the query string or the user info.
    ``data:`` URIs are shortened to their first 32 characters.
    """
    if url.startswith("data:"):
        return url[:32] + "..." if len(url) > 32 else url
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparseable URL)"
    if ":" in host:
        host = f"[{host}]"
    if port:
        host = f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_text(text: str) -> str:
    """``text`` (an exception's message, say) with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
